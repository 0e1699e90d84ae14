"""SALT pretraining on megatron-core: parse the config, init distributed, build, train, close.

    torchrun --nproc_per_node 2 pretrain_salt.py --config examples/configs/tiny_cpu.yaml \
        --tensor-model-parallel-size 2
"""

from __future__ import annotations

import os
import sys

from salt_megatron.config import ConfigError, parse_config


def main(argv: list[str] | None = None) -> int:
    """Run one training job; returns the process exit code."""
    try:
        cfg = parse_config(argv)
        cfg.validate_world(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        print(f"pretrain_salt.py: error: {exc}", file=sys.stderr)
        return 2

    from salt_megatron.runtime import destroy_distributed, init_distributed
    from salt_megatron.training.run import run

    init_distributed(cfg.parallel.distributed_timeout_minutes)
    try:
        return run(cfg)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
