#!/usr/bin/env python
"""Write a corpus made on the machine as JSONL, or the whole data (corpus, tokenizer, dataset).

Two corpora, no download: the demo's Python stdlib docstrings (2 MB), and the Python sources of
the stdlib and the installed packages (``--corpus code``: about 300 MB, 89M tokens with its
8,000-piece tokenizer; see salt_megatron/data/code_corpus.py), which the SALT study's regime
round trains on.

python tools/make_demo_corpus.py --output corpus.jsonl                 # docstrings only
python tools/make_demo_corpus.py --prepare cache/demo                  # + tokenizer + .bin/.idx
python tools/make_demo_corpus.py --corpus code --prepare cache/code    # the larger corpus
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.data.code_corpus import write_code_corpus
from salt_megatron.data.corpus import write_stdlib_corpus


def main(argv: list[str] | None = None) -> int:
    """Write the corpus (or prepare all its data) and print what was written."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--output", help="JSONL file to write")
    group.add_argument("--prepare", metavar="CACHE_DIR", help="corpus, tokenizer and dataset")
    p.add_argument("--corpus", choices=("docstrings", "code"), default="docstrings")
    p.add_argument("--min-chars", type=int, default=40, help="drop shorter docstrings")
    p.add_argument("--workers", type=int, default=2, help="processes cleaning/tokenizing (code)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    if args.output and args.corpus == "code":
        c = write_code_corpus(args.output, args.workers)
        print(f"wrote {c.path}: {c.documents} documents, {c.chars} chars, {c.bytes / 1e6:.2f} MB "
              f"in {c.seconds:.0f} s; sha256 {c.sha256}; manifest {c.manifest}")  # fmt: skip
        return 0
    if args.output:
        s = write_stdlib_corpus(args.output, args.min_chars)
        print(f"wrote {s.path}: {s.documents} documents, {s.chars} chars, {s.bytes / 1e6:.2f} MB")
        return 0
    from salt_megatron.data.demo import prepare_code_data, prepare_demo_data

    if args.corpus == "code":
        paths = prepare_code_data(args.prepare, workers=args.workers, progress=True)
    else:
        paths = prepare_demo_data(args.prepare, progress=True)
    print(
        f"corpus     {paths.corpus}\ntokenizer  {paths.tokenizer_model}\n"
        f"data       {paths.data_prefix}\n{time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
