"""SALT_DS tools end to end: score an indexed dataset with a teacher our trainer saved, select a
score band into a new indexed dataset, and train the KD phase on it with --kd-data-path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from salt_megatron.data.preprocess import preprocess_files
from tests.integration.conftest import REPO, _env, launch
from tests.unit.test_data import make_small_data, read_docs

pytestmark = pytest.mark.integration


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], env=_env(None), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_score_select_and_train_on_the_selection(tmp_path: Path) -> None:
    corpus, tok = make_small_data(tmp_path / "data", docs=150, vocab=600)
    prefix = str(tmp_path / "data" / "docs")
    preprocess_files([corpus], prefix, str(tok), progress=False)
    data = ["--data-path", prefix, "--tokenizer-model", str(tok), "--seq-length", "32",
            "--micro-batch-size", "4", "--global-batch-size", "4", "--log-interval", "1",
            "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--data-cache-path", str(tmp_path / "cache"), "--split", "100,0,0"]  # fmt: skip
    teacher = tmp_path / "teacher"
    proc = launch([*data, "--train-iters", "3", "--save", str(teacher)], nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]

    scores_prefix = str(tmp_path / "scores" / "docs")
    out = _run([str(REPO / "tools/score_data.py"), "--out", scores_prefix, "--top-k", "10",
                "--kd-teacher-load", str(teacher), *data])  # fmt: skip
    assert "scored" in out
    scores = np.load(scores_prefix + ".npy")
    finite = np.flatnonzero(np.isfinite(scores))
    assert finite.size > 4 and np.all(scores[finite] > 0)

    sel_prefix = str(tmp_path / "sel" / "kd")
    out = _run([str(REPO / "tools/select_data.py"), "--scores", scores_prefix,
                "--output-prefix", sel_prefix, "--top-fraction", "0.5"])  # fmt: skip
    n = max(1, round(0.5 * finite.size))
    expected = sorted(finite[np.argsort(-scores[finite], kind="stable")][:n].tolist())
    assert f"kept {n} of {scores.size}" in out
    docs = read_docs(sel_prefix)
    assert len(docs) == n and all(len(d) == 33 for d in docs)  # seq_length + 1 tokens each

    from salt_megatron.data.datasets import build_gpt_datasets
    from salt_megatron.data.tokenizer import SentencePieceTokenizer
    from salt_megatron.distill.scoring import torch_tokens

    tokenizer = SentencePieceTokenizer(str(tok))
    ds = build_gpt_datasets(prefix, "1,0,0", 32, 1234, (None, 0, 0), tokenizer,
                            str(tmp_path / "cache"))[0]  # fmt: skip
    for doc, index in zip(docs, expected):
        assert doc.tolist() == torch_tokens(ds[index]).tolist()

    proc = launch([*data, "--train-iters", "4", "--kd-teacher-load", str(teacher), "--kd-steps",
                   "2", "--kd-data-path", sel_prefix], nproc=1)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "KD phase over, teacher released" in proc.stdout
