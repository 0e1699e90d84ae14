"""Real megatron-core TP/PP/VPP/DP/SP on gloo processes against the world-size-1 run.

Same seed (the initial weights are layout-independent), same data: the per-step loss and grad
norm of 3 optimizer steps must match the single-process run within 1e-5.
"""

from __future__ import annotations

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


def _train(layouts: list[list[str]]) -> list[list[tuple[float, float]]]:
    """Train each layout in turn in this process group; return (loss, grad norm) per step."""
    import torch.distributed as dist

    from salt_megatron.runtime import cpu_compat
    from salt_megatron.training.trainer import Trainer

    cpu_compat.enable()
    results = []
    for extra in layouts:
        cfg = parse_config(BASE + extra)
        cfg.validate_world(dist.get_world_size())
        trainer = Trainer(cfg, (PatternDataset(), None), VOCAB)
        history = trainer.train()
        results.append([(r.loss, r.grad_norm) for r in history])
        trainer.close()
        from megatron.core import parallel_state

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


@pytest.fixture(scope="module")
def reference() -> list[tuple[float, float]]:
    return run_distributed(_train, 1, [[]])[0][0]


def _compare(name: str, got: list[tuple[float, float]], ref: list[tuple[float, float]]) -> None:
    assert len(got) == len(ref) == 3
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, ref), 1):
        assert loss == pytest.approx(ref_loss, abs=1e-5, rel=1e-5), f"{name} step {step} loss"
        assert norm == pytest.approx(ref_norm, abs=1e-5, rel=1e-5), f"{name} step {step} norm"


def test_world2_layouts_match_single_process(reference: list[tuple[float, float]]) -> None:
    per_rank = run_distributed(_train, 2, list(WORLD2.values()))
    assert reference[0][0] > reference[-1][0]  # the loss falls
    for rank_results in per_rank:  # every rank reports the same global numbers
        for name, got in zip(WORLD2, rank_results):
            _compare(name, got, reference)


def test_world4_layouts_match_single_process(reference: list[tuple[float, float]]) -> None:
    per_rank = run_distributed(_train, 4, list(WORLD4.values()))
    for rank_results in per_rank:
        for name, got in zip(WORLD4, rank_results):
            _compare(name, got, reference)
