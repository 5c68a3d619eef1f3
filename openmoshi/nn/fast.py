"""CPU inference fast paths for the few-vector matmuls of streaming (a few samples per call).

A streaming step multiplies large weights by a handful of vectors, so it is bound by how fast the weights
stream from memory. Measured on a 2-core Zen 4 (fp32, 2 threads, weights not in cache):

- MKL's sgemm reads a row-major weight [N, K] at close to memory bandwidth (~25 GB/s) when it is the left
  operand and the vectors the transposed right one, `W @ x.T`, for 2 vectors; `F.linear(x, W)` reaches
  5-10 GB/s on the same shapes, gemv ~10 GB/s, so a single vector was padded to two. Another 2-core EPYC VM
  (2026-12-03) showed the opposite: gemv 15 GB/s, the padded sgemm 6 GB/s at 1 thread (12 at 2). Which one
  a single vector takes is therefore measured once per process and thread count (`single_vector_kernel`).
- A weight with 2048+ columns streams at ~19 GB/s that way, at ~28 GB/s as a batch of 512-column blocks.
- From 3 vectors on, oneDNN's linear on a weight packed once for it stays near 20 GB/s where MKL drops to
  ~10 GB/s.
  These two keep a rearranged copy of the weight, so they only happen inside `packing()` (Mimi opts in:
  its weights are small; a 7B LM would double its memory).
- Convolutions over a few samples become one such matmul (im2col for conv, col2im for transposed conv),
  which also avoids the slow non-oneDNN kernels torch picks for them (a 1024 -> 512 transposed conv over
  2 steps: ~25 ms -> ~1.5 ms).

Every function computes the same thing as its torch counterpart (up to float rounding: other summation
orders) and falls back to it when the inputs are not CPU float32, when autograd is recording, or when the
input is long (the stock kernels are then as fast and need no im2col copy). `set_enabled(False)` or the
environment variable OPENMOSHI_FAST=0 turns the fast paths off, e.g. to compare.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import typing as tp

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import rope

logger = logging.getLogger(__name__)

# Matmuls with at most this many vectors take the `W @ x.T` path when weights are not packed.
MAX_ROWS = 16
# With packed weights: linears up to this many rows (offline chunks of the 25 Hz transformer) and convs up
# to this many output samples x batch. Longer convs are compute-bound, where oneDNN's own conv is faster
# than an im2col copy plus a matmul.
MAX_PACKED_ROWS = 1024
MAX_PACKED_CONV_ROWS = 64
_PACK_HINT = 8  # batch size oneDNN tunes the packed layout for; measured fine from 3 to 500 rows
_K_BLOCK = 512  # column block of weights with 2048+ columns, read as a batch of [N, 512] matrices

_enabled = os.environ.get("OPENMOSHI_FAST", "1").lower() not in ("0", "false", "no", "off")
_packing_works = True  # cleared, with a log line, if this torch build lacks the oneDNN ops
_local = threading.local()
_derived: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> {"version": int | None, kind: tensor}
_single_vector: dict[int, str] = {}  # thread count -> "pad" (sgemm on the vector twice) or "gemv"
_single_vector_forced = os.environ.get("OPENMOSHI_FAST_GEMV", "").lower()  # "pad" / "gemv" skip the measurement


def set_enabled(enabled: bool) -> None:
    """Turn the fast paths on or off for the whole process."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def packing(enabled: bool = True) -> tp.Iterator[None]:
    """Within this block (this thread), matmuls may keep a rearranged copy of their weight and reuse it.

    oneDNN-packed weights for 3+ vectors, column blocks of wide weights for 1-2 vectors.
    """
    previous = getattr(_local, "packing", False)
    _local.packing = enabled
    try:
        yield
    finally:
        _local.packing = previous


def _packing_active() -> bool:
    return _packing_works and getattr(_local, "packing", False)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the fast paths apply: CPU float32 inference (no autograd graph to build)."""
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def clear_cache() -> None:
    """Forget every packed or rearranged weight copy (they are rebuilt on next use).

    Copies follow in-place edits of normal tensors through their version counter; inference tensors
    (weights created under torch.inference_mode) have none, so whoever edits those in place calls this.
    """
    _derived.clear()


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _cached(weight: torch.Tensor, kind: str, make: tp.Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`make(weight)`, kept until the weight is freed, replaced or edited in place."""
    entry = _derived.get(weight)
    version = _version(weight)
    if entry is None or entry["version"] != version:
        entry = {"version": version}
        _derived[weight] = entry
    if kind not in entry:
        with torch.no_grad():
            entry[kind] = make(weight)
    return entry[kind]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_HINT)


def single_vector_kernel() -> str:
    """"pad" or "gemv": whichever reads a weight faster for one vector here, timed once per thread count on
    64 MB of weights (twice a large L3). OPENMOSHI_FAST_GEMV=pad|gemv forces one."""
    if _single_vector_forced in ("pad", "gemv"):
        return _single_vector_forced
    threads = torch.get_num_threads()
    if threads not in _single_vector:
        weights = [torch.full((2048, 2048), 0.5 + i) for i in range(4)]
        x = torch.ones(1, 2048)
        x2 = x.expand(2, -1).contiguous()
        times: dict[str, list[float]] = {"pad": [], "gemv": []}
        with torch.no_grad():
            for _ in range(4):  # alternating rounds; the second best of each counts
                for kind, samples in times.items():
                    start = time.perf_counter()
                    for w in weights:
                        w @ x2.T if kind == "pad" else torch.mv(w, x[0])
                    samples.append(time.perf_counter() - start)
        _single_vector[threads] = min(times, key=lambda k: sorted(times[k])[1])
        logger.info("one-vector matmuls at %d thread(s): %s (pad %.1f ms, gemv %.1f ms per 64 MB)", threads,
                    _single_vector[threads], *(1e3 * sorted(times[k])[1] for k in ("pad", "gemv")))
    return _single_vector[threads]


def rows_times_weight(rows: torch.Tensor, weight: torch.Tensor,
                      source: torch.Tensor | None = None, kind: str = "packed") -> torch.Tensor:
    """rows [M, K] @ weight [N, K].T -> [M, N] (not always contiguous), reading the weight once.

    `source`/`kind` name the cache entry of the packed weight when `weight` is itself derived from a
    parameter (the cache is keyed by the parameter, which lives as long as the model).
    """
    m = rows.shape[0]
    if m == 1 and single_vector_kernel() == "gemv" and not _packing_active():
        return torch.mv(weight, rows[0])[None]
    if m <= 2:
        rows = rows.contiguous() if m == 2 else rows.expand(2, -1).contiguous()
        n, k = weight.shape
        if k >= 4 * _K_BLOCK and k % _K_BLOCK == 0 and _packing_active():
            # MKL reads a weight with 2048+ columns at ~19 GB/s, as K/512 blocks of 512 at ~28 GB/s.
            blocks = _cached(source if source is not None else weight, kind + "_kblocks",
                             lambda _: weight.reshape(n, -1, _K_BLOCK).transpose(0, 1).contiguous())
            out = torch.bmm(blocks, rows.view(2, k // _K_BLOCK, _K_BLOCK).permute(1, 2, 0)).sum(0)
        else:
            out = weight @ rows.T
        return out[:, :m].T
    global _packing_works
    if _packing_active():
        try:
            packed = _cached(weight if source is None else source, kind, lambda _: _pack(weight))
            return torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")
        except (RuntimeError, AttributeError) as exc:  # a torch build without these oneDNN ops
            _packing_works = False
            logger.info("oneDNN weight packing unavailable (%s); using plain matmuls", exc)
    if m <= MAX_ROWS:
        return (weight @ rows.contiguous().T).T
    return F.linear(rows, weight)


def max_rows(conv: bool = False) -> int:
    """Longest input (in matmul rows) the fast paths take now."""
    if not _packing_active():
        return MAX_ROWS
    return MAX_PACKED_CONV_ROWS if conv else MAX_PACKED_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           contiguous: bool = True) -> torch.Tensor:
    """F.linear: x [..., K], weight [N, K] -> [..., N].

    contiguous=False may return a strided view (saves a copy when the next op is elementwise).
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= max_rows() or not usable(x, weight):
        return F.linear(x, weight, bias)
    out = rows_times_weight(x.reshape(rows, x.shape[-1]), weight)
    if bias is not None:
        out = out + bias
    elif contiguous:
        out = out.contiguous()
    return out.unflatten(0, x.shape[:-1])


def linear_module(module: torch.nn.Module, x: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
    """module(x) for an nn.Linear, through `linear`; other modules (wrappers, adapters) are called as is."""
    if type(module) is torch.nn.Linear:
        return linear(x, module.weight, module.bias, contiguous)
    return module(x)


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           dilation: int = 1, groups: int = 1) -> torch.Tensor:
    """F.conv1d without padding: x [B, C_in, T], weight [C_out, C_in, K] -> [B, C_out, T_out]."""
    batch, c_in, length = x.shape
    c_out, _, kernel = weight.shape
    span = (kernel - 1) * dilation + 1
    frames = (length - span) // stride + 1 if length >= span else 0
    if groups != 1 or not 0 < batch * frames <= max_rows(conv=True) or not usable(x, weight):
        return F.conv1d(x, weight, bias, stride, 0, dilation, groups)
    if kernel == 1:
        windows = x[..., ::stride].transpose(1, 2)  # [B, T_out, C_in]
    else:
        windows = x.unfold(2, span, stride)  # [B, C_in, T_out, span]
        if dilation > 1:
            windows = windows[..., ::dilation]
        windows = windows.transpose(1, 2)  # [B, T_out, C_in, K]
    rows = windows.reshape(batch * frames, c_in * kernel)
    out = rows_times_weight(rows, weight.view(c_out, c_in * kernel), weight)  # [B * T_out, C_out]
    out = out.view(batch, frames, c_out).transpose(1, 2)
    if bias is not None:
        out = out + bias[:, None]
    return out.contiguous()


def _columns_weight(weight: torch.Tensor) -> torch.Tensor:
    c_in, c_out, kernel = weight.shape
    return weight.reshape(c_in, c_out * kernel).T.contiguous()  # [C_out * K, C_in]


def conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     stride: int = 1, groups: int = 1) -> torch.Tensor:
    """F.conv_transpose1d without padding: x [B, C_in, T], weight [C_in, C_out, K] -> [B, C_out, L].

    L = (T - 1) * stride + K. Computed as columns [B * T, C_out * K] = x W, then overlap-added (col2im).
    """
    batch, c_in, frames = x.shape
    _, c_out, kernel = weight.shape
    if groups != 1 or not 0 < batch * frames <= max_rows(conv=True) or not usable(x, weight):
        return F.conv_transpose1d(x, weight, bias, stride, groups=groups)
    rows = x.transpose(1, 2).reshape(batch * frames, c_in)
    columns = _cached(weight, "columns", _columns_weight)
    cols = rows_times_weight(rows, columns, weight, "columns_packed")  # [B * T, C_out * K]
    cols = cols.view(batch, frames, c_out * kernel).transpose(1, 2)
    length = (frames - 1) * stride + kernel
    out = F.fold(cols, (1, length), (1, kernel), stride=(1, stride)).view(batch, c_out, length)
    if bias is not None:
        out = out + bias[:, None]
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rope.apply_rope as one complex multiply (bit-identical in float32): x [..., D], tables [..., D / 2]."""
    pairable = x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1])
    if not pairable or not usable(x, cos):
        return rope.apply_rope(x, cos, sin)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)

