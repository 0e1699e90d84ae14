"""Real megatron-core TP/PP/VPP/DP/SP on gloo processes against the world-size-1 run.

Same seed (the initial weights are layout-independent), same data: the per-step loss and grad
norm of 3 optimizer steps must match the single-process run within 1e-5.

In the same process groups (one launch per world size), memory and communication options are
checked against the same layout without them (:data:`PAIRS2`, :data:`PAIRS4`): activation
recomputation (with dropout, so the recomputed masks must equal the first ones) and the overlapped
gradient reduction and parameter all-gather over several buckets must give the same losses, grad
norms and final validation loss within 1e-6.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from salt_megatron.config import parse_config
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

SEQ, VOCAB = 32, 250  # 250 is padded to 256 (TP=1) / 256 (TP=2): the padding is exercised too
BASE = [
    "--mock-data", "--vocab-size", str(VOCAB), "--seq-length", str(SEQ),
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
    "--lr", "1e-2", "--lr-warmup-iters", "1", "--make-vocab-size-divisible-by", "8",
    "--log-interval", "100",
]  # fmt: skip


class PatternDataset:
    """Deterministic learnable token sequences (odd positions follow from even ones)."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
        data[:, 1::2] = (data[:, 0:-1:2] * 7 + 3) % VOCAB
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.data[i]
        mask = torch.ones(SEQ)
        mask[(i * 5) % SEQ :: 7] = 0.0  # uneven masks: the global token count matters
        return {
            "tokens": row[:-1], "labels": row[1:], "loss_mask": mask,
            "position_ids": torch.arange(SEQ),
        }  # fmt: skip


def _train(layouts: list[list[str]]) -> list[dict[str, Any]]:
    """Train each layout in turn in this process group.

    Per layout: ``steps``, the (loss, grad norm) of each step; ``weights``, the sum of this rank's
    weights after the last step as a checkpoint save reads them (``gathered_params``: with an
    overlapped all-gather they are otherwise stale until the next forward); ``eval``, the
    validation loss after the last step; ``buckets`` and ``grad_dtype`` of the first chunk's
    gradient buffers.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from salt_megatron.models.student import gathered_params
    from salt_megatron.runtime import cpu_compat
    from salt_megatron.training.trainer import Trainer

    cpu_compat.enable()
    results = []
    for extra in layouts:
        cfg = parse_config(BASE + extra)
        cfg.validate_world(dist.get_world_size())
        trainer = Trainer(cfg, (PatternDataset(), None), VOCAB)
        history = trainer.train()
        chunk = trainer.model[0]
        with gathered_params(trainer.model):
            weights = sum(float(p.double().sum()) for c in trainer.model for p in c.parameters())
        results.append(
            {
                "steps": [(r.loss, r.grad_norm) for r in history],
                "weights": weights,
                "eval": trainer.evaluate(PatternDataset(16), 2),
                "buckets": len(chunk.bucket_groups),
                "grad_dtype": str(chunk.buffers[0].grad_dtype),
            }
        )
        trainer.close()
        parallel_state.destroy_model_parallel()
    return results


WORLD2 = {
    "TP2": ["--tensor-model-parallel-size", "2"],
    "TP2+SP": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "PP2-1F1B": ["--pipeline-model-parallel-size", "2"],
    "PP2-VPP2": [
        "--pipeline-model-parallel-size",
        "2",
        "--virtual-pipeline-model-parallel-size",
        "2",
    ],
    "DP2-distopt": ["--use-distributed-optimizer"],
}
WORLD4 = {
    "TP2xDP2": ["--tensor-model-parallel-size", "2"],
    "TP2xPP2": ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
    "DP4-distopt-overlap": ["--use-distributed-optimizer", "--overlap-grad-reduce"],
}


DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
FULL_UNIFORM = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                "--recompute-num-layers", "1"]  # fmt: skip
FULL_BLOCK = ["--recompute-granularity", "full", "--recompute-method", "block",
              "--recompute-num-layers", "1"]  # fmt: skip
SELECTIVE = ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"]
DISTOPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "6000"]
OVERLAP = ["--overlap-param-gather", "--align-param-gather"]
#: name -> (baseline flags, the same with the option under test).
PAIRS2 = {
    "TP2 full recompute": ([*TP2, *DROPOUT], [*TP2, *DROPOUT, *FULL_UNIFORM]),
    "TP2+SP selective recompute": (
        [*TP2, "--sequence-parallel", *DROPOUT],
        [*TP2, "--sequence-parallel", *DROPOUT, *SELECTIVE],
    ),
    "PP2 full recompute": ([*PP2, *DROPOUT], [*PP2, *DROPOUT, *FULL_BLOCK]),
    "DP2 overlapped param gather": (DISTOPT, [*DISTOPT, *OVERLAP]),
}
VPP2 = [*PP2, "--virtual-pipeline-model-parallel-size", "2"]
PAIRS4 = {
    "TP2xDP2 overlapped param gather": ([*TP2, *DISTOPT], [*TP2, *DISTOPT, *OVERLAP]),
    "PP2xVPP2xDP2 aligned param gather": ([*VPP2, *DISTOPT], [*VPP2, *DISTOPT, *OVERLAP]),
}
BF16 = ["--bf16", "--use-distributed-optimizer"]


def _pair_layouts(pairs: dict[str, tuple[list[str], list[str]]]) -> list[list[str]]:
    return [flags for pair in pairs.values() for flags in pair]


@pytest.fixture(scope="module")
def reference() -> list[tuple[float, float]]:
    return run_distributed(_train, 1, [[]])[0][0]["steps"]


@pytest.fixture(scope="module")
def world2() -> list[list[dict[str, Any]]]:
    """Every world-2 run in one launch: the layouts, the pairs, bf16 with and without bf16 grads."""
    layouts = [*WORLD2.values(), *_pair_layouts(PAIRS2), BF16, [*BF16, "--grad-reduce-in-bf16"]]
    return run_distributed(_train, 2, layouts)


def _compare(name: str, got: list[tuple[float, float]], ref: list[tuple[float, float]]) -> None:
    assert len(got) == len(ref) == 3
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref), 1):
        assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5), f"{name} step {step} loss"
        assert norm == pytest.approx(ref_norm, abs=1e-5, rel=1e-5), f"{name} step {step} norm"


def _compare_pairs(
    pairs: dict[str, tuple[list[str], list[str]]], results: list[dict[str, Any]], rank: int
) -> None:
    """Each option against its baseline: losses, grad norms and the final eval within 1e-6.

    Rank 0 (first pipeline stage: megatron buckets only there) must have had several buckets to
    overlap.
    """
    assert len(results) == 2 * len(pairs)
    for i, name in enumerate(pairs):
        base, variant = results[2 * i], results[2 * i + 1]
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(
            zip(variant["steps"], base["steps"], strict=True), 1
        ):
            assert loss == pytest.approx(ref_loss, abs=1e-6, rel=1e-6), f"{name} step {step} loss"
            assert norm == pytest.approx(ref_norm, abs=1e-6, rel=1e-6), f"{name} step {step} norm"
        assert variant["eval"] == pytest.approx(base["eval"], abs=1e-6, rel=1e-6), f"{name} eval"
        assert variant["weights"] == pytest.approx(base["weights"], rel=1e-9), f"{name} weights"
        if "param gather" in name and rank == 0:
            assert variant["buckets"] > 1, f"{name}: one bucket, nothing to overlap"


def test_world2_layouts_match_single_process(
    reference: list[tuple[float, float]], world2: list[list[dict[str, Any]]]
) -> None:
    assert reference[0][0] > reference[-1][0]  # the loss falls
    for rank_results in world2:  # every rank reports the same global numbers
        for name, got in zip(WORLD2, rank_results):
            _compare(name, got["steps"], reference)


def test_world2_recompute_and_overlap_change_nothing(world2: list[list[dict[str, Any]]]) -> None:
    n = len(WORLD2)
    for rank, rank_results in enumerate(world2):
        _compare_pairs(PAIRS2, rank_results[n : n + 2 * len(PAIRS2)], rank)


def test_world2_grad_reduce_in_bf16(world2: list[list[dict[str, Any]]]) -> None:
    """bf16 gradient buffers (reduced in bf16): close to float32 reduction, not identical."""
    fp32_grads, bf16_grads = world2[0][-2], world2[0][-1]
    assert (fp32_grads["grad_dtype"], bf16_grads["grad_dtype"]) == (
        "torch.float32",
        "torch.bfloat16",
    )
    for (loss, _), (ref_loss, _) in zip(bf16_grads["steps"], fp32_grads["steps"], strict=True):
        assert loss == pytest.approx(ref_loss, abs=2e-2)


def test_world4_layouts_match_single_process(reference: list[tuple[float, float]]) -> None:
    per_rank = run_distributed(_train, 4, [*WORLD4.values(), *_pair_layouts(PAIRS4)])
    for rank, rank_results in enumerate(per_rank):
        for name, got in zip(WORLD4, rank_results):
            _compare(name, got["steps"], reference)
        _compare_pairs(PAIRS4, rank_results[len(WORLD4) :], rank)
