"""Tokenizer, corpus reading and preprocessing to .bin/.idx, including bad input."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from salt_megatron.data.corpus import iter_texts, stdlib_docstrings, write_stdlib_corpus
from salt_megatron.data.errors import DataError
from salt_megatron.data.indexed import read_tokenizer_record, validate_indexed_dataset
from salt_megatron.data.preprocess import preprocess_files
from salt_megatron.data.tokenizer import NullTokenizer, SentencePieceTokenizer, train_tokenizer

SAMPLES = [
    "Return the sum of *a* and *b*.\n\n    >>> add(1, 2)\n    3",
    "Tabs\tand  double  spaces, trailing space ",
    "Non-ASCII: café, naïve, 中文, emoji 🙂",
    "",
]


def make_small_data(root: Path, docs: int = 400, vocab: int = 600) -> tuple[Path, Path]:
    """A JSONL slice of the stdlib-docstring corpus and a small BPE tokenizer trained on it."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in itertools.islice(stdlib_docstrings(), docs):
            f.write(json.dumps(doc) + "\n")
    train_tokenizer(iter_texts([corpus]), root / "tok", vocab_size=vocab, num_threads=1)
    return corpus, root / "tok.model"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_small_data(tmp_path_factory.mktemp("data"))


def read_docs(prefix: str) -> list[np.ndarray]:
    """All documents of a dataset, through megatron's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    docs = [np.array(ds[i], copy=True) for i in range(len(ds))]
    del ds  # closes the mmap; the copies above stay valid
    return docs


def test_tokenizer_round_trip_and_special_ids(small: tuple[Path, Path]) -> None:
    tok = SentencePieceTokenizer(small[1])
    assert tok.vocab_size == 600
    assert (tok.eod, tok.bos, tok.pad, tok.unk) == (2, 1, 3, 0)
    for text in SAMPLES:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text
    assert tok.unique_identifiers["fingerprint"] == tok.fingerprint
    assert len(tok.fingerprint) == 64 and tok.vocab[tok.inv_vocab[5]] == 5


def test_tokenizer_covers_megatron_interface(small: tuple[Path, Path]) -> None:
    from megatron.core.tokenizers import MegatronTokenizerBase

    for tok in (SentencePieceTokenizer(small[1]), NullTokenizer(100)):
        missing = set(MegatronTokenizerBase.__abstractmethods__) - set(dir(tok))
        assert not missing
        for attr in ("eod", "pad", "vocab_size", "unique_identifiers"):
            getattr(tok, attr)


def test_null_tokenizer() -> None:
    tok = NullTokenizer(10)
    assert tok.vocab_size == 10 and tok.eod == 9 and tok.pad == -1
    assert tok.detokenize(tok.tokenize("1 2 3")) == "1 2 3"
    with pytest.raises(DataError):
        tok.tokenize("10")


def test_fingerprint_is_model_bytes(small: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, _ = small
    train_tokenizer(iter_texts([corpus]), tmp_path / "uni", vocab_size=500, model_type="unigram")
    a, b = SentencePieceTokenizer(small[1]), SentencePieceTokenizer(tmp_path / "uni.model")
    assert a.fingerprint != b.fingerprint
    assert not list(tmp_path.glob(".*tmp*"))  # temporary names renamed away


@pytest.mark.parametrize("workers", [1, 2])
def test_dataset_holds_exact_tokens(small: tuple[Path, Path], tmp_path: Path, workers: int) -> None:
    corpus, model = small
    tok = SentencePieceTokenizer(model)
    prefix = str(tmp_path / f"out{workers}")
    stats = preprocess_files([corpus], prefix, str(model), workers=workers, progress=False)
    texts = list(iter_texts([corpus]))
    expected = [[*tok.tokenize(t), tok.eod] for t in texts]
    docs = read_docs(prefix)
    assert [d.tolist() for d in docs] == expected
    assert docs[0].dtype == np.uint16
    assert stats.documents == len(texts) and stats.tokens == sum(map(len, expected))
    info = validate_indexed_dataset(prefix)
    assert info.num_documents == len(texts) and info.num_tokens == stats.tokens
    record = read_tokenizer_record(prefix)
    assert record is not None and record["fingerprint"] == tok.fingerprint
    assert sorted(os.listdir(tmp_path)) == [
        f"out{workers}{s}" for s in (".bin", ".idx", ".tokenizer.json")
    ]


def test_worker_count_does_not_change_output(small: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = small
    for w in (1, 2):
        preprocess_files(
            [corpus, corpus], str(tmp_path / f"w{w}"), str(model), workers=w, progress=False
        )
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()


def test_text_input_blocks_and_empty_json_text(small: tuple[Path, Path], tmp_path: Path) -> None:
    _, model = small
    tok = SentencePieceTokenizer(model)
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n", encoding="utf-8")
    preprocess_files([txt], str(tmp_path / "t"), str(model), progress=False)
    docs = [d.tolist() for d in read_docs(str(tmp_path / "t"))]
    assert docs == [[*tok.tokenize("first doc\nline two"), 2], [*tok.tokenize("second doc"), 2]]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": ""}\n{"text": "x"}\n', encoding="utf-8")
    stats = preprocess_files([jl], str(tmp_path / "e"), str(model), progress=False)
    assert (stats.documents, stats.empty_documents) == (2, 1)  # Megatron keeps empty documents


BAD_INPUTS = {
    "malformed": (b'{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n', "bad.jsonl:2: malformed"),
    "missing_key": (b'{"text": "ok"}\n{"content": "x"}\n', "bad.jsonl:2: missing key 'text'"),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.jsonl:2: not valid UTF-8"),
    "not_object": (b'{"text": "ok"}\n[1, 2]\n', "bad.jsonl:2: expected a JSON object"),
    "not_string": (b'{"text": "ok"}\n{"text": 5}\n', "bad.jsonl:2: 'text' is a int"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_lines_fail_or_skip(small: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    _, model = small
    content, message = BAD_INPUTS[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    with pytest.raises(DataError, match=message.replace("*", r"\*")):
        preprocess_files([bad], str(tmp_path / "o"), str(model), workers=2, progress=False)
    assert os.listdir(tmp_path) == ["bad.jsonl"]  # nothing partial left behind
    stats = preprocess_files(
        [bad], str(tmp_path / "o"), str(model), skip_bad_lines=True, progress=False
    )
    assert stats.bad_lines.count == 1 and message in stats.bad_lines.examples[0]
    assert stats.documents == content.count(b"\n") - 1


def test_empty_and_missing_inputs(small: tuple[Path, Path], tmp_path: Path) -> None:
    _, model = small
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty file"):
        preprocess_files([empty], str(tmp_path / "o"), str(model), progress=False)
    with pytest.raises(DataError, match=r"input file not found: .*nope\.jsonl"):
        preprocess_files([tmp_path / "nope.jsonl"], str(tmp_path / "o"), str(model))
    with pytest.raises(DataError, match="tokenizer model not found"):
        preprocess_files([empty], str(tmp_path / "o"), str(tmp_path / "no.model"))
    with pytest.raises(DataError, match="empty file"):
        train_tokenizer(iter_texts([empty]), tmp_path / "tok", vocab_size=300)
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]


def test_truncated_and_orphan_files(small: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = small
    prefix = str(tmp_path / "d")
    preprocess_files([corpus], prefix, str(model), progress=False)
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"d\.bin: truncated"):
        validate_indexed_dataset(prefix)
    os.remove(prefix + ".idx")
    with pytest.raises(DataError, match=r"d\.bin has no index file .*d\.idx"):
        validate_indexed_dataset(prefix)
    with pytest.raises(DataError, match=r"prefix .*nothere does not exist"):
        validate_indexed_dataset(str(tmp_path / "nothere"))
    Path(prefix + ".idx").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"d\.idx: not a Megatron index"):
        validate_indexed_dataset(prefix)


@pytest.mark.slow
def test_full_stdlib_corpus_is_deterministic(tmp_path: Path) -> None:
    a = write_stdlib_corpus(tmp_path / "a.jsonl")
    b = write_stdlib_corpus(tmp_path / "b.jsonl")
    assert a.documents == b.documents > 3000 and a.bytes > 1_000_000
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
