"""The KD-phase forward step on stored teacher targets (``--kd-targets``): no teacher model.

Each micro-batch arrives with the sparse targets of its samples (``kd_ids`` ``[b, s, k]``,
``kd_logprobs`` ``[b, s, k]``, ``kd_residual`` ``[b, s]``; see
:mod:`salt_megatron.data.teacher_targets`), moved to the device with the batch. The last
pipeline stage computes ``(1 - w) CE + w KD_sparse`` with the vocab-parallel sparse loss on
the output layer's ``[s, b]`` order (as :class:`~salt_megatron.distill.step.KDForwardStep`
does); earlier stages run the plain student forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from salt_megatron.config.schema import DistillConfig
from salt_megatron.data.batches import Batch
from salt_megatron.distill.step import reduce_kd_losses
from salt_megatron.loss import sparse_kd_cross_entropy
from salt_megatron.loss.contract import LossFunc, reduce_token_losses
from salt_megatron.loss.gate import KDGate, from_flags
from salt_megatron.models.stage import read_batch, stage_inputs
from salt_megatron.runtime import device
from salt_megatron.runtime.timing import DeviceTimer


@dataclass
class OfflineKDForwardStep:
    """Forward step of the KD phase on stored targets (``weight`` is set per optimizer step).

    ``vocab_size`` is the true vocabulary size (the residual is spread below it). There is no
    teacher: ``teacher`` is None and ``teacher_timer`` times nothing.
    """

    distill: DistillConfig
    tp_group: Any
    vocab_size: int
    weight: float = 0.0
    teacher_timer: DeviceTimer = field(default_factory=lambda: DeviceTimer(device()))
    teacher: Any = None
    gate: KDGate | None = field(init=False)
    """The token-level KD gate of ``--kd-gate`` (None without one), built once."""

    def __post_init__(self) -> None:
        self.gate = from_flags(self.distill.kd_gate, self.distill.kd_gate_threshold)

    def __call__(
        self, data_iterator: Iterator[Batch] | None, model: torch.nn.Module
    ) -> tuple[torch.Tensor, LossFunc]:
        batch, pre, post = read_batch(data_iterator, model)
        tokens, position_ids = stage_inputs(batch, pre)
        if batch is None or not post:
            return model(tokens, position_ids, None), partial(reduce_token_losses, torch.empty(0))
        student_sbv = model(tokens, position_ids, None).transpose(0, 1)
        loss_mask_sb = batch["loss_mask"].t()
        loss_sb, stats = sparse_kd_cross_entropy(
            student_sbv,
            batch["kd_ids"].transpose(0, 1),
            batch["kd_logprobs"].transpose(0, 1),
            batch["kd_residual"].t(),
            batch["labels"].t(),
            self.weight,
            self.distill.kd_temperature,
            self.tp_group,
            residual=self.distill.kd_residual,
            vocab_size=self.vocab_size,
            t2_scaling=self.distill.kd_t2_scaling,
            loss_mask=loss_mask_sb,
            return_stats=True,
            gate=self.gate,
        )
        return loss_sb, partial(reduce_kd_losses, loss_mask_sb, stats)
