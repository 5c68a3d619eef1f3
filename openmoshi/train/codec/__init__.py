"""Mimi codec training on the shared core: config presets, discriminator, losses, teacher, the task."""

from .config import PRESETS, CodecTrainConfig
from .task import CodecTask

__all__ = ["PRESETS", "CodecTask", "CodecTrainConfig"]
