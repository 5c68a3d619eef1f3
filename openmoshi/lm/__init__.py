"""The Moshi language model: an RQ-Transformer over a text stream and audio codebook streams."""

from .config import LMConfig
from .loading import load_lm, read_config, save_lm
from .model import LMModel, LMOutput

__all__ = ["LMConfig", "LMModel", "LMOutput", "load_lm", "read_config", "save_lm"]
