"""SALT's two phases in the trainer: KD with a colocated teacher, then plain next-token training.

:class:`KDPhase` owns the teacher's lifecycle (built when a step inside the KD phase is about to
run, on a fresh start or a resume; released at the first step past ``n_kd``), the per-step KD
weight, the KD forward step, and which dataset (and sample offset) the current step reads. With
stored teacher targets (``--kd-targets``) there is no teacher: the KD phase reads its samples
with their targets (:class:`~salt_megatron.data.teacher_targets.TargetsDataset`) and trains with
the sparse loss.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import torch

from salt_megatron.config.schema import SaltConfig
from salt_megatron.data.teacher_targets import TargetsDataset, TargetStore
from salt_megatron.distill.offline_step import OfflineKDForwardStep
from salt_megatron.distill.schedule import in_kd_phase, weight_for
from salt_megatron.distill.step import KDForwardStep
from salt_megatron.distill.teacher_pass import TeacherPass
from salt_megatron.loss import check_shard_widths
from salt_megatron.parallel.state import StudentLayout, preserved_rng
from salt_megatron.parallel.teacher_pipeline import StagePeers
from salt_megatron.runtime import device
from salt_megatron.training.logger import MetricsWriter, log


def teacher_record(kd_teacher_load: str | None) -> str | None:
    """How a target store records the teacher of ``--kd-teacher-load``: ``"<path> (step N)"``."""
    if kd_teacher_load is None:
        return None
    from salt_megatron.teacher.checks import resolve_checkpoint

    ckpt = resolve_checkpoint(kd_teacher_load)
    return f"{os.path.abspath(ckpt.path)} (step {ckpt.step})"


def memory_in_use() -> int:
    """Bytes in use: allocated GPU memory on CUDA, else this process's resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    return int(psutil.Process().memory_info().rss)


class KDPhase:
    """The KD phase of one run (inactive when distillation is off)."""

    def __init__(
        self,
        cfg: SaltConfig,
        layout: StudentLayout,
        vocab_size: int,
        padded_vocab: int,
        tokenizer_fingerprint: str,
        kd_train: Any | None,
        writer: MetricsWriter | None = None,
        kd_samples: int = 0,
        kd_targets: TargetStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.vocab_size = vocab_size
        self.padded_vocab = padded_vocab
        self.fingerprint = tokenizer_fingerprint
        self.kd_train = kd_train
        self.step_fn: KDForwardStep | OfflineKDForwardStep | None = None
        self.teacher_pass: TeacherPass | None = None
        self.released_bytes: int | None = None
        self.writer = writer
        self.kd_samples = kd_samples
        """Samples the KD phase's steps consume (their global batches, any ramp-up included)."""
        self.targets = kd_targets
        self._targets_data: TargetsDataset | None = None

    def weight(self, step: int) -> float:
        """KD weight of the 0-based step ``step``."""
        return weight_for(self.cfg.distill, step)

    def data_position(self, step: int, consumed: int, main_train: Any) -> tuple[Any, int]:
        """Dataset and sample offset that step ``step`` reads from, ``consumed`` samples in.

        With a separate KD blend (``--kd-data-path``) the KD phase reads it from sample 0 and the
        main data starts from its sample 0 at the switch; otherwise one stream runs throughout.
        With stored targets the KD phase reads its dataset through the store.
        """
        if in_kd_phase(self.cfg.distill, step):
            kd_data = self.kd_train if self.kd_train is not None else main_train
            if self.targets is not None:
                kd_data = self._with_targets(kd_data)
            return kd_data, consumed
        if self.kd_train is None:
            return main_train, consumed
        return main_train, consumed - self.kd_samples

    def _with_targets(self, dataset: Any) -> TargetsDataset:
        """``dataset`` with its stored targets, after checking they were made for it."""
        if self._targets_data is None:
            assert self.targets is not None
            cfg = self.cfg
            self.targets.check_run(
                self.fingerprint, dataset, self.kd_samples, cfg.data.seq_length, self.vocab_size,
                cfg.distill.kd_temperature, teacher=teacher_record(cfg.distill.kd_teacher_load),
            )  # fmt: skip
            self._targets_data = TargetsDataset(dataset, self.targets)
        return self._targets_data

    def sync(self, step: int) -> bool:
        """Build or release the teacher for ``step``; True when the data iterators must be
        rebuilt (the data stream switches, or the stages without data stop reading tokens)."""
        if in_kd_phase(self.cfg.distill, step):
            if self.step_fn is None:
                self._build()
            return False
        if self.step_fn is None:
            return False
        self._release(step)
        return self.kd_train is not None or self.targets is not None or self.layout.pp > 1

    def tokens_on_every_stage(self, step: int) -> bool:
        """Whether step ``step`` needs the step's tokens on every pipeline stage (the teacher
        pass of a KD step at PP > 1), not only on the first and last."""
        teacher_pass = self.layout.pp > 1 and self.targets is None
        return teacher_pass and in_kd_phase(self.cfg.distill, step)

    def step_iterators(self, iterators: list[Any], n_micro: int) -> list[Any]:
        """The data iterators for this step's schedule: at PP > 1 in the KD phase, after the
        teacher pass (:class:`TeacherPass`) over the step's ``n_micro`` micro-batches."""
        if self.teacher_pass is None:
            return iterators
        return self.teacher_pass.run(iterators, n_micro)

    def forward_step(self, step: int) -> KDForwardStep | OfflineKDForwardStep | None:
        """The KD forward step with this step's weight, or None outside the KD phase."""
        if self.step_fn is None:
            return None
        self.step_fn.weight = self.weight(step)
        return self.step_fn

    def take_teacher_seconds(self) -> float:
        """Teacher forward seconds since the last call (0 outside the KD phase)."""
        if self.step_fn is None:
            return 0.0
        return self.step_fn.teacher_timer.take_seconds()

    def _build(self) -> None:
        from salt_megatron.teacher import Teacher

        lay = self.layout
        check_shard_widths(self.padded_vocab // lay.tp, lay.tp_group, device())
        if self.targets is not None:
            self.step_fn = OfflineKDForwardStep(self.cfg.distill, lay.tp_group, self.vocab_size)
            log.info(
                f"KD phase: stored teacher targets from {self.targets.describe()} for "
                f"{self.cfg.distill.kd_steps} steps, schedule {self.cfg.distill.kd_schedule}, "
                f"residual {self.cfg.distill.kd_residual} (no teacher model)"
            )
            return
        with preserved_rng():
            teacher = self._build_teacher(Teacher, lay)
        self.step_fn = KDForwardStep(teacher, self.cfg.distill, lay.tp_group)
        if lay.pp > 1:
            peers = StagePeers.of(lay.pp_group, lay.pp_rank)
            self.teacher_pass = TeacherPass(teacher, peers, self.step_fn.teacher_timer)
        log.info(
            f"KD phase: teacher from {self.cfg.distill.kd_teacher_load} for "
            f"{self.cfg.distill.kd_steps} steps, schedule {self.cfg.distill.kd_schedule}"
        )

    def _build_teacher(self, teacher_cls: Any, lay: StudentLayout) -> Any:
        return teacher_cls.build(
            self.cfg,
            lay.tp_group,
            lay.tp_rank,
            lay.tp,
            lay.is_last_stage,
            self.padded_vocab,
            self.fingerprint,
            device=device(),
            vocab_size=self.vocab_size,
        )

    def _release(self, step: int) -> None:
        assert self.step_fn is not None
        before = memory_in_use()
        teacher = self.step_fn.teacher
        self.step_fn = self.teacher_pass = None
        freed = teacher.release() if teacher is not None else 0
        del teacher
        after = memory_in_use()
        self.released_bytes = freed
        if self.writer is not None:
            mib = {"teacher_freed_mib": freed, "memory_before_release_mib": before,
                   "memory_after_release_mib": after}  # fmt: skip
            self.writer.scalars(step, {k: v / 2**20 for k, v in mib.items()}, prefix="kd/")
        what = (
            "no teacher to release (stored targets)"
            if self.targets is not None
            else f"teacher released: {freed / 2**20:.1f} MiB of teacher state freed"
        )
        log.info(
            f"step {step}: KD phase over, {what}, memory in use {before / 2**20:.1f} -> "
            f"{after / 2**20:.1f} MiB"
        )

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint records of the phase after ``step`` steps (JSON-able)."""
        d = self.cfg.distill
        return {
            "phase": "kd" if in_kd_phase(d, step) else "plain",
            "kd_steps": d.kd_steps if d.enabled else 0,
            "kd_schedule": d.kd_schedule,
            "kd_weight": d.kd_weight,
            "kd_teacher_load": d.kd_teacher_load,
            "kd_targets": d.kd_targets,
            "kd_data_path": d.kd_data_path,
        }

    def check_resume(self, step: int, saved: dict[str, Any]) -> None:
        """Log the phase a checkpoint was saved in against the phase this run resumes into."""
        if not saved:
            return
        now = self.state(step)
        changed = [k for k in now if k in saved and saved[k] != now[k]]
        log.info(
            f"resuming in the {now['phase']} phase at step {step} (saved in the "
            f"{saved.get('phase')} phase)" + (f"; changed since: {changed}" if changed else "")
        )

    def close(self) -> None:
        """Release a teacher still held (a run that stops inside the KD phase)."""
        if self.step_fn is not None and self.step_fn.teacher is not None:
            self.step_fn.teacher.release()
        self.step_fn = self.teacher_pass = None
