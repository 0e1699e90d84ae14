"""Checks on the teacher checkpoint before training starts, and the teacher's model shape.

Every failure is a :class:`TeacherError` whose message names the flag or the path to fix.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from salt_megatron.checkpoint import layout
from salt_megatron.config.schema import ConfigError, SaltConfig, TeacherModelConfig

log = logging.getLogger(__name__)

DIST_METADATA_FILES = ("metadata.json", ".metadata")
"""megatron's dist-checkpoint metadata and torch DCP's: both exist in a complete checkpoint."""


class TeacherError(ValueError):
    """The teacher cannot be used as configured; the message names the flag or path."""


@dataclass(frozen=True)
class TeacherCheckpoint:
    """A complete teacher checkpoint: its iteration directory and its ``salt_meta.json``."""

    root: str
    step: int
    path: str
    meta: dict[str, Any]


def resolve_checkpoint(root: str | None) -> TeacherCheckpoint:
    """The newest complete checkpoint under ``--kd-teacher-load root`` (tracker, dir, metadata)."""
    flag = "--kd-teacher-load"
    if not root:
        raise TeacherError(f"{flag} is not set: distillation needs a teacher checkpoint")
    if not os.path.isdir(root):
        raise TeacherError(f"{flag} {root}: no such directory")
    try:
        step = layout.read_latest_step(root)
    except layout.CheckpointError as exc:
        raise TeacherError(f"{flag}: {exc}") from None
    if step is None:
        raise TeacherError(f"{flag} {root}: no {layout.TRACKER_FILE}; not a checkpoint directory")
    path = layout.iteration_dir(root, step)
    if not os.path.isdir(path):
        raise TeacherError(
            f"{flag} {root}: {layout.TRACKER_FILE} names step {step} but {path} is missing"
        )
    for name in DIST_METADATA_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise TeacherError(f"{flag}: incomplete checkpoint {path}: {name} is missing")
    try:
        meta = layout.read_meta(path)
    except layout.CheckpointError as exc:
        raise TeacherError(f"{flag}: {exc}") from None
    return TeacherCheckpoint(root, step, path, meta)


def _saved_sections(ckpt: TeacherCheckpoint) -> dict[str, Any]:
    config = ckpt.meta.get("config")
    return config if isinstance(config, dict) else {}


def teacher_model_config(ckpt: TeacherCheckpoint, cfg: SaltConfig) -> TeacherModelConfig:
    """The teacher's shape: the checkpoint's saved ``config.model``; else the ``--teacher-*`` flags.

    With a saved config, a ``--teacher-*`` shape flag set to a non-default value that disagrees
    with it is an error (the flags only describe checkpoints saved without a config). The layer
    implementation is a runtime choice and follows the student's ``--transformer-impl``; dropout
    is always 0 (the teacher only runs inference).
    """
    saved = _saved_sections(ckpt).get("model")
    flags = cfg.teacher
    if isinstance(saved, dict):
        known = {f.name for f in dataclasses.fields(TeacherModelConfig)}
        ignored = sorted(set(saved) - known)
        if ignored:
            log.warning(f"teacher checkpoint {ckpt.path}: ignoring unknown model keys {ignored}")
        try:
            model = TeacherModelConfig(**{k: v for k, v in saved.items() if k in known})
        except (ConfigError, TypeError) as exc:
            raise TeacherError(
                f"{ckpt.path}/{layout.META_FILE}: bad saved model config: {exc}"
            ) from None
        _check_flags_agree(flags, model, ckpt.path)
    else:
        log.warning(f"{ckpt.path}: no saved model config, using the --teacher-* flags")
        model = flags
    return dataclasses.replace(
        model,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        transformer_impl=cfg.model.transformer_impl,
    )


def _check_flags_agree(flags: TeacherModelConfig, saved: TeacherModelConfig, path: str) -> None:
    default = TeacherModelConfig()
    runtime = {"hidden_dropout", "attention_dropout", "transformer_impl"}
    for f in dataclasses.fields(TeacherModelConfig):
        value = getattr(flags, f.name)
        if f.name in runtime or value == getattr(default, f.name):
            continue
        if value != getattr(saved, f.name):
            flag = "--teacher-" + f.name.replace("_", "-")
            raise TeacherError(
                f"{flag} {value} disagrees with the teacher checkpoint's saved config "
                f"({getattr(saved, f.name)}) in {path}/{layout.META_FILE}; the saved config "
                f"wins: drop the flag"
            )


def check_compatible(
    ckpt: TeacherCheckpoint,
    model: TeacherModelConfig,
    cfg: SaltConfig,
    tokenizer_fingerprint: str,
    vocab_size: int | None,
) -> None:
    """Tokenizer, vocabulary and sequence-length checks between teacher and student.

    Args:
        vocab_size: the student's true (unpadded) vocabulary size, None if unknown.
    """
    meta_path = f"{ckpt.path}/{layout.META_FILE}"
    saved_fp = str(ckpt.meta.get("tokenizer_fingerprint") or "")
    if saved_fp != (tokenizer_fingerprint or ""):
        raise TeacherError(
            f"--kd-teacher-load: the teacher was trained with tokenizer {saved_fp or '<none>'!r} "
            f"({meta_path}), the student uses {tokenizer_fingerprint or '<none>'!r} "
            f"(--tokenizer-model): teacher and student must share one tokenizer"
        )
    teacher_vocab = ckpt.meta.get("vocab_size", model.vocab_size)
    if vocab_size is not None and teacher_vocab is not None and teacher_vocab != vocab_size:
        raise TeacherError(
            f"--kd-teacher-load: teacher vocabulary {teacher_vocab} ({meta_path}) differs from "
            f"the student's {vocab_size} (--vocab-size / --tokenizer-model)"
        )
    seq = cfg.data.seq_length
    if model.max_position_embeddings < seq:
        raise TeacherError(
            f"--seq-length {seq} exceeds the teacher's max_position_embeddings "
            f"{model.max_position_embeddings} ({meta_path})"
        )
    trained = _saved_sections(ckpt).get("data", {}).get("seq_length")
    if trained is not None and trained < seq:
        raise TeacherError(
            f"--seq-length {seq} exceeds the teacher's training sequence length {trained} "
            f"({meta_path}): its soft targets past position {trained} are untrained"
        )
