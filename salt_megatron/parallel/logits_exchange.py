"""Moving vocab-parallel teacher logits into the student's vocabulary layout.

Notation: one student TP group of ``s`` ranks ``g_0 .. g_{s-1}`` holds ``k = s / t`` teacher
replicas of ``t`` consecutive ranks each; student rank ``r = i * t + j`` is rank ``j`` of
replica ``i``.
With ``V`` the (shared) padded vocabulary, teacher shard ``j`` holds columns
``[j V/t, (j+1) V/t)`` = student slices ``j k .. j k + k - 1`` (``V/s`` columns each), so student
rank ``r`` needs sub-slice ``r % k`` of teacher shard ``r // k``.

Three cases, chosen per micro-batch by :func:`choose_mode`:

* ``local`` (``t == s``): rank ``r`` holds teacher shard ``r`` = its student slice. No exchange.
* ``split`` (``t < s`` and ``b >= k``): replica ``i`` computes only its chunk of the micro-batch's
  sequences (:func:`batch_chunks`, ``b / k`` each), then one ``all_to_all_single`` inside the
  student TP group hands every rank its slice for all ``b`` sequences
  (:func:`exchange_to_student_layout`). Per rank it moves about one ``[seq, b, V/s]`` slice.
* ``redundant`` (``t < s`` and ``b < k``): every replica computes all ``b`` sequences. With
  ``t == 1`` each rank slices its columns locally (:func:`local_student_slice`, no
  communication). With ``1 < t < s`` rank ``r`` holds shard ``r % t``, not the shard ``r // k``
  that contains its slice (teacher TP groups are consecutive ranks), so replica 0 serves all
  sequences through the same all-to-all (the other replicas send nothing). Every replica still
  runs a forward each micro-batch, which keeps collectives that span the student TP group (FP8
  amax reduction) in step.
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

    def source_rank(self, dest: int, replica: int) -> int:
        """Student rank of ``replica`` whose teacher shard contains student slice ``dest``."""
        return replica * self.teacher_tp + dest // self.replicas

    def sub_slice(self, dest: int) -> int:
        """Position of student slice ``dest`` inside its teacher shard (``dest % k``)."""
        return dest % self.replicas

    def destinations(self) -> range:
        """Student ranks whose slices lie in this rank's teacher shard."""
        return range(self.teacher_rank * self.replicas, (self.teacher_rank + 1) * self.replicas)


def batch_chunks(batch: int, replicas: int) -> list[int]:
    """Sequences per replica when ``batch`` sequences are split ``replicas`` ways."""
    return [batch // replicas + (i < batch % replicas) for i in range(replicas)]


def local_student_slice(shard_sbv: torch.Tensor, layout: VocabLayout) -> torch.Tensor:
    """This rank's student slice of its own teacher shard (only valid when it holds it).

    ``shard_sbv``: ``[seq, b, V/t]``; returns a contiguous ``[seq, b, V/s]``. Valid when
    ``t == s`` (identity) or ``t == 1`` (slice ``r`` of the full vocabulary).
    """
    if layout.teacher_tp == layout.student_tp:
        return shard_sbv
    if layout.teacher_tp != 1:
        raise ValueError("local slicing needs teacher TP == 1 or == student TP")
    width = shard_sbv.shape[-1] // layout.student_tp
    start = layout.student_rank * width
    return shard_sbv[..., start : start + width].contiguous()


def exchange_to_student_layout(
    shard_sbv: torch.Tensor,
    layout: VocabLayout,
    served: list[int],
    group: Any,
) -> torch.Tensor:
    """One ``all_to_all`` inside the student TP group: teacher shards -> student slices.

    Args:
        shard_sbv: ``[seq, b_i, V/t]`` logits this rank's replica computed for its sequences
            (``b_i = served[replica]``; may be 0 wide on the batch axis).
        layout: the student/teacher TP sizes and this rank's place.
        served: sequences each replica computed, in batch order (``sum(served) == b``): replica
            ``i`` computed sequences ``sum(served[:i]) .. + served[i]``. A replica serving 0
            sequences sends nothing.
        group: the student TP group (``s`` ranks, in student-rank order).

    Returns:
        ``[seq, b, V/s]``: this rank's vocabulary slice for all ``b`` sequences.
    """
    s, k = layout.student_tp, layout.replicas
    seq, width = shard_sbv.shape[0], shard_sbv.shape[-1] // k
    mine = served[layout.replica]
    if shard_sbv.shape[1] != mine:
        raise ValueError(f"shard holds {shard_sbv.shape[1]} sequences, replica serves {mine}")
    # Send buffer: for each destination rank, in rank order, sub-slice (dest % k) of the shard.
    pieces = [
        shard_sbv[..., layout.sub_slice(d) * width : (layout.sub_slice(d) + 1) * width]
        if d in layout.destinations()
        else shard_sbv[:, :0, :width]
        for d in range(s)
    ]
    send = torch.cat([p.reshape(-1) for p in pieces])
    in_splits = [p.numel() for p in pieces]
    r = layout.student_rank
    sources = {layout.source_rank(r, i): i for i in range(k)}
    out_splits = [seq * served[sources[q]] * width if q in sources else 0 for q in range(s)]
    recv = send.new_empty(sum(out_splits))
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    # Received pieces arrive in source-rank order; source rank i*t + r//k grows with replica i,
    # so that is also batch order.
    parts = recv.split([n for n in out_splits if n > 0]) if recv.numel() else []
    chunks_sbv = [
        p.view(seq, served[i], width) for p, i in zip(parts, [i for i in range(k) if served[i] > 0])
    ]
    return torch.cat(chunks_sbv, dim=1) if chunks_sbv else shard_sbv.new_empty(seq, 0, width)


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


def choose_mode(layout: VocabLayout, batch: int) -> str:
    """``local`` (t == s), ``split`` (b >= k replicas) or ``redundant`` (b < k)."""
    if layout.teacher_tp == layout.student_tp:
        return "local"
    return "split" if batch >= layout.replicas else "redundant"
