"""The KD step's teacher work at PP > 1, balanced over the pipeline stages, before the schedule.

Before megatron's schedule runs a KD step, every stage reads the step's ``M`` micro-batches (the
trainer gives every stage a token iterator in the KD phase, in the same resumable sample order),
computes the teacher's final hidden states for its block of them
(:func:`~salt_megatron.parallel.teacher_pipeline.stage_blocks`: about ``M / p`` each) and sends
them to the last stage, which keeps all ``M`` in one ``[M, b, seq, h]`` buffer. The schedule
then reads the same micro-batches again; on the last stage each carries its hidden states under
:data:`TEACHER_HIDDEN`, and the KD forward step (:mod:`salt_megatron.distill.step`) only applies
the teacher's head (its vocabulary slice of the output layer). The schedule itself is untouched,
so 1F1B and the interleaved (virtual pipeline) schedules run as for a plain step.

Costs per step on a last-stage rank: the buffer (``M * b * seq * h`` elements in the teacher's
dtype, alive until the step's last forward) and ``M - |own block|`` hidden-state receives; on
other stages, their block's hidden states until sent. No host synchronisation: every tensor
stays on the device, and the waits are stream waits on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from salt_megatron.data.batches import Batch, to_device
from salt_megatron.parallel.teacher_pipeline import StagePeers, stage_blocks, wait_all
from salt_megatron.runtime import device
from salt_megatron.runtime.timing import DeviceTimer

TEACHER_HIDDEN = "teacher_hidden_bsh"
"""Batch key of a micro-batch's teacher final hidden states ``[b, seq, h]`` (last stage)."""


class TeacherPass:
    """Computes a step's teacher hidden states on every stage and gathers them on the last.

    Args:
        teacher: a :class:`~salt_megatron.teacher.Teacher` (body on every rank, head on the last
            stage).
        peers: this rank's place in the student's pipeline group.
        timer: times this rank's teacher forwards (not the waits for other stages).
    """

    def __init__(self, teacher: Any, peers: StagePeers, timer: DeviceTimer) -> None:
        self.teacher, self.peers, self.timer = teacher, peers, timer

    def run(self, iterators: list[Any], n_micro: int) -> list[Iterator[Batch] | None]:
        """Read the step's ``n_micro`` micro-batches, run this stage's teacher block, exchange.

        Args:
            iterators: the trainer's per-chunk iterators; exactly one is set at PP > 1.
            n_micro: micro-batches of this step (per DP rank).

        Returns:
            Iterators for the schedule over the same micro-batches (on the device), in place of
            ``iterators``; on the last stage each batch holds :data:`TEACHER_HIDDEN`. (A middle
            stage's forward steps get the micro-batches too, and ignore them.)
        """
        sources = [it for it in iterators if it is not None]
        if len(sources) != 1:
            raise RuntimeError(f"the teacher pass needs one data iterator per rank, got {sources}")
        batches = [to_device(next(sources[0]), device()) for _ in range(n_micro)]
        blocks = stage_blocks(n_micro, self.peers.stages)
        mine = blocks[self.peers.stage]
        if self.peers.is_last:
            self._gather(batches, blocks)
        else:  # in the dtype of the last stage's buffer (the same unless a layer upcasts)
            dtype = self.teacher.empty_hidden(0, 0).dtype
            works = [self.peers.send_to_last(self._hidden(batches[m]).to(dtype)) for m in mine]
            wait_all(works)
        return [iter(batches) if it is not None else None for it in iterators]

    def _hidden(self, batch: Batch) -> torch.Tensor:
        with self.timer.time():
            return self.teacher.final_hidden_states(batch["tokens"], batch["position_ids"])

    def _gather(self, batches: list[Batch], blocks: list[range]) -> None:
        """Last stage: post the receives, compute its own block in place, wait, attach."""
        b, seq = batches[0]["tokens"].shape
        hidden_mbsh = self.teacher.empty_hidden(len(batches) * b, seq).unflatten(0, (-1, b))
        works = self.peers.receive_others(hidden_mbsh, blocks)
        for m in blocks[-1]:
            hidden_mbsh[m].copy_(self._hidden(batches[m]))
        wait_all(works)
        for m, batch in enumerate(batches):
            batch[TEACHER_HIDDEN] = hidden_mbsh[m]
