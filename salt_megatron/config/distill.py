"""The ``distill`` section: SALT's KD phase (teacher or stored targets, weight schedule, gate)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from salt_megatron.config.base import check


@dataclass
class DistillConfig:
    """SALT's knowledge-distillation phase."""

    kd_teacher_load: str | None = None
    """Checkpoint directory of the teacher (ours, tools/import_hf.py's, or a Megatron-LM
    torch_dist one); None trains without distillation."""
    kd_teacher_tokenizer_model: str | None = None
    """The tokenizer a Megatron-LM teacher was trained with, when the --tokenizer-model saved in
    its args is not readable here; it must be the student's tokenizer (same fingerprint)."""
    kd_steps: int = 0
    """Length of the KD phase in optimizer steps (n_kd); 0 disables it."""
    kd_weight: float = 0.5
    """Initial KD weight w0 in loss = (1-w) CE(labels) + w CE(teacher, student)."""
    kd_schedule: Literal["step", "linear", "linear_ratio"] = "linear"
    """How w goes to 0 by n_kd: hard switch, linear decay of w, or linear decay of w/(1-w)."""
    kd_decay_start: int = 0
    """Step at which the linear schedules start decaying (w = w0 before it)."""
    kd_temperature: float = 1.0
    """Softmax temperature T of both models in the KD term."""
    kd_t2_scaling: bool = False
    """Multiply the KD term by T^2 (keeps its gradient scale independent of T)."""
    kd_data_path: list[str] | None = None
    """A separate blend for the KD phase (SALT_DS selection), Megatron-style 'w1 p1 w2 p2'."""
    kd_targets: str | None = None
    """Directory of stored teacher targets (tools/save_teacher_targets.py): the KD phase trains on
    them with the sparse loss and builds no teacher (a --kd-teacher-load given too must be the
    teacher they were made with)."""
    kd_residual: Literal["uniform", "drop"] = "uniform"
    """With --kd-targets, the teacher's mass outside the stored ids: spread evenly over the other
    ids (uniform) or dropped, renormalising the stored ones (drop)."""
    kd_gate: Literal["none", "teacher-confidence", "teacher-label-loss"] = "none"
    """Token-level KD gate: apply the KD term only on tokens where the teacher's top-1
    probability at T is >= --kd-gate-threshold (teacher-confidence), or where its cross-entropy
    at T on the label is <= --kd-gate-threshold nats (teacher-label-loss); other tokens train on
    the label alone (CE weight 1). See docs/salt.md."""
    kd_gate_threshold: float | None = None
    """Threshold of --kd-gate: a probability in (0, 1] for teacher-confidence, nats (> 0) for
    teacher-label-loss."""

    def __post_init__(self) -> None:
        check(self.kd_steps >= 0, f"--kd-steps must be >= 0, got {self.kd_steps}")
        self._check_gate()
        check(0.0 <= self.kd_weight <= 1.0, f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        check(self.kd_temperature > 0, f"--kd-temperature must be > 0, got {self.kd_temperature}")
        check(
            0 <= self.kd_decay_start <= max(self.kd_steps, 0),
            f"--kd-decay-start {self.kd_decay_start} must be in [0, --kd-steps {self.kd_steps}]",
        )
        check(
            self.kd_schedule != "linear_ratio" or self.kd_weight < 1.0,
            "--kd-weight must be < 1 with --kd-schedule linear_ratio (w/(1-w) is infinite at 1)",
        )

    @property
    def enabled(self) -> bool:
        """True when a teacher (or its stored targets) and a positive KD phase are configured."""
        has_teacher = self.kd_teacher_load is not None or self.kd_targets is not None
        return has_teacher and self.kd_steps > 0

    def _check_gate(self) -> None:
        gate, thr = self.kd_gate, self.kd_gate_threshold
        if gate == "none":
            check(thr is None, f"--kd-gate-threshold {thr} needs --kd-gate")
            return
        check(self.enabled, f"--kd-gate {gate} needs a KD phase (--kd-teacher-load or "
                            "--kd-targets, and --kd-steps > 0)")  # fmt: skip
        high, what = (1.0, "a probability in (0, 1]") if gate == "teacher-confidence" else (
            math.inf, "finite nats > 0")  # fmt: skip
        check(thr is not None and 0.0 < thr <= high and math.isfinite(thr),
              f"--kd-gate {gate} needs --kd-gate-threshold {what}, got {thr}")  # fmt: skip
