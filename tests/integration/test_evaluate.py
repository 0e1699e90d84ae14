"""tools/evaluate.py: a checkpoint trained at TP=2 on an indexed dataset, evaluated at TP=1 and 2.

A sentencepiece tokenizer (300 pieces) and an indexed dataset are built from stdlib docstrings;
pretrain_salt.py trains a tiny GQA model for 5 steps at TP=2 (so its padded vocabulary, 512, is
not what TP=1 would pad to) and validates it at step 3 and at its last step, 5, on 4 samples of
the valid split. Evaluating the saved checkpoint on the same 4 samples must give the trainer's
validation loss, at TP=1 and TP=2 alike (1e-5).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docstring_data import docstring_texts, train_test_tokenizer
from tests.integration.conftest import REPO, launch, read_metrics

pytestmark = pytest.mark.integration
SPLIT = "90,10,0"


def _data(tmp: Path) -> tuple[str, str]:
    """(tokenizer model, dataset prefix) from ~40 KB of docstrings."""
    from salt_megatron.data.preprocess import preprocess_files

    texts = docstring_texts(40_000)
    train_test_tokenizer(texts, tmp / "tok")
    corpus = tmp / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = str(tmp / "docs_text_document")
    preprocess_files([corpus], prefix, str(tmp / "tok.model"), progress=False)
    return str(tmp / "tok.model"), prefix


def _evaluate(args: list[str], nproc: int) -> subprocess.CompletedProcess[str]:
    script = str(REPO / "tools/evaluate.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0"]  # fmt: skip
    cmd = [*(torchrun if nproc > 1 else [sys.executable]), script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str, float]:
    """(checkpoint root, tokenizer, data prefix, the trainer's validation loss at step 5)."""
    tmp = tmp_path_factory.mktemp("eval")
    tok, prefix = _data(tmp)
    args = [
        "--data-path", prefix, "--tokenizer-model", tok, "--split", SPLIT,
        "--data-cache-path", str(tmp / "cache"), "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "5",
        "--lr", "3e-3", "--eval-interval", "3", "--eval-iters", "2", "--log-interval", "1",
        "--tensor-model-parallel-size", "2", "--save", str(tmp / "ckpt"),
        "--metrics-file", str(tmp / "m.jsonl"),
    ]  # fmt: skip
    proc = launch(args, nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    valid = read_metrics(tmp / "m.jsonl", group="valid")
    assert sorted(valid) == [3, 5]  # every --eval-interval, and the last step
    return tmp / "ckpt", tok, prefix, float(valid[5]["loss"])


def test_any_layout_matches_trainer_validation(trained: tuple[Path, str, str, float]) -> None:
    root, _, prefix, val_loss = trained
    results = {}
    for tp in (2, 1):
        out = root.parent / f"eval_tp{tp}.json"
        proc = _evaluate(
            ["--load", str(root), "--data-path", prefix, "--split", SPLIT, "--split-name", "valid",
             "--eval-samples", "4", "--micro-batch-size", "2", "--json", str(out),
             "--tensor-model-parallel-size", str(tp),
             "--data-cache-path", str(root.parent / "cache")],
            nproc=tp,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "perplexity" in proc.stdout
        results[tp] = json.loads(out.read_text())
    for tp, res in results.items():
        assert res["step"] == 5 and res["samples"] == 4
        assert res["tokens"] == 4 * 32, res
        assert abs(res["loss"] - val_loss) < 1e-5, (tp, res["loss"], val_loss)
        assert math.isclose(res["perplexity"], math.exp(res["loss"]), rel_tol=1e-12)
    assert abs(results[1]["loss"] - results[2]["loss"]) < 1e-5
    assert 0.5 < results[1]["loss"] < math.log(300) + 1.0  # trained a little, finite


def test_refuses_another_tokenizer(
    trained: tuple[Path, str, str, float], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from salt_megatron.data.tokenizer import train_tokenizer
    from salt_megatron.eval.perplexity import main

    root, _, prefix, _ = trained
    texts = [f"other text number {i} with words" for i in range(200)]
    train_tokenizer(texts, tmp_path / "other", vocab_size=60, byte_fallback=False, num_threads=1)
    rc = main(["--load", str(root), "--data-path", prefix,
               "--tokenizer-model", str(tmp_path / "other.model")])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "is not the tokenizer the checkpoint was trained with" in err
    assert main(["--load", str(root), "--step", "4", "--data-path", prefix]) == 2
    assert "no checkpoint of step 4 (saved steps: 5)" in capsys.readouterr().err
