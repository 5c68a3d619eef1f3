"""SEANet encoder and decoder made of causal streaming convolutions.

Module indices inside `model` follow Kyutai's checkpoint keys (`encoder.model.0.conv.conv.weight`,
`decoder.model.2.convtr.convtr.weight`, ...), activations included, so the weights load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.conv import StreamingConv1d, StreamingConvTranspose1d
from ..nn.streaming import StreamingModule


@dataclass
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: list[int] = field(default_factory=lambda: [8, 6, 5, 4])  # decoder order; the encoder reverses it
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    pad_mode: str = "constant"
    activation: str = "ELU"
    activation_params: dict = field(default_factory=lambda: {"alpha": 1.0})
    true_skip: bool = True
    weight_norm: bool = False  # training-time reparametrisation; the released weights are plain

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


# Offline inference (no autograd) runs as a stream of chunks of this many latent steps (~1.3 s at batch 1):
# the result is the same (streaming is exact, up to float rounding) but each chunk's activations stay in
# cache instead of several passes over 60 MB tensors: ~1.5x faster on a 2-core CPU.
OFFLINE_CHUNK_STEPS = 32


def _in_chunks(module: StreamingModule, x: torch.Tensor, step: int) -> torch.Tensor:
    """module.model(x) for x [B, C, T], streamed over chunks of a multiple of `step` samples when offline."""
    chunk = step * max(1, OFFLINE_CHUNK_STEPS // max(1, x.shape[0]))
    length = x.shape[-1]
    if module.is_streaming or torch.is_grad_enabled() or length <= chunk or length % step:
        return _run(module.model, x)
    with module.streaming(x.shape[0]):
        return torch.cat([_run(module.model, piece) for piece in x.split(chunk, dim=-1)], dim=-1)


def _run(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """layers(x), except that an ELU right before a StreamingConv1d is handed to the conv, which fuses it
    into its input copy when training (see nn/gemm_conv.py): one pass and one activation tensor less."""
    pending: nn.ELU | None = None
    for layer in layers:
        if pending is not None:
            if isinstance(layer, StreamingConv1d):
                x, pending = layer(x, elu_alpha=pending.alpha), None
                continue
            x, pending = pending(x), None
        if type(layer) is nn.ELU and not layer.inplace:
            pending = layer
        else:
            x = layer(x)
    return x if pending is None else pending(x)


def _act(cfg: SeanetConfig) -> nn.Module:
    return getattr(nn, cfg.activation)(**cfg.activation_params)


class ResidualUnit(nn.Module):
    """x + conv_1(act(conv_k(act(x)))) with a hidden width of dim / compress."""

    def __init__(self, cfg: SeanetConfig, dim: int, dilation: int) -> None:
        super().__init__()
        if not cfg.true_skip:
            raise ValueError("only identity skips (true_skip=True) are supported")
        hidden = dim // cfg.compress
        self.block = nn.Sequential(
            _act(cfg),
            StreamingConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, pad_mode=cfg.pad_mode,
                            weight_norm=cfg.weight_norm),
            _act(cfg),
            StreamingConv1d(hidden, dim, 1, pad_mode=cfg.pad_mode, weight_norm=cfg.weight_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _run(self.block, x)


class SeanetEncoder(StreamingModule):
    """Waveform [B, channels, T] -> latent [B, dimension, T / hop_length].

    A StreamingModule only to stream its convs; it keeps no state of its own.
    """

    def __init__(self, cfg: SeanetConfig) -> None:
        super().__init__()
        width = cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, width, cfg.kernel_size, pad_mode=cfg.pad_mode,
                                                   weight_norm=cfg.weight_norm)]
        for ratio in reversed(cfg.ratios):
            layers += [ResidualUnit(cfg, width, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
            layers += [_act(cfg), StreamingConv1d(width, 2 * width, 2 * ratio, stride=ratio, pad_mode=cfg.pad_mode,
                                                  weight_norm=cfg.weight_norm)]
            width *= 2
        layers += [_act(cfg), StreamingConv1d(width, cfg.dimension, cfg.last_kernel_size, pad_mode=cfg.pad_mode,
                                              weight_norm=cfg.weight_norm)]
        self.model = nn.Sequential(*layers)
        self.hop_length = cfg.hop_length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_chunks(self, x, self.hop_length)


class SeanetDecoder(StreamingModule):
    """Latent [B, dimension, T] -> waveform [B, channels, T * hop_length]."""

    def __init__(self, cfg: SeanetConfig) -> None:
        super().__init__()
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, width, cfg.kernel_size, pad_mode=cfg.pad_mode,
                                                   weight_norm=cfg.weight_norm)]
        for ratio in cfg.ratios:
            layers += [_act(cfg), StreamingConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio,
                                                           weight_norm=cfg.weight_norm)]
            width //= 2
            layers += [ResidualUnit(cfg, width, cfg.dilation_base ** j) for j in range(cfg.n_residual_layers)]
        layers += [_act(cfg), StreamingConv1d(width, cfg.channels, cfg.last_kernel_size, pad_mode=cfg.pad_mode,
                                              weight_norm=cfg.weight_norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _in_chunks(self, z, 1)
