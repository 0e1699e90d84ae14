"""Hugging Face fast tokenizers (``tokenizer.json``) behind megatron-core's tokenizer interface.

Read with the ``tokenizers`` library (Rust, no ``transformers`` import). The special tokens come
from ``tokenizer_config.json`` or ``special_tokens_map.json`` beside the ``tokenizer.json``, as
``transformers.AutoTokenizer`` reads them. Text is encoded without the tokenizer's special-token
template (no BOS), as megatron-core's ``HuggingFaceTokenizer`` does by default; preprocessing
appends the EOD (the tokenizer's ``eos_token``) after every document.

:func:`train_bpe_tokenizer` trains a byte-level BPE ``tokenizer.json`` (GPT-2/Llama-3/Qwen style)
and writes a folder that both this class and ``AutoTokenizer.from_pretrained`` load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from salt_megatron.data.errors import DataError
from salt_megatron.data.tokenizer_base import FingerprintedTokenizer

TOKENIZER_JSON = "tokenizer.json"
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_SPECIALS = ("eos", "bos", "pad", "unk")
_NOT_MAPPING = ("truncation", "padding")
"""``tokenizer.json`` sections that change batching, not the text -> ids mapping."""
DEFAULT_EOS = "<|endoftext|>"


def find_tokenizer_json(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else ``path/tokenizer.json``; a clear error if absent."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_JSON
        if not p.is_file():
            raise DataError(
                f"{path}: no {TOKENIZER_JSON} in this folder (a Hugging Face fast tokenizer is "
                "needed; slow-only tokenizers are not supported)"
            )
    elif not p.is_file():
        raise DataError(f"tokenizer not found: {path}")
    return p


def _token_text(value: Any) -> str | None:
    """A special token as written in the configs: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(folder: Path) -> dict[str, str]:
    """``{"eos": "</s>", ...}`` from the folder's tokenizer configs (the first file wins)."""
    found: dict[str, str] = {}
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: unreadable tokenizer config ({err})") from err
        for kind in _SPECIALS:
            token = _token_text(config.get(f"{kind}_token")) if isinstance(config, dict) else None
            if token is not None:
                found.setdefault(kind, token)
    return found


def tokenizer_fingerprint(spec: dict[str, Any]) -> str:
    """sha256 of a parsed ``tokenizer.json``'s text -> ids mapping (canonical JSON).

    Keys are sorted and the truncation/padding settings left out, so two copies of one tokenizer
    written by different library versions or with other batching settings match.
    """
    mapping = {k: v for k, v in spec.items() if k not in _NOT_MAPPING}
    canonical = json.dumps(mapping, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class HuggingFaceTokenizer(FingerprintedTokenizer):
    """A ``tokenizer.json`` fast tokenizer with megatron-core's tokenizer interface.

    ``path``: a folder holding ``tokenizer.json`` (and usually ``tokenizer_config.json``), or the
    ``tokenizer.json`` itself (its folder's configs are read). ``eod`` is the ``eos_token``;
    a tokenizer without one raises :class:`DataError` when ``eod`` is asked for.
    ``fingerprint``: :func:`tokenizer_fingerprint`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer

        self.json_path = find_tokenizer_json(path)
        self.path = str(path)
        try:
            text = self.json_path.read_text(encoding="utf-8")
            spec = json.loads(text)
            self._tok = Tokenizer.from_str(text)
        except Exception as err:  # OSError, bad UTF-8 or JSON, the library's parse errors
            raise DataError(f"{self.json_path}: not a Hugging Face tokenizer.json ({err})") from err
        self._fingerprint = tokenizer_fingerprint(spec)
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._size = max(self._vocab.values()) + 1 if self._vocab else 0
        self._specials = _special_tokens(self.json_path.parent)

    def _identity(self) -> list[tuple[str, Any]]:
        return [("fingerprint", self._fingerprint), ("eod", self._special_id("eos"))]

    @property
    def vocab_size(self) -> int:
        """1 + the largest id (added tokens included): the rows a model needs."""
        return self._size

    @property
    def vocab(self) -> dict[str, int]:
        """Token -> id (added tokens included)."""
        return dict(self._vocab)

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token."""
        return {i: t for t, i in self._vocab.items()}

    def _special_id(self, kind: str) -> int:
        token = self._specials.get(kind)
        if token is None:
            return -1
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(
                f"{self.json_path.parent}: {kind}_token {token!r} is not in {self.json_path.name}"
            )
        return int(token_id)

    @property
    def eod(self) -> int:
        """End-of-document id: the ``eos_token``'s. A tokenizer without one is an error."""
        eod = self._special_id("eos")
        if eod < 0:
            raise DataError(
                f"{self.path}: the tokenizer has no eos_token, so there is no end-of-document "
                f'token; set "eos_token" in {self.json_path.parent / _CONFIG_FILES[0]}'
            )
        return eod

    @property
    def eos(self) -> int:
        """End-of-sequence id (same as ``eod``)."""
        return self.eod

    @property
    def bos(self) -> int:
        """Beginning-of-sequence id, ``-1`` if none."""
        return self._special_id("bos")

    @property
    def pad(self) -> int:
        """Padding id, ``-1`` if none."""
        return self._special_id("pad")

    @property
    def unk(self) -> int:
        """Unknown-token id, ``-1`` if none (byte-level BPE needs none)."""
        return self._special_id("unk")

    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (``{"eos": "<|endoftext|>", ...}``)."""
        return dict(self._specials)

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> ids in one call (the library's batched encoder)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids -> text (special tokens kept)."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Part of megatron's interface; chat templates need ``transformers`` (not used here)."""
        raise NotImplementedError(f"{self.path}: chat templates are not supported")

    def copy_files(self, out: str | os.PathLike[str]) -> list[str]:
        """Copy ``tokenizer.json`` and the configs beside it into ``out``; the names copied."""
        names = [TOKENIZER_JSON]
        shutil.copyfile(self.json_path, os.path.join(out, TOKENIZER_JSON))
        for name in _CONFIG_FILES:
            src = self.json_path.parent / name
            if src.is_file():
                shutil.copyfile(src, os.path.join(out, name))
                names.append(name)
        return names

    def __repr__(self) -> str:
        return (
            f"HuggingFaceTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self._fingerprint[:12]})"
        )


def write_tokenizer_config(out: str | os.PathLike[str], specials: dict[str, str]) -> None:
    """``tokenizer_config.json`` for ``AutoTokenizer`` (fast tokenizer, the special tokens)."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        **{f"{kind}_token": token for kind, token in specials.items()},
    }
    with open(os.path.join(out, _CONFIG_FILES[0]), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 8000,
    special_tokens: Sequence[str] = (),
    eos_token: str = DEFAULT_EOS,
) -> HuggingFaceTokenizer:
    """Train a byte-level BPE on ``texts``; write ``out_dir/tokenizer.json`` and its config.

    Byte-level: every string round-trips (``detokenize(tokenize(x)) == x``) and there is no unk.
    ``eos_token`` (id 0) is the end-of-document token; ``special_tokens`` follow it. The folder is
    written under a temporary name and renamed at the end.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    specials = [eos_token, *[t for t in special_tokens if t != eos_token]]
    if vocab_size < 256 + len(specials):
        raise DataError(f"a byte-level BPE needs vocab_size >= {256 + len(specials)}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((t for t in texts if t), trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer.save(str(tmp / TOKENIZER_JSON))
        write_tokenizer_config(tmp, {"eos": eos_token})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return HuggingFaceTokenizer(out)
