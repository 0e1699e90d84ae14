#!/usr/bin/env python
"""Convert a checkpoint (saved at any layout) into a Hugging Face ``transformers`` Llama folder.

Example::

    python tools/export_hf.py --load runs/x/ckpt --out hf/x
    python -c "import transformers as t; t.LlamaForCausalLM.from_pretrained('hf/x')"

Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and the sentencepiece
tokenizer (``tokenizer.model`` + ``tokenizer_config.json``). Only models that map onto Llama
(RMSNorm, SwiGLU, RoPE, no biases) are accepted. See ``docs/export.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.hf.exporter import main

if __name__ == "__main__":
    sys.exit(main())
