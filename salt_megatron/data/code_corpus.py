"""A larger corpus made on the machine: the Python sources of the standard library and of the
installed packages, cleaned and deduplicated (no download).

Every install of this project has these files (``make venv``), so the corpus needs no network;
what it holds depends on the installed versions, which the manifest records with a fingerprint
of the result. The steps, per source file in sorted path order (stdlib first, then the
interpreter's ``purelib`` site-packages):

1. *drop* a file over :data:`MAX_FILE_BYTES`, not UTF-8, not parseable by this Python's
   :mod:`ast`, generated or data-like (zlib compresses it below :data:`MIN_COMPRESSION`: tables,
   serialized patterns; or most of its bytes sit in lines over :data:`LONG_LINE` characters:
   embedded blobs), or an exact byte-for-byte copy of an earlier file;
2. *strip licence headers*: the leading comment block when it mentions a copyright or licence,
   and the module docstring's paragraphs that do;
3. *drop copies*: a class or function marked ``# Copied from`` (transformers' copies of another
   model's code, renamed);
4. *deduplicate units*: the file is cut into units (each top-level statement, a top-level class
   cut into its header and its body statements, each with the comment lines right above it); a
   unit of at least :data:`MIN_DEDUP_CHARS` characters whose normalised text (stripped lines, the
   file's folder name masked, so ``LlamaAttention`` and ``MistralAttention`` copies in
   ``models/llama`` and ``models/mistral`` match; vendoring prefixes such as ``pip._vendor.``
   removed, so pip's copy of pygments matches pygments) equals an earlier unit's is dropped;
5. keep the document when at least :data:`MIN_DOC_CHARS` characters remain, and when its text is
   not an exact copy of an earlier document.

Files are read and cut in worker processes; the deduplication runs in the parent in path order,
so the output does not depend on the number of workers.
"""

from __future__ import annotations

import ast
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import sysconfig
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

CLEANING_VERSION = 1  # bump when the cleaning rules change (recorded in the manifest)
MAX_FILE_BYTES = 512 * 1024
MIN_COMPRESSION = 0.10  # zlib size / size below this: tables and generated data
LONG_LINE = 300  # characters
MAX_LONG_LINE_SHARE = 0.3  # share of a file's bytes in lines over LONG_LINE characters
MIN_DEDUP_CHARS = 100  # shorter units (imports, one-liners) are never dropped as duplicates
MIN_DOC_CHARS = 200
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}
_LICENCE = re.compile(
    r"copyright|licen[cs]|warrant|all rights reserved|permission is hereby granted", re.I
)
_COPIED = re.compile(r"^\s*# Copied from ")
_VENDOR = re.compile(r"\b[\w.]+\._vendor\.")


@dataclass
class Cut:
    """One file after steps 1-3: its units, or why it was dropped."""

    doc_id: str
    reason: str | None = None  # None: kept; else the drop reason
    units: list[tuple[str, str | None]] = field(default_factory=list)  # (text, dedup key)
    raw_sha: str = ""
    licence_lines: int = 0
    copied_defs: int = 0


def source_files() -> list[tuple[str, Path]]:
    """``(document id, path)`` of every ``.py`` file: ``stdlib/...`` then ``site-packages/...``,
    each in sorted path order (the running interpreter's stdlib and purelib)."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"])), ("site-packages", Path(paths["purelib"]))]
    out: list[tuple[str, Path]] = []
    for label, root in roots:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            found += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
        rel = sorted((p.relative_to(root).as_posix(), p) for p in found)
        out += [(f"{label}/{r}", p) for r, p in rel]
    return out


def _data_like(raw: bytes) -> str | None:
    """Why ``raw`` looks generated or data-like, or None."""
    if len(zlib.compress(raw, 6)) < MIN_COMPRESSION * len(raw):
        return "data-like (compresses below 10%)"
    long_bytes = sum(len(line) for line in raw.split(b"\n") if len(line) > LONG_LINE)
    if long_bytes > MAX_LONG_LINE_SHARE * len(raw):
        return "data-like (long lines)"
    return None


def _leading_licence(lines: list[str]) -> int:
    """Number of leading comment/blank lines to drop: all of them when they mention a licence."""
    n = 0
    while n < len(lines) and (not lines[n].strip() or lines[n].lstrip().startswith("#")):
        n += 1
    return n if _LICENCE.search("\n".join(lines[:n])) else 0


def _docstring_without_licence(tree: ast.Module, lines: list[str]) -> dict[int, str | None]:
    """Line edits (0-based line -> replacement, None drops) that remove the module docstring's
    licence paragraphs; empty when it has none."""
    if not tree.body or not isinstance(tree.body[0], ast.Expr):
        return {}
    node = tree.body[0]
    value = node.value
    if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
        return {}
    if not _LICENCE.search(value.value) or node.end_lineno is None:
        return {}
    paragraphs = re.split(r"\n\s*\n", value.value.strip("\n"))
    kept = [p for p in paragraphs if not _LICENCE.search(p)]
    first, last = node.lineno - 1, node.end_lineno - 1
    edits: dict[int, str | None] = dict.fromkeys(range(first, last + 1))
    if kept and any(p.strip() for p in kept):
        body = "\n\n".join(kept).replace('"""', r"\"\"\"")
        edits[first] = '"""' + body + '\n"""\n'
    return edits


def _start_line(node: ast.stmt, lines: list[str]) -> int:
    """0-based first line of ``node``: its decorators, and the comment lines right above."""
    start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    return start


def _copied_ranges(tree: ast.Module, lines: list[str]) -> list[tuple[int, int]]:
    """0-based inclusive line ranges of classes/functions marked ``# Copied from``."""
    ranges = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        start = _start_line(node, lines)
        if node.end_lineno is None:
            continue
        if any(_COPIED.match(lines[i]) for i in range(start, node.lineno)):
            ranges.append((start, node.end_lineno - 1))
    return ranges


def _unit_starts(tree: ast.Module, lines: list[str]) -> list[int]:
    """0-based first lines of the units: top-level statements, and the body statements of
    top-level classes (the class header is the unit before its first body statement)."""
    starts = {0}
    for node in tree.body:
        starts.add(_start_line(node, lines))
        if isinstance(node, ast.ClassDef):
            starts.update(_start_line(child, lines) for child in node.body[1:])
            if node.body:
                starts.add(_start_line(node.body[0], lines))
    return sorted(starts)


def _dedup_key(text: str, folder: str) -> str | None:
    """Hash of the normalised unit text (stripped non-blank lines, vendoring prefixes removed,
    ``folder`` masked), or None when the unit is too short to be dropped as a duplicate."""
    norm = "\n".join(s for s in (line.strip() for line in text.splitlines()) if s)
    if len(norm) < MIN_DEDUP_CHARS:
        return None
    norm = _VENDOR.sub("", norm)
    if len(folder) >= 3:
        pattern = "_?".join(re.escape(c) for c in folder.replace("_", ""))
        norm = re.sub(pattern, "MODEL", norm, flags=re.I)
    return hashlib.sha1(norm.encode()).hexdigest()


def cut_file(doc_id: str, raw: bytes) -> Cut:
    """Steps 1-3 for one file (see the module docstring); no cross-file state."""
    cut = Cut(doc_id, raw_sha=hashlib.sha1(raw).hexdigest())
    if len(raw) > MAX_FILE_BYTES:
        cut.reason = "over 512 KiB"
        return cut
    cut.reason = _data_like(raw) if raw else "empty"
    if cut.reason:
        return cut
    try:
        text = raw.decode("utf-8")
        tree = ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        cut.reason = "not UTF-8 or not parseable"
        return cut
    lines = text.splitlines(keepends=True)
    edits: dict[int, str | None] = dict.fromkeys(range(_leading_licence(lines)))
    cut.licence_lines = len(edits)
    doc_edits = _docstring_without_licence(tree, lines)
    cut.licence_lines += sum(1 for v in doc_edits.values() if v is None)
    edits.update(doc_edits)
    for first, last in _copied_ranges(tree, lines):
        cut.copied_defs += 1
        edits.update(dict.fromkeys(range(first, last + 1)))
    starts = _unit_starts(tree, lines)
    folder = doc_id.split("/")[-2] if doc_id.count("/") > 1 else ""
    for begin, end in zip(starts, [*starts[1:], len(lines)]):
        unit = "".join(
            edits[i] or "" if i in edits else lines[i] for i in range(begin, end)
        )  # an edit's None drops the line
        if unit.strip():
            cut.units.append((unit, _dedup_key(unit, folder)))
    return cut


def _read_and_cut(item: tuple[str, str]) -> Cut:
    doc_id, path = item
    return cut_file(doc_id, Path(path).read_bytes())


@dataclass
class CodeCorpusStats:
    """What the build kept and dropped."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> files
    duplicate_units: int = 0
    duplicate_unit_chars: int = 0
    copied_defs: int = 0
    licence_lines: int = 0
    seconds: float = 0.0


def iter_code_documents(
    workers: int = 1,
    stats: CodeCorpusStats | None = None,
    files: list[tuple[str, Path]] | None = None,
) -> Iterator[dict[str, str]]:
    """The cleaned documents ``{"id", "text"}`` of ``files`` (default :func:`source_files`), in
    their order (see the module docstring); ``stats`` counts what was kept and dropped."""
    stats = stats if stats is not None else CodeCorpusStats()
    items = [(doc_id, str(path)) for doc_id, path in (files or source_files())]
    seen_files: set[str] = set()
    seen_units: set[str] = set()
    seen_docs: set[str] = set()
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers)
        cuts: Iterator[Cut] = pool.imap(_read_and_cut, items, chunksize=16)
    else:
        pool, cuts = None, map(_read_and_cut, items)
    try:
        for cut in cuts:
            stats.files += 1
            if cut.reason is None and cut.raw_sha in seen_files:
                cut.reason = "exact copy of an earlier file"
            seen_files.add(cut.raw_sha)
            if cut.reason is not None:
                stats.dropped[cut.reason] += 1
                continue
            stats.copied_defs += cut.copied_defs
            stats.licence_lines += cut.licence_lines
            kept = []
            for unit, key in cut.units:
                if key is not None and key in seen_units:
                    stats.duplicate_units += 1
                    stats.duplicate_unit_chars += len(unit)
                    continue
                if key is not None:
                    seen_units.add(key)
                kept.append(unit)
            text = "".join(kept).strip("\n") + "\n"
            digest = hashlib.sha1(text.encode()).hexdigest()
            if len(text) < MIN_DOC_CHARS or digest in seen_docs:
                stats.dropped["short or duplicate after cleaning"] += 1
                continue
            seen_docs.add(digest)
            stats.documents += 1
            stats.chars += len(text)
            yield {"id": cut.doc_id, "text": text}
    finally:
        if pool is not None:
            pool.terminate()


def installed_versions() -> dict[str, str]:
    """``{distribution: version}`` of the packages installed in the running interpreter."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower()] = dist.version
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class CodeCorpusSummary:
    """What :func:`write_code_corpus` wrote: the corpus and its manifest (``.manifest.json``)."""

    path: str
    manifest: str
    documents: int
    chars: int
    bytes: int
    sha256: str
    seconds: float


def write_code_corpus(path: str | os.PathLike[str], workers: int = 1) -> CodeCorpusSummary:
    """Write :func:`iter_code_documents` to ``path`` as JSONL (temporary name, renamed at the end)
    and the manifest beside it: Python and package versions, the cleaning rules' version and
    thresholds, what was dropped, and the sha256 of the JSONL (another install may differ)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    stats = CodeCorpusStats()
    start = time.perf_counter()
    sha = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for doc in iter_code_documents(workers, stats):
                line = (json.dumps(doc, ensure_ascii=False) + "\n").encode()
                sha.update(line)
                f.write(line)
        stats.seconds = time.perf_counter() - start
        manifest = out.with_name(out.name + ".manifest.json")
        record = {
            "sha256": sha.hexdigest(),
            "bytes": tmp.stat().st_size,
            "python": sys.version.split()[0],
            "cleaning_version": CLEANING_VERSION,
            "thresholds": {
                "max_file_bytes": MAX_FILE_BYTES,
                "min_compression": MIN_COMPRESSION,
                "long_line": LONG_LINE,
                "max_long_line_share": MAX_LONG_LINE_SHARE,
                "min_dedup_chars": MIN_DEDUP_CHARS,
                "min_doc_chars": MIN_DOC_CHARS,
            },
            "stats": {**asdict(stats), "dropped": dict(stats.dropped)},
            "packages": installed_versions(),
        }
        manifest.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return CodeCorpusSummary(
        str(out), str(manifest), stats.documents, stats.chars, out.stat().st_size,
        sha.hexdigest(), stats.seconds,
    )  # fmt: skip
