"""openmoshi: an open, trainable, fast implementation of Moshi and the Mimi codec.

Public API:
    load_mimi(source, num_codebooks=8, device="cpu") -> Mimi
    load_lm(source, device="cpu", dtype=torch.float32) -> LMModel
    load_model(source) -> MoshiBundle (mimi, lm, tokenizer, config, generation defaults)
    Generator(lm, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25, seed=None)
"""

from .bundle import MoshiBundle, init_model, load_model, save_model
from .codec import Mimi, MimiConfig, load_mimi, save_mimi
from .errors import AudioError, CheckpointError, ConfigError, OpenMoshiError, ProtocolError
from .generation.generator import Generator
from .lm import LMConfig, LMModel, load_lm, save_lm

__version__ = "0.1.0"

__all__ = ["AudioError", "CheckpointError", "ConfigError", "Generator", "LMConfig", "LMModel", "Mimi",
           "MimiConfig", "MoshiBundle", "OpenMoshiError", "ProtocolError", "init_model", "load_lm", "load_mimi",
           "load_model", "save_lm", "save_mimi", "save_model"]
