"""Codec training losses, each a small function, and EnCodec's gradient balancer.

Adversarial (hinge), averaged over the discriminator's scales:
    discriminator: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))
    generator:     -mean(D(x_hat))
Feature matching: L1 between the feature maps of x_hat and of x (detached), averaged over the maps of a
scale, then over scales. Reconstruction: waveform L1 and a multi-scale mel loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed


def hinge_discriminator(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    loss = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake))
    return loss / len(real)


def hinge_generator(fake: list[torch.Tensor]) -> torch.Tensor:
    return sum(-f.mean() for f in fake) / len(fake)


def feature_matching(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    total = 0.0
    for maps_r, maps_f in zip(real, fake):
        total = total + sum(F.l1_loss(f, r.detach()) for r, f in zip(maps_r, maps_f)) / len(maps_r)
    return total / len(real)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Slaney-style triangular mel filters (HTK mel scale), [n_mels, n_fft // 2 + 1]."""
    f_max = f_max or sample_rate / 2

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (bins[None] - lower) / (center - lower)
    down = (upper - bins[None]) / (upper - center)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    fb = fb * (2.0 / (upper - lower))  # equal area
    return fb.float()


class MelSpectrogram(nn.Module):
    """wav [B, 1, T] -> mel magnitudes [B, n_mels, frames] (Hann window n_fft, hop n_fft / 4)."""

    def __init__(self, n_fft: int, n_mels: int, sample_rate: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.reshape(-1, wav.shape[-1]).float()
        spec = torch.stft(x, self.n_fft, self.hop, self.n_fft, self.window, center=True, return_complex=True)
        return self.fb @ spec.abs()


class MultiScaleMelLoss(nn.Module):
    """Sum over n_fft = 2^6 .. 2^11 of L1 on mel magnitudes + L1 on log10 mel, averaged over scales."""

    def __init__(self, sample_rate: int, n_mels: int = 64, scales: tuple[int, ...] = (6, 7, 8, 9, 10, 11)) -> None:
        super().__init__()
        self.mels = nn.ModuleList(MelSpectrogram(2 ** s, min(n_mels, 2 ** s // 4), sample_rate) for s in scales)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for mel in self.mels:
            a, b = mel(x_hat), mel(x)
            total = total + F.l1_loss(a, b) + F.l1_loss(torch.log10(a.clamp_min(1e-5)), torch.log10(b.clamp_min(1e-5)))
        return total / len(self.mels)


class Balancer:
    """EnCodec's gradient balancer on the model output y_hat.

    For losses L_i with weights w_i, g_i = dL_i / dy_hat; the gradient sent back is
        G = sum_i total_norm * (w_i / sum_j w_j) * g_i / (EMA of ||g_i|| + eps)
    where ||g_i|| is the per-item norm averaged over the batch (and over processes), its EMA bias-corrected:
    ema_t = (sum_k beta^(t-k) n_k) / (sum_k beta^(t-k)). So each loss gets its share of the gradient whatever
    its scale. Losses not balanced (commitment, distillation) are backpropagated beside it.
    """

    def __init__(self, weights: dict[str, float], total_norm: float = 1.0, ema_decay: float = 0.999,
                 eps: float = 1e-12) -> None:
        self.weights = {k: w for k, w in weights.items() if w}
        self.total_norm, self.beta, self.eps = total_norm, ema_decay, eps
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def gradient(self, losses: dict[str, torch.Tensor], y_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The balanced gradient for y_hat, and each loss's gradient norm (for logging)."""
        names = [k for k in self.weights if k in losses]
        norms, per_loss = {}, {}
        for name in names:
            (g,) = torch.autograd.grad(losses[name], y_hat, retain_graph=True)
            per_loss[name] = g
            dims = tuple(range(1, g.dim()))
            norms[name] = float(g.norm(dim=dims).mean())
        norms = distributed.all_reduce_mean(norms, y_hat.device)
        total_w = sum(self.weights[k] for k in names)
        out = torch.zeros_like(y_hat)
        for name in names:
            self.sums[name] = self.sums.get(name, 0.0) * self.beta + norms[name]
            self.counts[name] = self.counts.get(name, 0.0) * self.beta + 1.0
            avg = self.sums[name] / self.counts[name]
            scale = self.total_norm * self.weights[name] / total_w / (avg + self.eps)
            out = out + per_loss[name] * scale
        return out, norms

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = dict(state.get("sums", {})), dict(state.get("counts", {}))
