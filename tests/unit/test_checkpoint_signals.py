"""Early-exit conditions: exit signal, --exit-interval, --exit-duration-in-mins."""

from __future__ import annotations

import os
import signal
import time

from salt_megatron.config.schema import CheckpointConfig, TrainingConfig
from salt_megatron.runtime.signals import StopConditions


def test_exit_signal_is_recorded_then_handler_restored() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    stop = StopConditions(TrainingConfig(), CheckpointConfig(exit_signal="SIGUSR1"))
    try:
        assert stop.check(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process without the handler
        assert stop.check(2) == "received SIGUSR1"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_exit_interval_and_duration() -> None:
    stop = StopConditions(TrainingConfig(exit_interval=5), CheckpointConfig(), install_signal=False)
    assert [s for s in range(1, 12) if stop.check(s)] == [5, 10]
    late = StopConditions(
        TrainingConfig(exit_duration_in_mins=0.5),
        CheckpointConfig(),
        start_time=time.monotonic() - 31.0,
        install_signal=False,
    )
    assert late.check(1) == "--exit-duration-in-mins 0.5 reached"
    early = StopConditions(
        TrainingConfig(exit_duration_in_mins=0.5), CheckpointConfig(), install_signal=False
    )
    assert early.check(1) is None
