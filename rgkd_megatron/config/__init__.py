"""Config tree (``schema``) and its YAML loading, dotted overrides, validation and saving (``loader``)."""

from rgkd_megatron.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    data_parallel_size,
    load_config,
    save_resolved_config,
    validate_config,
)
from rgkd_megatron.config.pbkd import PbKDConfig
from rgkd_megatron.config.schema import (
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RGKDConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig",
    "LoggingConfig",
    "PbKDConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RGKDConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "data_parallel_size",
    "load_config",
    "save_resolved_config",
    "validate_config",
]
