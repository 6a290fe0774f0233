"""The single training loop of loralib (see loralib/train/loop.py for usage)."""
from .checkpoint import list_checkpoints, load_adapter_weights, load_model, resolve_resume
from .distributed import ShardedBatches
from .loop import TrainConfig, TrainResult, TrainState, default_optimizer, train
from .schedules import WarmupSchedule, build_scheduler

__all__ = ["TrainConfig", "TrainResult", "TrainState", "train", "default_optimizer", "build_scheduler",
           "WarmupSchedule", "ShardedBatches", "list_checkpoints", "resolve_resume", "load_model",
           "load_adapter_weights"]
