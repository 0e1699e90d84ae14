"""When to stop early: an exit signal, --exit-interval, --exit-duration-in-mins (as Megatron-LM).

A scheduler preempting a job sends a signal (SIGTERM by default, ``--exit-signal``) to every
rank, but not necessarily at the same moment; each rank only records it. After every step the
ranks agree with one all-reduce (MAX) of their flags, so every rank stops after the *same* step,
saves, and exits 0. The wall-clock limit is agreed the same way (clocks differ per rank);
``--exit-interval`` needs no agreement.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

from salt_megatron.config.schema import CheckpointConfig, TrainingConfig


class ExitSignal:
    """Records that ``name`` (e.g. ``"SIGTERM"``) arrived; installed per rank, restorable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signum = signal.Signals[name]
        self.received = False
        self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def restore(self) -> None:
        """Put the previous handler back."""
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None


class StopConditions:
    """Checks, after each step, whether training must save and exit; same answer on every rank."""

    def __init__(
        self,
        training: TrainingConfig,
        checkpoint: CheckpointConfig,
        start_time: float | None = None,
        install_signal: bool = True,
    ) -> None:
        self.exit_interval = training.exit_interval
        self.exit_seconds = (
            None
            if training.exit_duration_in_mins is None
            else 60.0 * training.exit_duration_in_mins
        )
        self.start_time = time.monotonic() if start_time is None else start_time
        self.signal = ExitSignal(checkpoint.exit_signal) if install_signal else None

    def _local_flags(self) -> list[float]:
        got_signal = self.signal is not None and self.signal.received
        elapsed = time.monotonic() - self.start_time
        out_of_time = self.exit_seconds is not None and elapsed > self.exit_seconds
        return [float(got_signal), float(out_of_time)]

    def check(self, step: int) -> str | None:
        """Why training must stop after ``step`` (a message), or None to go on. Collective."""
        flags = self._local_flags()
        if dist.is_initialized() and dist.get_world_size() > 1:
            from salt_megatron.runtime import device

            agreed = torch.tensor(flags, dtype=torch.float32, device=device())
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            flags = agreed.tolist()
        if flags[0]:
            assert self.signal is not None
            return f"received {self.signal.name}"
        if flags[1]:
            return f"--exit-duration-in-mins {self.exit_seconds / 60.0:g} reached"  # type: ignore[operator]
        if self.exit_interval and step % self.exit_interval == 0:
            return f"--exit-interval {self.exit_interval} reached at step {step}"
        return None

    def close(self) -> None:
        """Restore the previous signal handler."""
        if self.signal is not None:
            self.signal.restore()
