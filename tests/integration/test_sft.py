"""pretrain_salt.py --sft end to end: fine-tune a pretrained checkpoint, resume bitwise, evaluate.

A sentencepiece tokenizer, an indexed dataset and an SFT file (prompt/response and chat records
from stdlib docstrings, one empty response, some longer than the sequence) are made here. A tiny
GPT pretrains 2 steps; SFT fine-tunes it for 2 epochs (--sft-epochs) without any model flag (the
shape and tokenizer come from the checkpoint), skipping the bad record (--sft-skip-bad-lines),
holding out 10% for validation and saving every 2 steps. A run resumed from the middle
checkpoint must log the same losses and grad norms bitwise; tools/evaluate.py reads the SFT
checkpoint. Four one-process launches (other layouts: tests/distributed/test_sft_dist.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from salt_megatron.checkpoint import layout
from tests.docstring_data import docstring_texts, train_test_tokenizer
from tests.integration.conftest import launch, read_metrics, run_tool

pytestmark = pytest.mark.integration

BAD_LINE = 7


def _files(tmp: Path) -> tuple[str, str, Path]:
    """(tokenizer, indexed-data prefix, SFT file) from ~40 KB of docstrings."""
    from salt_megatron.data.preprocess import preprocess_files

    texts = docstring_texts(40_000)
    train_test_tokenizer(texts, tmp / "tok")
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = str(tmp / "docs_text_document")
    preprocess_files([tmp / "docs.jsonl"], prefix, str(tmp / "tok.model"), progress=False)
    records: list[dict[str, Any]] = []
    for k, text in enumerate(t for t in texts if len(t.split()) > 40):
        words = text.split()
        prompt, response = " ".join(words[:3]), " ".join(words[3 : 5 + k % 6 + 30 * (k % 9 == 4)])
        if k % 3 == 0:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
            records.append({"messages": messages})
        else:
            records.append({"prompt": prompt, "response": response})
        if len(records) == 80:
            break
    records[BAD_LINE - 1] = {"prompt": "an empty response", "response": " "}
    sft = tmp / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(tmp / "tok.model"), prefix, sft


def _ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stdout[-4000:]
    return str(proc.stdout)


def _sft_args(tmp: Path, sft: Path, root: Path, metrics: Path) -> list[str]:
    return [
        "--sft", "--sft-data", str(sft), "--pretrained-checkpoint", str(tmp / "pre"),
        "--sft-epochs", "2", "--sft-valid-fraction", "0.1", "--sft-skip-bad-lines",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
        "--eval-interval", "4", "--log-interval", "1",
        "--save", str(root), "--save-interval", "2", "--keep-last", "20",
        "--metrics-file", str(metrics),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sft")
    tok, prefix, sft = _files(tmp)
    _ok(launch([
        "--data-path", prefix, "--tokenizer-model", tok, "--split", "90,10,0",
        "--data-cache-path", str(tmp / "cache"), "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--lr", "3e-3", "--log-interval", "1", "--save", str(tmp / "pre"),
    ]))  # fmt: skip
    root, metrics = tmp / "ckpt", tmp / "m.jsonl"
    out = _ok(launch(_sft_args(tmp, sft, root, metrics)))
    return {"tmp": tmp, "prefix": prefix, "sft": sft, "root": root, "out": out,
            "train": read_metrics(metrics), "valid": read_metrics(metrics, "valid")}  # fmt: skip


def test_finetunes_the_pretrained_checkpoint(finetuned: dict[str, Any]) -> None:
    out, train, root = finetuned["out"], finetuned["train"], finetuned["root"]
    sft = finetuned["sft"]
    assert f"skipped 1 bad (--sft-skip-bad-lines; first: {sft}:{BAD_LINE}: empty response)" in out
    assert "examples longer than --seq-length 64 (never truncated" in out
    assert "packing efficiency" in out and "SFT held-out set" in out
    pre = layout.iteration_dir(str(finetuned["tmp"] / "pre"), 2)
    assert f"fine-tuning from {pre} (step 2): weights loaded, fresh optimizer" in out
    steps = max(train)
    assert sorted(train) == list(range(1, steps + 1)) and steps >= 6
    meta = layout.read_meta(layout.iteration_dir(str(root), steps))
    sequences = meta["extra"]["sft"]["sequences"]
    assert steps == 2 * sequences // 4  # --sft-epochs 2, global batch 4
    assert f"SFT: {steps} steps read {4 * steps} sequences" in out
    for step, record in train.items():
        assert record["response_tokens"] > 0
        assert record["epoch"] == pytest.approx(4 * step / sequences)
    assert sorted(finetuned["valid"]) == [
        s for s in range(1, steps + 1) if s % 4 == 0 or s == steps
    ]
    saved_pre = layout.read_meta(pre)["config"]["model"]
    assert meta["config"]["model"] == saved_pre  # no model flag given: the checkpoint's shape
    assert meta["config"]["training"]["train_iters"] == steps


def test_resume_mid_sft_is_bitwise(finetuned: dict[str, Any], tmp_path: Path) -> None:
    src, train = finetuned["root"], finetuned["train"]
    root = tmp_path / "ckpt"
    root.mkdir()
    shutil.copytree(layout.iteration_dir(str(src), 4), layout.iteration_dir(str(root), 4))
    layout.write_latest_step(str(root), 4)
    metrics = tmp_path / "m.jsonl"
    args = [*_sft_args(finetuned["tmp"], finetuned["sft"], root, metrics), "--load", str(root)]
    out = _ok(launch(args))
    assert "resumed from" in out and "fine-tuning from" not in out
    resumed = read_metrics(metrics)
    assert sorted(resumed) == list(range(5, max(train) + 1))
    for step, record in resumed.items():
        assert (record["loss"], record["grad_norm"]) == (
            train[step]["loss"],
            train[step]["grad_norm"],
        ), step


def test_sft_checkpoint_evaluates(finetuned: dict[str, Any]) -> None:
    proc = run_tool("evaluate.py", [
        "--load", str(finetuned["root"]), "--data-path", finetuned["prefix"], "--split", "90,10,0",
        "--split-name", "valid", "--eval-samples", "4", "--micro-batch-size", "2",
        "--data-cache-path", str(finetuned["tmp"] / "cache"),
    ])  # fmt: skip
    out = _ok(proc)
    assert f"step {max(finetuned['train'])} | loss" in out and "perplexity" in out
