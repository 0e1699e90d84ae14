"""The local evaluation tasks' data: examples made from docstrings the demo never trains on.

``tools/make_eval_tasks.py`` writes them as JSONL under ``examples/tasks/`` (read by the task
YAMLs there, offline). The source is :func:`salt_megatron.data.corpus.stdlib_docstrings`, the
demo's corpus; the demo trains with ``--split 95,5,0``, and megatron splits an indexed dataset by
document order, so the last 5% of the documents are the validation split: held out from training.
Only those are used (:func:`held_out_docs`). Deterministic for a given Python version (the
corpus is the running interpreter's standard library; the files record which).

Three kinds of example, four tasks:

* ``next`` (multiple choice, ``salt_docstring_next``): a sentence, and four candidate next
  sentences (of the same docstring's prose): the true one and three of other docstrings.
* ``cloze`` (``salt_docstring_cloze``: log-likelihood, ``salt_docstring_cloze_gen``: greedy
  generation): a sentence without its last word, and the word (LAMBADA-style).
* ``text`` (``salt_docstring_ppl``: rolling log-likelihood): a whole docstring.

Each file has a ``test`` split and (but the ``text`` one) a ``fewshot`` split of :data:`FEWSHOT`
examples, in a field ``split``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELD_OUT = 0.05
"""The demo's validation share (``--split 95,5,0``): the last 5% of documents."""
FEWSHOT = 16
TEST = 300
SEED = 1234
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]{3,}")


def held_out_docs(share: float = HELD_OUT) -> list[dict[str, str]]:
    """The corpus' last ``share`` of documents (megatron's split puts them after training's)."""
    from salt_megatron.data.corpus import stdlib_docstrings

    docs = list(stdlib_docstrings())
    return docs[round((1.0 - share) * len(docs)) :]


def prose_sentences(text: str) -> Iterator[list[str]]:
    """Per prose paragraph of a docstring, its sentences (wrapped lines joined by spaces).

    Paragraphs that look like code, lists, tables or doctests (an indented, ``>>>``, bullet or
    ``:param`` line) are skipped.
    """
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(not ln or ln[0].isspace() or ln.lstrip()[:1] in "->*:+|=" for ln in lines):
            continue
        if any(ln.lstrip().startswith((">>>", "...")) for ln in lines):
            continue
        joined = " ".join(ln.strip() for ln in lines)
        yield [s for s in _SENTENCE_END.split(joined) if s]


def _word_count_ok(sentence: str, low: int = 4, high: int = 40) -> bool:
    return low <= len(sentence.split()) <= high


def next_sentence_pairs(docs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``{"id", "context", "answer"}``: consecutive prose sentences of one docstring."""
    pairs = []
    for doc in docs:
        sentences = [s for para in prose_sentences(doc["text"]) for s in para]
        for first, second in itertools.pairwise(sentences):
            if _word_count_ok(first) and _word_count_ok(second):
                pairs.append({"id": doc["id"], "context": first, "answer": second})
    return pairs


def next_sentence_examples(docs: list[dict[str, str]], rng: random.Random) -> list[dict[str, Any]]:
    """Multiple-choice examples: the true next sentence among three from other docstrings."""
    pairs = next_sentence_pairs(docs)
    examples = []
    for pair in pairs:
        others = [p["answer"] for p in pairs if p["id"] != pair["id"]]
        choices = [*rng.sample(others, 3), pair["answer"]]
        rng.shuffle(choices)
        examples.append({**pair, "choices": choices, "label": choices.index(pair["answer"])})
    return examples


def cloze_examples(docs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``{"id", "context", "target"}``: a sentence (>= 6 words) ending in a plain word of >= 3
    letters, split before that word; the final punctuation is dropped."""
    examples = []
    for doc in docs:
        for sentences in prose_sentences(doc["text"]):
            for sentence in sentences:
                words = sentence.rstrip(".!?").split(" ")
                if len(words) >= 6 and _WORD.fullmatch(words[-1]) and words[-2]:
                    context = " ".join(words[:-1])
                    examples.append({"id": doc["id"], "context": context, "target": words[-1]})
    return examples


def text_examples(
    docs: list[dict[str, str]], low: int = 200, high: int = 3000
) -> list[dict[str, Any]]:
    """``{"id", "text"}``: whole docstrings of ``low``..``high`` characters."""
    return [{"id": d["id"], "text": d["text"]} for d in docs if low <= len(d["text"]) <= high]


def _splits(
    examples: list[dict[str, Any]], fewshot: int, rng: random.Random
) -> list[dict[str, Any]]:
    """A shuffled sample: ``fewshot`` examples split ``fewshot``, then up to :data:`TEST`
    ``test``."""
    order = list(examples)
    rng.shuffle(order)
    picked = order[: fewshot + TEST]
    return [{**e, "split": "fewshot" if i < fewshot else "test"} for i, e in enumerate(picked)]


@dataclass(frozen=True)
class Written:
    """One file :func:`write_task_data` wrote."""

    path: str
    fewshot: int
    test: int


def write_task_data(out_dir: str | os.PathLike[str]) -> list[Written]:
    """Write ``docstring_{next,cloze,text}.jsonl`` into ``out_dir``; what was written."""
    docs = held_out_docs()
    made = {  # name: (examples, few-shot examples; rolling log-likelihood takes none)
        "docstring_next": (next_sentence_examples(docs, random.Random(SEED)), FEWSHOT),
        "docstring_cloze": (cloze_examples(docs), FEWSHOT),
        "docstring_text": (text_examples(docs), 0),
    }
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    written = []
    for name, (examples, fewshot) in made.items():
        rows = _splits(examples, fewshot, random.Random(SEED))
        path = Path(out_dir) / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({**row, "python": version}, ensure_ascii=False) + "\n")
        n_few = sum(r["split"] == "fewshot" for r in rows)
        written.append(Written(str(path), n_few, len(rows) - n_few))
    return written
