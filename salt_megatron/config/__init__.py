"""The typed config tree, its YAML/flag reader, and the single adapter into megatron-core configs."""

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
    TeacherModelConfig,
    SaltConfig,
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
    "TeacherModelConfig",
    "SaltConfig",
    "TrainingConfig",
    "build_parser",
    "from_dict",
    "parse_config",
    "to_dict",
]
