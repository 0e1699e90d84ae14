#!/usr/bin/env python
"""Train a tokenizer from JSONL or plain-text files: sentencepiece (BPE/unigram) or a Hugging Face
byte-level BPE ``tokenizer.json``.

Example::

    python tools/train_tokenizer.py --input data.jsonl --model-prefix tok/bpe8k --vocab-size 8000
    python tools/train_tokenizer.py --input data.jsonl --model-prefix tok/hf8k --vocab-size 8000 \\
        --tokenizer-type HuggingFaceTokenizer

Sentencepiece writes ``<prefix>.model`` and ``<prefix>.vocab``; special ids unk 0, bos 1, eos/eod
2, pad 3. Hugging Face writes the folder ``<prefix>/`` (``tokenizer.json`` and
``tokenizer_config.json``, loadable by ``transformers.AutoTokenizer``); ``<|endoftext|>`` (id 0)
is the eos/eod token, the ``--user-defined-symbols`` follow it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.data.corpus import BadLines, iter_texts
from salt_megatron.data.errors import DataError
from salt_megatron.data.hf_tokenizer import train_bpe_tokenizer
from salt_megatron.data.tokenizer import TOKENIZER_TYPES, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL (.jsonl/.json) or text files")
    p.add_argument(
        "--model-prefix",
        required=True,
        help="output prefix (.model/.vocab added), or the output folder of a Hugging Face one",
    )
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=TOKENIZER_TYPES[0])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true", help="disable byte fallback")
    p.add_argument("--json-key", default="text", help="text key of JSONL inputs")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=200_000,
        help="train on at most this many documents (sentencepiece: even stride; Hugging Face: "
        "the first ones)",
    )
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="extra special pieces")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and skip malformed lines instead of failing",
    )
    return p.parse_args(argv)


def _train_hf(args: argparse.Namespace, bad: BadLines | None) -> str:
    if args.model_type != "bpe":
        raise DataError("--tokenizer-type HuggingFaceTokenizer trains a byte-level BPE only")
    texts = itertools.islice(iter_texts(args.input, args.json_key, bad), args.max_sentences)
    tok = train_bpe_tokenizer(
        texts, args.model_prefix, args.vocab_size, special_tokens=args.user_defined_symbols
    )
    return (
        f"tokenizer  {tok.path}\n  type byte-level BPE (Hugging Face tokenizer.json), vocab "
        f"{tok.vocab_size}\n  special tokens: eos/eod={tok.eod}\n  fingerprint {tok.fingerprint}"
    )


def main(argv: list[str] | None = None) -> int:
    """Train and print a summary; exit status 1 with a message on bad input."""
    args = parse_args(argv)
    bad = BadLines() if args.skip_bad_lines else None
    try:
        if args.tokenizer_type == "HuggingFaceTokenizer":
            print(_train_hf(args, bad))
        else:
            summary = train_tokenizer(
                iter_texts(args.input, args.json_key, bad),
                args.model_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                byte_fallback=not args.no_byte_fallback,
                max_sentences=args.max_sentences,
                user_defined_symbols=args.user_defined_symbols,
                num_threads=args.threads,
            )
            print(summary.format())
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if bad is not None and bad.count:
        print(bad.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
