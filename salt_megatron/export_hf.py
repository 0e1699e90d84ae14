"""Export a checkpoint to a Hugging Face ``transformers`` Llama folder (config, weights, tokenizer).

The full weights are read by building the model at TP = PP = 1 in one process (a world of 1) and
loading the dist checkpoint into it (any saved layout), then renamed into Llama's names. The
padded vocabulary rows (megatron pads the embedding to a multiple of 128 x TP) are dropped by
default, so the exported ``vocab_size`` is the tokenizer's and generation can never emit an id
the tokenizer cannot decode; ``keep_padded_vocab`` keeps them (then the exported model's softmax
is exactly ours, padding columns included). ``transformers`` is not needed to export.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import torch

from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.config.schema import ConfigError, ModelConfig
from salt_megatron.evaluation import (
    init_world,
    load_weights,
    resolve,
    saved_bf16,
    saved_model_config,
    saved_padded_vocab,
)


class ExportError(ValueError):
    """The checkpoint cannot be exported as a Llama model; the message says why."""


def check_llama(model: ModelConfig) -> None:
    """Refuse configurations that Llama cannot express (each problem named)."""
    problems = []
    if model.normalization != "RMSNorm":
        problems.append(f"normalization {model.normalization} (Llama uses RMSNorm)")
    if not model.swiglu:
        problems.append("a GELU MLP (Llama uses SwiGLU: train with --swiglu)")
    if model.position_embedding_type != "rope":
        problems.append(f"{model.position_embedding_type} position embeddings (Llama uses rope)")
    if model.add_bias_linear:
        problems.append("biases in the linear layers (--add-bias-linear)")
    if problems:
        raise ExportError("not a Llama-compatible model: " + "; ".join(problems))


# ---- weights -----------------------------------------------------------------------------------
def split_qkv(
    weight: torch.Tensor, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused ``linear_qkv`` weight -> Llama's ``q_proj``, ``k_proj``, ``v_proj``.

    megatron stores, per query group ``g``, its ``heads/groups`` query heads, then its key head,
    then its value head: rows ``[g][q_0..q_{r-1}, k, v][head_dim]``. Query head ``j`` belongs to
    group ``j // r``, which is Llama's ``repeat_kv`` pairing too.
    """
    r = heads // groups
    hidden = weight.shape[-1]
    w = weight.reshape(groups, r + 2, head_dim, hidden)
    q = w[:, :r].reshape(heads * head_dim, hidden)
    k = w[:, r].reshape(groups * head_dim, hidden)
    v = w[:, r + 1].reshape(groups * head_dim, hidden)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _layer_names(i: int) -> dict[str, str]:
    """megatron name (after ``decoder.layers.i.``) -> Llama name, for 1:1 tensors."""
    pre = f"model.layers.{i}."
    return {
        "input_layernorm.weight": pre + "input_layernorm.weight",
        "self_attention.linear_qkv.layer_norm_weight": pre + "input_layernorm.weight",  # TE
        "self_attention.linear_proj.weight": pre + "self_attn.o_proj.weight",
        "pre_mlp_layernorm.weight": pre + "post_attention_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": pre + "post_attention_layernorm.weight",  # TE
        "mlp.linear_fc2.weight": pre + "mlp.down_proj.weight",
    }


def llama_state_dict(sd: dict[str, torch.Tensor], model: ModelConfig, vocab: int) -> dict[str, Any]:
    """Rename and split a TP=1 megatron GPT state dict into Llama's; keep ``vocab`` rows.

    Every megatron weight must be used (``_extra_state`` entries aside): a leftover is an error,
    so a layer kind this mapping does not know cannot be silently dropped.
    """
    heads, hidden = model.num_attention_heads, model.hidden_size
    groups, head_dim = model.num_query_groups or heads, hidden // heads
    left = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": left.pop("embedding.word_embeddings.weight")[:vocab],
        "model.norm.weight": left.pop("decoder.final_layernorm.weight"),
    }
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = left.pop("output_layer.weight")[:vocab]
    for i in range(model.num_layers):
        src = f"decoder.layers.{i}."
        for name, dst in _layer_names(i).items():
            if src + name in left:
                out[dst] = left.pop(src + name)
        q, k, v = split_qkv(
            left.pop(src + "self_attention.linear_qkv.weight"), heads, groups, head_dim
        )
        gate, up = left.pop(src + "mlp.linear_fc1.weight").chunk(2, dim=0)
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out |= {attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v}
        out |= {mlp + "gate_proj.weight": gate, mlp + "up_proj.weight": up}
    if left:
        raise ExportError(f"megatron weights with no Llama counterpart: {sorted(left)}")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def llama_config(
    model: ModelConfig, vocab: int, ffn: int, dtype: torch.dtype, special: dict[str, int]
) -> dict[str, Any]:
    """``config.json`` of the exported ``LlamaForCausalLM``."""
    heads = model.num_attention_heads
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": model.hidden_size,
        "intermediate_size": ffn,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "initializer_range": model.init_method_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
    }


# ---- tokenizer ---------------------------------------------------------------------------------
def write_tokenizer(out: str, tokenizer: Any, max_length: int) -> dict[str, int]:
    """Copy the sentencepiece model and write a LlamaTokenizer config; the special ids."""
    shutil.copyfile(tokenizer.path, os.path.join(out, "tokenizer.model"))
    ids = {"unk": tokenizer.unk, "bos": tokenizer.bos, "eos": tokenizer.eos, "pad": tokenizer.pad}
    pieces = {name: tokenizer.inv_vocab[i] for name, i in ids.items() if i >= 0}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": max_length,
        # Our preprocessing appends </s> after each document and adds no <s>: match it.
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        **{f"{name}_token": piece for name, piece in pieces.items()},
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({f"{name}_token": piece for name, piece in pieces.items()}, f, indent=2)
    return {name: i for name, i in ids.items() if i >= 0}


# ---- the job -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export` wrote."""

    out: str
    step: int
    vocab_size: int
    padded_vocab_size: int
    parameters: int


def _full_state_dict(path: str, meta: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """Build the model at TP = PP = 1 (world of 1) and load ``path`` into it; its state dict.

    Always in host memory, GPU or not: the whole model must fit (a 70B model does not fit one
    GPU), and the weights are written from the host anyway.
    """
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.models.gpt import build_gpt
    from salt_megatron.runtime import destroy_distributed

    if init_world() != 1:
        raise ExportError("export_hf runs in one process (plain python, not torchrun)")
    try:
        if not mpu.model_parallel_is_initialized():
            mpu.initialize_model_parallel(1, 1)
        tf = mcfg.transformer_config(model, tp=1, bf16=saved_bf16(meta), host_init=True)
        gpt = build_gpt(
            model, tf, padded_vocab_size=saved_padded_vocab(meta, path, 1),
            max_sequence_length=model.max_position_embeddings, pre_process=True,
            post_process=True, device=torch.device("cpu"),
        )  # fmt: skip
        load_weights([gpt], path)
        return {k: v for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)}
    finally:
        destroy_distributed()


def export(
    load: str,
    out: str,
    step: int | None = None,
    tokenizer_model: str | None = None,
    keep_padded_vocab: bool = False,
) -> ExportSummary:
    """Export the checkpoint under ``load`` (its latest, or ``step``) to the folder ``out``."""
    from safetensors.torch import save_file

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.evaluation import check_tokenizer

    ckpt = resolve(load, step)
    model = saved_model_config(ckpt.meta, ckpt.path)
    check_llama(model)
    tokenizer = None
    has_tokenizer = tokenizer_model or ((ckpt.meta.get("config") or {}).get("data") or {}).get(
        "tokenizer_model"
    )
    if has_tokenizer:
        tokenizer = check_tokenizer(ckpt.meta, ckpt.path, tokenizer_model)
    padded = saved_padded_vocab(ckpt.meta, ckpt.path, 1)
    true_vocab = int(ckpt.meta.get("vocab_size") or padded)
    vocab = padded if keep_padded_vocab else true_vocab
    sd = llama_state_dict(_full_state_dict(ckpt.path, ckpt.meta, model), model, vocab)
    os.makedirs(out, exist_ok=True)
    special = write_tokenizer(out, tokenizer, model.max_position_embeddings) if tokenizer else {}
    dtype = next(iter(sd.values())).dtype
    config = llama_config(model, vocab, mcfg.ffn_hidden_size(model), dtype, special)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    n_params = sum(t.numel() for t in sd.values())
    return ExportSummary(out, ckpt.step, vocab, padded, n_params)


def main(argv: list[str] | None = None) -> int:
    """Command line of ``tools/export_hf.py``; the exit code."""
    from salt_megatron.data.errors import DataError
    from salt_megatron.evaluation import EvalError

    p = argparse.ArgumentParser(prog="export_hf.py", description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (as written by --save)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--step", type=int, help="export iter_<step> (default: the latest)")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's saved path")
    p.add_argument(
        "--keep-padded-vocab",
        action="store_true",
        help="keep megatron's padded embedding rows (vocab_size = padded size)",
    )
    args = p.parse_args(argv)
    try:
        summary = export(
            args.load, args.out, args.step, args.tokenizer_model, args.keep_padded_vocab
        )
    except (ExportError, EvalError, ConfigError, DataError, CheckpointError) as exc:
        print(f"export_hf.py: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"exported step {summary.step} to {summary.out}: {summary.parameters / 1e6:.2f}M "
        f"parameters, vocab {summary.vocab_size} (padded {summary.padded_vocab_size})"
    )
    return 0
