"""Megatron-LM ``torch_dist`` checkpoints: their layout and the model config in their ``args``.

    <root>/latest_checkpointed_iteration.txt    "1000", or "release"
    <root>/iter_0001000/  or  <root>/release/   one megatron-core dist checkpoint:
        metadata.json, .metadata, *.distcp      weights under "model" ("model0", "model1", ... with
                                                virtual pipelining; the sharded keys are global)
        common.pt  (or the DCP object "common_state" of newer megatron-core)
                                                "args" (argparse.Namespace), "iteration", ...

Megatron-LM writes exactly this through ``dist_checkpointing.save`` (``generate_state_dict`` in
``megatron/training/checkpointing.py``). The weights load like ours
(:func:`salt_megatron.checkpoint.untrusted.load_weights`): megatron-core's local and Transformer
Engine layer specs map onto the same sharded keys. The ``args`` are read with
:func:`~salt_megatron.checkpoint.untrusted.read_common_state` (``weights_only=True``) and
translated here into our model config; an option that changes the model's function and that we
do not build is a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from salt_megatron.checkpoint import layout
from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.checkpoint.untrusted import read_common_state

RELEASE = "release"
DIST_CONFIG = "metadata.json"
TOKENIZERS = {
    "SentencePieceTokenizer": "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer",
    "Llama2Tokenizer": "SentencePieceTokenizer",
    "HuggingFaceTokenizer": "HuggingFaceTokenizer",
}
"""Megatron-LM ``--tokenizer-type`` -> ours (sentencepiece kinds share the ``.model`` file)."""

_MUST_BE = {
    # option (newest name first, then older spellings): the value we can build
    ("num_experts", "num_moe_experts"): None,
    ("multi_latent_attention",): False,
    ("heterogeneous_layers_config_path",): None,
    ("hybrid_layer_pattern", "hybrid_override_pattern"): None,
    ("rotary_interleaved",): False,
    ("squared_relu",): False,
    ("quick_geglu",): False,
    ("openai_gelu",): False,
    ("layernorm_zero_centered_gamma", "apply_layernorm_1p"): False,
    ("apply_residual_connection_post_layernorm",): False,
    ("qk_l2_norm",): False,
    ("attention_output_gate",): False,
    ("window_size",): None,
    ("no_rope_freq",): None,
    ("experimental_attention_variant",): None,
}
_DEFAULT_ON: dict[tuple[str, ...], Any] = {
    ("softmax_type",): "vanilla",
    ("rotary_percent",): 1.0,
}
"""Options whose only value we build (Megatron-LM's default for each)."""


def _arg(args: argparse.Namespace, names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class MegatronLMCheckpoint:
    """One Megatron-LM checkpoint directory and what its common state says."""

    root: str
    path: str
    iteration: int | None
    """None for a ``release`` checkpoint."""
    args: argparse.Namespace
    checkpoint_version: float | None


def iteration_dir(root: str) -> tuple[str, int | None]:
    """``(directory, iteration)`` the tracker names (``release``: iteration None).

    ``root`` may also be the checkpoint directory itself (it holds ``metadata.json``).
    """
    if os.path.isfile(os.path.join(root, DIST_CONFIG)):
        return root, None
    tracker = os.path.join(root, layout.TRACKER_FILE)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"{root}: no {layout.TRACKER_FILE}; not a checkpoint directory")
    with open(tracker) as f:
        text = f.read().strip()
    if text == RELEASE:
        return os.path.join(root, RELEASE), None
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration or 'release', found {text!r}")
    return layout.iteration_dir(root, int(text)), int(text)


def is_megatron_lm(path: str) -> bool:
    """A dist checkpoint directory without our ``salt_meta.json``."""
    return os.path.isfile(os.path.join(path, DIST_CONFIG)) and not os.path.isfile(
        os.path.join(path, layout.META_FILE)
    )


def read(root: str, path: str, iteration: int | None) -> MegatronLMCheckpoint:
    """Read the common state of ``path``; it must hold Megatron-LM's ``args``."""
    state = read_common_state(path)
    args = state.get("args")
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(
            f"{path}: the common state has no Megatron-LM 'args' (keys: {sorted(state)[:8]})"
        )
    fmt = getattr(args, "ckpt_format", "torch_dist")
    if fmt != "torch_dist":
        raise CheckpointError(f"{path}: ckpt_format {fmt!r}; only torch_dist is read")
    version = state.get("checkpoint_version")
    iteration = state.get("iteration", iteration) if iteration is None else iteration
    return MegatronLMCheckpoint(root, path, iteration, args, version)


def _unsupported(args: argparse.Namespace) -> list[str]:
    problems = []
    for names, ok in _MUST_BE.items():
        value = _arg(args, names)
        if value is not None and value != ok:
            problems.append(f"{names[0]}={value!r}")
    for names, default in _DEFAULT_ON.items():
        value = _arg(args, names, default)
        if value != default:
            problems.append(f"{names[0]}={value!r}")
    if _arg(args, ("rope_type",), "rope") != "rope":
        problems.append(f"rope_type={args.rope_type!r}")
    position = _position_embedding(args)
    if position not in ("rope", "learned_absolute"):
        problems.append(f"position_embedding_type={position!r}")
    return problems


def _position_embedding(args: argparse.Namespace) -> str:
    if getattr(args, "use_rotary_position_embeddings", False):  # before position_embedding_type
        return "rope"
    return str(_arg(args, ("position_embedding_type",), "learned_absolute"))


def model_config(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """Our ``ModelConfig`` fields from Megatron-LM's args (both its old and new arg names)."""
    problems = _unsupported(args)
    if problems:
        raise CheckpointError(
            f"{path}: Megatron-LM options this teacher cannot run: {', '.join(problems)}"
        )
    gqa = getattr(args, "group_query_attention", False)
    add_bias = _arg(args, ("add_bias_linear",), True)
    if getattr(args, "disable_bias_linear", False):
        add_bias = False
    interpolation = _arg(args, ("rotary_seq_len_interpolation_factor",))
    return {
        "num_layers": int(args.num_layers),
        "hidden_size": int(args.hidden_size),
        "num_attention_heads": int(args.num_attention_heads),
        "num_query_groups": int(args.num_query_groups) if gqa else None,
        "kv_channels": _arg(args, ("kv_channels",)),
        "ffn_hidden_size": _arg(args, ("ffn_hidden_size",)),
        "make_vocab_size_divisible_by": int(_arg(args, ("make_vocab_size_divisible_by",), 128)),
        "position_embedding_type": _position_embedding(args),
        "rotary_base": int(_arg(args, ("rotary_base",), 10000)),
        "use_rope_scaling": bool(_arg(args, ("use_rope_scaling",), False)),
        "rope_scaling_factor": float(_arg(args, ("rope_scaling_factor",), 8.0)),
        "rotary_seq_len_interpolation_factor": interpolation,
        "max_position_embeddings": int(_arg(args, ("max_position_embeddings", "seq_length"))),
        "normalization": str(_arg(args, ("normalization",), "LayerNorm")),
        "norm_epsilon": float(_arg(args, ("layernorm_epsilon", "norm_epsilon"), 1e-5)),
        "swiglu": bool(_arg(args, ("swiglu",), False)),
        "untie_embeddings_and_output_weights": bool(
            _arg(args, ("untie_embeddings_and_output_weights",), False)
        ),
        "add_bias_linear": bool(add_bias),
        "add_qkv_bias": bool(_arg(args, ("add_qkv_bias",), False)) and not add_bias,
        "qk_layernorm": bool(_arg(args, ("qk_layernorm",), False)),
        "init_method_std": float(_arg(args, ("init_method_std",), 0.02)),
    }


def tokenizer_spec(args: argparse.Namespace, path: str) -> tuple[str, str | None]:
    """``(our tokenizer type, the --tokenizer-model saved in the args)``."""
    kind = getattr(args, "tokenizer_type", None)
    if kind not in TOKENIZERS:
        raise CheckpointError(
            f"{path}: the teacher's --tokenizer-type {kind!r} is not supported (supported: "
            f"{', '.join(TOKENIZERS)})"
        )
    return TOKENIZERS[kind], getattr(args, "tokenizer_model", None)


def teacher_meta(ckpt: MegatronLMCheckpoint) -> dict[str, Any]:
    """A ``salt_meta.json``-shaped dict for the teacher checks (no tokenizer fingerprint yet)."""
    args = ckpt.args
    kind, tokenizer_model = tokenizer_spec(args, ckpt.path)
    return {
        "step": ckpt.iteration or 0,
        "config": {
            "model": model_config(args, ckpt.path),
            "data": {"seq_length": _arg(args, ("seq_length",))},
            "training": {"bf16": bool(getattr(args, "bf16", False))},
        },
        "padded_vocab_size": _arg(args, ("padded_vocab_size",)),
        "source": {
            "format": "megatron-lm",
            "iteration": ckpt.iteration,
            "checkpoint_version": ckpt.checkpoint_version,
            "tokenizer_type": kind,
            "tokenizer_model": tokenizer_model,
        },
    }
