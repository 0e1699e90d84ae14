"""Checkpoint directories for the fake-accelerator tier.

The tier stubs ``dist_checkpointing.load`` (meta tensors hold no data), so a teacher checkpoint
here is every file the teacher's checks read (tracker, metadata, ``salt_meta.json`` with the
model config) and no weights. Real weights are loaded by the CPU tiers.
"""

from __future__ import annotations

import os

from salt_megatron.checkpoint import layout
from salt_megatron.config import parse_config
from salt_megatron.config.cli import to_dict

FINGERPRINT = "sha256:fake-device-tokenizer"
VOCAB = 200
TEACHER_ARGS = [
    "--mock-data", "--vocab-size", str(VOCAB), "--num-layers", "2", "--hidden-size", "32",
    "--num-attention-heads", "4", "--max-position-embeddings", "64", "--seq-length", "16",
    "--make-vocab-size-divisible-by", "8",
]  # fmt: skip
"""A small teacher; with ``learned_absolute`` positions and LayerNorm, the modules megatron does
not place on the GPU itself (plain ``torch.nn`` embeddings and norms) are all present."""


def write_teacher_checkpoint(root: str, *extra: str, step: int = 3) -> str:
    """A weightless teacher checkpoint under ``root``; returns ``root``."""
    cfg = parse_config([*TEACHER_ARGS, *extra])
    path = layout.iteration_dir(root, step)
    os.makedirs(path, exist_ok=True)
    for name in ("metadata.json", ".metadata"):
        with open(os.path.join(path, name), "w") as f:
            f.write("{}")
    meta = {"config": to_dict(cfg), "tokenizer_fingerprint": FINGERPRINT, "step": step}
    layout.write_meta(path, meta)
    with open(os.path.join(root, layout.TRACKER_FILE), "w") as f:
        f.write(str(step))
    return root
