#!/usr/bin/env python
"""Few-shot task scores of a checkpoint through lm-evaluation-harness, at any TP/PP layout.

Examples::

    python tools/eval_tasks.py --load runs/x/ckpt --include-path examples/tasks \\
        --tasks salt_docstrings --output-path eval/tasks.json --log-samples
    torchrun --nproc_per_node 4 tools/eval_tasks.py --load runs/x/ckpt \\
        --tasks hellaswag,arc_easy --num-fewshot 5 --tensor-model-parallel-size 2

Needs the ``[eval]`` extra (``pip install -e ".[eval]"``). The checkpoint runs as it is (no
export) on lm-eval's ``salt-megatron`` backend; see ``docs/evaluation.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.eval.tasks import main

if __name__ == "__main__":
    sys.exit(main())
