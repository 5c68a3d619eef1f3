"""Helpers shared by the LM and generator tests: small configs, sharpened random weights, greedy runs."""

from __future__ import annotations

import torch

from openmoshi.generation.generator import Generator
from openmoshi.lm.config import LMConfig
from openmoshi.lm.model import LMModel

# Keys of Kyutai's config.json that its CheckpointInfo consumes before building the LM.
FILE_KEYS = {"model_type", "moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name", "lora",
             "lora_rank", "lora_scaling", "lm_gen_config", "tts_config", "stt_config", "model_id"}


def small_config(**changes) -> LMConfig:
    """The 7B's structure (delays, n_q 16, dep_q 8, per-step depth weights, gating, rms_norm_f32) at toy size."""
    base = {"dim": 64, "num_heads": 4, "num_layers": 2, "context": 40, "text_card": 120, "depformer_dim": 32,
            "depformer_num_heads": 2, "depformer_num_layers": 2, "depformer_dim_feedforward": int(4.125 * 32)}
    base.update(changes)
    return LMConfig(**base)


def kyutai_kwargs(cfg: LMConfig) -> dict:
    """Constructor arguments of Kyutai's LMModel for `cfg`."""
    return {k: v for k, v in cfg.to_kyutai().items() if k not in FILE_KEYS}


def sharp_model(cfg: LMConfig, seed: int = 0) -> LMModel:
    """Random weights with output heads scaled up, so greedy choices have wide margins (robust to 1e-6 noise)."""
    torch.manual_seed(seed)
    lm = LMModel(cfg).eval()
    with torch.no_grad():
        lm.text_linear.weight.mul_(12)
        for linear in lm.linears:
            linear.weight.mul_(12)
    return lm


def random_codes(cfg: LMConfig, batch: int, steps: int, seed: int = 1) -> torch.Tensor:
    """Random token grid [B, 1 + n_q, T] (text first)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (batch, cfg.num_codebooks, steps), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (batch, steps), generator=g)
    return codes


def run(gen: Generator, user: torch.Tensor | None, steps: int, batch: int, **step_kwargs) -> list:
    """Step `gen` over user codes [B, n_user, steps]; returns the list of step outputs (None included)."""
    outs = []
    with gen.streaming(batch):
        for s in range(steps):
            frame = None if user is None else user[:, :, s:s + 1]
            outs.append(gen.step(frame, **step_kwargs))
    return outs


def frames(outs: list) -> torch.Tensor:
    """Concatenate the non-None step outputs -> [B, 1 + dep_q, frames]."""
    return torch.cat([o for o in outs if o is not None], dim=2)
