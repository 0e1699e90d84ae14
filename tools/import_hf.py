#!/usr/bin/env python
"""Convert a Hugging Face model folder (Llama, Mistral, Qwen2/2.5, Qwen3; safetensors) into a
checkpoint that ``--kd-teacher-load`` reads at any teacher TP size.

Example::

    python tools/import_hf.py --hf-dir hf/Qwen2.5-0.5B --output ckpt/qwen2.5-0.5b
    python pretrain_salt.py ... --tokenizer-model hf/Qwen2.5-0.5B \\
        --kd-teacher-load ckpt/qwen2.5-0.5b --kd-steps 1000

Runs in one process (plain python). The tokenizer defaults to the folder's ``tokenizer.json``;
its fingerprint and vocabulary are recorded for the teacher checks. See ``docs/teachers.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.hf.importer import main

if __name__ == "__main__":
    sys.exit(main())
