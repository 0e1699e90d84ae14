"""Perplexity of a saved checkpoint on a held-out indexed dataset, at any TP/PP layout.

    python tools/evaluate.py --load ckpt --data-path data/heldout_text_document --eval-samples 512
    torchrun --nproc_per_node 2 tools/evaluate.py --load ckpt --data-path ... \
        --tensor-model-parallel-size 2

The model's shape comes from the checkpoint's ``salt_meta.json`` (``config.model``); its weights
are read with megatron's dist-checkpointing, whose sharded keys are global, so the evaluation
layout may differ from the one the checkpoint was saved at. The loss is the model's own
cross-entropy over the padded vocabulary (exactly what the trainer's validation reports), summed
per token in float64 and divided by the number of valid tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from salt_megatron.checkpoint.layout import CheckpointError
from salt_megatron.checkpoint.saved import (
    LoadError,
    check_tokenizer,
    load_weights,
    resolve,
    saved_bf16,
    saved_model_config,
    saved_padded_vocab,
)
from salt_megatron.config.schema import (
    ConfigError,
    DataConfig,
    ParallelConfig,
    SaltConfig,
    TrainingConfig,
)

SPLITS = ("train", "valid", "test")


# ---- data ------------------------------------------------------------------------------------
class EvalBatches:
    """This DP rank's micro-batches over samples ``0..n-1`` in the trainer's order.

    Global micro-batch ``k`` covers samples ``[k*mbs*dp, (k+1)*mbs*dp)``, rank ``r`` its ``r``-th
    slice (as :func:`salt_megatron.data.batches.sample_indices` orders them). Rows past ``n``
    repeat sample 0 with a zero loss mask, so every rank runs the same number of micro-batches.
    """

    def __init__(self, dataset: Any, n: int, mbs: int, dp_rank: int, dp: int) -> None:
        self.dataset, self.n, self.mbs, self.dp_rank, self.dp = dataset, n, mbs, dp_rank, dp
        self.k = 0

    def __iter__(self) -> EvalBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        from salt_megatron.data.batches import collate

        start = (self.k * self.dp + self.dp_rank) * self.mbs
        self.k += 1
        idx = list(range(start, start + self.mbs))
        batch = collate([self.dataset[i if i < self.n else 0] for i in idx])
        keep = torch.tensor([float(i < self.n) for i in idx])
        batch["loss_mask"] = batch["loss_mask"] * keep[:, None]
        return batch


def build_dataset(cfg: SaltConfig, split_name: str, n: int | None, tokenizer: Any) -> Any:
    """The ``split_name`` GPT dataset of ``--data-path`` (``n`` samples, or one epoch)."""
    from salt_megatron.data.datasets import build_gpt_datasets, parse_blend

    data = cfg.data
    cache = data.data_cache_path
    if cache is None:
        blend = parse_blend(data.data_path)
        cache = os.path.join(os.path.dirname(os.path.abspath(blend[0][0])), "index-cache")  # type: ignore[index]
    counts: list[int | None] = [0, 0, 0]
    counts[SPLITS.index(split_name)] = n
    splits = build_gpt_datasets(
        data.data_path, data.split, data.seq_length, cfg.training.seed,
        (counts[0], counts[1], counts[2]), tokenizer, cache,
    )  # fmt: skip
    dataset = splits[SPLITS.index(split_name)]
    if dataset is None or len(dataset) == 0:
        raise LoadError(f"--split {data.split!r} leaves no {split_name} samples in --data-path")
    return dataset


# ---- forward -----------------------------------------------------------------------------------
def _sum_float64(
    loss_mask_bs: torch.Tensor, losses_bs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    mask = loss_mask_bs.reshape(-1).double()
    total = (losses_bs.reshape(-1).double() * mask).sum()
    count = mask.sum()
    return total.float(), count.to(torch.int), {"eval": torch.stack([total, count])}


@dataclass(frozen=True)
class EvalResult:
    """Mean per-token loss (nats), its perplexity, and what it was computed over."""

    loss: float
    perplexity: float
    tokens: int
    samples: int
    step: int
    checkpoint: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)


@torch.no_grad()
def loss_sums(chunks: list[Any], cfg: SaltConfig, dataset: Any, n: int) -> tuple[float, int]:
    """``(sum of token losses, valid tokens)`` over samples ``0..n-1``, on every rank."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from salt_megatron.parallel.state import current_layout
    from salt_megatron.runtime import device
    from salt_megatron.training.step import lm_forward_step

    lay = current_layout()
    mbs = cfg.training.micro_batch_size
    model = chunks[0]
    model.eval()
    uses_data = bool(model.pre_process or model.post_process)
    iterator = EvalBatches(dataset, n, mbs, lay.dp_rank, lay.dp) if uses_data else None
    reports = get_forward_backward_func()(
        forward_step_func=partial(lm_forward_step, reduce=_sum_float64),
        data_iterator=iterator,
        model=model,
        num_microbatches=math.ceil(n / (mbs * lay.dp)),
        seq_length=cfg.data.seq_length,
        micro_batch_size=mbs,
        forward_only=True,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    for report in reports:
        totals += report["eval"].to(totals.device)
    if lay.is_last_stage:
        dist.all_reduce(totals, group=lay.dp_group)
    else:
        totals.zero_()
    dist.all_reduce(totals, group=lay.pp_group)
    return float(totals[0]), int(totals[1])


# ---- the job -----------------------------------------------------------------------------------
def eval_config(args: argparse.Namespace, meta: dict[str, Any], path: str) -> SaltConfig:
    """The run's config: the checkpoint's model and seed, the evaluation's layout and data."""
    model = saved_model_config(meta, path)
    if args.transformer_impl:
        model = dataclasses.replace(model, transformer_impl=args.transformer_impl)
    saved_data = (meta.get("config") or {}).get("data") or {}
    saved_seed = ((meta.get("config") or {}).get("training") or {}).get("seed", 1234)
    mbs = args.micro_batch_size
    return SaltConfig(
        model=model,
        parallel=ParallelConfig(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        ),
        data=DataConfig(
            data_path=args.data_path,
            split=args.split,
            data_cache_path=args.data_cache_path,
            tokenizer_model=args.tokenizer_model or saved_data.get("tokenizer_model"),
            tokenizer_type=args.tokenizer_type or saved_data.get("tokenizer_type"),
            seq_length=args.seq_length or int(saved_data.get("seq_length", 256)),
        ),
        training=TrainingConfig(
            micro_batch_size=mbs,
            global_batch_size=mbs,
            seed=args.seed if args.seed is not None else int(saved_seed),
            bf16=saved_bf16(meta),
        ),
    )


def run(args: argparse.Namespace) -> EvalResult:
    """Check, start the groups, build, load and evaluate (every rank); the global result."""
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.models.student import build_student_chunks
    from salt_megatron.parallel.state import init_student_parallel
    from salt_megatron.runtime.distributed import init_world

    ckpt = resolve(args.load, args.step)
    cfg = eval_config(args, ckpt.meta, ckpt.path)
    tokenizer = check_tokenizer(
        ckpt.meta, ckpt.path, cfg.data.tokenizer_model, cfg.data.tokenizer_type
    )
    padded = saved_padded_vocab(ckpt.meta, ckpt.path, cfg.parallel.tensor_model_parallel_size)
    world = init_world()
    if world % cfg.parallel.model_parallel_size:
        raise LoadError(f"world size {world} is not divisible by TP x PP")
    if not mpu.model_parallel_is_initialized():
        init_student_parallel(cfg.parallel, cfg.training.seed)
    dataset = build_dataset(cfg, args.split_name, args.eval_samples, tokenizer)
    n = args.eval_samples or len(dataset)
    chunks = build_student_chunks(cfg, mcfg.student_transformer_config(cfg), padded)
    load_weights(chunks, ckpt.path)
    total, tokens = loss_sums(chunks, cfg, dataset, n)
    loss = total / max(tokens, 1)
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens, n, ckpt.step, ckpt.path)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``tools/evaluate.py``."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (as written by --save)")
    p.add_argument("--step", type=int, help="evaluate iter_<step> (default: the latest)")
    p.add_argument("--data-path", nargs="+", required=True, help="prefix or 'w1 p1 w2 p2'")
    p.add_argument("--split", default="0,0,1", help="train,valid,test weights (default 0,0,1)")
    p.add_argument("--split-name", choices=SPLITS, default="test", help="split to evaluate")
    p.add_argument("--eval-samples", type=int, help="sequences to evaluate (default: one epoch)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer-model", help="default: the checkpoint's saved path")
    p.add_argument(
        "--tokenizer-type",
        choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"),
        help="default: the checkpoint's, else inferred from --tokenizer-model",
    )
    p.add_argument("--seq-length", type=int, help="default: the checkpoint's training length")
    p.add_argument("--seed", type=int, help="dataset shuffle seed (default: the checkpoint's)")
    p.add_argument("--data-cache-path", help="index cache (default: beside the data)")
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"))
    p.add_argument("--json", help="also write the result to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate; print the result (and write ``--json``) on rank 0; the exit code."""
    from salt_megatron.data.errors import DataError

    args = build_parser().parse_args(argv)
    if args.eval_samples is not None and args.eval_samples < 1:
        print("evaluate.py: error: --eval-samples must be >= 1", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except (LoadError, ConfigError, DataError, CheckpointError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        from salt_megatron.runtime import destroy_distributed

        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"step {result.step} | loss {result.loss:.6f} | perplexity {result.perplexity:.4f} | "
            f"{result.tokens} tokens in {result.samples} samples | {result.checkpoint}"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result.to_dict(), f, indent=2)
    return 0
