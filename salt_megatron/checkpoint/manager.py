"""The trainer's checkpoint policy: resume, periodic saves, early exit, the final save.

``run.py`` builds one :class:`Checkpointer` per job, calls :meth:`Checkpointer.resume` before
training, installs :meth:`Checkpointer.after_step` as the trainer's per-step hook and calls
:meth:`Checkpointer.finish` at the end.

With ``--async-save`` a save returns once its writer process is forked; :meth:`after_step`
finalizes (commits) it at the first step after every rank's writer is done, a new save first waits
for the previous one, and :meth:`finish` and :meth:`close` wait for the last, so a job never exits
with a save in flight. A crash before the commit leaves the previous checkpoint the latest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from salt_megatron.checkpoint import files, trainer_state
from salt_megatron.runtime.signals import StopConditions

log = logging.getLogger("salt_megatron")


class Checkpointer:
    """Saves and restores one trainer according to the ``checkpoint`` and ``training`` configs.

    ``extra_fn`` returns a JSON-able dict stored in each checkpoint's ``salt_meta.json`` under
    ``extra`` (e.g. the KD phase); :attr:`loaded_extra` is the one read back by :meth:`resume`.
    """

    def __init__(
        self,
        trainer: Any,
        tokenizer_fingerprint: str,
        extra_fn: Callable[[], dict[str, Any]] | None = None,
        install_signal: bool = True,
    ) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg.checkpoint
        self.fingerprint = tokenizer_fingerprint
        self.extra_fn = extra_fn
        self.stop = StopConditions(trainer.cfg.training, self.cfg, install_signal=install_signal)
        self.last_saved: int | None = None
        self.loaded_extra: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.async_queue: Any = None
        if self.cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue(persistent=False)  # fork: a snapshot per save
        self.pending: tuple[str, float] | None = None
        """The async save in flight: its directory and when it started."""
        self.blocked_seconds: list[float] = []
        """Training time each save blocked (the save call; the wait for a previous async one)."""

    def resume(self) -> int | None:
        """Load the latest checkpoint under ``--load`` if there is one; returns its step."""
        if not self.cfg.load:
            return None
        resolved = files.resolve(self.cfg.load, self.cfg.fallback_to_previous)
        if resolved is None:
            log.info(f"no checkpoint in --load {self.cfg.load}: starting from step 0")
            return None
        meta = trainer_state.load(self.trainer, resolved, self.fingerprint)
        self.loaded_extra = dict(meta.get("extra") or {})
        self.last_saved = resolved.step if self.cfg.load == self.cfg.save else None
        log.info(
            f"resumed from {resolved.path}: step {resolved.step}, "
            f"{self.trainer.consumed_samples} samples consumed, "
            f"{self.trainer.skipped_steps} skipped steps"
        )
        return resolved.step

    def save(self) -> None:
        """Save now (every rank); no-op without ``--save``. Async: after the previous save ends."""
        if not self.cfg.save:
            return
        start = time.perf_counter()
        self.wait()
        extra = self.extra_fn() if self.extra_fn is not None else {}
        path = trainer_state.save(
            self.trainer,
            self.cfg.save,
            self.cfg.keep_last,
            self.fingerprint,
            extra,
            async_queue=self.async_queue,
        )
        self.last_saved = self.trainer.step
        blocked = time.perf_counter() - start
        self.blocked_seconds.append(blocked)
        if self.async_queue is None:
            log.info(f"saved checkpoint {path} ({blocked:.2f} s)")
        else:
            self.pending = (path, start)
            log.info(
                f"saving checkpoint {path} in the background (training blocked {blocked:.2f} s)"
            )

    def finalize(self, blocking: bool) -> None:
        """Commit the async save in flight once every rank has written it (collective).

        ``blocking`` waits for it; otherwise it is committed only if every writer is done.
        """
        if self.async_queue is None or self.pending is None:
            return
        if self.async_queue.maybe_finalize_async_calls(blocking=blocking):
            path, start = self.pending
            self.pending = None
            log.info(
                f"saved checkpoint {path} ({time.perf_counter() - start:.2f} s in the background)"
            )

    def wait(self) -> None:
        """Wait for the async save in flight, if any, and commit it."""
        self.finalize(blocking=True)

    def after_step(self) -> bool:
        """Periodic save, then the stop checks (collective); True when training must stop."""
        self.finalize(blocking=False)
        step = self.trainer.step
        if self.cfg.save_interval and step % self.cfg.save_interval == 0:
            self.save()
        reason = self.stop.check(step)
        if reason is None:
            return False
        self.stop_reason = reason
        if self.last_saved != step:
            self.save()
        self.wait()
        where = f"checkpoint at step {step} in {self.cfg.save}" if self.cfg.save else "no --save"
        log.info(f"exiting early: {reason}; {where}")
        return True

    def finish(self) -> None:
        """The save at the end of training (skipped when this step is already saved), committed."""
        if self.last_saved != self.trainer.step:
            self.save()
        self.wait()

    def close(self) -> None:
        """Commit an async save still in flight; restore the signal handler."""
        try:
            self.wait()
        finally:
            self.stop.close()
