"""Console lines, TensorBoard and W&B scalars, written by one rank (the last stage's first)."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import IO, Any

log = logging.getLogger("salt_megatron")


def setup_console(is_logging_rank: bool) -> None:
    """Log INFO from the logging rank and WARNING from the others, to stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_logging_rank else logging.WARNING)
    log.propagate = False


class MetricsWriter:
    """Formats a step's metrics for the console and writes them to TensorBoard (and to a W&B run,
    ``wandb_run``, when the logging rank started one)."""

    def __init__(
        self,
        tensorboard_dir: str | None,
        enabled: bool,
        metrics_file: str | None = None,
        wandb_run: Any = None,
    ) -> None:
        self.enabled = enabled
        self._wandb = wandb_run
        self._tb: Any = None
        self._jsonl: IO[str] | None = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        if enabled and metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self._jsonl = open(metrics_file, "a")  # noqa: SIM115 - held open for the run

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Write ``values`` as TensorBoard (and W&B) scalars ``prefix + name``, and a JSON line."""
        if self._jsonl is not None:
            record = {"step": step, "group": prefix.rstrip("/"), **values}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({prefix + name: value for name, value in values.items()}, step=step)
        if self._tb is None:
            return
        for name, value in values.items():
            self._tb.add_scalar(prefix + name, value, step)

    def console(self, step: int, total: int, values: dict[str, float]) -> None:
        """One console line: ``step N/M | name value | ...``."""
        if not self.enabled:
            return
        parts = [f"step {step}/{total}"] + [f"{k} {_fmt(v)}" for k, v in values.items()]
        log.info(" | ".join(parts))

    def close(self) -> None:
        """Flush and close the event file; finish the W&B run."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3e}"
