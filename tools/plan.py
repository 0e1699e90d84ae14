#!/usr/bin/env python
"""Plan a SALT run: per-GPU memory, FLOPs, KD overhead and step time, from a config alone.

Example::

    python tools/plan.py --config examples/configs/salt_pile_1p5b_2p8b.yaml --world-size 64

The world size defaults to the ``# world_size: N`` comment of the YAML file (else TP x PP); the
vocabulary size to ``--vocab-size`` in the config, else the sentencepiece model's. Other flags
after the planner's own override the config like ``pretrain_salt.py``'s
(``--micro-batch-size 2``). Exit status 1 when the run, with its ``--recompute-*`` choice, does
not fit the GPU memory.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=UserWarning)  # megatron: "TE and Apex not installed"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.config import ConfigError, parse_config  # noqa: E402
from salt_megatron.config.schema import SaltConfig  # noqa: E402
from salt_megatron.planner import Hardware, format_plan, plan  # noqa: E402

WORLD_COMMENT = re.compile(r"^#\s*world[_ ]size:\s*(\d+)", re.MULTILINE)


def world_from_comment(path: Path) -> int | None:
    """The ``# world_size: N`` comment of a YAML config, if any."""
    match = WORLD_COMMENT.search(path.read_text())
    return int(match.group(1)) if match else None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The planner's options, and the rest (config flags)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="YAML config of the run")
    p.add_argument("--world-size", type=int, help="GPUs in the job")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    p.add_argument("--mfu", type=float, default=0.4, help="model-FLOP utilisation to assume")
    p.add_argument("--vocab-size", dest="plan_vocab_size", type=int, help="vocabulary size")
    return p.parse_known_args(argv)


def _vocab(cfg: SaltConfig, override: int | None) -> int:
    if override is not None:
        return override
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    model = cfg.data.tokenizer_model
    if model and Path(model).exists():
        from salt_megatron.data.tokenizer import load_tokenizer

        return int(load_tokenizer(model, cfg.data.tokenizer_type).vocab_size)
    raise ConfigError("no vocabulary size: set --vocab-size or a readable --tokenizer-model")


def main(argv: list[str] | None = None) -> int:
    """Print the plan; 0 if it fits, 1 if not, 2 on a config error."""
    args, rest = parse_args(argv)
    try:
        cfg = parse_config(["--config", str(args.config), *rest])
        world = args.world_size or world_from_comment(args.config)
        world = world or cfg.parallel.model_parallel_size
        hardware = Hardware(args.gpu_memory_gib, args.gpu_tflops, args.mfu)
        result = plan(cfg, world, _vocab(cfg, args.plan_vocab_size), hardware)
    except ConfigError as exc:
        print(f"plan.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(cfg, result))
    return 1 if result.memory_total > hardware.gpu_memory_gib * 1024**3 else 0


if __name__ == "__main__":
    sys.exit(main())
