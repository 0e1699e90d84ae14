"""SFT data: record encoding (prompt/response, chat template), bad input, packing, datasets.

References: ids written out by hand (the null tokenizer maps "1 2 3" to [1, 2, 3]), the
tokenizer's own output for each part, a naive quadratic best-fit-decreasing packer, and each
example's ids read back from the packed sequences.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from salt_megatron.config import ConfigError, parse_config
from salt_megatron.data.errors import DataError
from salt_megatron.data.sft import (
    Example,
    encode_record,
    parse_record,
    prompt_ids,
    read_examples,
    role_header,
)
from salt_megatron.data.sft_pack import PackedSFTDataset, fit, pack, split_held_out
from salt_megatron.data.tokenizer import NullTokenizer, SentencePieceTokenizer
from tests.docstring_data import docstring_texts, train_test_tokenizer

NULL = NullTokenizer(50)  # eod 49


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    root = tmp_path_factory.mktemp("tok")
    return SentencePieceTokenizer(train_test_tokenizer(docstring_texts(20_000), root / "tok"))


def _example(record: dict[str, Any], tokenizer: Any = NULL) -> Example:
    return encode_record(parse_record(json.dumps(record).encode(), "f:1"), tokenizer, "f:1")


def test_prompt_response_ids_and_loss_targets() -> None:
    ex = _example({"prompt": "1 2 3", "response": "4 5", "id": 7})  # other keys are ignored
    assert ex.ids.tolist() == [1, 2, 3, 4, 5, 49]
    assert ex.target.tolist() == [False, False, False, True, True, True]
    assert (ex.positions, ex.response_tokens) == (5, 3)
    assert prompt_ids({"prompt": "1 2 3", "response": "4 5"}, NULL) == [1, 2, 3]


def test_parts_are_tokenized_separately(sp: SentencePieceTokenizer) -> None:
    prompt, response = "Return the sum of a", "nd b."  # a word split across the parts
    ex = _example({"prompt": prompt, "response": response}, sp)
    want = sp.tokenize(prompt) + sp.tokenize(response) + [sp.eod]
    assert ex.ids.tolist() == want != [*sp.tokenize(prompt + response), sp.eod]
    n = len(sp.tokenize(prompt))
    assert ex.target.tolist() == [False] * n + [True] * (len(want) - n)
    assert prompt_ids({"prompt": prompt, "response": response}, sp) == want[:n]


def test_chat_template_trains_assistant_turns_only(sp: SentencePieceTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
    ex = _example({"messages": messages}, sp)
    want: list[int] = []
    trained: list[bool] = []
    for m in messages:
        header = sp.tokenize(role_header(m["role"]))
        want += header
        trained += [False] * len(header)
        if m["role"] == "assistant":
            body = [*sp.tokenize(m["content"]), sp.eod]
            want += body
            trained += [True] * len(body)
        else:
            body = sp.tokenize(m["content"] + "\n")
            want += body
            trained += [False] * len(body)
    assert ex.ids.tolist() == want and ex.target.tolist() == trained
    # generation at evaluation starts from everything before the last assistant content
    last = [*sp.tokenize("An immutable one."), sp.eod]
    assert prompt_ids({"messages": messages}, sp) == want[: len(want) - len(last)]
    assert prompt_ids({"messages": messages[:-1]}, sp) == want[: len(want) - len(last)]


BAD = {
    "malformed": ('{"prompt": "1", "response": ', "malformed JSON"),
    "not_object": ("[1, 2]", "expected a JSON object, got list"),
    "missing_response": ('{"prompt": "1"}', "missing key 'response'"),
    "missing_both": ('{"text": "1"}', "missing key 'prompt'"),
    "not_string": ('{"prompt": "1", "response": 2}', "'response' is a int, not a string"),
    "empty_response": ('{"prompt": "1", "response": ""}', "empty response"),
    "blank_response": ('{"prompt": "1", "response": "  \\n"}', "empty response"),
    "both_kinds": ('{"prompt": "1", "response": "2", "messages": []}', "both 'messages'"),
    "no_messages": ('{"messages": []}', "'messages' must be a non-empty list"),
    "bad_role": ('{"messages": [{"role": "bot", "content": "1"}]}', "role 'bot'"),
    "no_content": ('{"messages": [{"role": "user"}]}', "needs 'role' and 'content'"),
    "empty_turn": (
        '{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": ""}]}',
        "empty assistant turn",
    ),
    "last_is_user": ('{"messages": [{"role": "user", "content": "1"}]}', "not the assistant's"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_file_and_line_or_is_skipped(case: str, tmp_path: Path) -> None:
    line, message = BAD[case]
    path = tmp_path / "sft.jsonl"
    good = '{"prompt": "1 2", "response": "3"}'
    path.write_text(f"{good}\n\n{line}\n{good}\n")  # the bad record is on line 3
    with pytest.raises(DataError, match=rf"^{path}:3: .*{message}"):
        read_examples(str(path), NULL)
    examples, bad = read_examples(str(path), NULL, skip_bad_lines=True)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:4"]
    assert bad.count == 1 and bad.examples[0].startswith(f"{path}:3: ")


def test_undecodable_untokenizable_missing_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "1", "response": "2 99"}\n')  # 99: outside the null vocabulary
    with pytest.raises(DataError, match=rf"^{path}:1: cannot tokenize \(ids \[99\] outside"):
        read_examples(str(path), NULL)
    path.write_bytes(b'{"prompt": "1", "response": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:1: not valid UTF-8"):
        read_examples(str(path), NULL)
    with pytest.raises(DataError, match="no such file"):
        read_examples(str(tmp_path / "absent.jsonl"), NULL)
    path.write_text("\n \n")
    with pytest.raises(DataError, match="empty file"):
        read_examples(str(path), NULL)


def test_too_long_examples_are_left_out_and_reported() -> None:
    examples = [_example({"prompt": "1 " * n, "response": "2"}) for n in (3, 8, 2, 9)]
    kept, too_long = fit(examples, seq_length=8)  # n prompt ids + 1 + eod: n + 1 positions
    assert [e.positions for e in kept] == [4, 3]
    assert too_long.count == 2 and too_long.examples == ["f:1 (9 positions)", "f:1 (10 positions)"]
    assert "left out 2 examples longer than --seq-length 8" in too_long.format(8)


def _naive_best_fit_decreasing(
    lengths: list[int], capacity: int, order: list[int]
) -> list[list[int]]:
    packs: list[list[int]] = []
    for i in sorted(order, key=lambda i: -lengths[i]):
        room = [(capacity - sum(lengths[j] for j in p), k) for k, p in enumerate(packs)]
        fits = [(r, k) for r, k in room if r >= lengths[i]]
        if fits:
            packs[min(fits)[1]].append(i)
        else:
            packs.append([i])
    return packs


def test_best_fit_decreasing_matches_naive_reference() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=300).tolist()
    packs = pack(lengths, 64, seed=5)
    order = np.random.default_rng([5, 0]).permutation(len(lengths)).tolist()
    assert packs == _naive_best_fit_decreasing(lengths, 64, order)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in p) for p in packs) <= 64
    assert len(packs) <= math.ceil(sum(lengths) / 64) * 1.1 + 1  # near the lower bound
    assert pack(lengths, 64, seed=5) == packs and pack(lengths, 64, seed=6) != packs


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        prompt = " ".join(str(x) for x in rng.integers(0, 49, size=rng.integers(1, 6)))
        response = " ".join(str(x) for x in rng.integers(0, 49, size=rng.integers(1, 8)))
        out.append(encode_record({"prompt": prompt, "response": response}, NULL, f"f:{k}"))
    return out


def _unpack(sample: dict[str, np.ndarray]) -> list[tuple[list[int], list[int], list[float]]]:
    """(inputs, labels, loss mask) of each example of a packed sequence, from its segments."""
    seg, pos = sample["segment_ids"], sample["position_ids"]
    out = []
    for k in range(int(seg.max()) + 1):
        where = np.flatnonzero(seg == k)
        assert (np.diff(where) == 1).all() and pos[where].tolist() == list(range(len(where)))
        out.append(
            (
                sample["tokens"][where].tolist(),
                sample["labels"][where].tolist(),
                sample["loss_mask"][where].tolist(),
            )
        )
    return out


def test_packed_sequences_hold_every_example_once_per_epoch() -> None:
    examples = _examples(40)
    ds = PackedSFTDataset(examples, seq_length=24, eod=49, seed=3, epochs=2)
    n = len(ds.packs)
    assert len(ds) == 2 * n and ds.stats.examples == 40 and 0.8 < ds.stats.efficiency <= 1.0
    want = sorted(
        (e.ids[:-1].tolist(), e.ids[1:].tolist(), e.target[1:].astype(float).tolist())
        for e in examples
    )
    for epoch in range(2):
        got = []
        for i in range(epoch * n, (epoch + 1) * n):
            sample = ds[i]
            assert {k: v.shape for k, v in sample.items()} == {k: (24,) for k in sample}
            parts = _unpack(sample)
            fill = sum(len(p[0]) for p in parts if any(p[2]))
            pad = sample["segment_ids"] == sample["segment_ids"].max()
            if fill < 24:  # the padding: the last segment, no loss, positions from 0
                assert pad.sum() == 24 - fill and sample["loss_mask"][pad].sum() == 0
                parts = parts[:-1]
            got += parts
        assert sorted(got) == want
    order0 = [int(ds._order(0)[k]) for k in range(n)]
    assert order0 != [int(ds._order(1)[k]) for k in range(n)]  # each epoch its own order
    again = PackedSFTDataset(examples, seq_length=24, eod=49, seed=3, epochs=2)
    assert all((again[i]["tokens"] == ds[i]["tokens"]).all() for i in range(2 * n))
    with pytest.raises(IndexError):
        ds[2 * n]


def test_held_out_split_and_padded_validation_rows() -> None:
    examples = _examples(30)
    train, valid = split_held_out(examples, 0.2, seed=1)
    assert len(valid) == 6 and len(train) == 24
    assert {e.where for e in train}.isdisjoint(e.where for e in valid)
    names = [e.where for e in valid]
    assert [e.where for e in split_held_out(examples, 0.2, seed=1)[1]] == names
    assert [e.where for e in split_held_out(examples, 0.2, seed=2)[1]] != names
    with pytest.raises(DataError, match="nothing left to train on"):
        split_held_out(examples[:1], 0.5, seed=1)
    ds = PackedSFTDataset(valid, seq_length=16, eod=49, seed=1, shuffle=False, pad_to=4)
    assert len(ds) % 4 == 0 and len(ds) >= len(ds.packs)
    for i in range(len(ds.packs), len(ds)):  # empty rows: no loss
        assert ds[i]["loss_mask"].sum() == 0 and (ds[i]["tokens"] == 49).all()


def test_sft_flags_are_checked() -> None:
    base = ["--sft", "--sft-data", "x.jsonl"]
    cases = {
        "--sft needs --sft-data": ["--sft"],
        "--sft-data needs --sft": ["--sft-data", "x.jsonl"],
        "--pretrained-checkpoint needs --sft": ["--pretrained-checkpoint", "c"],
        "drop --data-path": [*base, "--mock-data"],
        "does no knowledge distillation": [*base, "--kd-teacher-load", "t", "--kd-steps", "5"],
        "use --transformer-impl local": [*base, "--transformer-impl", "transformer_engine"],
        "needs a held-out set": [*base, "--eval-interval", "5"],
        "give one of them": [*base, "--sft-epochs", "2", "--train-iters", "5"],
        "two held-out sets": [*base, "--sft-valid-data", "v", "--sft-valid-fraction", "0.1"],
        "--sft-valid-fraction must be in": [*base, "--sft-valid-fraction", "1"],
    }
    for message, argv in cases.items():
        with pytest.raises(ConfigError, match=message):
            parse_config(argv)
    cfg = parse_config([*base, "--sft-epochs", "2", "--sft-valid-fraction", "0.1",
                        "--eval-interval", "5"])  # fmt: skip
    assert cfg.sft.sft_epochs == 2 and cfg.sft.has_valid
