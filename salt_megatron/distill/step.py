"""The KD-phase forward step: teacher soft targets + student logits -> the SALT loss.

On the student's last pipeline stage each micro-batch gets the frozen teacher's logits in the
student's vocabulary layout (at PP = 1 the teacher runs here on the same tokens; at PP > 1 every
stage computed its share of the teacher's hidden states before the schedule,
:mod:`salt_megatron.distill.teacher_pass`, and only the head runs here), runs the student
without labels (vocab-parallel logits), and computes per token
``(1 - w) * CE(student, labels) + w * KD(student, teacher)`` with the fused vocab-parallel loss.
Earlier stages run the plain student forward.

The loss runs in the ``[s, b]`` order of the output layer. megatron's GPTModel returns logits as a
contiguous ``[b, s, V/tp]`` copy of its ``[s, b, V/tp]`` output; the loss takes the transposed
view back, so the gradient it writes is a contiguous ``[s, b, V/tp]`` buffer and reaches the
output layer's backward matmul contiguous (a strided one is several times slower on CPU at small b),
and the teacher's ``[s, b, V/tp]`` logits need no copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from salt_megatron.config.schema import DistillConfig
from salt_megatron.data.batches import Batch
from salt_megatron.distill.teacher_pass import TEACHER_HIDDEN
from salt_megatron.loss import KDStats, kd_cross_entropy
from salt_megatron.loss.contract import LossFunc, reduce_token_losses
from salt_megatron.loss.gate import KDGate, from_flags
from salt_megatron.models.stage import read_batch, stage_inputs
from salt_megatron.runtime import device
from salt_megatron.runtime.timing import DeviceTimer


def reduce_kd_losses(
    loss_mask_sb: torch.Tensor, stats: KDStats, loss_sb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The KD loss function: :func:`reduce_token_losses` with the KD statistics as metrics."""
    return reduce_token_losses(
        loss_mask_sb, loss_sb, stats.ce, stats.kd, stats.top1_agree, stats.kd_on
    )


@dataclass
class KDForwardStep:
    """Callable forward step for megatron's schedules during the KD phase.

    ``weight`` is set by the trainer before each optimizer step; ``teacher_timer`` times the
    teacher forwards (CUDA events on GPU: no host sync per micro-batch) for the time-share metric.
    """

    teacher: Any
    distill: DistillConfig
    tp_group: Any
    weight: float = 0.0
    teacher_timer: DeviceTimer = field(default_factory=lambda: DeviceTimer(device()))
    gate: KDGate | None = field(init=False)
    """The token-level KD gate of ``--kd-gate`` (None without one), built once."""

    def __post_init__(self) -> None:
        self.gate = from_flags(self.distill.kd_gate, self.distill.kd_gate_threshold)

    def _teacher_logits_sbv(self, batch: Batch) -> torch.Tensor:
        with self.teacher_timer.time():
            hidden_bsh = batch.get(TEACHER_HIDDEN)
            if hidden_bsh is not None:  # computed before the schedule (PP > 1)
                return self.teacher.logits_from_hidden(hidden_bsh)
            return self.teacher.student_layout_logits(batch["tokens"], batch["position_ids"])

    def __call__(
        self, data_iterator: Iterator[Batch] | None, model: torch.nn.Module
    ) -> tuple[torch.Tensor, LossFunc]:
        batch, pre, post = read_batch(data_iterator, model)
        tokens, position_ids = stage_inputs(batch, pre)
        if batch is None or not post:
            return model(tokens, position_ids, None), partial(reduce_token_losses, torch.empty(0))
        teacher_sbv = self._teacher_logits_sbv(batch)
        # Without labels megatron returns a [b, s, V/tp] copy; view it back in [s, b] order.
        student_sbv = model(tokens, position_ids, None).transpose(0, 1)
        loss_mask_sb = batch["loss_mask"].t()
        loss_sb, stats = kd_cross_entropy(
            student_sbv,
            teacher_sbv,
            batch["labels"].t(),
            self.weight,
            self.distill.kd_temperature,
            self.tp_group,
            t2_scaling=self.distill.kd_t2_scaling,
            loss_mask=loss_mask_sb,
            return_stats=True,
            teacher_scratch=True,  # the teacher's logits are this micro-batch's temporary
            gate=self.gate,
        )
        return loss_sb, partial(reduce_kd_losses, loss_mask_sb, stats)
