"""Which pipeline stage computes which micro-batch's teacher hidden states, and their transfer.

With student PP = ``p`` and ``M`` micro-batches per step (per DP rank), every stage holds a
teacher body (:mod:`salt_megatron.parallel.teacher_groups`) and computes the teacher's final
hidden states ``[b, seq, h]`` of one contiguous block of the step's micro-batches
(:func:`stage_blocks`: ``M / p`` each, the first ``M % p`` stages one more, so the last stage,
which also applies the teacher's head and the KD loss, never has more). The last stage needs
them all: TP rank ``r`` of stage ``i`` sends each hidden-state tensor it computed to TP rank ``r``
of the last stage (same DP rank: the two are neighbours in the student's pipeline group), one
message per micro-batch, posted as soon as it is computed; the last stage posts every receive,
straight into its slot of one ``[M, b, seq, h]`` buffer, before computing its own block. Hidden
states cross, never logits: ``(M - M/p) * b * seq * h`` elements per step and last-stage rank.

Point-to-point operations are issued one by one (``isend``/``irecv``, not
``batch_isend_irecv``): each peer pair carries messages in one direction only, in micro-batch
order on both sides, so NCCL and gloo pair them unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from salt_megatron.parallel.teacher_exchange import batch_chunks


def stage_blocks(n_micro: int, stages: int) -> list[range]:
    """The micro-batches each pipeline stage computes the teacher for, in stage order.

    Contiguous blocks of :func:`~salt_megatron.parallel.teacher_exchange.batch_chunks` sizes:
    ``n_micro // stages`` each, the first ``n_micro % stages`` stages one more.
    """
    blocks, start = [], 0
    for size in batch_chunks(n_micro, stages):
        blocks.append(range(start, start + size))
        start += size
    return blocks


@dataclass(frozen=True)
class StagePeers:
    """This rank's place in the student's pipeline group.

    ``ranks``: the group's global ranks in stage order (same TP and DP rank on every stage).
    """

    stage: int
    ranks: tuple[int, ...]
    group: Any

    @classmethod
    def of(cls, pp_group: Any, stage: int) -> StagePeers:
        """From the student's pipeline group and this rank's stage."""
        return cls(stage, tuple(dist.get_process_group_ranks(pp_group)), pp_group)

    @property
    def stages(self) -> int:
        """``p``: the number of pipeline stages."""
        return len(self.ranks)

    @property
    def is_last(self) -> bool:
        """Whether this rank is on the last stage (it receives every stage's hidden states)."""
        return self.stage == self.stages - 1

    def send_to_last(self, hidden_bsh: torch.Tensor) -> Any:
        """Post the send of one micro-batch's hidden states to the last stage; returns the work.

        ``hidden_bsh`` must stay alive and unchanged until the work completes.
        """
        return dist.isend(hidden_bsh.contiguous(), self.ranks[-1], group=self.group)

    def receive_others(self, hidden_mbsh: torch.Tensor, blocks: list[range]) -> list[Any]:
        """Post the receives of every other stage's micro-batches into ``hidden_mbsh[m]``.

        Args:
            hidden_mbsh: ``[M, b, seq, h]``, the step's hidden states on the last stage.
            blocks: :func:`stage_blocks` of ``M``.

        Returns:
            The works, in posting order (stage, then micro-batch).
        """
        works = []
        for stage, block in enumerate(blocks[:-1]):
            for m in block:
                works.append(dist.irecv(hidden_mbsh[m], self.ranks[stage], group=self.group))
        return works


def wait_all(works: list[Any]) -> None:
    """Wait for point-to-point works (on a GPU the stream waits; the host does not)."""
    for work in works:
        work.wait()
