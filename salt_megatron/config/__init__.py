"""The typed config tree, its YAML/flag reader, and the one adapter into megatron-core configs."""

from salt_megatron.config.cli import build_parser, from_dict, parse_config, to_dict
from salt_megatron.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    SaltConfig,
    SFTConfig,
    TeacherModelConfig,
    TrainingConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "SFTConfig",
    "SaltConfig",
    "TeacherModelConfig",
    "TrainingConfig",
    "build_parser",
    "from_dict",
    "parse_config",
    "to_dict",
]
