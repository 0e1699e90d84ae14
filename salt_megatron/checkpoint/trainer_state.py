"""Save and load the trainer's full state with megatron-core dist-checkpointing (collective calls).

One checkpoint holds:

* the student's weights (``model`` / ``model0``...; global sharded keys, any TP/PP/VPP layout),
* the optimizer state (the distributed optimizer in its ``fully_reshardable`` format, so TP, PP
  and DP may all change on resume; see :mod:`salt_megatron.checkpoint.optimizer_state`),
* the LR scheduler state (common, saved by rank 0),
* every rank's RNG states (Python, NumPy, torch CPU, CUDA, megatron's tracker) as one
  ``ShardedObject`` per global rank; restored only when the layout is unchanged (a different
  layout draws different dropout masks anyway),
* ``salt_meta.json``: step, consumed samples, tokens seen, skipped steps, the full config, the
  tokenizer fingerprint, vocabulary sizes, the layout, and the caller's ``extra`` dict.

Saves are synchronous. megatron's writer fetches its results queue from a *spawn*-context
``Manager``, which re-imports ``__main__`` in a fresh interpreter and hangs entry points that are
not importable scripts (and costs seconds); :func:`_use_in_process_results_queue` swaps in a
thread queue before the first save. A synchronous save puts its results and reads them back with
``get_nowait()`` in this process; a ``multiprocessing.Queue`` would race there (its ``put``
returns before a feeder thread has written the item, so ``get_nowait`` can find it empty and the
save fails with "results_queue should not be empty").
"""

from __future__ import annotations

import queue
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from salt_megatron.checkpoint import files, layout, optimizer_state
from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.config import to_dict

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
)
"""Model fields that must match between a checkpoint and the run resuming from it."""


def _use_in_process_results_queue() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _save_strategy() -> Any:
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def layout_info(trainer: Any) -> dict[str, Any]:
    """The layout a checkpoint was saved at (``salt_meta.json["layout"]``)."""
    lay = trainer.layout
    return {
        "tp": lay.tp,
        "pp": lay.pp,
        "vpp": lay.vpp,
        "dp": lay.dp,
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


def _sharded_state(trainer: Any, is_loading: bool, with_rng: bool) -> dict[str, Any]:
    model_sd = layout.model_sharded_state_dict(trainer.model)
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = optimizer_state.sharded_state_dict(trainer.optimizer, model_sd, is_loading)
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
        "extra": extra,
    }


def save(trainer: Any, root: str, keep_last: int, fingerprint: str, extra: dict[str, Any]) -> str:
    """Save ``trainer`` atomically under ``root`` (every rank calls this); returns the dir."""
    _use_in_process_results_queue()
    rank = dist.get_rank()
    if rank == 0:
        files.prepare_tmp(root, trainer.step)
    dist.barrier()
    tmp = layout.tmp_dir(root, trainer.step)
    state = _sharded_state(trainer, is_loading=False, with_rng=True)
    dist_checkpointing.save(state, tmp, sharded_strategy=_save_strategy())
    if rank == 0:
        layout.write_meta(tmp, build_meta(trainer, fingerprint, extra))
    dist.barrier()  # every rank's shards and the metadata are on disk
    final = layout.iteration_dir(root, trainer.step)
    if rank == 0:
        files.commit(root, trainer.step, keep_last)
    dist.barrier()
    return final


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
    return all(saved.get(k) == now[k] for k in ("tp", "pp", "vpp", "dp", "world_size"))


def _apply(loaded: dict[str, Any], trainer: Any, with_rng: bool) -> None:
    chunks = trainer.model
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        layout.unwrap(chunk).load_state_dict(loaded[key], strict=True)
    optimizer_state.load(trainer.optimizer, loaded["optimizer"])
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        _set_rng(loaded["rng_state"])


def load(trainer: Any, resolved: files.Resolved, fingerprint: str) -> dict[str, Any]:
    """Restore ``trainer`` from a verified checkpoint (every rank calls this); returns its meta.

    Any failure (a shape mismatch, a missing key, an unreadable shard) is a CheckpointError that
    names the checkpoint directory.
    """
    meta, path = resolved.meta, resolved.path
    check_compatible(meta, trainer, fingerprint, path)
    with_rng = _same_layout(meta, trainer)
    try:
        state = _sharded_state(trainer, is_loading=True, with_rng=with_rng)
        loaded = dist_checkpointing.load(state, path)
        _apply(loaded, trainer, with_rng)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
    trainer.step = int(meta["step"])
    trainer.consumed_samples = int(meta["consumed_samples"])
    trainer.skipped_steps = int(meta.get("skipped_steps", 0))
    trainer.tokens_seen = int(meta.get("tokens_seen", 0))
    trainer.reset_data_position()
    return meta
