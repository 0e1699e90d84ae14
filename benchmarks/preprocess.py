#!/usr/bin/env python
"""Preprocessing throughput with 1 and 2 workers on the demo corpus (stdlib docstrings).

    python benchmarks/preprocess.py [--cache-dir cache/data] [--repeat 3]

Prints docs/s, tokens/s and MB/s per worker count (best of ``--repeat`` runs) and the ratio.
``--workers 1`` tokenizes in the parent process; more workers use a process pool.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.data.demo import prepare_demo_data
from salt_megatron.data.preprocess import PreprocessStats, preprocess_files


def best_run(corpus: str, model: str, workers: int, repeat: int, out_dir: str) -> PreprocessStats:
    """The fastest of ``repeat`` preprocessing runs with ``workers`` workers."""
    runs = [
        preprocess_files([corpus], f"{out_dir}/w{workers}", model, workers=workers, progress=False)
        for _ in range(repeat)
    ]
    return min(runs, key=lambda s: s.seconds)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache-dir", default="cache/data")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    paths = prepare_demo_data(args.cache_dir)
    with tempfile.TemporaryDirectory() as out_dir:
        results = [
            best_run(paths.corpus, paths.tokenizer_model, w, args.repeat, out_dir)
            for w in args.workers
        ]
    first = results[0]
    print(
        f"corpus {paths.corpus}: {first.documents} docs, {first.tokens} tokens, "
        f"{first.input_bytes / 1e6:.2f} MB (best of {args.repeat})"
    )
    print(f"{'workers':>8} {'seconds':>8} {'docs/s':>10} {'tokens/s':>12} {'MB/s':>7} {'ratio':>6}")
    for s in results:
        print(
            f"{s.workers:>8} {s.seconds:>8.2f} {s.docs_per_s:>10,.0f} {s.tokens_per_s:>12,.0f} "
            f"{s.mb_per_s:>7.2f} {first.seconds / s.seconds:>5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
