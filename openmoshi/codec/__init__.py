"""Mimi codec: SEANet, split RVQ, the model and its checkpoint I/O."""

from .config import MimiConfig, mimi_official, mimi_tiny
from .loading import MIMI_NAME, load_mimi, save_mimi
from .mimi import Mimi

__all__ = ["MIMI_NAME", "Mimi", "MimiConfig", "load_mimi", "mimi_official", "mimi_tiny", "save_mimi"]
