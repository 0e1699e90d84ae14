"""A saved model read back for inference: its checkpoint, shape, vocabulary, tokenizer, weights.

What evaluation (:mod:`salt_megatron.eval`), fine-tuning from a pretrained checkpoint and the
Hugging Face export share: the model's shape comes from the checkpoint's ``salt_meta.json``
(``config.model``), its weights are read with megatron's dist-checkpointing, whose sharded keys
are global, so the reading layout may differ from the one the checkpoint was saved at.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from salt_megatron.checkpoint import files, layout
from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.config.schema import ConfigError, ModelConfig


class LoadError(ValueError):
    """A saved model cannot be used as asked (layout, tokenizer); the message names the flag."""


def resolve(root: str, step: int | None = None, flag: str = "--load") -> files.Resolved:
    """The verified checkpoint under ``root`` (given as ``flag``): the tracker's latest, or
    ``iter_<step>``."""
    if not os.path.isdir(root):
        raise CheckpointError(f"{flag} {root}: no such directory")
    if step is None:
        step = layout.read_latest_step(root)
        if step is None:
            raise CheckpointError(f"{flag} {root}: no {layout.TRACKER_FILE}; not a checkpoint")
    path = layout.iteration_dir(root, step)
    if not os.path.isdir(path):
        have = ", ".join(str(s) for s in layout.saved_steps(root)) or "none"
        raise CheckpointError(f"{flag} {root}: no checkpoint of step {step} (saved steps: {have})")
    return files.Resolved(step, path, files.verify(path))


def saved_model_config(meta: dict[str, Any], path: str) -> ModelConfig:
    """The model shape saved in ``salt_meta.json`` (unknown keys ignored, dropout off)."""
    saved = (meta.get("config") or {}).get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}/{layout.META_FILE}: no saved model config")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        model = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}/{layout.META_FILE}: bad saved model config: {exc}") from None
    return dataclasses.replace(model, hidden_dropout=0.0, attention_dropout=0.0)


PRETRAINED_DATA_FIELDS = ("tokenizer_model", "tokenizer_type", "seq_length")
"""``data`` fields that default to a pretrained checkpoint's (with every ``model`` field)."""


def pretrained_defaults(values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The config values given (``{section: {field: value}}``), completed from the checkpoint of
    ``--pretrained-checkpoint`` under ``--sft``: every model field, the tokenizer and
    ``--seq-length`` that were not given take its saved values (``parse_config``'s ``fill``).
    A checkpoint that cannot be read is a ConfigError naming the flag."""
    sft = values.get("sft") or {}
    root = sft.get("pretrained_checkpoint")
    if not sft.get("sft") or not root:
        return values
    try:
        meta = resolve(root, flag="--pretrained-checkpoint").meta
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    saved = meta.get("config") or {}
    known = {"model": [f.name for f in dataclasses.fields(ModelConfig)],
             "data": PRETRAINED_DATA_FIELDS}  # fmt: skip
    filled = {section: dict(fields) for section, fields in values.items()}
    for section, names in known.items():
        saved_section = saved.get(section) or {}
        for name in names:
            if name in saved_section:
                filled.setdefault(section, {}).setdefault(name, saved_section[name])
    return filled


def saved_padded_vocab(meta: dict[str, Any], path: str, tp: int) -> int:
    """The checkpoint's padded vocabulary (its embedding rows); must divide by ``tp``."""
    padded = meta.get("padded_vocab_size")
    if padded is None:
        raise CheckpointError(f"{path}/{layout.META_FILE}: padded_vocab_size is missing")
    if int(padded) % tp:
        raise LoadError(
            f"--tensor-model-parallel-size {tp} does not divide the checkpoint's padded "
            f"vocabulary {padded}"
        )
    return int(padded)


def saved_bf16(meta: dict[str, Any]) -> bool:
    """Whether the checkpoint was trained (and its weights kept) in bfloat16."""
    return bool(((meta.get("config") or {}).get("training") or {}).get("bf16", False))


def check_tokenizer(
    meta: dict[str, Any], path: str, tokenizer_model: str | None, tokenizer_type: str | None = None
) -> Any:
    """Load the tokenizer and check its fingerprint against the checkpoint's.

    ``tokenizer_model``/``tokenizer_type`` default to the checkpoint's saved ones.
    """
    from salt_megatron.data.tokenizer import load_tokenizer

    saved = (meta.get("config") or {}).get("data") or {}
    model_path = tokenizer_model or saved.get("tokenizer_model")
    if not model_path:
        raise LoadError(f"{path} was saved without a tokenizer model: pass --tokenizer-model")
    tokenizer = load_tokenizer(model_path, tokenizer_type or saved.get("tokenizer_type"))
    saved_fp = str(meta.get("tokenizer_fingerprint") or "")
    if tokenizer.fingerprint != saved_fp:
        raise LoadError(
            f"--tokenizer-model {model_path} (fingerprint {tokenizer.fingerprint[:12]}) is not "
            f"the tokenizer the checkpoint was trained with ({saved_fp[:12] or '<none>'}, "
            f"{path}/{layout.META_FILE})"
        )
    return tokenizer


def load_weights(chunks: list[Any], path: str) -> None:
    """Read the model weights of ``path`` into ``chunks`` (built at any layout; collective)."""
    from megatron.core import dist_checkpointing

    sharded = layout.model_sharded_state_dict(chunks)
    try:
        state = dist_checkpointing.load(sharded, path)
        for key, chunk in zip(list(sharded), chunks, strict=True):
            layout.unwrap(chunk).load_state_dict(state[key], strict=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot load the weights ({type(exc).__name__}: {exc})"
        ) from exc
