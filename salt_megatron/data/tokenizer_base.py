"""What every fingerprinted tokenizer shares: its identity and megatron's dataset-cache key.

Its own module so that :mod:`.tokenizer` (sentencepiece, :func:`~.tokenizer.load_tokenizer`) and
:mod:`.hf_tokenizer` (Hugging Face) both build on it without importing each other.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Any


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FingerprintedTokenizer:
    """Identity of a tokenizer: ``fingerprint`` and megatron's dataset-cache key from it."""

    _fingerprint: str

    @property
    def fingerprint(self) -> str:
        """sha256 hex digest identifying the text -> ids mapping."""
        return self._fingerprint

    def _identity(self) -> list[tuple[str, Any]]:
        return [("fingerprint", self._fingerprint)]

    @property
    def unique_identifiers(self) -> OrderedDict[str, Any]:
        """What megatron hashes into its dataset-cache key (class, fingerprint, ...)."""
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        return OrderedDict([("class", kind), *self._identity()])
