"""Hugging Face <-> megatron-core for mixture-of-experts models: Qwen3-MoE and Mixtral.

Config (``config.json`` -> our fields): ``num_experts`` (Mixtral: ``num_local_experts``) ->
``--num-experts``, ``num_experts_per_tok`` -> ``--moe-router-topk``, the expert width
(Qwen3-MoE: ``moe_intermediate_size``; Mixtral: ``intermediate_size``) ->
``--moe-ffn-hidden-size``, which layers are sparse (Qwen3-MoE: not in ``mlp_only_layers`` and
``(i + 1) % decoder_sparse_step == 0``; Mixtral: all) -> ``--moe-layer-freq`` as a 0/1
pattern, ``router_aux_loss_coef`` -> ``--moe-aux-loss-coeff``. Routing: both take the softmax
over all experts and the top k; Mixtral (and Qwen3-MoE with ``norm_topk_prob``) renormalise
the k probabilities, which equals megatron's softmax over the top-k logits; Qwen3-MoE without
it keeps them as they are: ``--moe-router-pre-softmax``.

Weights of an MoE layer ``i`` (megatron after ``decoder.layers.i.mlp.``; Hugging Face after
``model.layers.i.`` + ``mlp.`` for Qwen3-MoE, ``block_sparse_moe.`` for Mixtral):
``router.weight`` = ``gate.weight``; expert ``e``'s ``experts.local_experts.e.linear_fc1`` =
``experts.e.[gate_proj; up_proj]`` (Mixtral ``[w1; w3]``) and ``linear_fc2`` =
``experts.e.down_proj`` (``w2``). A model with a shared expert has no counterpart here.
"""

from __future__ import annotations

from typing import Any

from salt_megatron.config.schema import ModelConfig

MOE_ARCHITECTURES = {"Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}
"""Supported mixture-of-experts ``architectures`` entries -> ``model_type``."""
_NAMES = {
    "qwen3_moe": ("mlp.", ("gate_proj", "up_proj"), "down_proj"),
    "mixtral": ("block_sparse_moe.", ("w1", "w3"), "w2"),
}
"""Per architecture: the MoE block's prefix, the fc1 halves' names, the fc2 name."""


def moe_fields_from_hf(config: dict[str, Any], kind: str, problems: list[str],
                       notes: list[str]) -> dict[str, Any]:  # fmt: skip
    """Our MoE fields (and the dense MLP width) from a Qwen3-MoE or Mixtral ``config.json``."""
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    layers = int(config["num_hidden_layers"])
    if kind == "mixtral":
        pattern = [1] * layers
        width = int(config["intermediate_size"])
        pre_softmax = False
        if float(config.get("router_jitter_noise") or 0.0) > 0:
            notes.append("router_jitter_noise (training-time noise) is not imported")
    else:
        step = int(config.get("decoder_sparse_step", 1))
        dense = set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        width = int(config["moe_intermediate_size"])
        pre_softmax = not config.get("norm_topk_prob", False)
    if experts < 1:
        problems.append(f"num_experts {experts}")
    return {
        "num_experts": experts or None,
        "moe_router_topk": int(config["num_experts_per_tok"]),
        "moe_ffn_hidden_size": width,
        "moe_layer_freq": [1] if all(pattern) else pattern,
        "moe_router_pre_softmax": pre_softmax,
        "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef") or 0.0),
    }


def moe_architecture_for(model: ModelConfig, problems: list[str]) -> str:
    """Qwen3-MoE with QK layernorm, else Mixtral (every layer MoE, renormalised top-k)."""
    if model.moe_shared_expert_intermediate_size:
        problems.append("a shared expert (--moe-shared-expert-intermediate-size)")
    if model.add_qkv_bias:
        problems.append("QKV bias in an MoE model")
    if model.qk_layernorm:
        return "Qwen3MoeForCausalLM"
    if not all(model.moe_layer_pattern()):
        problems.append("dense layers among MoE layers without QK layernorm (Mixtral is all MoE)")
    if model.moe_router_pre_softmax:
        problems.append("--moe-router-pre-softmax without QK layernorm (Mixtral renormalises)")
    return "MixtralForCausalLM"


def moe_hf_config(model: ModelConfig, arch: str, expert_width: int) -> dict[str, Any]:
    """The MoE keys of ``config.json`` for ``arch``."""
    common = {
        "num_experts_per_tok": model.moe_router_topk,
        "router_aux_loss_coef": model.moe_aux_loss_coeff,
        "output_router_logits": False,
    }
    if arch == "MixtralForCausalLM":
        return common | {
            "num_local_experts": model.num_experts,
            "intermediate_size": expert_width,
            "router_jitter_noise": 0.0,
        }
    pattern = model.moe_layer_pattern()
    return common | {
        "num_experts": model.num_experts,
        "moe_intermediate_size": expert_width,
        "norm_topk_prob": not model.moe_router_pre_softmax,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
    }


def moe_layer_rules(model: ModelConfig, kind: str) -> list[tuple[str, tuple[str, ...], str]]:
    """``(megatron suffix, Hugging Face suffixes, how)`` of an MoE layer's MLP (how: copy/cat)."""
    assert model.num_experts is not None
    block, fc1, fc2 = _NAMES[kind]
    rules: list[tuple[str, tuple[str, ...], str]] = [
        ("mlp.router.weight", (block + "gate.weight",), "copy")
    ]
    for e in range(model.num_experts):
        ours, theirs = f"mlp.experts.local_experts.{e}.", f"{block}experts.{e}."
        rules.append((ours + "linear_fc1.weight", tuple(f"{theirs}{n}.weight" for n in fc1), "cat"))
        rules.append((ours + "linear_fc2.weight", (f"{theirs}{fc2}.weight",), "copy"))
    return rules
