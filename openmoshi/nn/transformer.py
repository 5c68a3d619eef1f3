"""Causal transformer with RoPE, optional gated MLP, per-step weights and a preallocated KV cache.

One implementation serves Mimi's transformers (LayerNorm, GELU MLP, LayerScale), Helium (RMSNorm in float32,
gated SiLU) and the depth transformer (separate weights for each codebook step). Parameter names follow
Kyutai's checkpoints: `self_attn.in_proj_weight` and `self_attn.out_proj.weight` hold the weights of every
step stacked along the output dimension.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from . import fast
from .kv_cache import (
    check_kv_cache,
    decode,
    encode,
    round_trip,
    scale_dtype,
    scratch,
    storage_dtype,
    stored_shapes,
)
from .rope import rope_tables
from .streaming import StreamingModule, StreamingState, masked_fill_

# Extra KV-cache slots beyond the attention context, so a streaming call of up to this many steps never
# overwrites keys that its own first queries still attend to (streamed == offline for any chunking).
CACHE_RESERVE = 32
READ_CHUNK = 512  # cache slots widened at once when a narrow KV cache is read (Attention._attend_cache)


@dataclass
class TransformerConfig:
    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int | list[int] = 2048
    causal: bool = True
    context: int | None = None  # steps each query sees, itself included; None = unbounded
    norm: str = "layer_norm"  # layer_norm | layer_norm_f32 | rms_norm | rms_norm_f32
    layer_scale: float | None = None
    gating: str = "none"  # none (GELU MLP) | silu | gelu | ...
    positional_embedding: str = "rope"  # rope | none
    max_period: float = 10_000.0
    kv_repeat: int = 1
    weights_per_step: int = 0  # > 0: a separate set of weights for each of the first N steps
    weights_per_step_schedule: list[int] | None = None  # step -> weight index, for shared weights
    checkpointing: bool = False  # gradient checkpointing of each layer during training
    cross_attention: bool = False  # each layer also attends to a given source (e.g. a voice), no mask

    @property
    def num_weight_sets(self) -> int:
        if not self.weights_per_step:
            return 1
        if self.weights_per_step_schedule:
            return max(self.weights_per_step_schedule) + 1
        return self.weights_per_step

    def weight_index(self, step: int) -> int:
        if not self.weights_per_step:
            return 0
        if step >= self.weights_per_step:
            raise RuntimeError(f"step {step} has no weights (weights_per_step={self.weights_per_step})")
        return self.weights_per_step_schedule[step] if self.weights_per_step_schedule else step


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim; `dtype=float32` computes it in float32 whatever the input."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = dtype
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.compute_dtype is None else x.to(self.compute_dtype)
        var = self.eps + y.pow(2).mean(dim=-1, keepdim=True)
        return (y * (self.alpha.to(var) * torch.rsqrt(var))).to(x.dtype)


class LayerNormF32(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer_norm":
        return nn.LayerNorm(dim, eps=1e-5)
    if kind == "layer_norm_f32":
        return LayerNormF32(dim, eps=1e-8)
    if kind == "rms_norm":
        return RMSNorm(dim, eps=1e-5)
    if kind == "rms_norm_f32":
        return RMSNorm(dim, eps=1e-8, dtype=torch.float32)
    raise ValueError(f"unknown norm {kind!r}")


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def _activation(name: str):
    if name in ("silu", "gelu", "elu", "relu", "mish", "leaky_relu", "softsign"):
        return getattr(F, name)
    if name in ("sigmoid", "tanh"):
        return getattr(torch, name)
    if name == "identity":
        return lambda x: x
    raise ValueError(f"unknown activation {name!r}")


def gated_hidden_dim(dim: int, dim_feedforward: int) -> int:
    """Hidden width of a gated MLP given the nominal feed-forward width (Kyutai's convention)."""
    return (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3


class GatedMLP(nn.Module):
    """out = W_out(act(W_in x [first half]) * W_in x [second half])."""

    def __init__(self, dim: int, dim_feedforward: int, activation: str) -> None:
        super().__init__()
        hidden = gated_hidden_dim(dim, dim_feedforward)
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fast.linear_module(self.linear_in, x).unflatten(-1, (2, -1))
        return fast.linear_module(self.linear_out, self.act(h[..., 0, :]) * h[..., 1, :])


class StackedLinear(nn.Module):
    """Bias-free linear layers, one per step, stored stacked as `weight` [n * out, in]."""

    def __init__(self, in_dim: int, out_dim: int, n: int = 1) -> None:
        super().__init__()
        self.n, self.out_dim = n, out_dim
        self.weight = nn.Parameter(torch.empty(n * out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return stacked_linear(x, self.weight, self.n, indices)


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, n: int, indices: list[int]) -> torch.Tensor:
    """x [B, T, in] through weight [n * out, in], using weight set `indices[t]` at step t -> [B, T, out]."""
    if n == 1:
        return fast.linear(x, weight)
    weights = weight.view(n, weight.shape[0] // n, -1)
    if len(indices) == 1:
        return fast.linear(x, weights[indices[0]])
    return torch.einsum("btd,tod->bto", x, weights[indices])


def lazy_zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Zeros; on CPU, large ones in fresh anonymous memory whose pages take RAM only once written (torch.zeros
    writes them all): a KV cache for Moshi's 3000-step context (3 GB at 7B, fp32) then fills as the
    conversation goes on, ~1 MB per step, instead of at the first step."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < 1 << 22:
        return torch.zeros(shape, device=device, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


@dataclass
class _AttentionState(StreamingState):
    keys: torch.Tensor  # [B, H_kv, capacity, D_head], in the cache's storage dtype (nn/kv_cache.py)
    values: torch.Tensor  # [B, H_kv, capacity, D_head] (int4: D_head / 2 bytes)
    kind: str = "float"  # float | bf16 | int8 | int4
    key_scales: torch.Tensor | None = None  # int8: [B, H_kv, capacity, 1] float32; int4: [..., D / 32] bf16
    value_scales: torch.Tensor | None = None
    # Stale entries need no reset: the transformer's slot positions mask them out.

    def write(self, items: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, H_kv, T, D] at cache slots [B, T] (items: the batch index of each)."""
        # indexed assignment, not scatter_: in bf16 that one writes the whole cache (all of its RAM at once)
        for store, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            values, x_scales = encode(self.kind, x)
            store.transpose(1, 2)[items, slots] = values.transpose(1, 2)
            if scales is not None:
                scales.transpose(1, 2)[items, slots] = x_scales.transpose(1, 2)

    def read(self, b: int, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, H_kv, stop - start, D] of item b's slots start..stop in `dtype` (a narrower cache
        is widened into scratch buffers, valid until the next read)."""
        return self.widen(0, b, start, stop, dtype), self.widen(1, b, start, stop, dtype)

    def widen(self, which: int, b: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Keys (which 0) or values (1) of item b's slots start..stop in `dtype`, in scratch buffer `which`."""
        store = (self.keys, self.values)[which][b:b + 1, :, start:stop]
        if store.dtype == dtype:
            return store
        scales = (self.key_scales, self.value_scales)[which]
        width = 2 * store.shape[-1] if self.kind == "int4" else store.shape[-1]
        out = scratch(which, (*store.shape[:-1], width), store.device, dtype)
        return decode(self.kind, store, None if scales is None else scales[b:b + 1, :, start:stop], out)


class Attention(StreamingModule):
    """Multi-head self-attention; streaming keeps keys/values in a ring buffer of `capacity` slots."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_model // cfg.num_heads
        self.kv_heads = cfg.num_heads // cfg.kv_repeat
        qkv_dim = cfg.d_model + 2 * self.kv_heads * self.head_dim
        n = cfg.num_weight_sets
        self.in_proj_weight = nn.Parameter(torch.empty(n * qkv_dim, cfg.d_model))
        nn.init.kaiming_uniform_(self.in_proj_weight, a=5 ** 0.5)
        self.in_proj: nn.Module | None = None  # replaces in_proj_weight when quantized (nn/quant.py)
        self.out_proj = StackedLinear(cfg.d_model, cfg.d_model, n)
        self.kv_cache = "float"  # storage of the streaming cache: float | bf16 | int8 | int4 (nn/kv_cache.py)
        if cfg.context is not None:
            self.capacity = cfg.context + CACHE_RESERVE
        elif cfg.weights_per_step:
            self.capacity = cfg.weights_per_step
        else:
            self.capacity = 0  # streaming needs a bounded cache

    def _init_streaming_state(self, batch_size: int) -> _AttentionState:
        if not self.capacity:
            raise RuntimeError("streaming attention needs a context (or weights_per_step) to size its cache")
        w = self.float_like()
        shape, scales = stored_shapes(self.kv_cache, (batch_size, self.kv_heads, self.capacity, self.head_dim))
        store = storage_dtype(self.kv_cache, w.dtype)
        state = _AttentionState(batch_size, w.device, keys=lazy_zeros(shape, w.device, store),
                                values=lazy_zeros(shape, w.device, store), kind=self.kv_cache)
        if scales is not None:
            state.key_scales = lazy_zeros(scales, w.device, scale_dtype(self.kv_cache))
            state.value_scales = lazy_zeros(scales, w.device, scale_dtype(self.kv_cache))
        return state

    def set_kv_cache(self, kind: str) -> None:
        """How the streaming cache stores keys and values (float | bf16 | int8 | int4); offline calls round the
        same way."""
        if self._streaming_state is not None:
            raise RuntimeError("set the KV cache kind outside of a streaming() block")
        stored_shapes(check_kv_cache(kind), (self.head_dim,))  # an odd head dimension cannot hold int4
        self.kv_cache = kind

    def forward(self, x: torch.Tensor, ctx: "_StepContext") -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; `ctx` holds positions, RoPE tables, mask and cache slots of this call."""
        weight_indices = ctx.weight_indices
        B, T, _ = x.shape
        if self.in_proj is not None:
            qkv = self.in_proj(x, weight_indices)
        else:
            qkv = stacked_linear(x, self.in_proj_weight, self.cfg.num_weight_sets, weight_indices)
        heads = self.num_heads + self.kv_heads  # query and key heads, rotated together
        qkv = qkv.unflatten(-1, (heads + self.kv_heads, self.head_dim))  # [B, T, H + 2 H_kv, D]
        qk, v = qkv[:, :, :heads], qkv[:, :, heads:]
        if ctx.rope is not None:
            qk = fast.apply_rope(qk, *ctx.rope)
        q, k = qk[:, :, :self.num_heads].transpose(1, 2), qk[:, :, self.num_heads:].transpose(1, 2)
        v = v.transpose(1, 2)

        state = self._streaming_state
        if state is None:
            out = self._attend(q, round_trip(self.kv_cache, k), round_trip(self.kv_cache, v), ctx.mask)
        else:
            assert isinstance(state, _AttentionState) and ctx.slots is not None and ctx.lengths is not None
            state.write(torch.arange(B, device=x.device)[:, None].expand(B, T), ctx.slots, k, v)
            # Each item attends to the cache slots it has written (all of them once the ring has wrapped),
            # on its own: its numerics never depend on the other items or on the batch's history.
            out = torch.cat([self._attend_cache(q[b:b + 1], state, b, n, ctx.mask[b:b + 1, ..., :n])
                             for b, n in enumerate(ctx.lengths)])
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(out, weight_indices)


    def float_like(self) -> torch.Tensor:
        """A tensor with the device and float dtype of this layer's weights (its KV cache's)."""
        return self.in_proj_weight if self.in_proj is None else self.in_proj.float_like()

    def _attend_cache(self, q: torch.Tensor, state: _AttentionState, b: int, n: int,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """q [1, H, T, D] attending to item b's first n cache slots. A narrower cache than q's dtype (bf16, int8,
        int4) is widened `READ_CHUNK` slots at a time (scores of all slots, one softmax, then the values chunk
        by chunk), so its scratch buffers stay small: [H, READ_CHUNK, D] instead of [H, n, D] (94 MiB at 7B
        with a full context)."""
        if state.keys.dtype == q.dtype or n <= READ_CHUNK:
            return self._attend(q, *state.read(b, 0, n, q.dtype), mask)
        repeat = self.cfg.kv_repeat
        scores = q.new_empty(*q.shape[:-1], n)  # [1, H, T, n]
        for start in range(0, n, READ_CHUNK):
            k = state.widen(0, b, start, min(start + READ_CHUNK, n), q.dtype)
            k = k.repeat_interleave(repeat, dim=1) if repeat > 1 else k
            scores[..., start:start + k.shape[2]] = q @ k.transpose(-1, -2)
        scores.mul_(q.shape[-1] ** -0.5)
        weights = (scores if mask is None else scores.masked_fill_(~mask, float("-inf"))).softmax(dim=-1)
        out = None
        for start in range(0, n, READ_CHUNK):
            v = state.widen(1, b, start, min(start + READ_CHUNK, n), q.dtype)
            v = v.repeat_interleave(repeat, dim=1) if repeat > 1 else v
            part = weights[..., start:start + v.shape[2]] @ v
            out = part if out is None else out.add_(part)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.kv_repeat > 1:
            k = k.repeat_interleave(self.cfg.kv_repeat, dim=1)
            v = v.repeat_interleave(self.cfg.kv_repeat, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@dataclass
class _CrossState(StreamingState):
    """The keys and values of the last cross-attention source, kept while the same tensor comes back at the
    next step (with the same version counter where it has one: an in-place change invalidates them; inference
    tensors have none, so a changed source must be a new tensor, as Generator.set_conditions makes it)."""

    source: torch.Tensor | None = None
    version: int = -1
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


class CrossAttention(StreamingModule):
    """Attention from x [B, T, D] to a source [B, S, D] (all of it, no positions); Kyutai's parameter names.
    Streaming, the source's keys and values are computed once, not at every step."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.d_model, cfg.d_model))
        nn.init.kaiming_uniform_(self.in_proj_weight, a=5 ** 0.5)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def _init_streaming_state(self, batch_size: int) -> _CrossState:
        return _CrossState(batch_size, self.in_proj_weight.device)

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        q = fast.linear(x, self.in_proj_weight[:d]).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = self._source_keys_values(source, x.dtype, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return fast.linear_module(self.out_proj, out)

    def _source_keys_values(self, source: torch.Tensor, dtype: torch.dtype, d: int) -> tuple[torch.Tensor, ...]:
        state = self._streaming_state
        cached = isinstance(state, _CrossState) and not torch.is_grad_enabled()
        version = _version(source)
        if cached and state.source is source and state.version == version and state.keys is not None \
                and state.keys.dtype == dtype:
            return state.keys, state.values
        kv = fast.linear(source.to(dtype), self.in_proj_weight[d:]).unflatten(-1, (2, self.num_heads, -1))
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if cached:
            state.source, state.version, state.keys, state.values = source, version, k, v
        return k, v


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter
        return -1


class TransformerLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.self_attn = Attention(cfg)
        self.norm1 = make_norm(cfg.norm, d)
        self.norm2 = make_norm(cfg.norm, d)
        n = cfg.num_weight_sets
        if cfg.gating == "none":
            if cfg.weights_per_step or isinstance(cfg.dim_feedforward, list):
                raise ValueError("per-step weights need a gated MLP")
            self.linear1 = nn.Linear(d, cfg.dim_feedforward, bias=False)
            self.linear2 = nn.Linear(cfg.dim_feedforward, d, bias=False)
            self.gating = None
        elif cfg.weights_per_step:
            widths = cfg.dim_feedforward if isinstance(cfg.dim_feedforward, list) else [cfg.dim_feedforward] * n
            if len(widths) != n:
                raise ValueError(f"dim_feedforward lists {len(widths)} widths for {n} weight sets")
            self.gating = nn.ModuleList([GatedMLP(d, w, cfg.gating) for w in widths])
        else:
            self.gating = GatedMLP(d, int(cfg.dim_feedforward), cfg.gating)
        if cfg.layer_scale is None:
            self.layer_scale_1 = self.layer_scale_2 = None
        else:
            self.layer_scale_1 = LayerScale(d, cfg.layer_scale)
            self.layer_scale_2 = LayerScale(d, cfg.layer_scale)
        if cfg.cross_attention:
            self.cross_attention = CrossAttention(cfg)
            self.norm_cross = nn.LayerNorm(d, eps=1e-5)  # always a LayerNorm, as Kyutai's
            self.layer_scale_cross = None if cfg.layer_scale is None else LayerScale(d, cfg.layer_scale)
        else:
            self.cross_attention = None

    def _mlp(self, x: torch.Tensor, weight_indices: list[int]) -> torch.Tensor:
        if self.gating is None:
            hidden = F.gelu(fast.linear_module(self.linear1, x, contiguous=False))
            return fast.linear_module(self.linear2, hidden, contiguous=False)
        if isinstance(self.gating, nn.ModuleList):
            if len(weight_indices) == 1:
                return self.gating[weight_indices[0]](x)
            return torch.cat([self.gating[i](x[:, t:t + 1]) for t, i in enumerate(weight_indices)], dim=1)
        return self.gating(x)

    def forward(self, x: torch.Tensor, ctx: "_StepContext") -> torch.Tensor:
        weight_indices = ctx.weight_indices
        x = _residual(x, self.self_attn(self.norm1(x), ctx), self.layer_scale_1)
        if self.cross_attention is not None:
            if ctx.cross is None:
                raise ValueError("this transformer has cross-attention: pass the cross-attention source")
            x = _residual(x, self.cross_attention(self.norm_cross(x), ctx.cross), self.layer_scale_cross)
        return _residual(x, self._mlp(self.norm2(x), weight_indices), self.layer_scale_2)


def _residual(x: torch.Tensor, update: torch.Tensor, scale: LayerScale | None) -> torch.Tensor:
    """x + scale * update, in update's dtype (one fused op when there is a layer scale)."""
    if scale is None:
        return x.to(update) + update
    return torch.addcmul(x.to(update), update, scale.scale)


@dataclass
class _StepContext:
    """What every layer of one transformer call shares, computed once per call."""

    weight_indices: list[int]
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin [B, T, 1, D_head / 2]
    mask: torch.Tensor | None  # [B, 1, T, S] bool, True = may attend
    slots: torch.Tensor | None  # [B, T] cache slots written by this call (streaming only)
    lengths: list[int] | None = None  # per item, the cache slots worth attending to (streaming only)
    cross: torch.Tensor | None = None  # [B, S, D] cross-attention source


@dataclass
class _TransformerState(StreamingState):
    offsets: torch.Tensor  # [B] long, steps seen so far by each batch item
    key_positions: torch.Tensor  # [B, capacity], absolute step held by each cache slot, -1 = empty
    step: int = 0  # steps seen (host side), selects per-step weights; all items move together
    host_offsets: list[int] | None = None  # `offsets` on the host: bounds the cache slots each item wrote

    def reset(self, mask: torch.Tensor) -> None:
        self.offsets.masked_fill_(mask, 0)
        masked_fill_(self.key_positions, mask, -1)
        self.step = 0
        if self.host_offsets is not None:
            self.host_offsets = [0 if m else n for m, n in zip(mask.tolist(), self.host_offsets)]


class Transformer(StreamingModule):
    """Stack of layers on [B, T, D] inputs; streaming continues positions and caches across calls."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.num_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])

    def _init_streaming_state(self, batch_size: int) -> _TransformerState:
        device = self.layers[0].self_attn.float_like().device
        capacity = self.layers[0].self_attn.capacity
        return _TransformerState(batch_size, device, torch.zeros(batch_size, dtype=torch.long, device=device),
                                 torch.full((batch_size, capacity), -1, dtype=torch.long, device=device),
                                 host_offsets=[0] * batch_size)

    def set_kv_cache(self, kind: str) -> None:
        """Store every layer's streaming keys and values as float | bf16 | int8 | int4 (nn/kv_cache.py)."""
        for layer in self.layers:
            layer.self_attn.set_kv_cache(kind)

    def _mask(self, positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor | None:
        """Which keys each query sees: [B, 1, T, S] bool (None = all)."""
        if not self.cfg.causal and self.cfg.context is None and self._streaming_state is None:
            return None
        delta = positions[:, :, None] - key_positions[:, None, :]
        mask = key_positions[:, None, :] >= 0
        if self.cfg.causal:
            mask = mask & (delta >= 0)
        if self.cfg.context is not None:
            mask = mask & (delta < self.cfg.context)
        return mask[:, None]

    def forward(self, x: torch.Tensor, cross: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; `cross` [B, S, D] is the cross-attention source (cross_attention only)."""
        state = self._streaming_state
        limit = CACHE_RESERVE if (state is not None and self.cfg.context is not None) else x.shape[1]
        if x.shape[1] > limit:  # keep each streamed chunk within the cache reserve
            return torch.cat([self(chunk, cross) for chunk in x.split(limit, dim=1)], dim=1)
        B, T, _ = x.shape
        steps = torch.arange(T, device=x.device)
        if state is None:
            positions = steps.expand(B, T)
            first_step = 0
        else:
            assert isinstance(state, _TransformerState)
            positions = state.offsets[:, None] + steps
            first_step = state.step
        slots = lengths = None
        if state is None:
            key_positions = positions
        else:
            capacity = state.key_positions.shape[1]
            if self.cfg.context is None and first_step + T > capacity:
                raise RuntimeError(f"streaming past the {capacity} steps this unbounded-context cache holds")
            slots = positions % capacity
            state.key_positions.scatter_(1, slots, positions)
            key_positions = state.key_positions
            lengths = [min(capacity, n + T) for n in state.host_offsets]
        rope = None
        if self.cfg.positional_embedding == "rope":
            cos, sin = rope_tables(positions, self.cfg.d_model // self.cfg.num_heads, self.cfg.max_period)
            rope = (cos.transpose(1, 2), sin.transpose(1, 2))  # [B, T, 1, D / 2], for [B, T, heads, D]
        ctx = _StepContext([self.cfg.weight_index(first_step + t) for t in range(T)], rope,
                           self._mask(positions, key_positions), slots, lengths, cross)
        dtype = x.dtype
        for layer in self.layers:
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        if state is not None:
            # Frozen items keep their offset; their cache writes sit in the slot they will overwrite next.
            state.offsets.copy_(state.keep_inactive(state.offsets + T, state.offsets))
            state.step += T
            active = state.active_host or [True] * B
            state.host_offsets = [n + T if a else n for n, a in zip(state.host_offsets, active)]
        return x.to(dtype)
