"""The teacher's own process groups (a megatron-core ``ProcessGroupCollection``).

Every rank holds a teacher body (every pipeline stage computes the teacher's hidden states for
its share of a step's micro-batches, :mod:`salt_megatron.parallel.teacher_pipeline`), with PP = 1
and its own tensor-parallel size ``t`` (a divisor of the student's ``s``). Inside each student
TP group ``[g_0 .. g_{s-1}]`` (of every stage) the teacher TP groups are consecutive runs of ``t``
ranks (``[g_0 .. g_{t-1}]``, ``[g_t .. g_{2t-1}]``, ...): ``k = s / t`` teacher replicas. The
teacher's data-parallel ("replica") group joins the teacher ranks holding the same teacher shard:
it gives dist-checkpointing unique replica ids (one main replica per shard) when loading. The
*gather* group joins, inside one student TP group, the ``k`` ranks of equal teacher TP rank (one
per replica): each replica computes the final hidden states of its share of a micro-batch's
sequences, and this group all-gathers them (see :mod:`salt_megatron.parallel.teacher_exchange`).
Only the last stage's ranks apply the output layer (the head); ``head_index`` numbers the last
stage's student TP groups for the head's replica ids.

An MoE teacher runs at expert-parallel size 1: each rank holds all its experts, split by the
teacher TP size like its dense layers (expert TP group = teacher TP group, expert data-parallel
group = replica group, expert-parallel group = the rank alone). Expert parallelism would tie the
teacher forwards of different ranks together in all-to-alls, but at PP > 1 the stages run
different numbers of teacher forwards per step (:mod:`salt_megatron.parallel.teacher_pipeline`);
the teacher is the smaller model of SALT and its weights are frozen (no optimizer state).

``torch.distributed.new_group`` is collective over the world: :func:`build_teacher_groups` is
called by every rank and creates every group in the same order. The size-1 groups for pipeline,
context and embedding roles are created with ``use_local_synchronization`` (only their member
takes part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass
class TeacherGroups:
    """This rank's teacher groups; ``pgs`` is None once destroyed."""

    teacher_tp: int
    teacher_tp_rank: int
    pgs: ProcessGroupCollection | None
    owned: list[Any] = field(default_factory=list)
    """Groups this rank belongs to and must destroy on release."""
    gather: Any = None
    """The ``k`` ranks of this rank's teacher TP rank across the replicas of its student TP
    group, in replica order; None when ``k == 1``."""
    head_index: int | None = 0
    """Index of this rank's student TP group among the last stage's (a unique replica id for the
    head's shards, which every last-stage student TP group loads alike); None off the last
    stage, which holds no head."""

    def destroy(self) -> int:
        """Destroy the groups this rank belongs to (after a barrier on the teacher TP group).

        Returns the number destroyed. Only teacher ranks own groups; the caller runs this on every
        teacher rank at the same point (the end of the KD phase), so no collective is in flight.
        """
        if self.pgs is not None and self.teacher_tp > 1:
            dist.barrier(group=self.pgs.tp)
        count = 0
        for group in self.owned:
            dist.destroy_process_group(group)
            count += 1
        self.owned.clear()
        self.pgs = None
        return count


def _student_tp_groups(
    student_tp_group: Any, is_last_stage: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Global ranks of every student TP group and of the last stage's, sorted (same lists on
    every rank)."""
    mine = (bool(is_last_stage), dist.get_process_group_ranks(student_tp_group))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    every = sorted({tuple(ranks) for _, ranks in gathered})
    last = sorted({tuple(ranks) for is_last, ranks in gathered if is_last})
    return [list(g) for g in every], [list(g) for g in last]


def build_teacher_groups(
    student_tp_group: Any, is_last_stage: bool, teacher_tp: int
) -> TeacherGroups:
    """Create the teacher's TP and replica groups on every rank (collective over the world).

    Args:
        student_tp_group: this rank's student TP group (its ranks in student TP rank order).
        is_last_stage: whether this rank is on the student's last pipeline stage (holds a head).
        teacher_tp: teacher TP size ``t``; must divide every student TP group's size.
    """
    student_groups, last_groups = _student_tp_groups(student_tp_group, is_last_stage)
    me = dist.get_rank()
    tp_groups: list[list[int]] = []
    for ranks in student_groups:
        if len(ranks) % teacher_tp:
            raise ValueError(f"teacher TP {teacher_tp} does not divide student TP {len(ranks)}")
        tp_groups += [ranks[i : i + teacher_tp] for i in range(0, len(ranks), teacher_tp)]
    replica_groups = [[g[j] for g in tp_groups] for j in range(teacher_tp)]
    replicas = len(student_groups[0]) // teacher_tp if student_groups else 1
    gather_groups = [
        [ranks[i * teacher_tp + j] for i in range(replicas)]
        for ranks in student_groups
        for j in range(teacher_tp)
    ]
    my_tp = my_dp = my_gather = None
    for ranks in tp_groups:
        group = dist.new_group(ranks)
        if me in ranks:
            my_tp, tp_rank = group, ranks.index(me)
    for ranks in replica_groups:
        group = dist.new_group(ranks)
        if me in ranks:
            my_dp = group
    if replicas > 1:
        for ranks in gather_groups:
            group = dist.new_group(ranks)
            if me in ranks:
                my_gather = group
    if my_tp is None or my_dp is None:  # unreachable: every rank is in a student TP group
        raise RuntimeError(f"rank {me} is in no teacher group")
    single = dist.new_group([me], use_local_synchronization=True)
    owned = [g for g in (my_tp, my_dp, my_gather, single) if g is not None]
    pgs = ProcessGroupCollection(
        tp=my_tp, pp=single, cp=single, embd=single, pos_embd=single,
        tp_cp=my_tp, mp=my_tp, dp=my_dp, dp_cp=my_dp,
        ep=single, expt_tp=my_tp, tp_ep=my_tp, expt_dp=my_dp, tp_dp_cp=dist.group.WORLD,
    )  # fmt: skip
    index = next((i for i, ranks in enumerate(last_groups) if me in ranks), None)
    return TeacherGroups(teacher_tp, tp_rank, pgs, owned, my_gather, index)
