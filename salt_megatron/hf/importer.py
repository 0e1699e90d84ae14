"""Import a Hugging Face model (safetensors) as a checkpoint that ``--kd-teacher-load`` reads.

    python tools/import_hf.py --hf-dir hf/Qwen2.5-0.5B --output ckpt/qwen2.5-0.5b

Supported: Llama (1/2/3.x), Mistral, Qwen2/2.5, Qwen3, and the mixture-of-experts Qwen3-MoE and
Mixtral (see :mod:`salt_megatron.hf.format`, the mapping :mod:`salt_megatron.hf.exporter`
shares). The weights are read from ``model.safetensors``
(or the shards of ``model.safetensors.index.json``; never a pickle), renamed and fused into a
megatron-core GPT built at TP = PP = 1 (local layer spec, no initialisation), and saved with
dist-checkpointing under ``<output>/iter_0000000`` like a checkpoint of our trainer, so any
teacher TP size can load it. ``salt_meta.json`` records the model config, the tokenizer's
fingerprint and true vocabulary, and the source ``config.json`` (for an exact export).

Vocabulary: the embedding keeps the model's ``vocab_size`` rows and is zero-padded to a multiple
of ``--make-vocab-size-divisible-by`` (megatron's rule at TP = 1); ``vocab_size`` in the metadata
is the tokenizer's, and the teacher masks every column at or above it out of the KD loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.config.schema import DataConfig, ModelConfig, SaltConfig, TrainingConfig
from salt_megatron.data.errors import DataError
from salt_megatron.hf.format import (
    IGNORED_HF_WEIGHTS,
    HFFormatError,
    HFModel,
    hf_to_megatron,
    model_config_from_hf,
)

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float32}
"""Checkpoint dtype per Hugging Face dtype (float16 widens exactly to float32)."""


class SafetensorsReader:
    """Tensors of a Hugging Face folder by name, read lazily; remembers which were asked for."""

    def __init__(self, hf_dir: str) -> None:
        from safetensors import safe_open

        index = os.path.join(hf_dir, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SAFETENSORS)):
            weight_map = {}
            with safe_open(os.path.join(hf_dir, SAFETENSORS), "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SAFETENSORS)
        else:
            raise HFFormatError(
                f"{hf_dir}: no {SAFETENSORS} or {SAFETENSORS_INDEX} (only safetensors weights are "
                "read; convert .bin pickles with transformers' save_pretrained first)"
            )
        self.hf_dir, self.weight_map = hf_dir, weight_map
        self._files = {
            name: safe_open(os.path.join(hf_dir, name), "pt") for name in {*weight_map.values()}
        }
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``; a clear error if the checkpoint lacks it."""
        if name not in self.weight_map:
            raise HFFormatError(f"{self.hf_dir}: the weights have no tensor {name}")
        self.used.add(name)
        return self._files[self.weight_map[name]].get_tensor(name)

    def unused(self) -> list[str]:
        """Names never asked for, minus recomputed buffers such as ``rotary_emb.inv_freq``."""
        return sorted(
            n for n in self.weight_map if n not in self.used and not n.endswith(IGNORED_HF_WEIGHTS)
        )


def default_tokenizer(hf_dir: str) -> tuple[str, str]:
    """``(path, type)`` of the tokenizer shipped in ``hf_dir``: tokenizer.json, else .model."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        return hf_dir, "HuggingFaceTokenizer"
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        return os.path.join(hf_dir, "tokenizer.model"), "SentencePieceTokenizer"
    raise DataError(
        f"{hf_dir} holds no tokenizer (tokenizer.json or tokenizer.model): pass --tokenizer-model"
    )


@dataclass
class ImportPlan:
    """Everything decided before any weight is read (no megatron import needed)."""

    hf_dir: str
    source: HFModel
    config: dict[str, Any]
    tokenizer: Any
    tokenizer_type: str
    dtype: torch.dtype
    padded_vocab: int
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> ModelConfig:
        """Our model config."""
        return self.source.model


def plan_import(
    hf_dir: str,
    tokenizer_model: str | None = None,
    tokenizer_type: str | None = None,
    dtype: str | None = None,
) -> ImportPlan:
    """Read ``config.json`` and the tokenizer; check they fit; choose dtype and padded vocab."""
    from salt_megatron.data.tokenizer import infer_tokenizer_type, load_tokenizer

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise HFFormatError(f"--hf-dir {hf_dir}: no config.json")
    with open(path) as f:
        config = json.load(f)
    source = model_config_from_hf(config)
    if tokenizer_model is None:
        tokenizer_model, tokenizer_type = default_tokenizer(hf_dir)
    kind = tokenizer_type or infer_tokenizer_type(tokenizer_model)
    tokenizer = load_tokenizer(tokenizer_model, kind)
    if tokenizer.vocab_size > source.vocab_rows:
        raise HFFormatError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
            f"{source.vocab_rows} (config.json vocab_size): ids past it have no embedding"
        )
    if dtype is None and source.dtype not in DTYPES:
        raise HFFormatError(f"config.json dtype {source.dtype!r}: pass --dtype bf16 or fp32")
    torch_dtype = (
        {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype] if dtype else DTYPES[source.dtype]
    )
    div = source.model.make_vocab_size_divisible_by
    padded = int(math.ceil(source.vocab_rows / div) * div)
    notes = list(source.notes)
    if source.dtype == "float16" and dtype is None:
        notes.append("float16 weights are stored as float32 (exact)")
    return ImportPlan(hf_dir, source, config, tokenizer, kind, torch_dtype, padded, notes)


def _fill(gpt: Any, plan: ImportPlan) -> int:
    """Copy the Hugging Face tensors into ``gpt``'s parameters; every one on each side is used."""
    reader = SafetensorsReader(plan.hf_dir)
    params = dict(gpt.named_parameters())
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in hf_to_megatron(
            reader.get, plan.model, plan.padded_vocab, plan.source.architecture
        ):
            target = params.get(name)
            if target is None or target.shape != tensor.shape:
                have = None if target is None else tuple(target.shape)
                raise HFFormatError(f"{name}: shape {tuple(tensor.shape)}, the model has {have}")
            target.copy_(tensor)
            filled.add(name)
        if (
            not plan.model.untie_embeddings_and_output_weights
            and "lm_head.weight" in reader.weight_map
        ):
            _check_tied(reader, plan)
    missing = sorted(set(params) - filled)
    if missing or reader.unused():
        raise HFFormatError(f"unmapped weights: ours {missing}, Hugging Face {reader.unused()}")
    return sum(p.numel() for p in params.values())


def _check_tied(reader: SafetensorsReader, plan: ImportPlan) -> None:
    if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise HFFormatError(
            f"{plan.hf_dir}: tie_word_embeddings is true but lm_head.weight differs from "
            "model.embed_tokens.weight"
        )


def _meta(plan: ImportPlan) -> dict[str, Any]:
    from salt_megatron.config import to_dict

    model = plan.model
    cfg = SaltConfig(
        model=model,
        data=DataConfig(
            mock_data=True,
            tokenizer_model=os.path.abspath(plan.tokenizer.path),
            tokenizer_type=plan.tokenizer_type,  # type: ignore[arg-type]
            seq_length=model.max_position_embeddings,
        ),
        training=TrainingConfig(bf16=plan.dtype == torch.bfloat16),
    )
    return {
        "format": 1,
        "step": 0,
        "config": to_dict(cfg),
        "tokenizer_fingerprint": plan.tokenizer.fingerprint,
        "vocab_size": plan.tokenizer.vocab_size,
        "padded_vocab_size": plan.padded_vocab,
        "source": {
            "format": "huggingface",
            "path": os.path.abspath(plan.hf_dir),
            "architecture": plan.source.architecture,
            "config": plan.config,
            "notes": plan.notes,
        },
    }


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`convert` wrote."""

    output: str
    architecture: str
    parameters: int
    vocab_size: int
    padded_vocab_size: int
    dtype: str
    fingerprint: str
    notes: tuple[str, ...]

    def format(self) -> str:
        """Human-readable lines."""
        lines = [
            f"imported {self.architecture} to {self.output}: {self.parameters / 1e6:.2f}M "
            f"parameters ({self.dtype}), vocab {self.vocab_size} (padded {self.padded_vocab_size})",
            f"  tokenizer fingerprint {self.fingerprint}",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def convert(plan: ImportPlan, output: str) -> ImportSummary:
    """Build, fill and save (every rank of an initialised world at TP = PP = 1 calls this)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from salt_megatron.checkpoint import files, layout, trainer_state
    from salt_megatron.config import megatron as mcfg
    from salt_megatron.models.gpt import build_gpt

    if layout.read_latest_step(output) is not None:
        raise CheckpointError(f"--output {output} already holds a checkpoint")
    tf = mcfg.transformer_config(plan.model, tp=1, bf16=plan.dtype == torch.bfloat16)
    tf.perform_initialization = False  # every weight is overwritten
    gpt = build_gpt(
        plan.model, tf, padded_vocab_size=plan.padded_vocab,
        max_sequence_length=plan.model.max_position_embeddings, pre_process=True,
        post_process=True,
    )  # fmt: skip
    n_params = _fill(gpt, plan)
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(output, exist_ok=True)
        files.prepare_tmp(output, 0)
    dist.barrier()
    trainer_state.use_results_queue()
    dist_checkpointing.save(
        layout.model_sharded_state_dict([gpt]), layout.tmp_dir(output, 0),
        sharded_strategy=trainer_state._save_strategy(),
    )  # fmt: skip
    if rank0:
        layout.write_meta(layout.tmp_dir(output, 0), _meta(plan))
        files.commit(output, 0, keep_last=1)
    dist.barrier()
    return ImportSummary(
        output, plan.source.architecture, n_params, plan.tokenizer.vocab_size,
        plan.padded_vocab, str(plan.dtype).removeprefix("torch."), plan.tokenizer.fingerprint,
        tuple(plan.notes),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Command line of ``tools/import_hf.py`` (one process); the exit code."""
    from salt_megatron.data.tokenizer import TOKENIZER_TYPES

    p = argparse.ArgumentParser(prog="import_hf.py", description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json, ...)")
    p.add_argument("--output", required=True, help="checkpoint root to create")
    p.add_argument("--tokenizer-model", help="default: the folder's tokenizer.json / .model")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: the model's (fp16 -> fp32)")
    args = p.parse_args(argv)
    try:
        plan = plan_import(args.hf_dir, args.tokenizer_model, args.tokenizer_type, args.dtype)
        summary = _convert_in_one_process(plan, args.output)
    except (HFFormatError, DataError, CheckpointError) as exc:
        print(f"import_hf.py: error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


def _convert_in_one_process(plan: ImportPlan, output: str) -> ImportSummary:
    from megatron.core import parallel_state as mpu

    from salt_megatron.runtime import destroy_distributed
    from salt_megatron.runtime.distributed import init_world

    if init_world() != 1:
        raise CheckpointError("import_hf runs in one process (plain python, not torchrun)")
    try:
        mpu.initialize_model_parallel(1, 1)
        return convert(plan, output)
    finally:
        destroy_distributed()
