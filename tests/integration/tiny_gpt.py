"""A tiny GQA model saved at TP=2 as our checkpoint (step 3): what the export and evaluation
tests load (:func:`save_tiny_gpt` runs on each of 2 ranks, ``run_distributed``), and its export
to Hugging Face (:func:`export_hf`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from salt_megatron.config.schema import ModelConfig

MODEL = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
    rotary_base=5000, max_position_embeddings=64, norm_epsilon=1e-5,
)  # fmt: skip
"""Non-default RoPE base, grouped queries: what an exporter or loader must carry over."""
REPO = Path(__file__).resolve().parents[2]


def export_hf(root: str, out: Path) -> None:
    """``tools/export_hf.py --load root --out out`` in its own process (world 1); must succeed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/export_hf.py"), "--load", root, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def save_tiny_gpt(
    root: str, tokenizer_model: str, vocab: int, norm_scale: float, tokens: torch.Tensor | None
) -> torch.Tensor | None:
    """Build :data:`MODEL` at TP=2 (world 2), draw its norm weights as ``1 + norm_scale x
    N(0, 1)`` (the same on both ranks), save it under ``root`` with the tokenizer's fingerprint,
    and return its full logits ``[b, s, padded V]`` on ``tokens`` ``[b, s]`` (None without)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as mpu

    from salt_megatron.checkpoint import layout, trainer_state
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.config import to_dict
    from salt_megatron.config.schema import DataConfig, ParallelConfig, SaltConfig
    from salt_megatron.data.tokenizer import SentencePieceTokenizer
    from salt_megatron.models.gpt import build_gpt
    from salt_megatron.parallel.state import reseed

    mpu.initialize_model_parallel(2, 1)
    reseed(1)
    model = ModelConfig(**MODEL)  # type: ignore[arg-type]
    padded = mcfg.padded_vocab_size(vocab, model.make_vocab_size_divisible_by, 2)
    gpt = build_gpt(
        model, mcfg.transformer_config(model, tp=2), padded_vocab_size=padded,
        max_sequence_length=64, pre_process=True, post_process=True, init_seed=5,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)  # same on both ranks: norms are replicated
    logits = None
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + norm_scale * torch.randn(param.shape, generator=gen))
        if tokens is not None:
            gpt.eval()
            local = gpt(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
            shards = [torch.empty_like(local) for _ in range(2)]  # [b, s, V/2] each
            dist.all_gather(shards, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
            logits = torch.cat(shards, dim=-1)
    step_dir = layout.iteration_dir(root, 3)
    os.makedirs(step_dir, exist_ok=True)
    dist.barrier()
    trainer_state.use_results_queue()
    sharded = layout.model_sharded_state_dict([gpt])
    dist_checkpointing.save(sharded, step_dir, trainer_state._save_strategy())
    if dist.get_rank() == 0:
        cfg = SaltConfig(
            model=model, parallel=ParallelConfig(tensor_model_parallel_size=2),
            data=DataConfig(mock_data=True, tokenizer_model=tokenizer_model, seq_length=32),
        )  # fmt: skip
        layout.write_meta(step_dir, {
            "step": 3, "config": to_dict(cfg), "vocab_size": vocab, "padded_vocab_size": padded,
            "tokenizer_fingerprint": SentencePieceTokenizer(tokenizer_model).fingerprint,
        })  # fmt: skip
        layout.write_latest_step(root, 3)
    dist.barrier()
    mpu.destroy_model_parallel()
    return logits
