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


class _TableTeacher:
    """Stands in for the teacher: logits ``table[token]`` ``[V]`` per position; this rank's
    vocabulary slice, as :meth:`salt_megatron.teacher.Teacher.student_layout_logits` returns."""

    def __init__(self, table_tv: torch.Tensor, rank: int, world: int) -> None:
        self.table_tv, self.rank, self.world = table_tv, rank, world

    def student_layout_logits(self, tokens_bs: torch.Tensor, _pos: torch.Tensor) -> torch.Tensor:
        full_sbv = self.table_tv[tokens_bs.t()]
        return full_sbv.chunk(self.world, dim=-1)[self.rank].contiguous()


def _score_tp2(out: str) -> dict[str, object]:
    import torch.distributed as dist

    from salt_megatron.distill import scoring
    from salt_megatron.distill.salt_ds import sequence_scores, token_losses_and_topk

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(5)
    table_tv = torch.randn(48, 48, generator=g) * 3
    samples = []
    for _ in range(7):
        tokens = torch.randint(0, 48, (13,), generator=g)
        samples.append({"tokens": tokens[:-1], "labels": tokens[1:],
                        "loss_mask": torch.ones(12), "position_ids": torch.arange(12)})  # fmt: skip
    writers: list[int] = []
    save = scoring._save_atomic

    def recording_save(path: str, **arrays: object) -> None:
        writers.append(rank)
        save(path, **arrays)  # type: ignore[arg-type]

    scoring._save_atomic = recording_save  # type: ignore[assignment]
    spec = scoring.ScoreSpec(["x"], 12, 1, 5, 7, "tok", "teacher")
    merged = scoring.score_dataset(
        _TableTeacher(table_tv, rank, world), samples, out, spec, 3, 0, 1, dist.group.WORLD,
        save_every=1,
    )  # fmt: skip
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, writers)
    dense = []
    for s in samples:
        logits_bsv = table_tv[s["tokens"]][None]
        loss, member = token_losses_and_topk(logits_bsv, s["labels"][None], 5)
        dense.append(float(sequence_scores(loss, member)[0]))
    every = sorted(r for ranks in gathered for r in ranks)  # type: ignore[attr-defined]
    return {"writers": every, "merged": merged, "dense": dense}


def test_scoring_at_teacher_tp2_writes_once_per_replica(tmp_path) -> None:
    """Both ranks of one TP group score the same sequences; only TP rank 0 writes its file."""
    results = run_distributed(_score_tp2, 2, str(tmp_path / "scores"))
    assert results[0]["writers"] == [0, 0, 0, 0], results[0]["writers"]  # 3 batches + final
    merged, dense = results[0]["merged"], results[0]["dense"]
    assert merged is not None and results[1]["merged"] is None
    assert torch.allclose(
        torch.as_tensor(merged), torch.tensor(dense, dtype=torch.float64), equal_nan=True
    )
