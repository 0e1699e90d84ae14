#!/usr/bin/env python
"""Perplexity of a checkpoint on a held-out indexed dataset, at any TP/PP layout.

Examples::

    python tools/evaluate.py --load runs/x/ckpt --data-path data/heldout_text_document \\
        --eval-samples 512 --json eval.json
    torchrun --nproc_per_node 2 tools/evaluate.py --load runs/x/ckpt --step 1000 \\
        --data-path data/train_text_document --split 969,30,1 --split-name valid \\
        --tensor-model-parallel-size 2

Prints the mean loss per valid token, its perplexity and the token count (see
``salt_megatron/eval/perplexity.py`` and ``docs/export.md``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.eval.perplexity import main

if __name__ == "__main__":
    sys.exit(main())
