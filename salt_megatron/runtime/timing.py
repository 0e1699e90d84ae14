"""Wall-clock of device work without host synchronisation on the hot path.

On a GPU, ``time.perf_counter()`` around a kernel launch measures the launch, not the work, and
``torch.cuda.synchronize()`` to fix that stalls the host once per call. :class:`DeviceTimer`
records a pair of CUDA events per interval instead and reads their elapsed times only when asked
(:meth:`DeviceTimer.take_seconds`, once per log window): one host wait per window, none per
interval. On the CPU the work is synchronous and ``perf_counter`` is exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class DeviceTimer:
    """Accumulates the duration of timed blocks on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._seconds = 0.0

    @contextmanager
    def time(self) -> Iterator[None]:
        """Time the device work launched inside the block (no host sync)."""
        if not self.on_gpu:
            start = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - start
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._events.append((begin, end))

    def take_seconds(self) -> float:
        """Seconds timed since the last call; on GPU waits for the last recorded event once."""
        seconds, self._seconds = self._seconds, 0.0
        if self._events:
            self._events[-1][1].synchronize()
            seconds += sum(b.elapsed_time(e) for b, e in self._events) / 1000.0
            self._events.clear()
        return seconds
