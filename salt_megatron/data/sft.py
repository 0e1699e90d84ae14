"""SFT records -> token ids with a per-token training mask (which tokens the loss covers).

Two record kinds, one JSON object per line (blank lines are ignored; other keys are ignored):

* ``{"prompt": str, "response": str}``: ids = ``tokenize(prompt) + tokenize(response) + [eod]``,
  each part tokenized separately, so the ids a model generates from at evaluation
  (:func:`prompt_ids`: ``tokenize(prompt)``) are exactly the SFT-time prompt tokens. The loss
  covers the response ids and the eod.
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` in the built-in
  template (our sentencepiece / BPE tokenizers carry none), each part tokenized separately::

      per turn:   tokenize("<|{role}|>\\n")              header, no loss
      system/user: tokenize(content + "\\n")               no loss
      assistant:   tokenize(content) + [eod]               loss (the turn ends with the eod)

  The last message must be the assistant's; :func:`prompt_ids` of a chat record is everything
  before its last assistant content (the conversation and the ``<|assistant|>`` header).

A bad record (not UTF-8, malformed JSON, not an object, a missing key, a wrong type, an unknown
role, an empty response or assistant turn, a last message that is not the assistant's) raises
:class:`DataError` naming ``file:line``; :func:`read_examples` can skip and count them instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from salt_megatron.data.corpus import BadLines
from salt_megatron.data.errors import DataError

ROLES = ("system", "user", "assistant")
"""Roles of a chat record's messages."""


def role_header(role: str) -> str:
    """The template's text before a turn's content."""
    return f"<|{role}|>\n"


@dataclass(frozen=True, eq=False)
class Example:
    """One encoded record.

    ``ids``: int32 ``[n]`` token ids; ``target``: bool ``[n]``, True for the ids the loss covers
    (predicted from the ids before them: response/assistant ids and their eod); ``where``:
    ``file:line``. As a training sequence it holds ``n - 1`` positions: inputs ``ids[:-1]``,
    labels ``ids[1:]``, loss mask ``target[1:]``.
    """

    ids: np.ndarray
    target: np.ndarray
    where: str

    @property
    def positions(self) -> int:
        """Sequence positions the example occupies (its ids minus one)."""
        return len(self.ids) - 1

    @property
    def response_tokens(self) -> int:
        """Tokens the loss covers."""
        return int(self.target[1:].sum())


def _parts_to_arrays(parts: list[tuple[list[int], bool]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([i for part, _ in parts for i in part], dtype=np.int32)
    target = np.array([t for part, t in parts for _ in part], dtype=bool)
    return ids, target


def _prompt_response_parts(
    prompt: str, response: str, tokenizer: Any
) -> list[tuple[list[int], bool]]:
    return [
        (tokenizer.tokenize(prompt), False),
        (tokenizer.tokenize(response), True),
        ([tokenizer.eod], True),
    ]


def _chat_parts(
    messages: list[dict[str, str]], tokenizer: Any, generation_header: bool = False
) -> list[tuple[list[int], bool]]:
    parts: list[tuple[list[int], bool]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        parts.append((tokenizer.tokenize(role_header(role)), False))
        if role == "assistant":
            parts += [(tokenizer.tokenize(content), True), ([tokenizer.eod], True)]
        else:
            parts.append((tokenizer.tokenize(content + "\n"), False))
    if generation_header:
        parts.append((tokenizer.tokenize(role_header("assistant")), False))
    return parts


def _check_chat(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: messages[{k}] needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{where}: messages[{k}] has role {role!r}, not one of {list(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{k}]['content'] is a {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: messages[{k}] is an empty assistant turn (empty response)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message is the {messages[-1]['role']}'s, not the "
                        "assistant's (nothing to train on after it)")  # fmt: skip
    return messages


def _check_prompt_response(record: dict[str, Any], where: str) -> tuple[str, str]:
    for key in ("prompt", "response"):
        if key not in record:
            keys = ", ".join(sorted(record)[:10]) or "none"
            raise DataError(
                f"{where}: missing key {key!r} (a record needs 'prompt' and 'response', or "
                f"'messages'; keys: {keys})"
            )
        if not isinstance(record[key], str):
            raise DataError(f"{where}: {key!r} is a {type(record[key]).__name__}, not a string")
    if not record["response"].strip():
        raise DataError(f"{where}: empty response")
    return record["prompt"], record["response"]


def parse_record(raw: bytes, where: str) -> dict[str, Any]:
    """One JSONL line -> its checked record (``{"prompt", "response"}`` or ``{"messages"}``)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 (byte {err.start}: {err.reason})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "response" in record:
            raise DataError(f"{where}: both 'messages' and 'prompt'/'response': give one kind")
        return {"messages": _check_chat(record["messages"], where)}
    prompt, response = _check_prompt_response(record, where)
    return {"prompt": prompt, "response": response}


def encode_record(record: dict[str, Any], tokenizer: Any, where: str = "") -> Example:
    """A checked record (:func:`parse_record`) -> its :class:`Example`."""
    if "messages" in record:
        parts = _chat_parts(record["messages"], tokenizer)
    else:
        parts = _prompt_response_parts(record["prompt"], record["response"], tokenizer)
    ids, target = _parts_to_arrays(parts)
    return Example(ids, target, where)


def prompt_ids(record: dict[str, Any], tokenizer: Any) -> list[int]:
    """The ids a model generates the (last) response from: the SFT-time prompt tokens.

    Prompt/response: ``tokenize(prompt)``. Chat: the template's ids of every message before the
    last assistant turn, then the ``<|assistant|>`` header (a conversation that ends with a user
    turn may be given too: its reply is generated after all of it).
    """
    if "messages" not in record:
        return list(tokenizer.tokenize(record["prompt"]))
    messages = list(record["messages"])
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids, _ = _parts_to_arrays(_chat_parts(messages, tokenizer, generation_header=True))
    return [int(i) for i in ids]


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of every non-blank line of ``path`` (1-based), whatever its
    suffix; a missing file or one without a record is a :class:`DataError`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    count = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                count += 1
                yield lineno, line
    if count == 0:
        raise DataError(f"{path}: empty file (no records)")


def read_examples(
    path: str, tokenizer: Any, skip_bad_lines: bool = False
) -> tuple[list[Example], BadLines]:
    """Every record of the JSONL file ``path``, encoded, in file order, and the bad lines skipped.

    Without ``skip_bad_lines`` the first bad record raises :class:`DataError` (``file:line: ...``).
    A missing or empty file is a :class:`DataError` too.
    """
    examples: list[Example] = []
    bad = BadLines()
    for lineno, raw in iter_lines(path):
        where = f"{path}:{lineno}"
        try:
            examples.append(_encode_line(raw, where, tokenizer))
        except DataError as exc:
            if not skip_bad_lines:
                raise
            bad.add(str(exc))
    return examples, bad


def _encode_line(raw: bytes, where: str, tokenizer: Any) -> Example:
    record = parse_record(raw, where)
    try:
        return encode_record(record, tokenizer, where)
    except ValueError as exc:  # the tokenizer's own refusal (DataError is one)
        raise DataError(f"{where}: cannot tokenize ({exc})") from None
