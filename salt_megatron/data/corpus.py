"""Reading documents from JSONL / plain-text files, and the embedded stdlib-docstring corpus.

Input formats (chosen by file suffix):

* ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line, the document text under a key
  (``text`` by default); blank lines are ignored.
* anything else: plain UTF-8 text, one document per block of lines separated by blank lines.

Bad input raises :class:`DataError` naming the file and line; callers that skip bad lines catch
it per record.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from salt_megatron.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "_bundled"}


def input_format(path: str | os.PathLike[str]) -> str:
    """``"jsonl"`` for .jsonl/.json/.ndjson files, else ``"text"``."""
    return "jsonl" if str(path).lower().endswith(JSONL_SUFFIXES) else "text"


def iter_raw_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` per document of ``path`` (1-based line numbers).

    Raises :class:`DataError` if the file is missing or holds no document at all.
    """
    if not os.path.isfile(path):
        raise DataError(f"input file not found: {path}")
    fmt = input_format(path)
    count = 0
    with open(path, "rb") as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    count += 1
                    yield lineno, line
        else:
            block: list[bytes] = []
            start = 0
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    if not block:
                        start = lineno
                    block.append(line)
                elif block:
                    count += 1
                    yield start, b"".join(block).rstrip(b"\r\n")
                    block = []
            if block:
                count += 1
                yield start, b"".join(block).rstrip(b"\r\n")
    if count == 0:
        raise DataError(f"{path}: empty file (no documents)")


def decode_record(raw: bytes, path: str, lineno: int, json_key: str = "text") -> str:
    """Decode one raw record of ``path`` to its document text.

    Raises :class:`DataError` ("<path>:<line>: ...") for non-UTF-8 bytes, malformed JSON, a
    line that is not a JSON object, a missing key or a non-string value.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}:{lineno}: not valid UTF-8 (byte {err.start} of the record: {err.reason})"
        ) from err
    if input_format(path) != "jsonl":
        return line
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg}, column {err.colno})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    if json_key not in obj:
        keys = ", ".join(sorted(obj)[:10]) or "none"
        raise DataError(f"{path}:{lineno}: missing key {json_key!r} (keys: {keys})")
    text = obj[json_key]
    if not isinstance(text, str):
        raise DataError(f"{path}:{lineno}: {json_key!r} is a {type(text).__name__}, not a string")
    return text


@dataclass
class BadLines:
    """Counts and first examples of records skipped as bad."""

    count: int = 0
    examples: tuple[str, ...] = ()

    def add(self, message: str, keep: int = 5) -> None:
        """Count one bad record, keeping the first ``keep`` messages."""
        self.count += 1
        if len(self.examples) < keep:
            self.examples = (*self.examples, message)

    def format(self) -> str:
        """One line per kept example, after a count line."""
        lines = [f"skipped {self.count} bad line(s)"]
        lines += [f"  {m}" for m in self.examples]
        return "\n".join(lines)


def iter_texts(
    paths: Iterable[str | os.PathLike[str]],
    json_key: str = "text",
    bad_lines: BadLines | None = None,
) -> Iterator[str]:
    """Yield the document texts of all ``paths`` in order.

    With ``bad_lines`` given, bad records are counted there and skipped; otherwise the first
    one raises :class:`DataError`.
    """
    for path in paths:
        for lineno, raw in iter_raw_records(path):
            try:
                yield decode_record(raw, str(path), lineno, json_key)
            except DataError as err:
                if bad_lines is None:
                    raise
                bad_lines.add(str(err))


def _stdlib_sources(root: Path) -> list[Path]:
    """Sorted ``.py`` files under the stdlib ``root``, minus tests and site-packages."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(path: Path, module: str) -> Iterator[tuple[str, str]]:
    """``(qualified name, docstring)`` of the module, classes and functions in ``path``."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop(0)
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc:
            yield name, doc
        children = [
            (child, f"{name}.{child.name}")
            for child in ast.iter_child_nodes(node)
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        stack[0:0] = children


def stdlib_docstrings(min_chars: int = 40) -> Iterator[dict[str, str]]:
    """Docstrings of the running Python's standard library, as ``{"id", "text"}`` documents.

    Source files are parsed with :mod:`ast` (nothing is imported) in sorted path order; a
    docstring shorter than ``min_chars`` or equal to an earlier one is dropped. Deterministic
    for a given Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in _stdlib_sources(root):
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        module = ".".join(parts) or rel.name
        for name, doc in module_docstrings(path, module):
            if len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            yield {"id": name, "text": doc}


@dataclass(frozen=True)
class CorpusSummary:
    """What :func:`write_stdlib_corpus` wrote."""

    path: str
    documents: int
    chars: int
    bytes: int


def write_stdlib_corpus(path: str | os.PathLike[str], min_chars: int = 40) -> CorpusSummary:
    """Write :func:`stdlib_docstrings` to ``path`` as JSONL (temporary name, renamed at the end)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    docs = chars = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in stdlib_docstrings(min_chars):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                docs += 1
                chars += len(doc["text"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return CorpusSummary(str(out), docs, chars, out.stat().st_size)
