"""Exponential moving average of a model's weights, used for evaluation and export."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """ema = decay * ema + (1 - decay) * weights, for parameters; buffers are copied as they are.

    The average lives in a frozen copy of the module (`.module`), so it can run and export as it is.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for avg, cur in zip(self.module.parameters(), module.parameters()):
            avg.lerp_(cur.detach().to(avg.dtype), 1.0 - self.decay)
        for avg, cur in zip(self.module.buffers(), module.buffers()):
            avg.copy_(cur)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
