#!/usr/bin/env python
"""Tokenize JSONL or plain-text files into Megatron's indexed ``.bin/.idx`` format.

Example::

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/mydata \\
        --tokenizer-model tok/bpe8k.model --workers 2
    python tools/preprocess_data.py --input data.jsonl --output-prefix out/mydata \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model hf/Qwen2.5-0.5B --workers 2

writes ``out/mydata_text_document.{bin,idx}`` (Megatron-LM's naming: ``<prefix>_<key>_document``)
and ``out/mydata_text_document.tokenizer.json``; pass ``out/mydata_text_document`` as the data
prefix. JSONL: one document per line (``--json-key``); text files: one document per block of
lines separated by a blank line. An end-of-document token follows every document.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.data.errors import DataError
from salt_megatron.data.preprocess import preprocess_files
from salt_megatron.data.tokenizer import TOKENIZER_TYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.json) or text files")
    p.add_argument("--output-prefix", required=True)
    p.add_argument(
        "--tokenizer-model",
        required=True,
        help="sentencepiece .model file, or a Hugging Face tokenizer folder / tokenizer.json",
    )
    p.add_argument(
        "--tokenizer-type",
        choices=TOKENIZER_TYPES,
        help="default: inferred (a folder or .json is a Hugging Face tokenizer)",
    )
    p.add_argument("--json-key", default="text")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-append-eod", action="store_true", help="do not append the eod token")
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and report malformed lines instead of failing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Preprocess and print the closing summary; exit status 1 with a message on bad input."""
    args = parse_args(argv)
    prefix = f"{args.output_prefix}_{args.json_key}_document"
    try:
        stats = preprocess_files(
            args.input,
            prefix,
            args.tokenizer_model,
            json_key=args.json_key,
            workers=args.workers,
            append_eod=not args.no_append_eod,
            skip_bad_lines=args.skip_bad_lines,
            progress=not args.no_progress,
            tokenizer_type=args.tokenizer_type,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(stats.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
