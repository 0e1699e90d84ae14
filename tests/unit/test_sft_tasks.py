"""The generated fine-tuning tasks: answers recomputed independently, splits disjoint, seeded."""

from __future__ import annotations

import re

import pytest

from salt_megatron.data import sft_tasks


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def test_arithmetic_answers_follow_from_the_question() -> None:
    problems = sft_tasks.arithmetic_problems(400, seed=3)
    assert len({p["prompt"] for p in problems}) == 400
    ops = set()
    for p in problems:
        a, b = _numbers(p["prompt"])  # the question's two numbers, in order
        q = p["prompt"]
        if "bags" in q or "boxes" in q:
            want, op = a * b, "*"
        elif "together" in q or "puts" in q or ("more" in q and "How many more" not in q):
            want, op = a + b, "+"
        else:
            want, op = a - b, "-"
        ops.add(op)
        assert p["answer"] == str(want), q
        assert p["response"] == f" {a} {op} {b} = {want}. The answer is {want}."
        assert want >= 1 and p["prompt"].endswith("\nAnswer:")
    assert ops == {"+", "-", "*"}
    assert sft_tasks.arithmetic_problems(50, seed=3) == problems[:50]
    assert sft_tasks.arithmetic_problems(50, seed=4) != problems[:50]


PASSAGES = [
    "The quick brown fox jumps over the lazy dog while the farmer sleeps soundly near "
    "the barn, dreaming about harvests.",
    "Tensors hold numbers; the quick brown fox jumps twice and never tires of jumping.",
]


def test_reading_answers_follow_their_phrase_once_in_the_passage() -> None:
    problems = sft_tasks.reading_problems(PASSAGES, per_passage=50, seed=0)
    assert problems
    for p in problems:
        phrase = re.search(r'comes after "(.*)" in the passage', p["prompt"]).group(1)  # type: ignore[union-attr]
        words = p["passage"].split()
        hits = [i for i in range(len(words) - 2) if " ".join(words[i : i + 3]) == phrase]
        assert len(hits) == 1, phrase
        assert words[hits[0] + 3].strip(".,;:!?()\"'") == p["answer"]
        assert len(p["answer"]) >= 4 and p["answer"].lower() not in sft_tasks.STOP_WORDS
        assert p["response"] == " " + p["answer"]
    assert not any(p["answer"] == "over" for p in problems)  # a stop word is never an answer


def test_split_keeps_groups_on_one_side() -> None:
    problems = sft_tasks.reading_problems(PASSAGES * 1, per_passage=3, seed=0)
    train, test = sft_tasks.split_examples(problems, 1, seed=0, key="passage")
    assert {p["passage"] for p in train}.isdisjoint({p["passage"] for p in test})
    assert len(train) + len(test) == len(problems)


def test_package_passages_are_plain_prose() -> None:
    passages = sft_tasks.package_passages(("salt_megatron",), min_words=8, max_words=60)
    assert passages and len(set(passages)) == len(passages)
    for text in passages:
        assert 8 <= len(text.split()) <= 60 and "`" not in text and "\n" not in text
    with pytest.raises(ModuleNotFoundError, match="no_such_package"):
        sft_tasks.package_passages(("no_such_package",))
