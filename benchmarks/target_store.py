"""Benchmark: the teacher-target store's formats side by side on the same targets.

The targets of ``--shards`` shards of an existing store (``--store DIR``, any format: the demo's
``runs/demo/full/targets_v1`` is the issue's reference) or, without one, of a synthetic teacher
(Zipf-like random logits at k, p), re-written in each format (format 1 by its own layout, the
format-1 code's ``np.save`` calls; format 2 ``float32``, ``float16``, ``q8``). Per format:

* bytes per token on disk (all files of the shards) and their ratio to format 1;
* write ms per shard (encode, ``np.save``, CRC-32 of every file);
* first read: the CRC-32 pass over the shard's files (``ShardFiles.verify``), against reading the
  same bytes without checksumming them (both from the page cache: the CRC's own cost);
* per-sample read (what the data loader does per sample after the first read), microseconds;
* the L1 error of the decoded target distribution against the source's (mean, max per token);
  q8: the largest ``|q^/q - 1|`` over its closed-form bound (``target_codec``).

Plus ``zlib.crc32`` throughput on 64 MiB. Times are the best and the median of ``--reps``.

    python benchmarks/target_store.py [--store DIR] [--shards 2] [--reps 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import load_average, machine, write_docs  # noqa: E402
from salt_megatron.data import target_codec as codec  # noqa: E402
from salt_megatron.data import teacher_targets as store  # noqa: E402
from salt_megatron.data.target_shards import SHARD_FILE  # noqa: E402

FORMATS = ("v1 float16", "float32", "float16", "q8")


def _timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(best, median) seconds of ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def _synthetic(spec: store.TargetSpec, shard: int) -> tuple[np.ndarray, ...]:
    import torch

    from salt_megatron.distill.targets import sparse_targets

    count = spec.shard_range(shard)[1]
    gen = torch.Generator().manual_seed(shard)
    n, vocab = count * spec.seq_length, spec.vocab_size
    logits = torch.randn(n, vocab, generator=gen) * 2.0
    logits -= torch.log1p(torch.arange(vocab, dtype=torch.float32))  # frequent ids first
    ids, logq, resid = sparse_targets(logits, 1.0, spec.top_k, spec.top_p, None, vocab)
    shape = (count, spec.seq_length, spec.top_k)
    return ids.view(shape).numpy(), logq.view(shape).numpy(), resid.view(shape[:2]).numpy()


def _source(args: argparse.Namespace) -> tuple[store.TargetSpec, list[tuple[np.ndarray, ...]]]:
    """The spec and the padded targets (ids, logq, residual, checksums) of the shards to use."""
    if args.store:
        src = store.TargetStore(args.store)
        spec = src.spec
        return spec, [src.read_shard(s) for s in range(min(args.shards, spec.num_shards))]
    spec = store.TargetSpec(
        teacher="synthetic", tokenizer_fingerprint="", dataset_fingerprint="", dataset_length=4096,
        num_samples=256 * args.shards, seq_length=128, vocab_size=8000, temperature=1.0, top_k=64,
        top_p=0.95, samples_per_shard=256,
    )  # fmt: skip
    sums = np.arange(256, dtype=np.uint64)
    return spec, [(*_synthetic(spec, s), sums) for s in range(args.shards)]


def _write_v1(
    root: str, spec: store.TargetSpec, shard: int, arrays: tuple[np.ndarray, ...]
) -> None:
    """A format-1 shard, as the format-1 code wrote it (its files and dtypes)."""
    ids, logq, resid, sums = arrays
    path = store.shard_dir(root, shard)
    os.makedirs(path, exist_ok=True)
    kept = ids >= 0
    np.save(os.path.join(path, "counts.npy"), kept.sum(-1).astype(np.uint16))
    np.save(os.path.join(path, "ids.npy"), ids[kept].astype(np.int32))
    np.save(os.path.join(path, "logprobs.npy"), logq[kept].astype(np.float16))
    np.save(os.path.join(path, "residual.npy"), resid.astype(np.float32))
    np.save(os.path.join(path, "checksums.npy"), sums)
    start, count = spec.shard_range(shard)
    Path(path, SHARD_FILE).write_text(f'{{"start": {start}, "count": {count}}}')


def _error(spec: store.TargetSpec, shards: list, root: str, q8: bool) -> dict[str, float]:
    """The stored targets' L1 error against the source's (kept ids and residual, per token,
    mean and max), and for q8 the largest measured error over its bound."""
    reader = store.TargetStore(root)
    worst, l1s = 0.0, []
    for shard, (ids, logq, resid, _) in enumerate(shards):
        start, count = spec.shard_range(shard)
        for row in range(count):
            got = reader.sample(start + row)
            order_r = np.argsort(np.where(ids[row] >= 0, ids[row], 1 << 30), axis=1)
            g_ids = got["kd_ids"].numpy()
            order_g = np.argsort(np.where(g_ids >= 0, g_ids, 1 << 30), axis=1)
            kept = np.take_along_axis(ids[row], order_r, 1) >= 0
            q = np.exp(np.take_along_axis(logq[row], order_r, 1).astype(np.float64)) * kept
            logq_hat = got["kd_logprobs"].numpy().astype(np.float64)  # exp in float64
            q_hat = np.exp(np.take_along_axis(logq_hat, order_g, 1)) * kept
            r_hat = got["kd_residual"].numpy()
            l1s.append(np.abs(q_hat - q).sum(1) + np.abs(r_hat.astype(np.float64) - resid[row]))
            if not q8:
                continue
            lq = np.where(kept, np.log(np.where(kept, q, 1.0)), 0.0)
            span = np.where(kept, lq, -np.inf).max(1) - np.where(kept, lq, np.inf).min(1)
            r16 = r_hat.astype(np.float16)
            bound = codec.relative_bound(
                codec.float16_up(np.where(kept.any(1), span, 0)), q.sum(1), r16
            )
            bound += codec.FLOAT32_SLACK * np.abs(lq).max(1, initial=0.0)  # float32 log q^
            rel = np.where(kept, np.abs(q_hat / np.where(kept, q, 1.0) - 1.0), 0.0).max(1)
            worst = max(worst, float((rel / np.maximum(bound, 1e-300)).max()))
    l1 = np.concatenate(l1s)
    return {"worst": worst, "l1_mean": float(l1.mean()), "l1_max": float(l1.max())}


def _files_of(root: str, shard: int) -> list[str]:
    path = store.shard_dir(root, shard)
    return [os.path.join(path, n) for n in sorted(os.listdir(path))]


def _read_bytes(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(chunk)
    return total


def _measure(fmt: str, spec: store.TargetSpec, shards: list, root: str, reps: int) -> dict:
    """Write the shards in ``fmt`` under ``root`` and time writing and reading them."""
    v1 = fmt.startswith("v1")
    spec = dataclasses.replace(
        spec, format=store.FORMAT, logprob_format="float16" if v1 else fmt,
        num_samples=sum(s[0].shape[0] for s in shards), command="",
    )  # fmt: skip
    store.write_spec(root, spec)
    if v1:  # the format-1 spec: no CRC, its own format string
        Path(root, store.SPEC_FILE).write_text(
            store.json.dumps({**dataclasses.asdict(spec), "format": store.FORMAT_V1})
        )

    def write() -> None:
        for shard, arrays in enumerate(shards):
            if v1:
                _write_v1(root, spec, shard, arrays)
            else:
                store.write_shard(root, spec, shard, *arrays)

    row: dict = {"format": fmt, "write": _timed(write, reps)}
    opened = store.read_spec(root)
    files = [store.shard_files(root, opened, s) for s in range(len(shards))]
    paths = [p for s in range(len(shards)) for p in _files_of(root, s)]
    row["bytes"] = sum(os.path.getsize(p) for p in paths)
    row["tokens"] = sum(s[0].shape[0] * s[0].shape[1] for s in shards)
    row["plain"] = _timed(lambda: _read_bytes(paths), reps)

    def verify() -> None:
        for f in files:
            f.verify()

    row["crc"] = None if v1 else _timed(verify, reps)
    reader = store.TargetStore(root, cache_shards=len(shards))
    n = opened.covered
    row["sample"] = _timed(lambda: [reader.sample(i) for i in range(n)], reps)
    row["samples"] = n
    row["error"] = _error(opened, shards, root, q8=fmt == "q8")
    return row


def _table(rows: list[dict], n_shards: int) -> str:
    ms, us = 1000.0 / n_shards, 1e6
    ref = rows[0]["bytes"] / rows[0]["tokens"]
    lines = [
        "| format | bytes/token | vs format 1 | write ms/shard | first read: CRC-32 ms/shard "
        "| plain read of the same bytes ms/shard | read us/sample | target L1 error per token "
        "vs the source: mean (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpt = r["bytes"] / r["tokens"]
        crc = "none" if r["crc"] is None else f"{r['crc'][0] * ms:.1f} ({r['crc'][1] * ms:.1f})"
        per = us / r["samples"]
        lines.append(
            f"| {r['format']} | {bpt:.1f} | {bpt / ref:.3f} | {r['write'][0] * ms:.0f} "
            f"({r['write'][1] * ms:.0f}) | {crc} | {r['plain'][0] * ms:.1f} "
            f"({r['plain'][1] * ms:.1f}) | {r['sample'][0] * per:.0f} "
            f"({r['sample'][1] * per:.0f}) | {r['error']['l1_mean']:.1e} "
            f"({r['error']['l1_max']:.1e}) |"
        )
    return "\n".join(lines)


def _crc_throughput(reps: int) -> tuple[float, float]:
    """zlib.crc32 MB/s on 64 MiB (best, median)."""
    data = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    best, median = _timed(lambda: zlib.crc32(data), reps)
    return len(data) / best / 1e6, len(data) / median / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--store", help="an existing store whose targets to re-write")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    load = load_average()
    start = time.perf_counter()
    spec, shards = _source(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="target_store_") as tmp:
        for fmt in FORMATS:
            rows.append(
                _measure(fmt, spec, shards, os.path.join(tmp, fmt.replace(" ", "_")), args.reps)
            )
            print(_table(rows, len(shards)), flush=True)
    crc = _crc_throughput(args.reps)
    err = rows[-1]["error"]
    tokens = rows[0]["tokens"]
    source = args.store or "a synthetic teacher (V 8000, k 64, p 0.95)"
    text = (
        f"Machine: {machine()}; load average {load} before the run; "
        f"{time.perf_counter() - start:.0f} s.\n"
        f"`python benchmarks/target_store.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
        f"{len(shards)} shards ({tokens} tokens, {rows[0]['samples']} samples of "
        f"{spec.seq_length}) of {source}, re-written in each format; best (median) of "
        f"{args.reps}; reads from the page cache.\n\n"
        + _table(rows, len(shards))
        + f"\n\nzlib.crc32: {crc[0]:.0f} MB/s ({crc[1]:.0f}). q8 error against its bound "
        f"(`salt_megatron/data/target_codec.py`): largest |q^/q - 1| / bound = "
        f"{err['worst']:.4f} over every kept id. The L1 error is that of the decoded target "
        "distribution (kept ids and residual) against the source store's."
    )
    print("\n" + text)
    if args.write_docs:
        write_docs(text, "## Teacher-target store")


if __name__ == "__main__":
    main()
