"""Multi-scale STFT discriminator (EnCodec/audiocraft's MS-STFTD, as used to train Mimi).

Each scale looks at the complex STFT of the waveform (real and imaginary parts as 2 input channels,
normalized, Hann window of n_fft, hop n_fft / 4):

    wav [B, 1, T] -> STFT [B, 2, frames, n_fft/2+1] -> conv (3, 9) -> 3 x conv (3, 9) stride (1, 2) dilation
    (1|2|4, 1) -> conv (3, 3) -> conv (3, 3) to 1 channel = logits [B, 1, frames, bins']

LeakyReLU after every conv but the last; weight norm on every conv. Each scale returns its logits and the
feature maps after each activation (for feature matching).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrizations


@dataclass
class DiscriminatorConfig:
    filters: int = 32
    n_ffts: list[int] = field(default_factory=lambda: [1024, 2048, 512, 256, 128])
    hop_ratio: float = 0.25  # hop = n_fft * hop_ratio
    dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    kernel: list[int] = field(default_factory=lambda: [3, 9])  # (time, frequency)
    negative_slope: float = 0.3  # LeakyReLU

    def __post_init__(self) -> None:
        if self.filters < 1 or not self.n_ffts or min(self.n_ffts) < 8:
            raise ValueError("discriminator needs filters >= 1 and n_ffts of at least 8")


def _padding(kernel: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    return ((kernel[0] - 1) * dilation[0] // 2, (kernel[1] - 1) * dilation[1] // 2)


def _conv(cin: int, cout: int, kernel: tuple[int, int], stride=(1, 1), dilation=(1, 1)) -> nn.Module:
    return parametrizations.weight_norm(
        nn.Conv2d(cin, cout, kernel, stride=stride, dilation=dilation, padding=_padding(kernel, dilation)))


class STFTDiscriminator(nn.Module):
    """One scale: logits [B, 1, frames, bins'] and feature maps of the complex STFT of wav [B, 1, T]."""

    def __init__(self, cfg: DiscriminatorConfig, n_fft: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, max(1, int(n_fft * cfg.hop_ratio))
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        k = tuple(cfg.kernel)
        f = cfg.filters
        self.convs = nn.ModuleList([_conv(2, f, k)])
        for d in cfg.dilations:
            self.convs.append(_conv(f, f, k, stride=(1, 2), dilation=(d, 1)))
        self.convs.append(_conv(f, f, (3, 3)))
        self.post = _conv(f, 1, (3, 3))
        self.act = nn.LeakyReLU(cfg.negative_slope)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = wav.reshape(-1, wav.shape[-1]).float()
        spec = torch.stft(x, self.n_fft, self.hop, self.n_fft, self.window, center=False, normalized=True,
                          return_complex=True)  # [B, bins, frames]
        z = torch.stack([spec.real, spec.imag], dim=1).transpose(2, 3)  # [B, 2, frames, bins]
        feats = []
        for conv in self.convs:
            z = self.act(conv(z))
            feats.append(z)
        return self.post(z), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, cfg: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or DiscriminatorConfig()
        self.scales = nn.ModuleList(STFTDiscriminator(cfg, n) for n in cfg.n_ffts)

    def forward(self, wav: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """wav [B, 1, T] -> (logits per scale, feature maps per scale)."""
        logits, feats = [], []
        for scale in self.scales:
            lg, ft = scale(wav)
            logits.append(lg)
            feats.append(ft)
        return logits, feats
