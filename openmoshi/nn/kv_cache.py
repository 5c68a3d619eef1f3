"""Storage of streaming attention's keys and values: float (the model's dtype), bfloat16, or int8.

int8 keeps one float32 scale per head and per step (each stored key or value vector of `head_dim` numbers is
scaled by its own largest magnitude / 127), so a vector's rounding never depends on other steps, batch items or
chunking. `round_trip` applies the same rounding to the keys and values of an offline (non-streaming) call, so
that streamed == offline holds for every kind. Reading an int8 cache dequantizes into scratch buffers shared by
all layers of a thread (one [H, n, D] pair in the compute dtype), never into new memory per layer and step;
a bf16 cache is widened into them the same way (attention always runs in the model's dtype).
"""

from __future__ import annotations

import threading

import torch

KV_CACHE_KINDS = ("float", "bf16", "int8")
_TINY = torch.finfo(torch.float32).tiny


def check_kv_cache(kind: str) -> str:
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"unknown KV cache kind {kind!r}; choose one of {', '.join(KV_CACHE_KINDS)}")
    return kind


def storage_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache of `kind` holds for a model computing in `dtype`."""
    return {"float": dtype, "bf16": torch.bfloat16, "int8": torch.int8}[kind]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values [..., D], float32 scales [..., 1]) with x ~ values * scales, per vector."""
    x = x.float()
    scales = x.abs().amax(dim=-1, keepdim=True) / 127
    values = torch.round(x / scales.clamp_min(_TINY)).clamp_(-127, 127).to(torch.int8)
    return values, scales


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """values * scales into `out` (same shape as values): a copy then an in-place scaling, both vectorised."""
    return out.copy_(values).mul_(scales.to(out.dtype))


def round_trip(kind: str, x: torch.Tensor) -> torch.Tensor:
    """x as a cache of `kind` gives it back (for offline calls): the same numbers a streamed call reads."""
    if kind == "float":
        return x
    if kind == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    values, scales = quantize_int8(x)
    return dequantize_int8(values, scales, torch.empty(x.shape, device=x.device, dtype=x.dtype))


_scratch = threading.local()


def scratch(which: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer of `shape` (grown when needed), one per thread, device, dtype and `which` (0 or 1)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (which, device, dtype)
    numel = 1
    for n in shape:
        numel *= n
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, device=device, dtype=dtype)
    return buffer[:numel].view(shape)
