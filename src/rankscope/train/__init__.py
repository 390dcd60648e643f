"""The training loop, its configuration and presets, and the diagnostics monitor."""

from rankscope.train.config import PRESETS, RunConfig, TrainConfig, resolve
from rankscope.train.monitor import Monitor
from rankscope.train.trainer import TrainResult, train

__all__ = ["PRESETS", "Monitor", "RunConfig", "TrainConfig", "TrainResult", "resolve", "train"]
