"""Bootstrap intervals against the normal-approximation closed forms they converge to."""

from __future__ import annotations

import numpy as np
import pytest

from salt_megatron.eval import intervals

Z95 = 1.959964


def test_accuracy_interval_matches_the_binomial_normal_approximation() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    scores_se = (rng.random((2, n)) < 0.3).astype(np.float64)
    got = intervals.accuracy(scores_se, resamples=3000)
    per_example = scores_se.mean(axis=0)  # the unit the bootstrap resamples
    half = Z95 * per_example.std(ddof=0) / np.sqrt(n)
    assert got.value == pytest.approx(scores_se.mean(), abs=1e-12)
    assert got.low == pytest.approx(got.value - half, abs=0.1 * half)
    assert got.high == pytest.approx(got.value + half, abs=0.1 * half)
    assert got.format() == f"{100 * got.value:.1f} [{100 * got.low:.1f}, {100 * got.high:.1f}]"


def test_paired_difference_uses_the_per_example_differences() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    b_se = (rng.random((2, n)) < 0.4).astype(np.float64)
    flip = rng.random((2, n)) < 0.1  # a = b with 10% of the answers changed: strongly paired
    a_se = np.where(flip, 1.0 - b_se, b_se)
    got = intervals.paired_difference(a_se, b_se, resamples=3000)
    d = a_se.mean(axis=0) - b_se.mean(axis=0)
    half = Z95 * d.std(ddof=0) / np.sqrt(n)
    assert got.value == pytest.approx(d.mean(), abs=1e-12)
    assert got.low == pytest.approx(got.value - half, abs=0.1 * half)
    assert got.high == pytest.approx(got.value + half, abs=0.1 * half)
    unpaired_half = Z95 * np.sqrt(a_se.mean(0).var() / n + b_se.mean(0).var() / n)
    assert got.high - got.low < unpaired_half  # pairing narrows it


def test_identical_models_differ_by_exactly_zero() -> None:
    scores = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=float)
    got = intervals.paired_difference(scores, scores)
    assert (got.value, got.low, got.high) == (0.0, 0.0, 0.0)
    assert got.contains(0.0)
    with pytest.raises(ValueError, match="same examples"):
        intervals.paired_difference(scores, scores[:, :3])
    with pytest.raises(ValueError, match="seeds, examples"):
        intervals.accuracy(np.zeros((1, 0)))
