"""Typed, validated experiment configuration."""

from .errors import ConfigError
from .loader import apply_override, config_from_dict, config_to_dict, load_config
from .presets import PRESETS, model_preset
from .schema import (CheckpointConfig, DataConfig, DatasetConfig, ExperimentConfig, LanguageConfig,
                     LoggingConfig, ModelConfig, ParallelConfig, PrecisionConfig, ProjectorConfig,
                     TrainConfig, VisionConfig, validate_layout)

__all__ = [
    "ConfigError", "apply_override", "config_from_dict", "config_to_dict", "load_config", "PRESETS",
    "model_preset", "CheckpointConfig", "DataConfig", "DatasetConfig", "ExperimentConfig",
    "LanguageConfig", "LoggingConfig", "ModelConfig", "ParallelConfig", "PrecisionConfig",
    "ProjectorConfig", "TrainConfig", "VisionConfig", "validate_layout",
]
