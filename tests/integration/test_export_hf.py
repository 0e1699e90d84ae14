"""Export to Hugging Face: a GQA model saved at TP=2 -> tools/export_hf.py -> LlamaForCausalLM.

Two ranks build a tiny GQA model (random norm weights, non-default RoPE base, padded vocab),
compute its full logits on a random batch and save it as our checkpoint; the export runs as its
own process (world 1, TP=1); transformers loads the folder and must reproduce the logits of the
true-vocabulary columns within 1e-4, and its tokenizer must encode like ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salt_megatron.config.schema import ModelConfig
from tests.distributed.launcher import run_distributed

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODEL = dict(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
    rotary_base=5000, max_position_embeddings=64, norm_epsilon=1e-5,
)  # fmt: skip
VOCAB = 300


def _tokenizer(tmp: Path) -> str:
    from salt_megatron.data.corpus import stdlib_docstrings
    from salt_megatron.data.tokenizer import train_tokenizer

    texts = []
    for doc in stdlib_docstrings():
        texts.append(doc["text"])
        if sum(map(len, texts)) > 20_000:
            break
    train_tokenizer(texts, tmp / "tok", vocab_size=VOCAB, byte_fallback=False, num_threads=1)
    return str(tmp / "tok.model")


def _save_tp2(root: str, tokenizer_model: str, tokens: torch.Tensor) -> torch.Tensor:
    """Build at TP=2, randomise the norms, save as our checkpoint; the full logits ``[b,s,V]``."""
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
    padded = mcfg.padded_vocab_size(VOCAB, model.make_vocab_size_divisible_by, 2)
    gpt = build_gpt(
        model, mcfg.transformer_config(model, tp=2), padded_vocab_size=padded,
        max_sequence_length=64, pre_process=True, post_process=True, init_seed=5,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(7)  # same on both ranks: norms are replicated
    with torch.no_grad():
        for name, param in gpt.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
        gpt.eval()
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        local = gpt(tokens, positions, None)  # [b, s, V/2]
    shards = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(shards, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
    step_dir = layout.iteration_dir(root, 3)
    os.makedirs(step_dir, exist_ok=True)
    dist.barrier()
    trainer_state.use_results_queue()
    dist_checkpointing.save(
        layout.model_sharded_state_dict([gpt]), step_dir, trainer_state._save_strategy()
    )
    if dist.get_rank() == 0:
        cfg = SaltConfig(
            model=model,
            parallel=ParallelConfig(tensor_model_parallel_size=2),
            data=DataConfig(mock_data=True, tokenizer_model=tokenizer_model, seq_length=32),
        )
        layout.write_meta(step_dir, {
            "step": 3, "config": to_dict(cfg), "vocab_size": VOCAB, "padded_vocab_size": padded,
            "tokenizer_fingerprint": SentencePieceTokenizer(tokenizer_model).fingerprint,
        })  # fmt: skip
        layout.write_latest_step(root, 3)
    dist.barrier()
    return torch.cat(shards, dim=-1)


def test_refuses_what_no_architecture_expresses() -> None:
    from salt_megatron.hf.format import HFFormatError, architecture_for

    with pytest.raises(HFFormatError, match=r"LayerNorm.*SwiGLU.*learned_absolute"):
        architecture_for(
            ModelConfig(
                normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute"
            )
        )
    with pytest.raises(HFFormatError, match="QKV bias together with QK layernorm"):
        architecture_for(ModelConfig(add_qkv_bias=True, qk_layernorm=True))


def test_export_matches_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    tok = _tokenizer(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    root = str(tmp_path / "ckpt")
    ours = run_distributed(_save_tp2, 2, root, tok, tokens)[0]
    assert ours.shape == (2, 24, 512)
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/export_hf.py"), "--load", root, "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["num_key_value_heads"] == 2
    assert config["rope_theta"] == 5000.0 and config["tie_word_embeddings"] is False
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(out), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
    assert theirs.shape == (2, 24, VOCAB)
    diff = (theirs - ours[..., :VOCAB]).abs().max().item()
    assert diff < 1e-4, diff
    assert ours[..., :VOCAB].std().item() > 0.1  # non-trivial logits

    from salt_megatron.data.tokenizer import SentencePieceTokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Return the number of items in a container.\nExample: len([1, 2])"
    assert hf_tok.encode(text, add_special_tokens=False) == SentencePieceTokenizer(tok).tokenize(
        text
    )
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id) == (1, 2, 0)
