"""The teacher's output layer, cut to one student vocabulary slice.

Student TP rank ``r`` of ``s`` needs the teacher's logits over columns ``[r V/s, (r+1) V/s)``
only. It keeps those rows of the teacher's output weight (``[V/s, h]``, read straight from the
checkpoint whatever layout it was saved at) and multiplies its final hidden states by them: no
rank ever holds logits over more than its own slice, and the teacher's own vocab-parallel output
layer (``[V/t, h]`` per rank) is never built. See :mod:`salt_megatron.parallel.teacher_exchange`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from salt_megatron.parallel.teacher_exchange import mask_padded_vocab

PAD_LOGIT = -1e30
"""Teacher logit of padded vocabulary columns (``v >= true vocab``): ``softmax`` gives them
exactly 0 in float32/bf16. Not ``-inf``: a shard made only of padding would then have a local
maximum of ``-inf`` and the loss's ``exp(t - max)`` would be NaN."""


class FinalHiddenStates(torch.nn.Module):
    """Stands in for ``GPTModel.output_layer``: the model then returns its final (normed) hidden
    states, ``[b, s, h]`` (megatron transposes its output to batch-major)."""

    def forward(
        self, hidden_sbh: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None
    ) -> tuple[torch.Tensor, None]:
        return hidden_sbh, None


class VocabSliceHead(torch.nn.Module):
    """Rows ``[start, start + width)`` of the teacher's output weight; padded columns masked.

    Args:
        hidden: teacher hidden size ``h``.
        width: ``V/s`` columns of this student rank's slice.
        slice_index: the student TP rank ``r`` (slice ``r`` of ``s``).
        slices: the student TP size ``s``.
        true_vocab: columns ``>= true_vocab`` are padding (:data:`PAD_LOGIT`).
    """

    def __init__(
        self,
        hidden: int,
        width: int,
        slice_index: int,
        slices: int,
        true_vocab: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.weight_vh = torch.nn.Parameter(
            torch.zeros(width, hidden, dtype=dtype, device=device), requires_grad=False
        )
        self.slice_index, self.slices, self.true_vocab = slice_index, slices, true_vocab

    @property
    def vocab_start(self) -> int:
        """Global column of this slice's first logit."""
        return self.slice_index * self.weight_vh.shape[0]

    def sharded_state_dict(self, key: str, replica_id: int) -> dict[str, ShardedTensor]:  # type: ignore[override]
        """This slice of checkpoint tensor ``key`` (``output_layer.weight``, or the word
        embedding when tied): fragment ``r`` of ``s`` along the vocabulary.

        ``allow_shape_mismatch``: the checkpoint may hold another padded vocabulary than the
        student's (saved at another TP size); rows it lacks stay zero and are masked as padding.
        ``replica_id``: 0 for one student TP group of the last stage, distinct for the others.
        """
        sharded = ShardedTensor.from_rank_offsets(
            key,
            self.weight_vh,
            (0, self.slice_index, self.slices),
            replica_id=replica_id,
            allow_shape_mismatch=True,
        )
        return {key: sharded}

    def forward(self, hidden_sbh: torch.Tensor) -> torch.Tensor:
        """``[seq, b, h]`` -> contiguous ``[seq, b, V/s]`` logits in the weight's dtype."""
        logits_sbv = F.linear(hidden_sbh, self.weight_vh)
        return mask_padded_vocab(logits_sbv, self.vocab_start, self.true_vocab, PAD_LOGIT)
