"""``--profile``: a torch.profiler Chrome trace of chosen optimizer steps on chosen ranks.

Megatron-LM's ``--profile --use-pytorch-profiler`` equivalent. Steps are counted as the trainer
counts them (0-based index of the step about to run, resumes included): steps
``--profile-step-start`` up to, not including, ``--profile-step-end`` are recorded on the ranks in
``--profile-ranks``, then the trace is written to
``<--profile-dir>/trace_rank<r>_steps<start>-<end>.json`` (open it in chrome://tracing or
Perfetto). Each step is a ``train_step <n>`` range (``n`` 1-based, as the console counts), each
micro-batch forward a ``forward_step`` range; the backward shows as autograd's
``autograd::engine::evaluate_function: ...`` ranges. CUDA kernels are recorded on GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from salt_megatron.config.schema import LoggingConfig
from salt_megatron.training.logger import log

FORWARD_RANGE = "forward_step"
STEP_RANGE = "train_step"


def trace_path(cfg: LoggingConfig, rank: int) -> str:
    """Where rank ``rank`` writes its trace."""
    directory = cfg.profile_dir or cfg.tensorboard_dir or "profile"
    name = f"trace_rank{rank}_steps{cfg.profile_step_start}-{cfg.profile_step_end}.json"
    return os.path.join(directory, name)


class StepProfiler:
    """Starts torch.profiler before step ``--profile-step-start``, writes the trace after the last.

    Inactive (and free) unless ``--profile`` is set and this rank is in ``--profile-ranks``.
    """

    def __init__(self, cfg: LoggingConfig, rank: int) -> None:
        self.enabled = cfg.profile and rank in cfg.profile_ranks
        self.start, self.end = cfg.profile_step_start, cfg.profile_step_end
        self.path = trace_path(cfg, rank)
        self._prof: profile | None = None

    @property
    def recording(self) -> bool:
        """Whether the profiler is running now."""
        return self._prof is not None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap the optimizer step with 0-based index ``step``."""
        if self.enabled and self._prof is None and self.start <= step < self.end:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities)
            self._prof.start()
        if self._prof is None:
            yield
            return
        with record_function(f"{STEP_RANGE} {step + 1}"):
            yield
        if step + 1 >= self.end:
            self.close()

    def annotate(self, forward_step: Callable[..., Any]) -> Callable[..., Any]:
        """``forward_step`` wrapped in a ``forward_step`` range while recording."""
        if self._prof is None:
            return forward_step

        def annotated(data_iterator: Any, model: Any) -> Any:
            with record_function(FORWARD_RANGE):
                return forward_step(data_iterator, model)

        return annotated

    def close(self) -> str | None:
        """Stop and write the trace if recording (also when training ends early); its path."""
        if self._prof is None:
            return None
        prof, self._prof = self._prof, None
        prof.stop()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        prof.export_chrome_trace(self.path)
        log.warning(f"profiler trace of steps {self.start + 1}-{self.end}: {self.path}")
        return self.path
