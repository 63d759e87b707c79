"""Checkpoints: incremental, encrypted, signed safetensors content on any fsspec storage."""

from elastictrain.checkpoint.manager import CheckpointInfo, CheckpointManager
from elastictrain.checkpoint.reader import Loaded

__all__ = ["CheckpointInfo", "CheckpointManager", "Loaded"]
