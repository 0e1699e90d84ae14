"""Reads the local tasks' JSONL files (beside this file) into ``datasets`` splits, offline.

Each line is one example with a ``split`` field (``test`` or ``fewshot``); lm-eval calls
:func:`load_jsonl` through a task YAML's ``custom_dataset`` with the YAML's ``dataset_kwargs``
(and its metadata, ignored). Made by ``tools/make_eval_tasks.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_jsonl(data_file: str, **_metadata: Any) -> Any:
    """``DatasetDict`` of the file's splits; ``data_file`` is relative to this folder."""
    import datasets

    path = Path(__file__).resolve().parent / data_file
    splits: dict[str, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                splits.setdefault(row.pop("split"), []).append(row)
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: bad example ({exc})") from None
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
