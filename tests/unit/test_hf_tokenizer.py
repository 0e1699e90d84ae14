"""Hugging Face tokenizers: byte-level BPE training, loading, EOD, fingerprints, preprocessing."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from salt_megatron.config import ConfigError, parse_config
from salt_megatron.data.corpus import stdlib_docstrings
from salt_megatron.data.errors import DataError
from salt_megatron.data.hf_tokenizer import HuggingFaceTokenizer, train_bpe_tokenizer
from salt_megatron.data.indexed import read_tokenizer_record
from salt_megatron.data.preprocess import preprocess_files
from salt_megatron.data.tokenizer import infer_tokenizer_type, load_tokenizer
from salt_megatron.training.data import build_tokenizer
from tests.unit.test_data import SAMPLES, read_docs

VOCAB = 400
TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in itertools.islice(stdlib_docstrings(), 300):
            f.write(json.dumps(doc) + "\n")
    return path


@pytest.fixture(scope="module")
def tok_dir(corpus: Path) -> Path:
    """The tools/train_tokenizer.py byte-level BPE (run in-process)."""
    spec = importlib.util.spec_from_file_location("train_tokenizer", TOOLS / "train_tokenizer.py")
    assert spec and spec.loader
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = corpus.parent / "bpe"
    argv = ["--input", str(corpus), "--model-prefix", str(out), "--vocab-size", str(VOCAB),
            "--tokenizer-type", "HuggingFaceTokenizer",
            "--user-defined-symbols", "<|pad|>"]  # fmt: skip
    assert tool.main(argv) == 0
    return out


def test_bpe_round_trips_and_has_eod(tok_dir: Path) -> None:
    tok = HuggingFaceTokenizer(tok_dir)
    assert tok.vocab_size == VOCAB and tok.eod == 0 and tok.eos == 0
    assert tok.inv_vocab[0] == "<|endoftext|>" and tok.vocab["<|pad|>"] == 1
    assert (tok.bos, tok.pad, tok.unk) == (-1, -1, -1)
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert all(0 <= i < VOCAB for i in ids) and 0 not in ids
        assert tok.detokenize(ids) == text  # byte-level: exact, no unk
    assert tok.tokenize_batch(SAMPLES) == [tok.tokenize(t) for t in SAMPLES]


def test_encodes_like_transformers(tok_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = HuggingFaceTokenizer(tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for text in SAMPLES:
        assert theirs.encode(text, add_special_tokens=False) == ours.tokenize(text)
    assert theirs.eos_token_id == ours.eod and len(theirs) == ours.vocab_size


def test_folder_and_json_are_one_tokenizer(tok_dir: Path, tmp_path: Path) -> None:
    folder, json_file = (
        HuggingFaceTokenizer(tok_dir),
        HuggingFaceTokenizer(tok_dir / "tokenizer.json"),
    )
    assert folder.fingerprint == json_file.fingerprint and json_file.eod == folder.eod
    # Reformatted JSON and other batching settings: the same text -> ids mapping.
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 1, "pad_type_id": 0, "pad_token": "<|pad|>"}  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, indent=4, sort_keys=True))
    assert HuggingFaceTokenizer(tmp_path / "tokenizer.json").fingerprint == folder.fingerprint
    # One changed merge is another tokenizer.
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert HuggingFaceTokenizer(tmp_path / "tokenizer.json").fingerprint != folder.fingerprint


def test_missing_eos_is_a_clear_error(tok_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tok_dir / "tokenizer.json", bare / "tokenizer.json")
    tok = HuggingFaceTokenizer(bare)
    assert tok.tokenize("hello")  # encoding needs no eos
    with pytest.raises(DataError, match="no eos_token"):
        tok.eod  # noqa: B018
    cfg = parse_config(["--mock-data", "--tokenizer-model", str(bare)])
    with pytest.raises(ConfigError, match=r"--tokenizer-model: .*no eos_token"):
        build_tokenizer(cfg)
    (tmp_path / "x.txt").write_text("one document")
    with pytest.raises(DataError, match="no eos_token"):
        preprocess_files([str(tmp_path / "x.txt")], str(tmp_path / "d"), str(bare), progress=False)
    assert not (tmp_path / "d.bin").exists()
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=re.escape("eos_token '<|nope|>' is not in tokenizer.json")):
        HuggingFaceTokenizer(bare).eod  # noqa: B018


def test_tokenizer_type_inference_and_errors(tok_dir: Path, tmp_path: Path) -> None:
    assert infer_tokenizer_type(tok_dir) == "HuggingFaceTokenizer"
    assert infer_tokenizer_type(tok_dir / "tokenizer.json") == "HuggingFaceTokenizer"
    assert infer_tokenizer_type("x/tok.model") == "SentencePieceTokenizer"
    with pytest.raises(DataError, match=r"is a folder: a sentencepiece model is one \.model file"):
        load_tokenizer(tok_dir, "SentencePieceTokenizer")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        load_tokenizer(tok_dir / "tokenizer.json", "SentencePieceTokenizer")
    with pytest.raises(DataError, match=r"no tokenizer\.json in this folder"):
        load_tokenizer(tmp_path, "HuggingFaceTokenizer")
    with pytest.raises(ConfigError, match="--tokenizer-type"):
        parse_config(["--mock-data", "--tokenizer-type", "GPT2BPETokenizer"])
    cfg = parse_config(["--mock-data", "--tokenizer-model", str(tok_dir), "--tokenizer-type",
                        "HuggingFaceTokenizer"])  # fmt: skip
    assert isinstance(build_tokenizer(cfg), HuggingFaceTokenizer)


def test_preprocess_with_workers(corpus: Path, tok_dir: Path, tmp_path: Path) -> None:
    """Batched encoding in 1 and 2 workers: identical files, each document = tokenize + eod."""
    tok = HuggingFaceTokenizer(tok_dir)
    prefixes = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        stats = preprocess_files([str(corpus)], prefix, str(tok_dir), workers=workers,
                                 progress=False)  # fmt: skip
        assert stats.documents == 300 and stats.dtype == "uint16"
        prefixes.append(prefix)
    assert Path(prefixes[0] + ".bin").read_bytes() == Path(prefixes[1] + ".bin").read_bytes()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    docs = read_docs(prefixes[0])
    for text, doc in zip(texts, docs, strict=True):
        np.testing.assert_array_equal(doc, [*tok.tokenize(text), tok.eod])
    record = read_tokenizer_record(prefixes[0])
    assert record is not None and record["fingerprint"] == tok.fingerprint
    assert record["type"] == "HuggingFaceTokenizer" and record["vocab_size"] == VOCAB


def test_train_bpe_is_deterministic(corpus: Path, tok_dir: Path, tmp_path: Path) -> None:
    texts = (json.loads(line)["text"] for line in corpus.read_text().splitlines())
    again = train_bpe_tokenizer(texts, tmp_path / "again", VOCAB, special_tokens=["<|pad|>"])
    assert again.fingerprint == HuggingFaceTokenizer(tok_dir).fingerprint
    with pytest.raises(DataError, match="vocab_size >= 257"):
        train_bpe_tokenizer(["abc"], tmp_path / "tiny", 100)


def test_evaluation_reads_the_saved_tokenizer_kind(tok_dir: Path, corpus: Path) -> None:
    """tools/evaluate.py and export_hf.py reopen the tokenizer a checkpoint was trained with."""
    from salt_megatron.checkpoint.saved import LoadError, check_tokenizer

    tok = HuggingFaceTokenizer(tok_dir)
    data = {"tokenizer_model": str(tok_dir), "tokenizer_type": "HuggingFaceTokenizer"}
    meta = {"config": {"data": data}, "tokenizer_fingerprint": tok.fingerprint}
    assert check_tokenizer(meta, "ckpt", None).fingerprint == tok.fingerprint
    with pytest.raises(LoadError, match="is not the tokenizer the checkpoint was trained with"):
        check_tokenizer({**meta, "tokenizer_fingerprint": "f" * 64}, "ckpt", None)
