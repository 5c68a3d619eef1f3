"""Rotary position embedding with interleaved (real, imaginary) pairs, computed in float32."""

from __future__ import annotations

import math

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions [B, T] -> two float32 tensors [B, 1, T, head_dim / 2].

    Computed once per transformer call and shared by every layer.
    """
    half = head_dim // 2
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32)
                      * (-math.log(max_period) * 2 / head_dim))
    angles = positions.float()[:, None, :, None] * freqs
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] where (x[2i], x[2i+1]) are the real and imaginary parts of pair i."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
