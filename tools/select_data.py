"""SALT_DS step 2: keep the sequences in a score band as a new indexed dataset for --kd-data-path.

    python tools/select_data.py --scores runs/scores/pile --output-prefix data/pile_kd \
        --low-quantile 0.5 --high-quantile 0.9        # or: --top-fraction 0.3

Rebuilds the scored samples (same data, sequence length and seed as tools/score_data.py), writes
each chosen sequence (``seq_length + 1`` tokens) as one document of ``<output-prefix>.bin/.idx``
(written under a temporary name, renamed when complete) with the tokenizer's fingerprint beside it,
and prints how many were kept. Default band: the upper half of the finite scores up to the 90th
percentile ("challenging but learnable": the hardest 10% are dropped as likely noise).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", required=True, help="prefix given to score_data.py --out")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--low-quantile", type=float, default=0.5)
    parser.add_argument("--high-quantile", type=float, default=0.9)
    parser.add_argument("--top-fraction", type=float, default=None, help="instead of a band")
    args = parser.parse_args()

    from salt_megatron.distill.salt_ds import select_band
    from salt_megatron.distill.scoring import read_scores
    from salt_megatron.distill.selection import write_selection

    scores, spec = read_scores(args.scores)
    if args.top_fraction is not None:
        chosen = select_band(scores, top_fraction=args.top_fraction)
    else:
        chosen = select_band(scores, args.low_quantile, args.high_quantile)
    write_selection(spec, chosen, args.output_prefix, os.path.dirname(args.scores) or ".")
    print(f"kept {chosen.size} of {scores.size} sequences -> {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
