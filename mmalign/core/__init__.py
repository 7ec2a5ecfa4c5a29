"""Trainer core: configs, the Method protocol, the training loop, checkpoints and reference models."""
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import (ConfigError, Experiment, TrainConfig, apply_overrides, from_dict, load_experiment, load_yaml,
                     read_method_name, save_resolved)
from .method import Method
from .reference import make_reference
from .trainer import NonFiniteLossError, StepBatchSampler, train

__all__ = [
    "ConfigError", "Experiment", "TrainConfig", "apply_overrides", "from_dict", "load_experiment", "load_yaml",
    "read_method_name", "save_resolved", "Method", "train", "NonFiniteLossError", "StepBatchSampler",
    "make_reference", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
]
