"""docs/teachers.md end to end: a Hugging Face tokenizer and teacher, SALT's KD phase, export.

The commands of the doc, in order: train a byte-level BPE ``tokenizer.json``, preprocess with it
(2 workers), import a (random, Qwen2-shaped, 512-row) ``transformers`` model as the teacher,
train a Qwen2-shaped student whose first steps distil from it, and export the imported teacher
back to Hugging Face, bitwise.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.integration.conftest import launch, read_metrics, run_tool

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _ok(proc: Any) -> str:
    assert proc.returncode == 0, proc.stdout[-5000:]
    return str(proc.stdout)


def _teacher(out: Path, tok: Path) -> None:
    """A random Qwen2 with the tokenizer, as a downloaded model folder would look."""
    import shutil

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, out / name)


def test_hf_tokenizer_and_teacher_end_to_end(tmp_path: Path) -> None:
    from salt_megatron.data.corpus import stdlib_docstrings

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for doc in itertools.islice(stdlib_docstrings(), 400):
            f.write(json.dumps(doc) + "\n")
    tok, data, hf = tmp_path / "tok", tmp_path / "data" / "corpus", tmp_path / "hf_teacher"
    _ok(run_tool("train_tokenizer.py", ["--input", str(corpus), "--model-prefix", str(tok),
                                        "--vocab-size", "500", "--tokenizer-type",
                                        "HuggingFaceTokenizer"]))  # fmt: skip
    out = _ok(run_tool("preprocess_data.py", ["--input", str(corpus), "--output-prefix", str(data),
                                              "--tokenizer-model", str(tok), "--workers", "2",
                                              "--no-progress"]))  # fmt: skip
    assert "documents 400" in out
    _teacher(hf, tok)
    teacher = tmp_path / "ckpt" / "teacher"
    out = _ok(run_tool("import_hf.py", ["--hf-dir", str(hf), "--output", str(teacher)]))
    assert "imported Qwen2ForCausalLM" in out and "vocab 500 (padded 512)" in out

    metrics = tmp_path / "metrics.jsonl"
    out = _ok(launch([
        "--data-path", f"{data}_text_document", "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(tok), "--split", "90,5,5", "--seq-length", "32",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--add-qkv-bias", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3", "--log-interval", "1",
        "--kd-teacher-load", str(teacher), "--kd-steps", "2", "--kd-weight", "0.5",
        "--save", str(tmp_path / "ckpt" / "student"), "--metrics-file", str(metrics),
    ]))  # fmt: skip
    assert "KD phase over, teacher released" in out
    steps = read_metrics(metrics)
    assert sorted(steps) == [1, 2, 3, 4] and all(math.isfinite(s["loss"]) for s in steps.values())
    assert all(math.isfinite(steps[s]["kd_loss"]) and steps[s]["kd_weight"] > 0 for s in (1, 2))

    back = tmp_path / "hf_roundtrip"
    out = _ok(run_tool("export_hf.py", ["--load", str(teacher), "--out", str(back)]))
    assert "(Qwen2ForCausalLM)" in out
    from safetensors.torch import load_file

    original, exported = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert json.loads((hf / "config.json").read_text()) == json.loads(
        (back / "config.json").read_text()
    )
    assert (back / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
