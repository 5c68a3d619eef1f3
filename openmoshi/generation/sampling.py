"""Token sampling from logits: greedy, temperature, top-k and top-p, with no host synchronisation.

Draws are made by an exponential race: with E_i ~ Exp(1) i.i.d., argmax_i p_i / E_i is distributed as
Categorical(p). Unlike `torch.multinomial` this never waits on the device, and it consumes the random stream
exactly like Kyutai's sampler, so the same seed gives the same tokens as the reference implementation.
"""

from __future__ import annotations

import torch

from openmoshi.errors import ConfigError


def _race(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One categorical draw per row of `probs` [..., V] (unnormalised is fine); returns long [..., 1]."""
    flat = probs.reshape(-1, probs.shape[-1])
    noise = torch.empty_like(flat).exponential_(1, generator=generator)
    choice = (flat / noise).argmax(dim=-1, keepdim=True)
    return choice.reshape(*probs.shape[:-1], 1)


def _sample_top_k(probs: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    top_probs, top_index = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return top_index.gather(-1, _race(top_probs, generator))


def _sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    sorted_probs, sorted_index = torch.sort(probs, dim=-1, descending=True)
    # Keep a token while the mass strictly before it is <= p: the most likely token always survives.
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs * (~(mass_before > p)).float()
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return sorted_index.gather(-1, _race(sorted_probs, generator))


def sample_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Samples one token per position from `logits` [..., V]; returns long [...].

    temperature <= 0 is greedy (argmax). Otherwise tokens are drawn from softmax(logits / temperature),
    restricted to the nucleus of mass `top_p` when top_p > 0, else to the `top_k` most likely tokens when
    top_k > 0, else unrestricted. As in Kyutai's sampler, top_p takes precedence and top_k is then ignored.
    Pass float32 logits for draws identical to the reference; half-precision logits are upcast.
    """
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}.")
    if top_p < 0:
        raise ConfigError(f"top_p must be >= 0 (0 = off), got {top_p}.")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p > 0:
        token = _sample_top_p(probs, top_p, generator)
    elif top_k > 0:
        token = _sample_top_k(probs, top_k, generator)
    else:
        token = _race(probs, generator)
    return token[..., 0]
