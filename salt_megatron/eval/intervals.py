"""Bootstrap confidence intervals for task accuracy, over examples, with several fine-tuning seeds.

Scores come as a ``[seeds, examples]`` array of per-example scores (1/0 for exact match): row
``s`` is the model fine-tuned with seed ``s``, column ``i`` the same test example in every row.
An accuracy is the mean over seeds and examples. The bootstrap resamples *examples* (columns)
with replacement, the same draw for every seed and, in :func:`paired_difference`, for both
models, so the interval of a difference reflects that both were scored on the same examples.
Seed-to-seed spread is not in these intervals (two or three seeds cannot estimate it): report the
per-seed accuracies beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided percentile interval (``level``, e.g. 0.95)."""

    value: float
    low: float
    high: float
    level: float

    def contains(self, x: float) -> bool:
        """Whether ``x`` lies inside ``[low, high]``."""
        return self.low <= x <= self.high

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"34.9 [31.2, 38.5]"`` (``scale`` 100: percent)."""
        v, lo, hi = (round(scale * x, digits) for x in (self.value, self.low, self.high))
        return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _scores(scores_se: np.ndarray) -> np.ndarray:
    array = np.asarray(scores_se, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"expected [seeds, examples] scores, got shape {array.shape}")
    return array


def _resampled_means(scores_se: np.ndarray, draws_ri: np.ndarray) -> np.ndarray:
    """Mean over seeds and the drawn examples, per resample: ``[resamples]``."""
    per_example_e = scores_se.mean(axis=0)
    return per_example_e[draws_ri].mean(axis=1)


def _draws(n_examples: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_examples, size=(resamples, n_examples))


def _interval(value: float, samples_r: np.ndarray, level: float) -> Interval:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples_r, [tail, 100.0 - tail])
    return Interval(float(value), float(low), float(high), level)


def accuracy(
    scores_se: np.ndarray, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> Interval:
    """Mean score over seeds and examples, with its bootstrap interval over examples."""
    scores = _scores(scores_se)
    draws = _draws(scores.shape[1], resamples, seed)
    return _interval(scores.mean(), _resampled_means(scores, draws), level)


def paired_difference(
    scores_a_se: np.ndarray,
    scores_b_se: np.ndarray,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Accuracy of ``a`` minus accuracy of ``b`` on the same examples (columns must match), with
    a paired bootstrap interval: one draw of examples serves both models."""
    a, b = _scores(scores_a_se), _scores(scores_b_se)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores need the same examples: {a.shape[1]} vs {b.shape[1]}")
    draws = _draws(a.shape[1], resamples, seed)
    diff_r = _resampled_means(a, draws) - _resampled_means(b, draws)
    return _interval(a.mean() - b.mean(), diff_r, level)
