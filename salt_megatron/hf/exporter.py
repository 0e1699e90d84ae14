"""Export a checkpoint to a Hugging Face ``transformers`` folder (config, weights, tokenizer).

The full weights are read by building the model at TP = PP = 1 in one process (a world of 1) and
loading the dist checkpoint into it (any saved layout, any expert-parallel size), then renamed
by :mod:`.format` into Llama's names (Qwen2's with a QKV bias, Qwen3's with QK layernorm;
Qwen3-MoE's or Mixtral's for a mixture-of-experts model; a checkpoint made by
``import_hf`` keeps its source architecture and ``config.json``, so the round trip is exact). The
padded vocabulary rows (megatron pads the embedding to a multiple of 128 x TP) are dropped by
default, so the exported ``vocab_size`` is the tokenizer's and generation can never emit an id
the tokenizer cannot decode; ``keep_padded_vocab`` keeps them (then the exported model's softmax
is exactly ours, padding columns included). ``transformers`` is not needed to export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import torch

from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.checkpoint.saved import (
    load_weights,
    resolve,
    saved_bf16,
    saved_model_config,
    saved_padded_vocab,
)
from salt_megatron.config.schema import ConfigError, ModelConfig
from salt_megatron.hf.format import (
    HFFormatError,
    architecture_for,
    hf_config,
    megatron_to_hf,
    model_config_from_hf,
)
from salt_megatron.runtime.distributed import init_world


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says why."""


def target_architecture(model: ModelConfig, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The architecture to write and, for a checkpoint made by ``import_hf``, its source config.

    An imported checkpoint keeps its original architecture and ``config.json`` (so that
    ``export(import(x)) == x``) as long as that config still describes ``model``; anything else
    gets the architecture :func:`salt_megatron.hf.format.architecture_for` picks.
    """
    source = (meta.get("source") or {}).get("config")
    if isinstance(source, dict):
        try:
            original = model_config_from_hf(source)
        except HFFormatError:
            original = None
        if original is not None and _same_shape(original.model, model):
            return original.architecture, source
    try:
        return architecture_for(model), {}
    except HFFormatError as exc:
        raise ExportError(str(exc)) from None


def _same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    runtime = {"transformer_impl", "hidden_dropout", "attention_dropout", "vocab_size"}
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in runtime]
    return all(getattr(a, name) == getattr(b, name) for name in fields)


# ---- tokenizer ---------------------------------------------------------------------------------
def write_tokenizer(out: str, tokenizer: Any, max_length: int) -> dict[str, int]:
    """Write the tokenizer files ``AutoTokenizer`` loads; return the special ids it has.

    A Hugging Face tokenizer's ``tokenizer.json`` and configs are copied as they are. A
    sentencepiece model is copied with a LlamaTokenizer config (no ``<s>`` added, as our
    preprocessing adds none).
    """
    ids = {"unk": tokenizer.unk, "bos": tokenizer.bos, "eos": tokenizer.eos, "pad": tokenizer.pad}
    if not hasattr(tokenizer, "_sp"):
        tokenizer.copy_files(out)
        return {name: i for name, i in ids.items() if i >= 0}
    shutil.copyfile(tokenizer.path, os.path.join(out, "tokenizer.model"))
    pieces = {name: tokenizer.inv_vocab[i] for name, i in ids.items() if i >= 0}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "model_max_length": max_length,
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
    architecture: str


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
    from salt_megatron.checkpoint.saved import check_tokenizer

    ckpt = resolve(load, step)
    model = saved_model_config(ckpt.meta, ckpt.path)
    target_architecture(model, ckpt.meta)  # refuse before reading the weights
    tokenizer = None
    has_tokenizer = tokenizer_model or ((ckpt.meta.get("config") or {}).get("data") or {}).get(
        "tokenizer_model"
    )
    if has_tokenizer:
        tokenizer = check_tokenizer(ckpt.meta, ckpt.path, tokenizer_model)
    sd = _full_state_dict(ckpt.path, ckpt.meta, model)
    return write_hf_folder(out, sd, model, ckpt.meta, tokenizer, keep_padded_vocab, ckpt.step)


def write_hf_folder(
    out: str,
    sd: dict[str, torch.Tensor],
    model: ModelConfig,
    meta: dict[str, Any],
    tokenizer: Any = None,
    keep_padded_vocab: bool = False,
    step: int = 0,
) -> ExportSummary:
    """Write the Hugging Face folder of a TP = 1 state dict ``sd`` of the checkpoint ``meta``.

    Vocabulary rows: the tokenizer's (``meta["vocab_size"]``), the source model's for a
    checkpoint made by ``import_hf``, or all padded rows with ``keep_padded_vocab``.
    """
    from safetensors.torch import save_file

    from salt_megatron.config import megatron as mcfg

    arch, source_config = target_architecture(model, meta)
    padded = int(meta["padded_vocab_size"])
    vocab = int(source_config.get("vocab_size", meta.get("vocab_size") or padded))
    vocab = padded if keep_padded_vocab else vocab
    hf_sd = megatron_to_hf(sd, model, vocab, arch)
    os.makedirs(out, exist_ok=True)
    special = write_tokenizer(out, tokenizer, model.max_position_embeddings) if tokenizer else {}
    dtype = next(iter(hf_sd.values())).dtype
    config = dict(source_config) or hf_config(
        model, arch, vocab, mcfg.ffn_hidden_size(model), dtype
    )
    config["vocab_size"] = vocab
    for name in ("bos", "eos", "pad"):
        config.setdefault(f"{name}_token_id", special.get(name))
    save_file(hf_sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    n_params = sum(t.numel() for t in hf_sd.values())
    return ExportSummary(out, step, vocab, padded, n_params, arch)


def main(argv: list[str] | None = None) -> int:
    """Command line of ``tools/export_hf.py``; the exit code."""
    from salt_megatron.checkpoint.saved import LoadError
    from salt_megatron.data.errors import DataError

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
    except (ExportError, HFFormatError, LoadError, ConfigError, DataError, CheckpointError) as exc:
        print(f"export_hf.py: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"exported step {summary.step} to {summary.out} ({summary.architecture}): "
        f"{summary.parameters / 1e6:.2f}M "
        f"parameters, vocab {summary.vocab_size} (padded {summary.padded_vocab_size})"
    )
    return 0
