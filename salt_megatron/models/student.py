"""Build the student: its GPT chunks (one per virtual stage), wrapped in megatron-core's DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from salt_megatron.config import megatron as mcfg
from salt_megatron.config.schema import SaltConfig
from salt_megatron.models.gpt import build_gpt
from salt_megatron.runtime import device


def build_student_chunks(
    cfg: SaltConfig, tf_config: TransformerConfig, padded_vocab: int
) -> list[GPTModel]:
    """The student's model chunks on this rank: one per virtual pipeline stage.

    Weights are initialised on the CPU from the seed (megatron's ``use_cpu_initialization``), so a
    model built at any TP/PP layout holds the same full weights.
    """
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        chunk = build_gpt(
            cfg.model,
            tf_config,
            padded_vocab_size=padded_vocab,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
            init_seed=cfg.training.seed,
            device=device(),
        )
        chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
        chunks.append(chunk)
    return chunks


def _encoder_or_decoder():  # type: ignore[no-untyped-def]
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def wrap_ddp(
    cfg: SaltConfig, tf_config: TransformerConfig, chunks: list[GPTModel]
) -> list[DistributedDataParallel]:
    """Wrap each chunk in megatron-core DDP (bucketing only for the first, as Megatron-LM does)."""
    ddp_cfg = mcfg.ddp_config(cfg)
    return [
        DistributedDataParallel(
            config=tf_config, ddp_config=ddp_cfg, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]


def count_parameters(chunks: list[torch.nn.Module]) -> int:
    """Parameters held by this rank's chunks (each tensor-parallel shard counted once)."""
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())


@contextlib.contextmanager
def gathered_params(chunks: list[DistributedDataParallel]) -> Iterator[None]:
    """Every parameter fully up to date on this rank for the block (a collective).

    With ``--overlap-param-gather`` the distributed optimizer's all-gather of the updated weights
    is deferred to the next training forward (megatron DDP's forward pre-hooks). Code that reads
    the weights outside a training step (evaluation, checkpoint saves) runs in this block: the
    hooks are removed after a synchronous all-gather and put back afterwards, as Megatron-LM does.
    """
    hooked = [chunk for chunk in chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
