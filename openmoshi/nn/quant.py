"""Weight-only int8 / int4 linear layers, run by torch's packed integer matmul kernels.

Formats (what a checkpoint stores, per linear weight W [N, K]):

- int8, per output channel, Kyutai's (bitsandbytes) layout: `weight` int8 [N, K] and `weight_scb` float32 [N],
  the absolute maximum of each row: W ~ weight * weight_scb / 127.
- int4, groups of `group_size` (32) input columns: `weight` uint8 [N, K / 2] (column 2j in the high nibble,
  2j + 1 in the low one), q in 0..15, and per group, bfloat16 [N, K / group_size]:
  - symmetric (the default, 4.5 bits per weight): `weight_scale` only, W ~ (q - 8) * scale. The scale is the
    group's value of largest magnitude over -8 (signed), so that value is exact and all 16 levels are used.
  - asymmetric (5 bits per weight): `weight_scale` and `weight_zero`, W ~ (q - 8) * scale + zero (torch's int4
    kernels' convention: they take [G, N, 2] scales and zeros; a symmetric layer hands them zeros built per
    call in a reused buffer, so only its scales stay resident).

Why bfloat16 activations: on CPU, torch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are fast only
with bfloat16 inputs (4096 x 4096, 1 vector, 2 Zen 4 threads: 1.5 ms int8 and 1.9 ms int4 in bfloat16, 15 ms
and 27 ms in float32, against 5.5 ms for the float32 matmul). Scales and zeros are rounded to bfloat16 at
quantization time, so the kernel applies exactly the stored ones. Inputs with many rows (prefill, offline
chunks, training) are compute-bound: there the weight is dequantized once per call and multiplied in the
input's dtype, which is then faster than the per-row kernels.

Stacked per-step weights (the depth transformer's `in_proj` / `out_proj`, [n * N, K]) quantize row-wise,
so each step's block is a slice of the same buffers.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import typing as tp

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

BITS = (8, 4)
INT4_GROUP = 32
# Matmul rows up to which the integer kernels run (their time grows with each row; past this many rows a
# dequantized weight and one float matmul is faster, measured on a 2-core Zen 4).
MAX_KERNEL_ROWS = 16
_INT4_INNER_K_TILES = 8  # CUDA tinygemm layout
INT4_SCHEMES = ("symmetric", "asymmetric")


def int4_stored(symmetric: bool) -> tuple[str, ...]:
    """The buffers an int4 layer stores (and a checkpoint holds per weight)."""
    return ("weight", "weight_scale") if symmetric else ("weight", "weight_scale", "weight_zero")


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bfloat16 value, kept in float32."""
    return x.to(torch.bfloat16).float()


def check_bits(bits: int) -> int:
    from ..errors import ConfigError
    if bits not in BITS:
        raise ConfigError(f"unsupported quantization bit width {bits!r}: choose 8 (int8) or 4 (int4)")
    return bits


def quantizable(weight_shape: tuple[int, ...], bits: int, group_size: int = INT4_GROUP) -> bool:
    """Whether a [N, K] weight fits the kernels: K a multiple of 8 (int8) or of the group size, N of 16 (int4)."""
    n, k = weight_shape
    if bits == 8:
        return k % 8 == 0 and k >= 8
    return k % group_size == 0 and k % 2 == 0 and n % 16 == 0


# ---- quantize / dequantize (reference math, also used to build checkpoints)

@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q int8 [N, K], scb float32 [N]); scb / 127 is a bfloat16 value, q in -127..127."""
    w = weight.float()
    scale = _bf16((w.abs().amax(dim=1) / 127).clamp(min=1e-8))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale * 127


def int8_scale(scb: torch.Tensor) -> torch.Tensor:
    """Per-row multiplier of an int8 weight from its stored absolute maxima."""
    return scb.float() / 127


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * int8_scale(scb)[:, None]).to(dtype)


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, K / 2], scale bfloat16 [N, G], zero bfloat16 [N, G]), G = K / group_size."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = _bf16(((high - low) / 15).clamp(min=1e-8))
    zero = _bf16(low + 8 * scale)
    q = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).view(n, k)
    return pack_int4(q), scale.to(torch.bfloat16), zero.to(torch.bfloat16)


@torch.no_grad()
def quantize_int4_symmetric(weight: torch.Tensor, group_size: int = INT4_GROUP
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, K / 2], scale bfloat16 [N, G]): scale = m / -8 for m the group's value of
    largest magnitude (so m -> q = 0 exactly; a value of -m would need 16 and is clipped to 15)."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    scale = _bf16(extreme / -8)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: any scale, q = 8
    q = torch.round(w / scale[..., None] + 8).clamp(0, 15).to(torch.uint8).view(n, k)
    return pack_int4(q), scale.to(torch.bfloat16)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [N, K] -> uint8 [N, K / 2], even columns in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> values 0..15 uint8 [N, K]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q - 8) * scale (+ zero: None for the symmetric format) -> [N, K]."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = scale.shape[1]
    w = (q.view(n, groups, -1) - 8) * scale.float()[..., None]
    if zero is not None:
        w = w + zero.float()[..., None]
    return w.view(n, k).to(dtype)


_scratch = threading.local()


def _with_zeros(scales: torch.Tensor) -> torch.Tensor:
    """Scales bfloat16 [G, N] -> [G, N, 2] scales and zeros for torch's CPU int4 kernel, in a buffer reused by
    every symmetric layer of this thread. Little-endian: each (scale, 0) pair is the 32-bit word of the
    scale's 16 bits, widened by numpy in one pass on this thread (torch's strided or parallel copies cost
    several ms per layer when the cores are contended)."""
    g, n = scales.shape
    if sys.byteorder != "little":
        out = torch.zeros(g, n, 2, dtype=scales.dtype)
        out[..., 0] = scales
        return out
    buf = getattr(_scratch, "words", None)
    if buf is None or buf.size < g * n:
        buf = _scratch.words = np.zeros(g * n, dtype=np.uint32)
    words = buf[:g * n]
    np.copyto(words, scales.view(torch.uint16).numpy().reshape(-1))
    return torch.from_numpy(words).view(torch.bfloat16).view(g, n, 2)


# ---- kernels

def _to_cpu_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """Values 0..15 [N, K] -> torch's CPU int4 kernel layout (as this module models it): uint8 [N, K / 2],
    blocks of `block` rows stored column by column, row i of a block in the low nibble, row i + block / 2 in
    the high one."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n // block, 2, block // 2, k).permute(0, 3, 1, 2)  # [blocks, K, 2, block / 2]
    return ((v[:, :, 1] << 4) | v[:, :, 0]).reshape(n, k // 2)


def _from_cpu_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of _to_cpu_int4, to the stored layout (pack_int4)."""
    n, half = packed.shape
    v = packed.view(n // block, 2 * half, block // 2)
    q = torch.stack([v & 15, v >> 4], dim=2)  # [blocks, K, 2, block / 2]
    return pack_int4(q.permute(0, 2, 3, 1).reshape(n, 2 * half))


@functools.cache
def cpu_int4_block() -> int | None:
    """Rows per block of torch's CPU int4 weight layout, found by packing a probe with torch's converter.

    None when no block size reproduces it (another torch): int4 layers then keep their stored weights beside
    the kernel's copy instead of holding only the kernel's.
    """
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    return next((b for b in (64, 32, 16) if torch.equal(_to_cpu_int4(q, b), packed)), None)


class _Kernel:
    """One weight block ready for torch's packed matmul on one device: x [M, K] -> [M, N] (x.dtype).

    `exact_inverse`: the CPU int4 layout was built by _to_cpu_int4 (which matched torch's converter), so
    `stored()` can give the stored tensors back and the layer may drop its own copy (half the weight memory).
    int4 `zero` None: the symmetric format; on CPU only its scales [G, N] are kept (zeros added per call).
    """

    def __init__(self, bits: int, group_size: int, weight: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor | None) -> None:
        self.bits, self.group_size = bits, group_size
        self.device = weight.device
        self.compute_dtype = torch.bfloat16  # the dtype the kernels are fast in (CPU) or need (CUDA int4)
        self.exact_inverse = False
        self.symmetric = bits == 4 and zero is None
        # torch's AVX-512 int8 CPU kernel segfaults on rows whose length is not a multiple of 32 (torch 2.13, seen
        # at K = 24 and 88 with batches of 2 and 4): such (small) layers keep their weight widened, [K, N]
        self.int8_kernel = bits == 8 and (self.device.type != "cpu" or weight.shape[-1] % 32 == 0)
        with torch.no_grad():
            if bits == 8:
                self.weight = weight.contiguous() if self.int8_kernel else \
                    weight.to(self.compute_dtype).t().contiguous()
                self.scales = int8_scale(scale).to(self.compute_dtype).contiguous()
            else:
                if self.symmetric and self.device.type == "cpu":
                    self.scales = scale.transpose(0, 1).to(self.compute_dtype).contiguous()  # [G, N]
                else:
                    zeros = torch.zeros_like(scale) if zero is None else zero
                    self.scales = torch.stack([scale.float(), zeros.float()], dim=-1).transpose(0, 1).to(
                        self.compute_dtype).contiguous()  # [G, N, 2]
                if self.device.type == "cuda":
                    self.weight = torch._convert_weight_to_int4pack(weight.contiguous(), _INT4_INNER_K_TILES)
                else:
                    self.weight = self._cpu_int4(weight)

    def _cpu_int4(self, weight: torch.Tensor) -> torch.Tensor:
        """torch's CPU layout, built here in uint8 a few row blocks at a time (no int32 copy of the whole
        weight); the first block is checked against torch's own converter."""
        block = cpu_int4_block()
        n, half = weight.shape
        if block is None or n % block:
            return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(weight).to(torch.int32), 1)
        out = torch.empty_like(weight)
        step = max(block, (1 << 22) // half // block * block)
        for r in range(0, n, step):
            out[r:r + step] = _to_cpu_int4(unpack_int4(weight[r:r + step]), block)
        first = weight[:block]
        if not torch.equal(out[:block], torch._convert_weight_to_int4pack_for_cpu(
                unpack_int4(first).to(torch.int32), 1)):
            return torch._convert_weight_to_int4pack_for_cpu(unpack_int4(weight).to(torch.int32), 1)
        self.block, self.exact_inverse = block, True
        return out

    def stored(self) -> tuple[torch.Tensor, ...]:
        """(packed weight, scale[, zero]) in the stored layout (int4_stored), rebuilt from the kernel's copy."""
        assert self.exact_inverse
        weight = _from_cpu_int4(self.weight, self.block)
        if self.symmetric:
            return weight, self.scales.transpose(0, 1).contiguous()
        scale, zero = self.scales.transpose(0, 1).unbind(-1)
        return weight, scale.contiguous(), zero.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype).contiguous()
        if self.int8_kernel:
            out = torch._weight_int8pack_mm(xc, self.weight, self.scales)
        elif self.bits == 8:
            out = (xc @ self.weight) * self.scales
        elif self.device.type == "cuda":
            out = torch._weight_int4pack_mm(xc, self.weight, self.group_size, self.scales)
        else:
            scales = _with_zeros(self.scales) if self.symmetric else self.scales
            out = torch._weight_int4pack_mm_for_cpu(xc, self.weight, self.group_size, scales)
        return out.to(x.dtype)


class QuantizedLinear(nn.Module):
    """Bias-optional linear layer with int8 or int4 weights; `n` > 1 stacks per-step weights [n * N, K].

    forward(x [..., K]) -> [..., N] for n == 1; forward(x [B, T, K], indices) uses weight set indices[t] at
    step t (the StackedLinear interface of nn/transformer.py).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = INT4_GROUP,
                 bias: bool = False, n: int = 1, device: torch.device | str | None = None,
                 symmetric: bool = True) -> None:
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.bits, self.group_size = bits, group_size
        self.symmetric = bits == 4 and symmetric  # int4: scales only (4.5 bits / weight) or scales and zeros
        rows = n * out_features
        if bits == 8:
            self.register_buffer("weight", torch.zeros(rows, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scb", torch.ones(rows, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("weight", torch.zeros(rows, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=torch.bfloat16, device=device))
            if not self.symmetric:
                self.register_buffer("weight_zero", torch.zeros(rows, groups, dtype=torch.bfloat16,
                                                                device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        # follows the model's float dtype and device (model.to(...)): the dtype of the activations
        self.register_buffer("activation_like", torch.empty(0, device=device), persistent=False)
        self._kernels: list[_Kernel] | None = None
        self._kernel_only = False  # int4 on CPU: the kernels hold the only copy of the weights

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, bias: torch.Tensor | None = None, n: int = 1,
                    group_size: int = INT4_GROUP, symmetric: bool = True) -> QuantizedLinear:
        rows, in_features = weight.shape
        module = cls(in_features, rows // n, bits, group_size, bias is not None, n, device="meta",
                     symmetric=symmetric)
        if bits == 8:
            q, scb = quantize_int8(weight)
            module.weight, module.weight_scb = q, scb
        elif module.symmetric:
            module.weight, module.weight_scale = quantize_int4_symmetric(weight, group_size)
        else:
            packed, scale, zero = quantize_int4(weight, group_size)
            module.weight, module.weight_scale, module.weight_zero = packed, scale, zero
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        module.activation_like = torch.empty(0, dtype=weight.dtype)
        return module

    def extra_repr(self) -> str:
        group = (f", group_size={self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"
                 if self.bits == 4 else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"
                + (f", n={self.n}" if self.n > 1 else ""))

    def stored_names(self) -> tuple[str, ...]:
        return ("weight", "weight_scb") if self.bits == 8 else int4_stored(self.symmetric)

    # ---- int4 on CPU: once the kernels are built, their copy (another layout of the same bytes) is the only
    # one kept; the stored tensors are rebuilt from it, exactly, whenever they are asked for.

    def __getattr__(self, name: str) -> tp.Any:
        if self.__dict__.get("_kernel_only") and name in self.stored_names():
            return self._stored_from_kernels()[self.stored_names().index(name)]
        return super().__getattr__(name)

    def _stored_from_kernels(self) -> tuple[torch.Tensor, ...]:
        assert self._kernels is not None
        parts = [kernel.stored() for kernel in self._kernels]
        return tuple(torch.cat(tensors) if len(tensors) > 1 else tensors[0] for tensors in zip(*parts))

    def _restore_stored(self) -> None:
        if self._kernel_only:
            for name, tensor in zip(self.stored_names(), self._stored_from_kernels()):
                self._buffers[name] = tensor
            self._kernel_only = False
        self._kernels = None

    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel_only:
            for name, tensor in zip(self.stored_names(), self._stored_from_kernels()):
                destination[prefix + name] = tensor

    def _load_from_state_dict(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        self._restore_stored()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .float(): keep integer data, rebuild kernels
        self._restore_stored()
        return super()._apply(fn, recurse)

    def _block(self, i: int) -> tuple[torch.Tensor, ...]:
        if self._kernel_only:
            stored = self.kernels()[i].stored()
            return stored if len(stored) == 3 else (*stored, None)
        rows = slice(i * self.out_features, (i + 1) * self.out_features)
        if self.bits == 8:
            return self.weight[rows], self.weight_scb[rows], None
        return self.weight[rows], self.weight_scale[rows], None if self.symmetric else self.weight_zero[rows]

    def kernels(self) -> list[_Kernel]:
        if self._kernels is None or self._kernels[0].device != self.activation_like.device:
            self._restore_stored()
            self._kernels = [_Kernel(self.bits, self.group_size, *self._block(i)) for i in range(self.n)]
            if self.bits == 4 and all(kernel.exact_inverse for kernel in self._kernels):
                for name in self.stored_names():
                    del self._buffers[name]
                self._kernel_only = True
        return self._kernels

    def dequantized(self, i: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] of block i (for long inputs and for tests)."""
        q, scale, zero = self._block(i)
        if self.bits == 8:
            return dequantize_int8(q, scale, dtype)
        return dequantize_int4(q, scale, zero, dtype)

    def _matmul(self, x: torch.Tensor, i: int) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 0 < rows <= MAX_KERNEL_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
            out = self.kernels()[i](x.reshape(rows, self.in_features)).unflatten(0, x.shape[:-1])
        else:
            out = F.linear(x, self.dequantized(i, x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def forward(self, x: torch.Tensor, indices: list[int] | None = None) -> torch.Tensor:
        if self.n == 1 or indices is None:
            return self._matmul(x, 0)
        if len(indices) == 1:
            return self._matmul(x, indices[0])
        return torch.cat([self._matmul(x[:, t:t + 1], i) for t, i in enumerate(indices)], dim=1)

    def float_like(self) -> torch.Tensor:
        """A tensor on this layer's device in the float dtype of its activations."""
        return self.activation_like

    def memory_bytes(self) -> int:
        held = list(self.buffers())
        if self._kernel_only:
            held += [t for kernel in self.kernels() for t in (kernel.weight, kernel.scales)]
        return sum(t.numel() * t.element_size() for t in held)


def _quantized(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool,
               bias: torch.Tensor | None = None, n: int = 1) -> QuantizedLinear:
    if weight.is_meta:  # structure only: a checkpoint of quantized tensors will be assigned into it
        rows, in_features = weight.shape
        return QuantizedLinear(in_features, rows // n, bits, group_size, bias is not None, n, device="meta",
                               symmetric=symmetric)
    module = QuantizedLinear.from_weight(weight, bits, bias, n, group_size, symmetric)
    return module.to(weight.device)


@torch.no_grad()
def quantize_modules_(root: nn.Module, bits: int, group_size: int = INT4_GROUP,
                      skip: tp.Callable[[str], bool] | None = None, symmetric: bool = True) -> list[str]:
    """Replace, in place, every linear weight under `root` by an int8 / int4 one; returns their names.

    Covers nn.Linear, the transformers' stacked per-step `out_proj` (StackedLinear) and `in_proj_weight`.
    Weights whose shape the kernels cannot take stay float (logged). `skip(name)` keeps a layer float.
    On the meta device only the structure changes (to load a quantized checkpoint into). `symmetric`: the int4
    format (module docstring).
    """
    from .transformer import Attention, StackedLinear
    check_bits(bits)
    done: list[str] = []

    def fits(name: str, shape: tuple[int, ...]) -> bool:
        if skip is not None and skip(name):
            return False
        if not quantizable(tuple(shape), bits, group_size):
            logger.debug("%s %s stays float: the int%d kernels do not take this shape", name, tuple(shape), bits)
            return False
        return True

    for prefix, module in list(root.named_modules()):
        dot = prefix + "." if prefix else ""
        for child_name, child in list(module.named_children()):
            name = dot + child_name
            if type(child) is nn.Linear and fits(name, child.weight.shape):
                setattr(module, child_name, _quantized(child.weight, bits, group_size, symmetric, child.bias))
                done.append(name)
            elif type(child) is StackedLinear and fits(name, child.weight.shape):
                setattr(module, child_name, _quantized(child.weight, bits, group_size, symmetric, n=child.n))
                done.append(name)
        if isinstance(module, Attention) and module.in_proj is None and fits(dot + "in_proj",
                                                                              module.in_proj_weight.shape):
            weight = module.in_proj_weight
            del module.in_proj_weight
            module.in_proj = _quantized(weight, bits, group_size, symmetric, n=module.cfg.num_weight_sets)
            done.append(dot + "in_proj")
    return done
