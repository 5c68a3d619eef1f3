"""Storage of streaming attention's keys and values: float (the model's dtype), bfloat16, int8 or int4.

int8 keeps one float32 scale per head and per step (each stored key or value vector of `head_dim` numbers is
scaled by its own largest magnitude / 127), so a vector's rounding never depends on other steps, batch items or
chunking. int4 does the same per group of 32 numbers of a vector (the whole vector if head_dim is not a multiple
of 32), values -7..7 packed two per byte, one bfloat16 scale (largest magnitude / 7) per group: 4.5 bits a
number instead of 8.25, for the tightest memory (Moshi 7B's full context: ~430 MiB instead of ~780), at a
larger rounding error (measured in benchmarks/bench_kv_cache.py).
`round_trip` applies the same rounding to the keys and values of an offline (non-streaming) call, so
that streamed == offline holds for every kind. Reading an int8 cache dequantizes into scratch buffers shared by
all layers of a thread (one [H, n, D] pair in the compute dtype, n <= 512: Attention reads long caches in chunks),
never into new memory per layer and step;
a bf16 cache is widened into them the same way (attention always runs in the model's dtype).
"""

from __future__ import annotations

import math
import threading

import torch

KV_CACHE_KINDS = ("float", "bf16", "int8", "int4")
INT4_GROUP = 32
_TINY = torch.finfo(torch.float32).tiny


def check_kv_cache(kind: str) -> str:
    if kind not in KV_CACHE_KINDS:
        raise ValueError(f"unknown KV cache kind {kind!r}; choose one of {', '.join(KV_CACHE_KINDS)}")
    return kind


def storage_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cache of `kind` holds for a model computing in `dtype`."""
    return {"float": dtype, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[kind]


def scale_dtype(kind: str) -> torch.dtype:
    """The dtype of a scaled kind's scales (int8, int4)."""
    return torch.bfloat16 if kind == "int4" else torch.float32


def stored_shapes(kind: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """(values, scales) shapes of a cache of `kind` holding vectors `shape` [..., D] (scales None: unscaled)."""
    *lead, d = shape
    if kind == "int8":
        return shape, (*lead, 1)
    if kind == "int4":
        if d % 2:
            raise ValueError(f"an int4 KV cache needs an even head dimension, got {d}")
        return (*lead, d // 2), (*lead, d // int4_group(d))
    return shape, None


def int4_group(d: int) -> int:
    return INT4_GROUP if d % INT4_GROUP == 0 else d


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 values [..., D], float32 scales [..., 1]) with x ~ values * scales, per vector."""
    x = x.float()
    scales = x.abs().amax(dim=-1, keepdim=True) / 127
    values = torch.round(x / scales.clamp_min(_TINY)).clamp_(-127, 127).to(torch.int8)
    return values, scales


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """values * scales into `out` (same shape as values): a copy then an in-place scaling, both vectorised."""
    return out.copy_(values).mul_(scales.to(out.dtype))


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 [..., D / 2]: values -7..7 + 8, element 2i in the low nibble, 2i + 1 in the high one;
    bfloat16 scales [..., D / group]) with x ~ (values - 8) * scale, per group of a vector."""
    d = x.shape[-1]
    groups = x.float().unflatten(-1, (d // int4_group(d), int4_group(d)))
    scales = (groups.abs().amax(dim=-1, keepdim=True) / 7).to(torch.bfloat16)  # rounded first, then used
    q = torch.round(groups / scales.float().clamp_min(_TINY)).clamp_(-7, 7).add_(8).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scales.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(values - 8) * scale into `out` [..., D] (D = 2 * packed's last size)."""
    pairs = out.unflatten(-1, (-1, 2))
    pairs[..., 0].copy_(packed & 15)
    pairs[..., 1].copy_(packed >> 4)
    groups = out.sub_(8).unflatten(-1, (scales.shape[-1], -1))
    groups.mul_(scales.unsqueeze(-1).to(out.dtype))
    return out


def encode(kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys or values x [..., D] as a cache of `kind` stores them: (values, scales or None)."""
    if kind == "int8":
        return quantize_int8(x)
    if kind == "int4":
        return quantize_int4(x)
    return x.to(storage_dtype(kind, x.dtype)), None


def decode(kind: str, values: torch.Tensor, scales: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """What `encode` stored, widened into `out` [..., D] (its dtype: the model's)."""
    if kind == "int8":
        return dequantize_int8(values, scales, out)
    if kind == "int4":
        return dequantize_int4(values, scales, out)
    return out.copy_(values)


def round_trip(kind: str, x: torch.Tensor) -> torch.Tensor:
    """x as a cache of `kind` gives it back (for offline calls): the same numbers a streamed call reads."""
    if kind == "float":
        return x
    return decode(kind, *encode(kind, x), torch.empty(x.shape, device=x.device, dtype=x.dtype))


_scratch = threading.local()


def scratch(which: int, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer of `shape` (grown when needed), one per thread, device, dtype and `which` (0 or 1)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (which, device, dtype)
    numel = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, device=device, dtype=dtype)
    return buffer[:numel].view(shape)
