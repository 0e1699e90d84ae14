"""Save and load the trainer's full state with megatron-core dist-checkpointing (collective calls).

One checkpoint holds:

* the student's weights (``model`` / ``model0``...; global sharded keys, any TP/PP/VPP layout),
* the optimizer state; the distributed optimizer's by default in its ``dp_reshardable`` form
  (each rank writes its own buckets: no gather, no extra host memory; it resumes only at the same
  TP, PP and virtual PP), with ``--ckpt-fully-reshardable`` in the ``fully_reshardable`` form
  (gathered per data-parallel group; TP, PP and DP may all change on resume); see
  :mod:`salt_megatron.checkpoint.optimizer_state`,
* the LR scheduler state (common, saved by rank 0),
* every rank's RNG states (Python, NumPy, torch CPU, CUDA, megatron's tracker) as one
  ``ShardedObject`` per global rank; restored only when the layout is unchanged (a different
  layout draws different dropout masks anyway),
* ``salt_meta.json``: step, consumed samples, tokens seen, skipped steps, the full config, the
  tokenizer fingerprint, vocabulary sizes, the layout, the optimizer's sharding type, and the
  caller's ``extra`` dict.

Saves and loads go through megatron-core's fully parallel strategy wrappers over the data-parallel
group: the replicas of a tensor share its writing (and reading) instead of one rank doing all of
it. A save either blocks (the default) or, with an ``AsyncCallsQueue``, forks a writer process
(megatron's ``TemporalAsyncCaller``: the fork is a copy-on-write snapshot, so training goes on at
once) and returns; the queue's finalization, run by every rank once every rank's writer is done,
writes the metadata and only then commits the directory (:func:`files.commit`). megatron's writer
fetches its results queue from a *spawn*-context ``Manager``, which re-imports ``__main__`` in a
fresh interpreter and hangs entry points that are not importable scripts (and costs seconds);
:func:`use_results_queue` swaps in a fork-context :class:`ResultsQueue` before the first save.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.queues
import random
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from salt_megatron.checkpoint import files, layout, optimizer_state
from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.checkpoint.optimizer_state import DP_RESHARDABLE, FULLY_RESHARDABLE
from salt_megatron.config import to_dict
from salt_megatron.models.student import gathered_params
from salt_megatron.runtime import device

FORMAT_VERSION = 1
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "position_embedding_type",
    "normalization",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "num_experts",
    "moe_ffn_hidden_size",
    "moe_layer_freq",
    "moe_shared_expert_intermediate_size",
)
"""Model fields that must match between a checkpoint and the run resuming from it."""


RESULTS_WAIT_SECONDS = 30.0
"""How long a read of the write results waits for them (a writer that died never sends any)."""


class ResultsQueue(multiprocessing.queues.Queue):  # type: ignore[type-arg]
    """megatron's write-results queue: fork-context, and ``get_nowait`` waits for the data.

    The writer puts its results here: in this process for a synchronous save, in the forked writer
    process for an async one (so a thread queue would not do). megatron reads them with
    ``get_nowait`` right after the put; a ``multiprocessing`` queue's ``put`` returns before its
    feeder thread has written the item, so an immediate read could find it empty ("results_queue
    should not be empty": a failed save, about one in ten on a loaded machine). megatron's own
    queue is a synchronous Manager proxy.
    """

    def __init__(self) -> None:
        super().__init__(ctx=mp.get_context("fork"))

    def get_nowait(self) -> Any:
        """The next results, waiting up to :data:`RESULTS_WAIT_SECONDS` for the feeder thread."""
        return self.get(timeout=RESULTS_WAIT_SECONDS)


def use_results_queue() -> None:
    """Give megatron's checkpoint writer a :class:`ResultsQueue` (before any save)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, ResultsQueue):
        filesystem_async._results_queue = ResultsQueue()


def _save_strategy(dp_group: Any = None) -> Any:
    """megatron's torch_dist writer, its work spread over ``dp_group`` (None: every rank)."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    base = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    return FullyParallelSaveStrategyWrapper(base, dp_group)


def _load_strategy(dp_group: Any) -> Any:
    """megatron's torch_dist reader, each shard read once in ``dp_group`` and exchanged."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    return FullyParallelLoadStrategyWrapper(TorchDistLoadShardedStrategy(), dp_group)


def layout_info(trainer: Any) -> dict[str, Any]:
    """The layout a checkpoint was saved at (``salt_meta.json["layout"]``)."""
    lay = trainer.layout
    return {
        "tp": lay.tp,
        "pp": lay.pp,
        "vpp": lay.vpp,
        "dp": lay.dp,
        "ep": lay.ep,
        "etp": lay.etp,
        "world_size": dist.get_world_size(),
        "distributed_optimizer": trainer.cfg.parallel.use_distributed_optimizer,
    }


def _rng_object(trainer: Any) -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def optimizer_sharding(trainer: Any) -> str:
    """The form this run saves the distributed optimizer's state in."""
    return FULLY_RESHARDABLE if trainer.cfg.checkpoint.ckpt_fully_reshardable else DP_RESHARDABLE


def _sharded_state(trainer: Any, is_loading: bool, with_rng: bool, sharding: str) -> dict[str, Any]:
    model_sd = layout.model_sharded_state_dict(trainer.model)
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = optimizer_state.sharded_state_dict(
        trainer.optimizer, model_sd, is_loading, sharding
    )
    state["scheduler"] = trainer.scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_object(trainer)
    return state


def build_meta(trainer: Any, fingerprint: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``salt_meta.json`` of a checkpoint of ``trainer`` now."""
    return {
        "format": FORMAT_VERSION,
        "step": trainer.step,
        "consumed_samples": trainer.consumed_samples,
        "tokens_seen": getattr(trainer, "tokens_seen", 0),
        "skipped_steps": trainer.skipped_steps,
        "config": to_dict(trainer.cfg),
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": trainer.vocab_size,
        "padded_vocab_size": trainer.padded_vocab,
        "layout": layout_info(trainer),
        "optimizer_sharding": optimizer_sharding(trainer),
        "extra": extra,
    }


def save(
    trainer: Any,
    root: str,
    keep_last: int,
    fingerprint: str,
    extra: dict[str, Any],
    async_queue: Any | None = None,
) -> str:
    """Save ``trainer`` atomically under ``root`` (every rank calls this); returns the final dir.

    With ``async_queue`` (megatron's ``AsyncCallsQueue``) the shards are written in a background
    process and the commit is the request's last finalization step: the directory is renamed and
    the tracker updated only once the queue finalizes it. Otherwise the save completes here.
    """
    use_results_queue()
    rank, step = dist.get_rank(), trainer.step
    if rank == 0:
        files.prepare_tmp(root, step)
    dist.barrier()
    tmp = layout.tmp_dir(root, step)
    with gathered_params(trainer.model):  # the overlapped all-gather may still be pending
        state = _sharded_state(
            trainer, is_loading=False, with_rng=True, sharding=optimizer_sharding(trainer)
        )
        request = dist_checkpointing.save(
            state,
            tmp,
            sharded_strategy=_save_strategy(trainer.layout.dp_group),
            async_sharded_save=async_queue is not None,
        )
    commit = partial(_commit, root, step, keep_last, build_meta(trainer, fingerprint, extra))
    if async_queue is None:
        commit()
    else:
        request.add_finalize_fn(commit)
        async_queue.schedule_async_request(request)  # forks the writer: a snapshot of now
    return layout.iteration_dir(root, step)


def _commit(root: str, step: int, keep_last: int, meta: dict[str, Any]) -> None:
    """Mark a written checkpoint complete (every rank; after every rank's shards are on disk)."""
    rank = dist.get_rank()
    if rank == 0:
        layout.write_meta(layout.tmp_dir(root, step), meta)
        files.commit(root, step, keep_last)
    dist.barrier()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_compatible(meta: dict[str, Any], trainer: Any, fingerprint: str, path: str) -> None:
    """Refuse a checkpoint whose model, vocabulary, tokenizer or optimizer kind differ."""
    where = f"{path}/{layout.META_FILE}"
    saved = (meta.get("config") or {}).get("model") or {}
    diffs = [
        f"{_flag(name)} {getattr(trainer.cfg.model, name)} (checkpoint: {saved[name]})"
        for name in SHAPE_FIELDS
        if name in saved and saved[name] != getattr(trainer.cfg.model, name)
    ]
    if diffs:
        raise CheckpointError(
            f"{path}: the model does not match the checkpoint ({where}): " + ", ".join(diffs)
        )
    padded = meta.get("padded_vocab_size")
    if padded is not None and padded != trainer.padded_vocab:
        raise CheckpointError(
            f"{path}: padded vocabulary {trainer.padded_vocab} differs from the checkpoint's "
            f"{padded} (vocab {meta.get('vocab_size')}; set --make-vocab-size-divisible-by so "
            f"that both tensor-parallel sizes pad alike)"
        )
    saved_fp = meta.get("tokenizer_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        raise CheckpointError(
            f"{path}: saved with tokenizer {saved_fp!r}, this run uses {fingerprint!r}"
        )
    saved_dist = (meta.get("layout") or {}).get("distributed_optimizer")
    current = trainer.cfg.parallel.use_distributed_optimizer
    if saved_dist is not None and saved_dist != current:
        raise CheckpointError(
            f"{path}: saved {'with' if saved_dist else 'without'} --use-distributed-optimizer, "
            f"this run is {'with' if current else 'without'} it (not convertible)"
        )


def _same_layout(meta: dict[str, Any], trainer: Any) -> bool:
    saved = meta.get("layout") or {}
    now = layout_info(trainer)
    saved = {"ep": 1, "etp": saved.get("tp"), **saved}  # saved before expert parallelism
    keys = ("tp", "pp", "vpp", "dp", "ep", "etp", "world_size")
    return all(saved.get(k) == now[k] for k in keys)


def _apply(loaded: dict[str, Any], trainer: Any, with_rng: bool) -> None:
    chunks = trainer.model
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        layout.unwrap(chunk).load_state_dict(loaded[key], strict=True)
    optimizer_state.load(trainer.optimizer, loaded["optimizer"])
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        _set_rng(loaded["rng_state"])


def _load_sharding(meta: dict[str, Any], trainer: Any, path: str) -> str:
    """The form the checkpoint's optimizer state was saved in, if this run can load it.

    A ``dp_reshardable`` distributed-optimizer state is laid out in the saving run's
    gradient buckets: it loads only at the same TP, PP and virtual PP (and, for the experts'
    buckets, the same expert-parallel and expert tensor-parallel sizes).
    """
    sharding = str(meta.get("optimizer_sharding", FULLY_RESHARDABLE))
    if sharding != DP_RESHARDABLE or not trainer.cfg.parallel.use_distributed_optimizer:
        return sharding
    saved, now = meta.get("layout") or {}, layout_info(trainer)
    saved = {"ep": 1, "etp": saved.get("tp"), **saved}  # saved before expert parallelism
    keys = ("tp", "pp", "vpp", "ep", "etp")
    moved = [f"{k.upper()} {saved.get(k)} -> {now[k]}" for k in keys if saved.get(k) != now[k]]
    if moved:
        raise CheckpointError(
            f"{path}: its distributed-optimizer state is {DP_RESHARDABLE}, which cannot change "
            f"layout ({', '.join(moved)}); resave it at its own layout with "
            "--ckpt-fully-reshardable"
        )
    return sharding


def _load_error(exc: Exception, meta: dict[str, Any], trainer: Any, path: str) -> CheckpointError:
    if isinstance(exc, CheckpointError):
        return exc
    if isinstance(exc, AssertionError) and "unpadded elements in each bucket" in str(exc):
        dp = (meta.get("layout") or {}).get("dp")
        return CheckpointError(
            f"{path}: its {DP_RESHARDABLE} distributed-optimizer state was saved in DP {dp}'s "
            f"gradient buckets, which differ at DP {trainer.layout.dp}; resave it at DP {dp} "
            "with --ckpt-fully-reshardable"
        )
    return CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc})")


def load(trainer: Any, resolved: files.Resolved, fingerprint: str) -> dict[str, Any]:
    """Restore ``trainer`` from a verified checkpoint (every rank calls this); returns its meta.

    Any failure (a shape mismatch, a missing key, an unreadable shard, an optimizer state that
    does not fit this layout) is a CheckpointError that names the checkpoint directory, raised on
    every rank (the ranks agree after the load).
    """
    meta, path = resolved.meta, resolved.path
    check_compatible(meta, trainer, fingerprint, path)
    with_rng = _same_layout(meta, trainer)
    error: CheckpointError | None = None
    try:
        sharding = _load_sharding(meta, trainer, path)
        state = _sharded_state(trainer, is_loading=True, with_rng=with_rng, sharding=sharding)
        loaded = dist_checkpointing.load(
            state, path, sharded_strategy=_load_strategy(trainer.layout.dp_group)
        )
        _apply(loaded, trainer, with_rng)
    except Exception as exc:
        error = _load_error(exc, meta, trainer, path)
    failed = torch.tensor([float(error is not None)], device=device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise CheckpointError(f"{path}: another rank could not load it (see its error)")
    trainer.step = int(meta["step"])
    trainer.consumed_samples = int(meta["consumed_samples"])
    trainer.skipped_steps = int(meta.get("skipped_steps", 0))
    trainer.tokens_seen = int(meta.get("tokens_seen", 0))
    trainer.reset_data_position()
    return meta
