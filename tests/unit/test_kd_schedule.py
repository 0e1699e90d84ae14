"""KD weight schedules against their closed forms, at chosen steps including n_kd and past it."""

from __future__ import annotations

import pytest

from salt_megatron.config import DistillConfig
from salt_megatron.distill.schedule import in_kd_phase, kd_weight, weight_for

W0, N = 0.6, 100


@pytest.mark.parametrize("t", [0, 1, 37, 99, 100, 101, 10_000])
def test_step(t: int) -> None:
    assert kd_weight(t, W0, N, "step") == (W0 if t < N else 0.0)


@pytest.mark.parametrize(
    "t, expected", [(0, 0.6), (25, 0.45), (50, 0.3), (99, 0.006), (100, 0.0), (150, 0.0)]
)
def test_linear(t: int, expected: float) -> None:
    assert kd_weight(t, W0, N, "linear") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("t", [0, 10, 50, 90, 99, 100, 200])
def test_linear_ratio(t: int) -> None:
    r0 = W0 / (1 - W0)  # 1.5
    r = r0 * max(0.0, 1 - t / N)
    expected = r / (1 + r)
    got = kd_weight(t, W0, N, "linear_ratio")
    assert got == pytest.approx(expected, abs=1e-12)
    if t == 50:  # r = 0.75 -> w = 3/7
        assert got == pytest.approx(3 / 7, abs=1e-12)


def test_decay_start_holds_w0_then_decays() -> None:
    assert kd_weight(20, W0, N, "linear", decay_start=40) == W0
    assert kd_weight(40, W0, N, "linear", decay_start=40) == W0
    assert kd_weight(70, W0, N, "linear", decay_start=40) == pytest.approx(W0 * 0.5)
    assert kd_weight(100, W0, N, "linear", decay_start=40) == 0.0


def test_ratio_decays_slower_than_linear_late() -> None:
    # w/(1-w) linear keeps more weight than w linear in the middle (w0 = 0.6): 3/7 > 0.3
    assert kd_weight(50, W0, N, "linear_ratio") > kd_weight(50, W0, N, "linear")


def test_config_wiring() -> None:
    off = DistillConfig()
    assert weight_for(off, 0) == 0.0 and not in_kd_phase(off, 0)
    on = DistillConfig(kd_teacher_load="/ckpt", kd_steps=10, kd_weight=0.5, kd_schedule="step")
    assert weight_for(on, 9) == 0.5 and weight_for(on, 10) == 0.0
    assert in_kd_phase(on, 9) and not in_kd_phase(on, 10)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="cosine"):
        kd_weight(1, W0, N, "cosine")
