"""Hugging Face <-> megatron-core GPT: architectures, ``config.json`` fields and weight names.

The one mapping that ``import_hf`` (Hugging Face -> our checkpoint) and ``export_hf`` (our
checkpoint -> Hugging Face) share, so that ``export(import(x)) == x``. Supported: ``Llama``
(1/2/3.x, Llama 3 RoPE scaling, linear RoPE interpolation), ``Mistral``, ``Qwen2``/``Qwen2.5``
(QKV bias), ``Qwen3`` (QK norm), and the mixture-of-experts ``Qwen3-MoE`` and ``Mixtral``
(their MoE fields and weights: :mod:`salt_megatron.hf.moe`). Anything these cannot express
exactly is a :class:`HFFormatError` naming the option: never an approximation.

Weights, per layer (megatron name after ``decoder.layers.i.``, Hugging Face after
``model.layers.i.``): ``input_layernorm`` = ``input_layernorm``; ``self_attention.linear_qkv``
= ``self_attn.{q,k,v}_proj`` interleaved per query group (the group's query heads, then its key
head, then its value head; the bias likewise); ``linear_proj`` = ``o_proj``;
``q_layernorm``/``k_layernorm`` = ``q_norm``/``k_norm``; ``pre_mlp_layernorm`` =
``post_attention_layernorm``; ``mlp.linear_fc1`` = ``[gate_proj; up_proj]``; ``linear_fc2`` =
``down_proj`` (an MoE layer's MLP: :func:`salt_megatron.hf.moe.moe_layer_rules`). Then
``embedding.word_embeddings`` = ``model.embed_tokens``, ``decoder.final_layernorm`` =
``model.norm``, ``output_layer`` = ``lm_head`` (untied only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from salt_megatron.config.schema import ConfigError, ModelConfig
from salt_megatron.hf.moe import (
    MOE_ARCHITECTURES,
    moe_architecture_for,
    moe_fields_from_hf,
    moe_hf_config,
    moe_layer_rules,
)

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    **MOE_ARCHITECTURES,
}
"""Supported ``architectures`` entry -> ``model_type``."""
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_ORIGINAL_CONTEXT = 8192
"""megatron-core's Llama 3 RoPE scaling fixes these (only the factor is a parameter)."""
IGNORED_HF_WEIGHTS = ("rotary_emb.inv_freq",)
"""Hugging Face buffers some checkpoints carry that are recomputed, not learned."""
_TE_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
"""Transformer Engine's fused layer-norm names -> the local layer spec's."""


class HFFormatError(ValueError):
    """A Hugging Face model or config this mapping cannot express exactly; names the option."""


# ---- config.json -------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFModel:
    """What a Hugging Face ``config.json`` describes, in our terms."""

    architecture: str
    model: ModelConfig
    vocab_rows: int
    """Rows of the embedding (and of ``lm_head``): ``config.json``'s ``vocab_size``."""
    dtype: str
    notes: tuple[str, ...] = ()
    """Exact but noteworthy translations (e.g. a sliding window wider than the context)."""


def architecture_of(config: dict[str, Any]) -> str:
    """The supported architecture named by ``config.json``; an error naming any other."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return str(name)
    by_type = {v: k for k, v in ARCHITECTURES.items()}
    if not names and config.get("model_type") in by_type:
        return by_type[config["model_type"]]
    found = names or [config.get("model_type")]
    raise HFFormatError(
        f"unsupported architecture {found}: supported are {', '.join(ARCHITECTURES)}"
    )


def _rope(config: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """RoPE fields of ModelConfig from ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": int(theta)}
    if theta != int(theta):
        problems.append(f"rope_theta {theta} is not an integer (--rotary-base is)")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if "mrope_section" in params:
        problems.append("multimodal rope (mrope_section)")
    if partial not in (None, 1, 1.0):
        problems.append(f"partial_rotary_factor {partial} (only full rotary embeddings)")
    if kind == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(params["factor"])
    elif kind == "llama3":
        fixed = {**LLAMA3_FIXED, "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
        odd = {k: params.get(k) for k, v in fixed.items() if float(params.get(k, -1)) != v}
        if odd:
            problems.append(f"llama3 rope scaling with {odd} (megatron-core fixes {fixed})")
        out |= {"use_rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    elif kind != "default":
        problems.append(f"rope_type {kind!r} (supported: default, linear, llama3)")
    return out


def _attention_window(
    config: dict[str, Any], arch: str, max_pos: int, problems: list[str], notes: list[str]
) -> int:
    """The context length, narrowed to a sliding window that is never reached inside it."""
    window = config.get("sliding_window")
    windowed = arch in ("mistral", "mixtral")
    uses_window = config.get("use_sliding_window", windowed)
    layer_types = set(config.get("layer_types") or [])
    if layer_types - {"full_attention"}:
        problems.append(f"layer_types {sorted(layer_types)} (only full attention)")
    if not uses_window or window is None or window >= max_pos:
        return max_pos
    if not windowed:
        problems.append(f"use_sliding_window with sliding_window {window}")
        return max_pos
    notes.append(
        f"sliding_window {window} < max_position_embeddings {max_pos}: the teacher is limited to "
        f"{window} positions, where sliding-window attention equals full causal attention"
    )
    return int(window)


def model_config_from_hf(config: dict[str, Any]) -> HFModel:
    """Translate a ``config.json``; :class:`HFFormatError` lists every unsupported option."""
    arch = architecture_of(config)
    kind = ARCHITECTURES[arch]
    problems: list[str] = []
    notes: list[str] = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} (SwiGLU needs silu)")
    if config.get("mlp_bias"):
        problems.append("mlp_bias true")
    if config.get("attention_bias") and kind != "qwen2":
        problems.append("attention_bias true (biases on q/k/v and o_proj)")
    rope = _rope(config, problems)
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    max_pos = _attention_window(
        config, kind, int(config["max_position_embeddings"]), problems, notes
    )
    moe = {}
    if kind in MOE_ARCHITECTURES.values():
        moe = moe_fields_from_hf(config, kind, problems, notes)
    if problems:
        raise HFFormatError(f"{arch}: unsupported: " + "; ".join(problems))
    try:
        model = ModelConfig(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=int(config.get("num_key_value_heads") or heads),
            kv_channels=int(config.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(config["intermediate_size"]),
            max_position_embeddings=max_pos,
            position_embedding_type="rope",
            normalization="RMSNorm",
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            swiglu=True,
            untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
            add_bias_linear=False,
            add_qkv_bias=kind == "qwen2",
            qk_layernorm=kind in ("qwen3", "qwen3_moe"),
            init_method_std=float(config.get("initializer_range", 0.02)),
            **rope,
            **moe,
        )
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise HFFormatError(f"{arch}: bad config.json: {exc}") from None
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return HFModel(arch, model, int(config["vocab_size"]), dtype, tuple(notes))


def architecture_for(model: ModelConfig) -> str:
    """The Hugging Face architecture that expresses ``model`` exactly (errors name the reasons)."""
    problems = []
    if model.normalization != "RMSNorm":
        problems.append(f"normalization {model.normalization} (RMSNorm only)")
    if not model.swiglu:
        problems.append("a GELU MLP (SwiGLU only: train with --swiglu)")
    if model.position_embedding_type != "rope":
        problems.append(f"{model.position_embedding_type} position embeddings (rope only)")
    if model.add_bias_linear:
        problems.append("biases in the linear layers (--add-bias-linear)")
    if model.add_qkv_bias and model.qk_layernorm:
        problems.append("QKV bias together with QK layernorm (no supported architecture has both)")
    arch = moe_architecture_for(model, problems) if model.is_moe else None
    if problems:
        raise HFFormatError("no Hugging Face architecture fits: " + "; ".join(problems))
    if arch is not None:
        return arch
    if model.qk_layernorm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if model.add_qkv_bias else "LlamaForCausalLM"


def _rope_scaling(model: ModelConfig) -> dict[str, Any] | None:
    if model.use_rope_scaling:
        return {
            "rope_type": "llama3",
            "factor": model.rope_scaling_factor,
            **LLAMA3_FIXED,
            "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
        }
    if model.rotary_seq_len_interpolation_factor:
        return {"rope_type": "linear", "factor": model.rotary_seq_len_interpolation_factor}
    return None


def hf_config(
    model: ModelConfig, arch: str, vocab: int, ffn: int, dtype: torch.dtype
) -> dict[str, Any]:
    """``config.json`` of ``arch`` for ``model`` (the caller adds the special token ids)."""
    heads = model.num_attention_heads
    config: dict[str, Any] = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": vocab,
        "hidden_size": model.hidden_size,
        "intermediate_size": ffn,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": model.num_query_groups or heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": float(model.rotary_base),
        "rope_scaling": _rope_scaling(model),
        "attention_dropout": 0.0,
        "tie_word_embeddings": not model.untie_embeddings_and_output_weights,
        "initializer_range": model.init_method_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        config |= {"attention_bias": False}
    if arch == "LlamaForCausalLM":
        config |= {"mlp_bias": False}
    if arch != "LlamaForCausalLM":
        config |= {"sliding_window": None}
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        config |= {"use_sliding_window": False, "max_window_layers": model.num_layers}
    if arch == "Qwen3MoeForCausalLM":
        config |= {"use_sliding_window": False}
    if arch in MOE_ARCHITECTURES:
        config |= moe_hf_config(model, arch, model.moe_ffn_hidden_size or ffn)
    return config


# ---- weights -----------------------------------------------------------------------------------
def split_qkv(
    fused: torch.Tensor, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused ``linear_qkv`` weight ``[(heads + 2 groups) hd, h]`` (or bias) -> q, k, v.

    Rows are ``[g][q_0..q_{r-1}, k, v][head_dim]`` with ``r = heads / groups``: query head ``j``
    belongs to group ``j // r``, which is Hugging Face's ``repeat_kv`` pairing too.
    """
    r = heads // groups
    rest = fused.shape[1:]
    w = fused.reshape(groups, r + 2, head_dim, *rest)
    q = w[:, :r].reshape(heads * head_dim, *rest)
    k = w[:, r].reshape(groups * head_dim, *rest)
    v = w[:, r + 1].reshape(groups * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int
) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    r, rest = heads // groups, q.shape[1:]
    parts = [
        q.reshape(groups, r, head_dim, *rest),
        k.reshape(groups, 1, head_dim, *rest),
        v.reshape(groups, 1, head_dim, *rest),
    ]
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


def layer_rules(
    model: ModelConfig, moe: bool = False, arch: str | None = None
) -> list[tuple[str, tuple[str, ...], str]]:
    """``(megatron suffix, Hugging Face suffixes, how)`` per layer tensor; how: copy/qkv/cat.

    ``moe``: an MoE layer of architecture ``arch`` (its router and experts' names).
    """
    attn, mlp = "self_attn.", "mlp."
    rules = [
        ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
        ("self_attention.linear_qkv.weight", tuple(f"{attn}{x}_proj.weight" for x in "qkv"), "qkv"),
        ("self_attention.linear_proj.weight", (attn + "o_proj.weight",), "copy"),
        ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ]
    if moe:
        rules += moe_layer_rules(model, MOE_ARCHITECTURES[arch or "Qwen3MoeForCausalLM"])
    else:
        rules += [
            ("mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "cat"),
            ("mlp.linear_fc2.weight", (mlp + "down_proj.weight",), "copy"),
        ]
    if model.add_qkv_bias:
        rules.append(
            ("self_attention.linear_qkv.bias", tuple(f"{attn}{x}_proj.bias" for x in "qkv"), "qkv")
        )
    if model.qk_layernorm:
        rules.append(("self_attention.q_layernorm.weight", (attn + "q_norm.weight",), "copy"))
        rules.append(("self_attention.k_layernorm.weight", (attn + "k_norm.weight",), "copy"))
    return rules


def _heads(model: ModelConfig) -> tuple[int, int, int]:
    heads = model.num_attention_heads
    return heads, model.num_query_groups or heads, model.head_dim


def hf_to_megatron(
    get: Callable[[str], torch.Tensor],
    model: ModelConfig,
    padded_vocab: int,
    arch: str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(megatron name, tensor)`` of a TP = 1 local-spec GPT, one at a time, from ``get(name)``.

    Embedding (and untied output) rows are zero-extended to ``padded_vocab``. ``get`` raises for
    a missing name; the caller checks that every Hugging Face tensor was asked for. ``arch``:
    the Hugging Face architecture (names an MoE model's expert weights).
    """
    shape = _heads(model)

    def padded(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] > padded_vocab:
            raise HFFormatError(f"{t.shape[0]} vocabulary rows exceed the padded {padded_vocab}")
        out = torch.zeros(padded_vocab, *t.shape[1:], dtype=t.dtype)
        out[: t.shape[0]] = t
        return out

    yield "embedding.word_embeddings.weight", padded(get("model.embed_tokens.weight"))
    for i, moe in enumerate(model.moe_layer_pattern()):
        src = f"model.layers.{i}."
        for ours, theirs, how in layer_rules(model, bool(moe), arch):
            parts = [get(src + name) for name in theirs]
            if how == "qkv":
                q, k, v = parts
                tensor = merge_qkv(q, k, v, *shape)
            else:
                tensor = torch.cat(parts, dim=0) if how == "cat" else parts[0]
            yield f"decoder.layers.{i}.{ours}", tensor
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if model.untie_embeddings_and_output_weights:
        yield "output_layer.weight", padded(get("lm_head.weight"))


def megatron_to_hf(
    sd: dict[str, torch.Tensor], model: ModelConfig, vocab: int, arch: str | None = None
) -> dict[str, torch.Tensor]:
    """A TP = 1 megatron GPT state dict -> Hugging Face names; embedding rows cut to ``vocab``.

    Every megatron weight must be used (``_extra_state`` aside): a leftover is an error, so a
    layer kind this mapping does not know cannot be silently dropped.
    """
    left = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    for key in list(left):
        for te, local in _TE_NAMES.items():
            if key.endswith("." + te):
                left[key.removesuffix(te) + local] = left.pop(key)
    out = {
        "model.embed_tokens.weight": left.pop("embedding.word_embeddings.weight")[:vocab],
        "model.norm.weight": left.pop("decoder.final_layernorm.weight"),
    }
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = left.pop("output_layer.weight")[:vocab]
    shape = _heads(model)
    for i, moe in enumerate(model.moe_layer_pattern()):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ours, theirs, how in layer_rules(model, bool(moe), arch):
            tensor = left.pop(src + ours)
            if how == "qkv":
                parts: tuple[torch.Tensor, ...] = split_qkv(tensor, *shape)
            else:
                parts = tuple(tensor.chunk(2, dim=0)) if how == "cat" else (tensor,)
            out |= {dst + name: part for name, part in zip(theirs, parts, strict=True)}
    if left:
        raise HFFormatError(f"megatron weights with no Hugging Face counterpart: {sorted(left)}")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
