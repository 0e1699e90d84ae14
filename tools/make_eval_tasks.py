#!/usr/bin/env python
"""Write the local evaluation tasks' JSONL files (held-out stdlib docstrings) for examples/tasks.

    python tools/make_eval_tasks.py                  # rewrites examples/tasks/*.jsonl
    python tools/make_eval_tasks.py --out-dir /tmp/tasks

Deterministic for a given Python version (the corpus is its standard library); the committed
files were made with Python 3.11. See ``salt_megatron/eval/task_data.py`` and
``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.eval.task_data import write_task_data

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    """Write the files and print what was written."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(REPO / "examples" / "tasks"))
    args = p.parse_args(argv)
    for w in write_task_data(args.out_dir):
        print(f"wrote {w.path}: {w.fewshot} few-shot + {w.test} test examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
