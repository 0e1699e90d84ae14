"""SALT_DS token statistics on vocab shards (gloo TP=2) equal the single-process values."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed


def _sharded_and_dense(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    import torch.distributed as dist

    from salt_megatron.distill.salt_ds import token_losses_and_topk

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 17, 48, generator=g) * 2
    logits[0, :, :] = 0.0  # all-equal rows: ties at the k-th value
    labels = torch.randint(0, 48, (3, 17), generator=g)
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = logits.chunk(world, dim=-1)[rank].contiguous()
    sharded = token_losses_and_topk(shard, labels, k=k, tp_group=dist.group.WORLD)
    return [sharded, token_losses_and_topk(logits, labels, k=k)]


def test_tp2_matches_single_process() -> None:
    for (loss, member), (ref_loss, ref_member) in run_distributed(_sharded_and_dense, 2, 10):
        assert torch.allclose(loss, ref_loss, atol=1e-5)
        assert torch.equal(member, ref_member)
        assert 0 < int(member.sum()) < member.numel()
