"""SALT's KD weight schedules: how w goes from w0 to 0 over the first n_kd steps.

With ``t`` the 0-based index of the optimizer step being computed, ``d`` the decay start and
``n`` = n_kd (``progress(t) = (t - d) / (n - d)`` clipped to [0, 1]):

* ``step``:         ``w(t) = w0`` for ``t < n``, else 0.
* ``linear``:       ``w(t) = w0 * (1 - progress(t))`` for ``t < n``, else 0.
* ``linear_ratio``: the ratio ``r = w / (1 - w)`` decays linearly,
  ``r(t) = r0 * (1 - progress(t))`` with ``r0 = w0 / (1 - w0)``, and ``w(t) = r(t) / (1 + r(t))``.

Both linear schedules reach 0 exactly at ``t = n``, so the switch to plain training is continuous.
"""

from __future__ import annotations

from salt_megatron.config.schema import DistillConfig


def progress(step: int, n_kd: int, decay_start: int = 0) -> float:
    """Fraction of the decay done at ``step``: 0 before ``decay_start``, 1 at ``n_kd``."""
    if step <= decay_start:
        return 0.0
    if step >= n_kd:
        return 1.0
    return (step - decay_start) / (n_kd - decay_start)


def kd_weight(
    step: int, w0: float, n_kd: int, schedule: str = "linear", decay_start: int = 0
) -> float:
    """The KD weight ``w`` for the 0-based optimizer step ``step`` (see the module docstring)."""
    if step >= n_kd or w0 == 0.0:
        return 0.0
    if schedule == "step":
        return w0
    frac = 1.0 - progress(step, n_kd, decay_start)
    if schedule == "linear":
        return w0 * frac
    if schedule == "linear_ratio":
        ratio = w0 / (1.0 - w0) * frac
        return ratio / (1.0 + ratio)
    raise ValueError(f"unknown KD schedule {schedule!r} (step, linear, linear_ratio)")


def weight_for(cfg: DistillConfig, step: int) -> float:
    """``kd_weight`` with the run's distillation settings; 0 when distillation is off."""
    if not cfg.enabled:
        return 0.0
    return kd_weight(step, cfg.kd_weight, cfg.kd_steps, cfg.kd_schedule, cfg.kd_decay_start)


def in_kd_phase(cfg: DistillConfig, step: int) -> bool:
    """Whether the 0-based step ``step`` belongs to the KD phase (teacher needed)."""
    return cfg.enabled and step < cfg.kd_steps
