"""Checks on the teacher checkpoint before training starts, and the teacher's model shape.

A teacher checkpoint is ours (written by the trainer or by ``tools/import_hf.py``: it has
``salt_meta.json``) or Megatron-LM's ``torch_dist`` one (its model and tokenizer are read from the
saved ``args``, see :mod:`salt_megatron.checkpoint.megatron_lm`). Either is resolved into a
:class:`TeacherCheckpoint` whose ``meta`` has the same shape. Every failure is a
:class:`TeacherError` whose message names the flag or the path to fix.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from salt_megatron.checkpoint import layout, megatron_lm
from salt_megatron.checkpoint.untrusted import COMMON_FILE, COMMON_STATE_KEY, dcp_metadata
from salt_megatron.config.schema import ConfigError, SaltConfig, TeacherModelConfig
from salt_megatron.data.errors import DataError

log = logging.getLogger(__name__)

DIST_METADATA_FILES = ("metadata.json", ".metadata")
"""megatron's dist-checkpoint metadata and torch DCP's: both exist in a complete checkpoint."""


class TeacherError(ValueError):
    """The teacher cannot be used as configured; the message names the flag or path."""


@dataclass(frozen=True)
class TeacherCheckpoint:
    """A complete teacher checkpoint: its iteration directory and its (``salt_meta.json``) meta.

    ``kind``: ``"salt"`` (ours or imported) or ``"megatron-lm"`` (meta made from its args).
    """

    root: str
    step: int
    path: str
    meta: dict[str, Any]
    kind: str = "salt"


def resolve_checkpoint(root: str | None) -> TeacherCheckpoint:
    """The checkpoint ``--kd-teacher-load root`` names (tracker: an iteration or ``release``).

    ``root`` may also be the checkpoint directory itself. Ours has ``salt_meta.json``; without
    one, the directory must be a Megatron-LM checkpoint (``common.pt`` or ``common_state``).
    """
    flag = "--kd-teacher-load"
    if not root:
        raise TeacherError(f"{flag} is not set: distillation needs a teacher checkpoint")
    if not os.path.isdir(root):
        raise TeacherError(f"{flag} {root}: no such directory")
    try:
        path, step = megatron_lm.iteration_dir(root)
    except layout.CheckpointError as exc:
        raise TeacherError(f"{flag}: {exc}") from None
    if not os.path.isdir(path):
        raise TeacherError(
            f"{flag} {root}: {layout.TRACKER_FILE} names {os.path.basename(path)} but {path} "
            "is missing"
        )
    for name in DIST_METADATA_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise TeacherError(f"{flag}: incomplete checkpoint {path}: {name} is missing")
    try:
        if os.path.isfile(os.path.join(path, layout.META_FILE)):
            return TeacherCheckpoint(root, step or 0, path, layout.read_meta(path))
        return _megatron_lm_checkpoint(root, path, step)
    except layout.CheckpointError as exc:
        raise TeacherError(f"{flag}: {exc}") from None


def _megatron_lm_checkpoint(root: str, path: str, step: int | None) -> TeacherCheckpoint:
    has_common, why = os.path.isfile(os.path.join(path, COMMON_FILE)), ""
    if not has_common:
        try:
            has_common = COMMON_STATE_KEY in dcp_metadata(path).state_dict_metadata
        except layout.CheckpointError as exc:
            why = f" ({exc})"
    if not has_common:
        raise layout.CheckpointError(
            f"{path}: incomplete checkpoint: {layout.META_FILE} is missing, and there is no "
            f"Megatron-LM common state ({COMMON_FILE} or common_state) either{why}"
        )
    ckpt = megatron_lm.read(root, path, step)
    meta = megatron_lm.teacher_meta(ckpt)
    log.info(f"teacher: Megatron-LM checkpoint {path} (iteration {ckpt.iteration})")
    return TeacherCheckpoint(root, int(meta["step"]), path, meta, kind="megatron-lm")


def teacher_tokenizer(ckpt: TeacherCheckpoint, cfg: SaltConfig) -> tuple[str, int | None]:
    """``(fingerprint, true vocabulary)`` of the tokenizer the teacher was trained with.

    Ours: from ``salt_meta.json``. Megatron-LM: the tokenizer named in its args (or
    ``--kd-teacher-tokenizer-model``) is loaded and fingerprinted.
    """
    if ckpt.kind != "megatron-lm":
        vocab = ckpt.meta.get("vocab_size")
        return str(ckpt.meta.get("tokenizer_fingerprint") or ""), vocab
    from salt_megatron.data.tokenizer import load_tokenizer

    source = ckpt.meta["source"]
    saved, kind = source.get("tokenizer_model"), source["tokenizer_type"]
    path = cfg.distill.kd_teacher_tokenizer_model or saved
    if not path or not os.path.exists(path):
        raise TeacherError(
            f"--kd-teacher-load {ckpt.path}: its args name the tokenizer {saved!r} ({kind}), "
            "which is not readable here: pass --kd-teacher-tokenizer-model with that tokenizer"
        )
    try:
        tokenizer = load_tokenizer(path, kind)
    except DataError as exc:
        raise TeacherError(f"--kd-teacher-tokenizer-model: {exc}") from None
    return tokenizer.fingerprint, tokenizer.vocab_size


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
    meta_path = f"{ckpt.path}/{layout.META_FILE}" if ckpt.kind == "salt" else ckpt.path
    saved_fp, teacher_vocab = teacher_tokenizer(ckpt, cfg)
    if saved_fp != (tokenizer_fingerprint or ""):
        raise TeacherError(
            f"--kd-teacher-load: the teacher was trained with tokenizer {saved_fp or '<none>'!r} "
            f"({meta_path}), the student uses {tokenizer_fingerprint or '<none>'!r} "
            f"(--tokenizer-model): teacher and student must share one tokenizer"
        )
    teacher_vocab = teacher_vocab or model.vocab_size
    if vocab_size is not None and teacher_vocab is not None and teacher_vocab != vocab_size:
        raise TeacherError(
            f"--kd-teacher-load: teacher vocabulary {teacher_vocab} ({meta_path}) differs from "
            f"the student's {vocab_size} (--vocab-size / --tokenizer-model)"
        )
    check_vocab_rows(ckpt.meta.get("padded_vocab_size"), vocab_size or teacher_vocab, meta_path)
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


def check_vocab_rows(teacher_rows: int | None, true_vocab: int | None, where: str) -> None:
    """The teacher must embed every token of the shared tokenizer.

    Only ``true_vocab`` (the tokenizer's size) takes part in the KD term: the teacher is built
    with the student's padded vocabulary, its saved rows beyond that are dropped and missing ones
    are zeros (megatron's ``allow_shape_mismatch``), and ``Teacher`` masks every column at or
    above ``true_vocab`` to ``PAD_LOGIT``. So padded sizes may differ (Qwen2.5-7B's 152064 rows
    against 0.5B's 151936 for one 151665-token tokenizer), but rows below ``true_vocab`` must
    all come from the checkpoint.
    """
    if teacher_rows is not None and true_vocab is not None and int(teacher_rows) < true_vocab:
        raise TeacherError(
            f"--kd-teacher-load: the teacher embeds {teacher_rows} vocabulary rows ({where}), "
            f"fewer than the tokenizer's {true_vocab} tokens"
        )
