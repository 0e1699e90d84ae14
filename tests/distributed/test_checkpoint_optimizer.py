"""Distributed-optimizer (torch Adam) save -> load round trip at DP=2, one check per megatron bug.

In both checkpoint forms (``dp_reshardable``, the default, and ``fully_reshardable``):

1. a fresh optimizer (no Adam state) must save and load (megatron asserts ``len(steps) == 1``),
2. the ``fully_reshardable`` load must not look for ``step`` in the loaded tensors (KeyError),
3. every parameter must own its ``step`` after a load (a shared one is bumped once per param),
4. the ``dp_reshardable`` load must not copy in place into leaf parameters under autograd,
5. the ``dp_reshardable`` load must keep the restored ``step`` (not the fresh optimizer's 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.distributed

ARGS = [
    "--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--train-iters", "6", "--use-distributed-optimizer",
]  # fmt: skip


def _trainer(cfg: Any) -> Any:
    import torch.distributed as dist

    from salt_megatron.training.data import build_run_data
    from salt_megatron.training.trainer import Trainer

    data = build_run_data(cfg, cfg.data_parallel_size(dist.get_world_size()))
    return Trainer(cfg, (data.train, data.valid), data.vocab_size)


def _step_tensors(trainer: Any) -> list[Any]:
    inner = trainer.optimizer.chained_optimizers[0].optimizer
    return [state["step"] for state in inner.state.values()]


def _roundtrip(root: str, extra: list[str]) -> dict[str, Any]:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from salt_megatron.checkpoint import files, optimizer_state, trainer_state
    from salt_megatron.config import parse_config

    cfg = parse_config(ARGS + extra)
    a = _trainer(cfg)
    fresh_states = len(a.optimizer.chained_optimizers[0].optimizer.state)
    trainer_state.save(a, root, 5, "fp", {"phase": "lm"})  # bug 1: no Adam state yet
    a.train_step()
    a.train_step()
    trainer_state.save(a, root, 5, "fp", {"phase": "kd"})
    ref_loss = a.train_step().loss
    ref_steps = optimizer_state.adam_steps(a.optimizer)
    a.close()
    parallel_state.destroy_model_parallel()

    b = _trainer(cfg)  # a fresh optimizer again
    resolved = files.resolve(root, fallback=False)
    assert resolved is not None
    meta = trainer_state.load(b, resolved, "fp")  # bugs 1 and 2
    steps = _step_tensors(b)
    loaded_steps = optimizer_state.adam_steps(b.optimizer)
    loss = b.train_step().loss
    b.close()
    parallel_state.destroy_model_parallel()
    return {
        "sharding": meta["optimizer_sharding"],
        "fresh_states": fresh_states,
        "extra": meta["extra"],
        "distinct_steps": len({id(t) for t in steps}) == len(steps) > 1,  # bug 3
        "loaded_steps": sorted(set(loaded_steps)),
        "after_steps": sorted(set(optimizer_state.adam_steps(b.optimizer))),
        "ref_steps": sorted(set(ref_steps)),
        "loss": loss,
        "ref_loss": ref_loss,
        # a fork-context queue, not the spawn-context Manager proxy megatron creates
        "plain_queue": isinstance(filesystem_async._results_queue, trainer_state.ResultsQueue),
    }


def _both_forms(root: str) -> list[dict[str, Any]]:
    return [
        _roundtrip(f"{root}/dp", []),
        _roundtrip(f"{root}/fully", ["--ckpt-fully-reshardable"]),
    ]


def test_distributed_optimizer_roundtrip_dp2(tmp_path: Path) -> None:
    per_rank = run_distributed(_both_forms, 2, str(tmp_path))
    for r in [r for rank in per_rank for r in rank]:
        assert r["fresh_states"] == 0  # the save really started from an empty optimizer
        assert r["extra"] == {"phase": "kd"}
        assert r["distinct_steps"]
        assert r["loaded_steps"] == [2.0]
        assert r["after_steps"] == r["ref_steps"] == [3.0]
        assert r["loss"] == r["ref_loss"]
        assert r["plain_queue"]
    assert [r["sharding"] for r in per_rank[0]] == ["dp_reshardable", "fully_reshardable"]
