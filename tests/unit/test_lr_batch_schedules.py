"""WSD learning rates and the batch-size ramp-up against their closed forms; steps stay steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from salt_megatron.config import parse_config
from salt_megatron.distill.schedule import kd_weight
from salt_megatron.training.batch_schedule import BatchSchedule
from salt_megatron.training.optimizer import build_scheduler
from salt_megatron.training.phase import KDPhase

LR, MIN_LR, WARMUP, ITERS, ANNEAL = 1e-3, 1e-4, 10, 100, 30


def wsd_lr(step: int, style: str) -> float:
    """Warm-up, stable, decay (Hu et al. 2024, "MiniCPM"), with the anneal shapes of Megatron-LM."""
    if step <= WARMUP:
        return LR * step / WARMUP
    start = ITERS - ANNEAL
    if step <= start:
        return LR
    if step > ITERS:
        return MIN_LR
    r = (step - start) / ANNEAL
    shape = {
        "linear": 1 - r,
        "cosine": (1 + math.cos(math.pi * r)) / 2,
        "exponential": 2 * 0.5**r - 1,
        "minus_sqrt": 1 - math.sqrt(r),
    }[style]
    return MIN_LR + (LR - MIN_LR) * shape


@pytest.mark.parametrize("style", ["exponential", "linear", "cosine", "minus_sqrt"])
def test_wsd_learning_rate(style: str) -> None:
    cfg = parse_config(
        ["--mock-data", "--lr", str(LR), "--min-lr", str(MIN_LR), "--lr-warmup-iters",
         str(WARMUP), "--train-iters", str(ITERS), "--lr-decay-style", "WSD",
         "--lr-wsd-decay-style", style, "--lr-wsd-decay-iters", str(ANNEAL),
         "--global-batch-size", "64", "--rampup-batch-size", "16", "16", "1000"]
    )  # fmt: skip
    optimizer = SimpleNamespace(param_groups=[{}])
    scheduler = build_scheduler(cfg, optimizer)  # type: ignore[arg-type]
    lrs = []
    for _ in range(ITERS + 3):  # the trainer steps it once per optimizer step, ramp-up or not
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    expected = [wsd_lr(step, style) for step in range(ITERS + 3)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lrs[ITERS - ANNEAL] == LR and lrs[ITERS] == pytest.approx(MIN_LR)


def ramp_size(consumed: int, start: int, increment: int, samples: int, final: int) -> int:
    """The ramp-up's global batch size after ``consumed`` samples (Megatron-LM's definition)."""
    if consumed > samples:
        return final
    per_increment = samples / ((final - start) // increment)
    return start + int(consumed / per_increment) * increment


@pytest.mark.parametrize("dp", [1, 2])
def test_rampup_batch_sizes_follow_the_formula(dp: int) -> None:
    ramp = (8, 4, 300)  # 8 -> 32 in 6 increments of 4, one every 50 samples
    cfg = parse_config(["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "32",
                        "--rampup-batch-size", *map(str, ramp)])  # fmt: skip
    cfg.validate_world(dp)
    schedule = BatchSchedule(cfg.training, dp)
    consumed, sizes = 0, []
    for step in range(40):
        assert schedule.samples_before(step) == consumed
        gbs, n_micro = schedule.at(consumed)
        assert gbs == ramp_size(consumed, *ramp, 32)
        assert n_micro == gbs // (2 * dp)
        sizes.append(gbs)
        consumed += gbs
    assert sizes[0] == 8 and sizes[-1] == 32 and sorted(sizes) == sizes
    assert set(sizes) == {8, 12, 16, 20, 24, 28, 32}
    assert schedule.samples_before(1000) == consumed + (1000 - 40) * 32  # the closed-form tail


def test_kd_phase_stays_in_steps_across_a_rampup() -> None:
    """The KD weight and the switch depend on the step only; the KD blend's samples on the ramp."""
    argv = ["--mock-data", "--global-batch-size", "16", "--micro-batch-size", "2",
            "--rampup-batch-size", "4", "4", "40", "--kd-teacher-load", "t", "--kd-steps", "6",
            "--kd-weight", "0.6", "--kd-schedule", "linear"]  # fmt: skip
    cfg = parse_config(argv)
    schedule = BatchSchedule(cfg.training, 1)
    kd_samples = schedule.samples_before(6)
    assert kd_samples == 4 + 4 + 4 + 4 + 8 + 8  # 4 more every 40 / 3 samples consumed
    phase = KDPhase(cfg, None, 256, 256, "", "kd-blend", kd_samples=kd_samples)  # type: ignore[arg-type]
    consumed = 0
    for step in range(10):
        assert phase.weight(step) == kd_weight(step, 0.6, 6, "linear")
        dataset, offset = phase.data_position(step, consumed, "main")
        if step < 6:
            assert (dataset, offset) == ("kd-blend", consumed)
        else:
            assert (dataset, offset) == ("main", consumed - kd_samples)
        consumed += schedule.at(consumed)[0]
    assert phase.weight(5) > 0 and phase.weight(6) == 0.0
