"""SALT_DS step 1: score every training sequence with the teacher (all ranks, resumable).

    torchrun --nproc_per_node 2 tools/score_data.py --out runs/scores/pile \
        --kd-teacher-load runs/teacher --data-path data_text_document --tokenizer-model tok.model \
        --seq-length 128 --micro-batch-size 16 [--top-k 10] [--teacher-tensor-model-parallel-size 1]

Any pretrain_salt.py flag is accepted (data, sequence length, teacher layout). Writes
``<out>.npy`` (one score per sequence of the dataset's first epoch, NaN when no target token is in
the teacher's top-k) and ``<out>.json``. Rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from salt_megatron.config import ConfigError, parse_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--out", required=True, help="output path prefix (.npy/.json)")
    parser.add_argument("--top-k", type=int, default=10, help="k of the teacher's top-k (10)")
    args, rest = parser.parse_known_args()
    try:
        cfg = parse_config([*rest, "--pipeline-model-parallel-size", "1"])
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world % cfg.parallel.teacher_tensor_model_parallel_size or args.top_k < 1:
            raise ConfigError("world size must be a multiple of the teacher TP size; --top-k >= 1")
    except ConfigError as exc:
        print(f"score_data.py: error: {exc}", file=sys.stderr)
        return 2
    from salt_megatron.runtime import destroy_distributed, init_distributed

    init_distributed()
    try:
        _score(cfg, args.out, args.top_k)
    finally:
        destroy_distributed()
    return 0


def _score(cfg: Any, out: str, top_k: int) -> None:
    import numpy as np
    from megatron.core import parallel_state as mpu

    from salt_megatron.config import megatron as mcfg
    from salt_megatron.data.datasets import build_gpt_datasets
    from salt_megatron.distill.scoring import ScoreSpec, score_dataset
    from salt_megatron.parallel.state import reseed
    from salt_megatron.runtime import device
    from salt_megatron.teacher import Teacher
    from salt_megatron.training.data import build_tokenizer

    t = cfg.parallel.teacher_tensor_model_parallel_size
    mpu.initialize_model_parallel(tensor_model_parallel_size=t)
    reseed(cfg.training.seed)  # megatron's RNG tracker (attention dropout forks it)
    tp_group = mpu.get_tensor_model_parallel_group()
    tokenizer = build_tokenizer(cfg)
    cache = cfg.data.data_cache_path or os.path.dirname(os.path.abspath(out))
    dataset = build_gpt_datasets(
        cfg.data.data_path, "1,0,0", cfg.data.seq_length, cfg.training.seed, (None, 0, 0),
        tokenizer, cache,
    )[0]  # fmt: skip
    div = cfg.model.make_vocab_size_divisible_by
    padded = mcfg.padded_vocab_size(tokenizer.vocab_size, div, t)
    teacher = Teacher.build(
        cfg, tp_group, mpu.get_tensor_model_parallel_rank(), t, True, padded,
        tokenizer.fingerprint, device=device(), vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    spec = ScoreSpec(
        list(cfg.data.data_path or []), cfg.data.seq_length, cfg.training.seed, top_k,
        len(dataset), str(cfg.data.tokenizer_model), str(cfg.distill.kd_teacher_load),
        cfg.data.tokenizer_type,
    )  # fmt: skip
    scores = score_dataset(
        teacher, dataset, out, spec, cfg.training.micro_batch_size,
        mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size(), tp_group,
    )  # fmt: skip
    if scores is not None:
        finite = scores[np.isfinite(scores)]
        median = float(np.median(finite)) if finite.size else float("nan")
        print(
            f"scored {scores.size} sequences: {finite.size} with learnable tokens, median "
            f"score {median:.4f} -> {out}.npy"
        )
    if teacher is not None:
        teacher.release()


if __name__ == "__main__":
    sys.exit(main())
