"""Two fine-tuning tasks made on the machine, for the downstream protocol (``tools/downstream.py``).

SALT's paper reports accuracy after supervised fine-tuning on arithmetic reasoning and reading
comprehension. Neither data set can be downloaded here, so both are generated, deterministically
from a seed:

* :func:`arithmetic_problems`: one-step word problems ("Ada has 12 coins. She finds 7 more...")
  over addition, subtraction and multiplication of small numbers. The response writes the
  equation, then ``The answer is N.``; scoring is the exact match of the final number.
* :func:`reading_problems`: a passage (the first paragraph of a docstring of an installed package
  the demo students never trained on: PyTorch and megatron-core, whose versions this project
  pins) and the question which word follows a three-word phrase of it. The phrase occurs once in
  the passage and the answer is a content word (four letters or more, not a stop word), so the
  answer is in the passage and is found by reading it, not by a language prior.

Every example is ``{"prompt", "response", "answer"}`` (reading problems also ``"passage"``):
``prompt`` ends with ``"Answer:"``, ``response`` starts with a space and is what SFT trains on,
``answer`` is the string an exact match compares with. :func:`split_examples` keeps the held-out
test set disjoint from training (by prompt, or by passage).
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from salt_megatron.data.corpus import module_docstrings

Example = dict[str, str]

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jade", "Kai",
         "Lena", "Milo", "Nora", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma")  # fmt: skip
OBJECTS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells",
           "stickers", "cookies")  # fmt: skip

# (operation, template): {a} {b} the numbers, {n} {m} two names, {o} the objects.
TEMPLATES = (
    ("+", "{n} has {a} {o} and finds {b} more. How many {o} does {n} have now?"),
    ("+", "{n} had {a} {o} and bought {b} more. How many {o} does {n} have?"),
    ("+", "{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?"),
    ("+", "There are {a} {o} in a box. {n} puts {b} more {o} in it. How many {o} are in the box?"),
    ("-", "{n} has {a} {o} and gives {b} of them to {m}. How many {o} does {n} have left?"),
    ("-", "{n} had {a} {o} but lost {b} of them. How many {o} does {n} have now?"),
    ("-", "{n} has {a} {o} and {m} has {b} {o}. How many more {o} does {n} have than {m}?"),
    ("-", "There were {a} {o} on the table. {n} took {b} of them. How many {o} are on the table?"),
    ("*", "{n} buys {a} bags with {b} {o} in each bag. How many {o} does {n} buy?"),
    ("*", "{n} has {a} boxes. Each box holds {b} {o}. How many {o} does {n} have?"),
)

_STOP = """that this with from have will when which where there their them than then they these
those were been being into only also such each other some more most must should would could what
while after before over under about above below between both same very just does done used using
uses your returns return true false none self args kwargs"""
STOP_WORDS = frozenset(_STOP.split())
_WORD = re.compile(r"^[A-Za-z]{4,}$")


def _operands(op: str, rng: random.Random) -> tuple[int, int, int]:
    """``(a, b, result)``: sums and differences of 2..30 (differences >= 1), products of 2..9."""
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return a, b, a * b
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    if op == "-":
        a, b = max(a, b) + 1, min(a, b)
        return a, b, a - b
    return a, b, a + b


def arithmetic_problems(n: int, seed: int) -> list[Example]:
    """``n`` distinct arithmetic word problems (by prompt), drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        op, template = rng.choice(TEMPLATES)
        a, b, result = _operands(op, rng)
        name, other = rng.sample(NAMES, 2)
        question = template.format(a=a, b=b, n=name, m=other, o=rng.choice(OBJECTS))
        prompt = f"Question: {question}\nAnswer:"
        if prompt in seen:
            continue
        seen.add(prompt)
        response = f" {a} {op} {b} = {result}. The answer is {result}."
        out.append({"prompt": prompt, "response": response, "answer": str(result)})
    return out


def package_passages(
    packages: Sequence[str] = ("torch", "megatron.core"), min_words: int = 20, max_words: int = 45
) -> list[str]:
    """First paragraphs of the docstrings in the installed ``packages`` (parsed, not imported).

    Whitespace is collapsed; paragraphs with code-like characters are dropped, as are those of
    fewer than ``min_words`` or more than ``max_words`` words; duplicates are dropped. Sorted by
    source path, so the list is the same for the same package versions.
    """
    seen: set[str] = set()
    out: list[str] = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"package {package!r} is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
            if "test" in path.relative_to(root).as_posix():
                continue
            for _, doc in module_docstrings(path, path.stem):
                para = " ".join(doc.split("\n\n")[0].split())
                words = para.split()
                plain = not re.search(r"[<>`{}\[\]=_#|]", para)
                if plain and min_words <= len(words) <= max_words and para not in seen:
                    seen.add(para)
                    out.append(para)
    return out


def _questions(passage: str) -> Iterator[tuple[str, str]]:
    """``(three-word phrase, next word)`` pairs of ``passage`` whose phrase occurs only once and
    whose next word is a content word; punctuation is stripped from the answer only."""
    words = passage.split()
    phrases = [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]
    for i in range(len(words) - 3):
        answer = words[i + 3].strip(".,;:!?()\"'")
        if not _WORD.match(answer) or answer.lower() in STOP_WORDS:
            continue
        if phrases.count(phrases[i]) == 1:
            yield phrases[i], answer


def reading_problems(passages: Sequence[str], per_passage: int, seed: int) -> list[Example]:
    """Up to ``per_passage`` questions per passage (drawn with ``random.Random(seed)``)."""
    rng = random.Random(seed)
    out: list[Example] = []
    for passage in passages:
        candidates = list(_questions(passage))
        for phrase, answer in rng.sample(candidates, min(per_passage, len(candidates))):
            prompt = (
                f'Passage: {passage}\nQuestion: Which word comes after "{phrase}" in the passage?'
                "\nAnswer:"
            )
            out.append(
                {"prompt": prompt, "response": f" {answer}", "answer": answer, "passage": passage}
            )
    return out


def split_examples(
    examples: Sequence[Example], n_test: int, seed: int, key: str = "prompt"
) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle into ``(train, test)`` with ``n_test`` test examples; ``key`` groups
    examples that must land on the same side (e.g. a passage, so no test passage is trained on)."""
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example[key], []).append(example)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    train: list[Example] = []
    test: list[Example] = []
    for k in order:
        (test if len(test) < n_test else train).extend(groups[k])
    return train, test
