"""SALT pretraining on megatron-core: parse the config, init distributed, build, train, close.

    torchrun --nproc_per_node 2 pretrain_salt.py --config examples/configs/tiny_cpu.yaml \
        --tensor-model-parallel-size 2
    pretrain_salt.py --sft --sft-data train.jsonl --pretrained-checkpoint ckpt --save sft_ckpt \
        --sft-epochs 3          # supervised fine-tuning (docs/sft.md)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from salt_megatron.config import ConfigError, parse_config

EXIT_CHECKPOINT = 3
"""Exit code for a missing, corrupt or mismatched checkpoint."""
EXIT_NONFINITE = 4
"""Exit code for a non-finite loss or gradient norm beyond --skip-nonfinite-steps."""
EXIT_INPUT = 5
"""Exit code for bad data, tokenizer or teacher input found after start-up."""


def _pretrained_defaults(values: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """--pretrained-checkpoint's model shape and tokenizer where not given (reads it only then:
    the checkpoint reader imports torch)."""
    if not (values.get("sft") or {}).get("pretrained_checkpoint"):
        return values
    from salt_megatron.checkpoint.saved import pretrained_defaults

    return pretrained_defaults(values)


def main(argv: list[str] | None = None) -> int:
    """Run one training job; returns the process exit code."""
    try:
        cfg = parse_config(argv, fill=_pretrained_defaults)
        cfg.validate_world(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        print(f"pretrain_salt.py: error: {exc}", file=sys.stderr)
        return 2

    from salt_megatron.runtime.quiet import silence_known_warnings

    silence_known_warnings()
    from salt_megatron.checkpoint.layout import CheckpointError
    from salt_megatron.data.errors import DataError
    from salt_megatron.runtime import destroy_distributed, init_distributed
    from salt_megatron.teacher import TeacherError
    from salt_megatron.training.run import run
    from salt_megatron.training.trainer import NonFiniteError

    init_distributed(cfg.parallel.distributed_timeout_minutes)
    try:
        return run(cfg)
    except CheckpointError as exc:  # raised on every rank: they read the same files
        print(f"pretrain_salt.py: checkpoint error: {exc}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except NonFiniteError as exc:  # raised on every rank: the loss and norm are global
        print(f"pretrain_salt.py: training halted: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except (DataError, TeacherError, ConfigError) as exc:  # every rank checks the same input
        print(f"pretrain_salt.py: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
