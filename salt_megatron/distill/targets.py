"""Offline teacher targets: the teacher's top-k / top-p soft targets of every KD sample, saved.

:func:`sparse_targets` turns the teacher's vocab-parallel logits into per-token targets without
gathering the vocabulary: a MAX and a SUM all-reduce give ``log Z``, each rank takes its local
top-k, and one all-gather of the k candidates per rank (value and id packed in float64, exact
for ids below 2^53) lets every rank merge the global top-k. :func:`save_targets` runs the
teacher over the samples of the KD phase, data parallel over shards of the store
(:mod:`salt_megatron.data.teacher_targets`), tensor parallel inside the teacher, and writes each
shard atomically; a rerun skips the complete shards.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from salt_megatron.data.batches import collate, to_device
from salt_megatron.data.teacher_targets import (
    SHARD_FILE,
    TargetSpec,
    sample_checksum,
    shard_dir,
    shard_done,
    write_shard,
)
from salt_megatron.runtime import device

_ROW_CHUNK_ELEMS = 1 << 25


def _all_reduce(x: torch.Tensor, op: Any, group: Any, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _local_top(x_nv: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and columns of the first ``k`` columns of each row by (value desc, column asc):
    ``topk`` picks among tied values arbitrarily, this picks the lowest columns."""
    kth_n1 = x_nv.topk(k, dim=-1).values[:, -1:]
    above_nv, tied_nv = x_nv > kth_n1, x_nv == kth_n1
    need_n = k - above_nv.sum(dim=-1)
    chosen_nv = above_nv | tied_nv
    crossing = (tied_nv.sum(dim=-1) > need_n).nonzero().squeeze(-1)  # ties across the k-th
    if crossing.numel():
        first_cv = tied_nv[crossing].cumsum(dim=-1) <= need_n[crossing].unsqueeze(-1)
        chosen_nv[crossing] = above_nv[crossing] | (tied_nv[crossing] & first_cv)
    cols_nk = chosen_nv.nonzero()[:, 1].view(-1, k)  # ascending columns
    return x_nv.gather(1, cols_nk), cols_nk


def sparse_targets(
    logits_nv: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float | None,
    tp_group: Any,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (and top-p) teacher targets of ``[N, Vl]`` vocab-parallel logits (rank r of
    ``tp_group`` holds columns ``[r Vl, (r + 1) Vl)``; columns ``>= vocab_size`` are padding).

    Returns ``ids`` ``[N, k]`` int64 (descending probability, ties by lower id; -1 = slot not
    kept), ``logq`` ``[N, k]`` float32 (``log softmax(logits / T)`` of each id, 0 where not
    kept) and ``residual`` ``[N]`` float32 (``1 - sum`` of the kept probabilities). With
    ``top_p`` a token keeps its most probable ids up to and including the first one at which
    their cumulative probability reaches ``top_p`` (at most k). Deterministic under ties (lower
    ids first), so any layout of the teacher gives the same targets. Collectives: MAX, SUM, one
    all-gather of ``[N, k, 2]`` float64. Host synchronising (the tool's path, not training's).
    """
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    width = logits_nv.shape[-1]
    x_nv = logits_nv.float() / temperature
    max_n = _all_reduce(x_nv.amax(dim=-1), dist.ReduceOp.MAX, tp_group, world)
    sum_n = _all_reduce(
        (x_nv - max_n.unsqueeze(-1)).exp_().sum(dim=-1), dist.ReduceOp.SUM, tp_group, world
    )
    vals_nj, cols_nj = _local_top(x_nv, min(top_k, width))
    cand_njc = torch.stack([vals_nj.double(), (cols_nj + rank * width).double()], dim=-1)
    if world > 1:
        n, j, _ = cand_njc.shape
        gathered = torch.empty((world * n, j, 2), dtype=torch.float64, device=x_nv.device)
        dist.all_gather_into_tensor(gathered, cand_njc.contiguous(), group=tp_group)
        cand_njc = gathered.view(world, n, j, 2).permute(1, 0, 2, 3).reshape(n, world * j, 2)
    by_id = cand_njc[..., 1].argsort(dim=-1)
    cand_njc = cand_njc.gather(1, by_id.unsqueeze(-1).expand_as(cand_njc))
    order = cand_njc[..., 0].argsort(dim=-1, descending=True, stable=True)[:, :top_k]
    best_nkc = cand_njc.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
    logq_nk = (best_nkc[..., 0] - (max_n + sum_n.log()).double().unsqueeze(-1)).float()
    ids_nk = best_nkc[..., 1].long()
    keep_nk = ids_nk < vocab_size
    q_nk = torch.where(keep_nk, logq_nk.double().exp(), 0.0)
    if top_p is not None:
        keep_nk &= (q_nk.cumsum(dim=-1) - q_nk) < top_p
    q_nk = torch.where(keep_nk, q_nk, 0.0)
    residual_n = (1.0 - q_nk.sum(dim=-1)).clamp(min=0.0).float()
    return torch.where(keep_nk, ids_nk, -1), torch.where(keep_nk, logq_nk, 0.0), residual_n


def _shard_targets(
    teacher: Any, dataset: Any, spec: TargetSpec, shard: int, micro_batch_size: int, tp_group: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Padded ``[count, seq, k]`` ids / log-probabilities, ``[count, seq]`` residual and the
    ``[count]`` sample checksums of one shard."""
    start, count = spec.shard_range(shard)
    shape = (count, spec.seq_length, spec.top_k)
    ids = np.full(shape, -1, dtype=np.int32)
    logq = np.zeros(shape, dtype=np.float32)
    resid = np.zeros(shape[:2], dtype=np.float32)
    checksums = np.zeros(count, dtype=np.uint64)
    for b0 in range(0, count, micro_batch_size):
        rows = slice(b0, min(b0 + micro_batch_size, count))
        samples = [dataset[start + j] for j in range(rows.start, rows.stop)]
        checksums[rows] = [sample_checksum(x) for x in samples]
        batch = to_device(collate(samples), device())
        logits_sbv = teacher.student_layout_logits(batch["tokens"], batch["position_ids"])
        s, b, width = logits_sbv.shape
        logits_nv = logits_sbv.reshape(s * b, width)
        step = max(1, _ROW_CHUNK_ELEMS // width)  # bounds the float32 temporaries
        parts = [
            sparse_targets(logits_nv[r : r + step], spec.temperature, spec.top_k, spec.top_p,
                           tp_group, spec.vocab_size)
            for r in range(0, s * b, step)
        ]  # fmt: skip
        ids_nk, logq_nk, resid_n = (torch.cat(x) for x in zip(*parts))
        ids[rows] = ids_nk.view(s, b, -1).transpose(0, 1).cpu().numpy()
        logq[rows] = logq_nk.view(s, b, -1).transpose(0, 1).cpu().numpy()
        resid[rows] = resid_n.view(s, b).t().cpu().numpy()
    return ids, logq, resid, checksums


def save_targets(
    teacher: Any,
    dataset: Any,
    root: str,
    spec: TargetSpec,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    tp_group: Any,
    writer: bool,
) -> None:
    """Compute and write this data-parallel rank's missing shards (shards ``dp_rank``,
    ``dp_rank + dp_size``, ...); ``writer`` is true on one rank of each teacher TP group, and
    writes (encodes) each shard in a background thread while the next one is computed.
    Collective over the world (a barrier at the end)."""
    todo = [s for s in range(dp_rank, spec.num_shards, dp_size) if not shard_done(root, spec, s)]
    samples = sum(spec.shard_range(s)[1] for s in todo)
    show = dist.get_rank() == 0
    pending: Future[None] | None = None
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        tqdm(total=samples, desc="teacher targets", unit="sample", disable=not show) as bar,
    ):
        for shard in todo:
            arrays = _shard_targets(teacher, dataset, spec, shard, micro_batch_size, tp_group)
            if pending is not None:
                pending.result()  # one shard in flight: host memory stays bounded
            if writer:  # encoding (zlib releases the GIL) overlaps the next shard's forwards
                pending = pool.submit(write_shard, root, spec, shard, *arrays)
            bar.update(spec.shard_range(shard)[1])
        if pending is not None:
            pending.result()
    dist.barrier()


def store_summary(root: str, spec: TargetSpec) -> dict[str, float]:
    """Tokens, kept ids and bytes of a complete store (from the shards' records)."""
    tokens = kept = size = 0
    for shard in range(spec.num_shards):
        path = shard_dir(root, shard)
        with open(os.path.join(path, SHARD_FILE)) as f:
            record = json.load(f)
        tokens += record["tokens"]
        kept += record["kept"]
        size += sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    return {
        "tokens": tokens,
        "mean_ids_per_token": kept / max(tokens, 1),
        "bytes_per_token": size / max(tokens, 1),
        "bytes": size,
    }
