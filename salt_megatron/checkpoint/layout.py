"""On-disk layout of our checkpoints (shared by the trainer's save/load and the teacher loader).

    <root>/latest_checkpointed_iteration.txt   the step of the newest complete checkpoint
    <root>/iter_0000100/                       one megatron dist_checkpointing directory
    <root>/iter_0000100/salt_meta.json         step, config tree, tokenizer fingerprint, vocab
    <root>/iter_0000200.tmp/                   a save in progress (renamed when complete)

Model weights live in the dist checkpoint under the key ``model`` (``model0``, ``model1``, ... for
virtual pipeline chunks); their sharded keys are global (layer numbers across all stages), so a
model built at any TP/PP/VPP layout can load them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from torch import nn

TRACKER_FILE = "latest_checkpointed_iteration.txt"
META_FILE = "salt_meta.json"
TMP_SUFFIX = ".tmp"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A missing, incomplete or mismatched checkpoint; the message names the path."""


def iteration_dir(root: str, step: int) -> str:
    """Directory of the checkpoint saved after ``step`` optimizer steps."""
    return os.path.join(root, f"iter_{step:07d}")


def tmp_dir(root: str, step: int) -> str:
    """Directory a save of ``step`` writes to before it is renamed to :func:`iteration_dir`."""
    return iteration_dir(root, step) + TMP_SUFFIX


def saved_steps(root: str) -> list[int]:
    """Steps of the renamed (complete-looking) iteration directories under ``root``, ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = _ITER_RE.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def write_latest_step(root: str, step: int) -> None:
    """Point the tracker file at ``step`` atomically (write a temporary file, then replace)."""
    path = os.path.join(root, TRACKER_FILE)
    tmp = path + TMP_SUFFIX
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest_step(root: str) -> int | None:
    """The step named by the tracker file, or None when ``root`` has no checkpoint yet."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected a step number, found {text!r}")
    return int(text)


def write_meta(ckpt_dir: str, meta: dict[str, Any]) -> None:
    """Write the checkpoint's metadata (JSON)."""
    with open(os.path.join(ckpt_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def read_meta(ckpt_dir: str) -> dict[str, Any]:
    """Read the checkpoint's metadata; a missing or unparsable file is a CheckpointError."""
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint, {META_FILE} is missing")
    try:
        with open(path) as f:
            meta: dict[str, Any] = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt metadata ({exc})") from None
    return meta


def unwrap(chunk: nn.Module) -> nn.Module:
    """The GPT module inside a DDP (or other ``.module``) wrapper."""
    while isinstance(getattr(chunk, "module", None), nn.Module):
        chunk = chunk.module  # type: ignore[assignment]
    return chunk


def model_sharded_state_dict(chunks: list[nn.Module]) -> dict[str, Any]:
    """``{"model": ...}`` or ``{"model0": ..., "model1": ...}``: the weights' sharded state."""
    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}  # type: ignore[operator]
    return {
        f"model{i}": unwrap(chunk).sharded_state_dict()  # type: ignore[operator]
        for i, chunk in enumerate(chunks)
    }
