#!/usr/bin/env python
"""Write the embedded demo corpus (Python stdlib docstrings) as JSONL, or the whole demo data.

python tools/make_demo_corpus.py --output corpus.jsonl     # corpus only
python tools/make_demo_corpus.py --prepare cache/data      # corpus + tokenizer + .bin/.idx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.data.corpus import write_stdlib_corpus


def main(argv: list[str] | None = None) -> int:
    """Write the corpus (or prepare all demo data) and print what was written."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--output", help="JSONL file to write")
    group.add_argument("--prepare", metavar="CACHE_DIR", help="run prepare_demo_data(CACHE_DIR)")
    p.add_argument("--min-chars", type=int, default=40, help="drop shorter docstrings")
    args = p.parse_args(argv)
    if args.output:
        s = write_stdlib_corpus(args.output, args.min_chars)
        print(f"wrote {s.path}: {s.documents} documents, {s.chars} chars, {s.bytes / 1e6:.2f} MB")
        return 0
    from salt_megatron.data.demo import prepare_demo_data

    paths = prepare_demo_data(args.prepare, progress=True)
    print(
        f"corpus     {paths.corpus}\ntokenizer  {paths.tokenizer_model}\n"
        f"data       {paths.data_prefix}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
