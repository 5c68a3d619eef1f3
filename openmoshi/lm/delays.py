"""The acoustic delay pattern: streams are shifted right by their delay before the temporal transformer.

With Moshi's delays (text 0, semantic 0, acoustic 1), codes of frame t land at model position t + delay:

    position s            0      1      2      3   ...
    text      (delay 0)   x0     x1     x2     x3
    semantic  (delay 0)   a0     a1     a2     a3
    acoustic  (delay 1)   BOS    b0     b1     b2      (BOS = the initial token, filling the first `delay` steps)

Step s of the model is fed position s - 1 (all initial tokens at s = 0) and predicts position s, so the
acoustic codes of frame s - 1 are sampled knowing its semantic code. Undelaying shifts each stream back;
the last `delay` steps of a delayed stream have no prediction (NaN, masked out).
"""

from __future__ import annotations

import torch


def delay_codes(codes: torch.Tensor, delays: list[int], initial: torch.Tensor) -> torch.Tensor:
    """Shift stream k of codes [B, K, T] right by delays[k], filling with initial [B, K, 1] -> [B, K, T]."""
    B, _, T = codes.shape
    out = []
    for k, delay in enumerate(delays):
        line = codes[:, k]
        if delay > 0:
            pad = initial[:, k].expand(B, min(delay, T))
            line = torch.cat([pad, line[:, : T - delay]], dim=1)[:, :T]
        out.append(line)
    return torch.stack(out, dim=1)


def undelay(values: torch.Tensor, delays: list[int], fill_value: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift stream k of values [B, K, T, ...] left by delays[k].

    Returns the shifted values (the last delays[k] steps set to `fill_value`) and a mask [B, K, T] that is
    False there.
    """
    B, K, T = values.shape[:3]
    mask = torch.ones(B, K, T, dtype=torch.bool, device=values.device)
    if not any(delays):
        return values, mask
    out = []
    for k, delay in enumerate(delays):
        line = values[:, k]
        if delay > 0:
            pad = torch.full_like(line[:, : min(delay, T)], fill_value)
            line = torch.cat([line[:, delay:], pad], dim=1)
            mask[:, k, max(T - delay, 0):] = False
        out.append(line)
    return torch.stack(out, dim=1), mask
