"""How the teacher's work is laid out inside a student TP group, and its one exchange.

Notation: one student TP group of ``s`` ranks ``g_0 .. g_{s-1}`` holds ``k = s / t`` teacher
replicas of ``t`` consecutive ranks each; student rank ``r = i * t + j`` is rank ``j`` of
replica ``i``. Every student rank needs the teacher's logits over *its* vocabulary slice
``[r V/s, (r+1) V/s)`` for all ``b`` sequences of the micro-batch. Per micro-batch:

1. **Body, split over replicas.** Replica ``i`` runs the teacher's embedding, layers and final
   norm on its share of the sequences (:func:`batch_chunks`: ``b/k`` each, the first ``b % k``
   replicas one more; a replica with no sequence skips the forward). Its ``t`` ranks end with
   the same final hidden states ``[b_i, seq, h]``.
2. **One all-gather of hidden states** (:func:`gather_hidden`) over the ``k`` ranks of equal
   teacher TP rank: every rank then holds ``[b, seq, h]``. Hidden states, not logits, cross the
   wire: ``h`` is smaller than ``V/s`` at every realistic shape (2048 vs 6288 for a 1.4B teacher,
   50k vocabulary, s = 8). Nothing is exchanged when ``k == 1`` (``t == s``).
3. **Head on the slice.** Each rank multiplies by the teacher output layer's rows of its own
   vocabulary slice (:class:`salt_megatron.teacher.head.VocabSliceHead`): the only
   logits-sized tensor any rank holds is its ``[seq, b, V/s]`` result, at every ``(s, t, b)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabLayout:
    """Student TP size ``s``, teacher TP size ``t`` and this rank's place in the student group."""

    student_tp: int
    teacher_tp: int
    student_rank: int

    def __post_init__(self) -> None:
        if self.student_tp % self.teacher_tp:
            raise ValueError(f"teacher TP {self.teacher_tp} must divide student {self.student_tp}")
        if not 0 <= self.student_rank < self.student_tp:
            raise ValueError(f"student rank {self.student_rank} outside [0, {self.student_tp})")

    @property
    def replicas(self) -> int:
        """Teacher replicas inside one student TP group: ``k = s / t``."""
        return self.student_tp // self.teacher_tp

    @property
    def replica(self) -> int:
        """Index ``i`` of this rank's teacher replica."""
        return self.student_rank // self.teacher_tp

    @property
    def teacher_rank(self) -> int:
        """This rank's teacher TP rank ``j`` (the teacher shard it holds)."""
        return self.student_rank % self.teacher_tp

    def rows(self, batch: int) -> slice:
        """The sequences of a ``batch``-sequence micro-batch that this rank's replica computes."""
        served = batch_chunks(batch, self.replicas)
        start = sum(served[: self.replica])
        return slice(start, start + served[self.replica])


def batch_chunks(batch: int, replicas: int) -> list[int]:
    """Sequences per replica when ``batch`` sequences are split ``replicas`` ways."""
    return [batch // replicas + (i < batch % replicas) for i in range(replicas)]


def gather_hidden(
    mine_bsh: torch.Tensor, batch: int, layout: VocabLayout, group: Any
) -> torch.Tensor:
    """All-gather each replica's final hidden states into the whole micro-batch's.

    Args:
        mine_bsh: ``[b_i, seq, h]`` of this rank's replica (``b_i`` may be 0).
        batch: ``b``, the micro-batch's sequences (``sum`` of the replicas' shares).
        layout: the student/teacher TP sizes and this rank's place.
        group: the ``k`` ranks of this rank's teacher TP rank, one per replica, in replica
            order; unused when ``k == 1``.

    Returns:
        ``[b, seq, h]`` in batch order, contiguous. One ``all_gather_into_tensor`` of
        ``k * ceil(b/k) * seq * h`` elements (shares padded to equal size); no copy when ``k``
        divides ``b``.
    """
    k = layout.replicas
    if k == 1:
        return mine_bsh
    served = batch_chunks(batch, k)
    width = served[0]  # the largest share
    if mine_bsh.shape[0] == width:
        send_bsh = mine_bsh.contiguous()
    else:
        send_bsh = mine_bsh.new_zeros((width, *mine_bsh.shape[1:]))
        send_bsh[: mine_bsh.shape[0]] = mine_bsh
    out_bsh = send_bsh.new_empty((k * width, *send_bsh.shape[1:]))
    dist.all_gather_into_tensor(out_bsh, send_bsh, group=group)
    if all(n == width for n in served):
        return out_bsh
    return torch.cat([out_bsh[i * width : i * width + n] for i, n in enumerate(served) if n])


def mask_padded_vocab(
    slice_sbv: torch.Tensor, vocab_start: int, true_vocab: int, fill: float
) -> torch.Tensor:
    """Set columns whose global index is ``>= true_vocab`` to ``fill`` (in place; returned).

    ``slice_sbv``: ``[seq, b, Vl]`` whose first column is global column ``vocab_start``.
    """
    first_pad = true_vocab - vocab_start
    if first_pad < slice_sbv.shape[-1]:
        slice_sbv[..., max(first_pad, 0) :] = fill
    return slice_sbv
