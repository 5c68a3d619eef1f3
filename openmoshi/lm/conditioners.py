"""Conditioning of the LM (Kyutai's TTS models): named conditions turned into vectors, fused into the model.

    conditions ("control": "ok", "cfg": "2.0", "speaker_wavs": [B, S, D] tensor + mask)
        -> ConditionProvider: one conditioner per name -> Condition(values [B, T, dim], mask [B, T])
        -> ConditionFuser: "sum" names add one vector [B, 1, dim] to every step's input,
                           "cross" names are concatenated along T into the cross-attention source [B, S, dim]

A lookup-table conditioner ("lut") maps a string to a row (by its index in `possible_values`, else a sha256
hash); a tensor conditioner ("tensor") takes a given [B, T, D] tensor (e.g. a voice embedding). Both project to
the LM's dim and put a learnt padding vector where the mask is False (a missing condition: CFG's null branch).
The config.json layout and the parameter names are Kyutai's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class Condition:
    """An embedded condition: values [B, T, dim], mask [B, T] (False = padding / absent)."""

    values: torch.Tensor
    mask: torch.Tensor


@dataclass
class TensorInput:
    """The input of a tensor conditioner: tensor [B, T, D], mask [B, T] bool."""

    tensor: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def full(cls, tensor: torch.Tensor) -> TensorInput:
        return cls(tensor, torch.ones(tensor.shape[:2], dtype=torch.bool, device=tensor.device))

    def null(self) -> TensorInput:
        return TensorInput(torch.zeros_like(self.tensor), torch.zeros_like(self.mask))


class _Conditioner(nn.Module):
    def __init__(self, dim: int, output_dim: int, force_linear: bool = True, pad_empty: bool = True,
                 output_bias: bool = False, learn_padding: bool = True) -> None:
        super().__init__()
        if output_bias:
            raise ConfigError("conditioners with output_bias are not supported (Kyutai's code refuses them too)")
        self.dim, self.output_dim, self.pad_empty = dim, output_dim, pad_empty
        self.output_proj = nn.Linear(dim, output_dim, bias=False) if force_linear or dim != output_dim \
            else nn.Identity()
        self.learnt_padding = nn.Parameter(torch.randn(1, 1, output_dim) * 0.2) if learn_padding else None

    def _finish(self, values: torch.Tensor, mask: torch.Tensor) -> Condition:
        if values.shape[1] == 0 and self.pad_empty:
            mask = torch.zeros(values.shape[:2], dtype=torch.bool, device=values.device)
        values = self.output_proj(values)
        keep = mask.float()[..., None]
        if self.learnt_padding is not None:
            values = values * keep + self.learnt_padding * (1 - keep)
        else:
            values = values * keep
        return Condition(values, mask)


class LUTConditioner(_Conditioner):
    """A string (or None = absent) per batch item -> one embedding row [B, 1, output_dim]."""

    def __init__(self, n_bins: int, dim: int, output_dim: int, tokenizer: str = "noop",
                 possible_values: list[str] | None = None, init_scale: float = 1.0, **kwargs) -> None:
        super().__init__(dim, output_dim, **kwargs)
        if tokenizer != "noop":
            raise ConfigError(f"lut conditioner tokenizer {tokenizer!r} is not supported (only 'noop')")
        if possible_values is not None and len(possible_values) > n_bins:
            raise ConfigError(f"lut conditioner lists {len(possible_values)} values for {n_bins} bins")
        self.n_bins = n_bins
        self.possible_values = None if possible_values is None else list(possible_values)
        self.embed = nn.Embedding(n_bins + 1, dim)  # the last row stands for "absent"
        with torch.no_grad():
            self.embed.weight.mul_(init_scale)

    def index(self, value: str | None) -> int:
        if value is None:
            return self.n_bins
        if self.possible_values is None:
            return int(hashlib.sha256(value.encode("utf-8")).hexdigest(), 16) % self.n_bins
        if value not in self.possible_values:
            raise ConfigError(f"condition value {value!r} is not one of {self.possible_values}")
        return self.possible_values.index(value)

    def forward(self, values: list[str | None]) -> Condition:
        device = self.embed.weight.device
        tokens = torch.tensor([self.index(v) for v in values], dtype=torch.long, device=device)[:, None]
        mask = torch.tensor([v is not None for v in values], dtype=torch.bool, device=device)[:, None]
        return self._finish(self.embed(tokens), mask)


class TensorConditioner(_Conditioner):
    """A given tensor [B, T, dim] with its mask, projected to output_dim."""

    def forward(self, inputs: TensorInput) -> Condition:
        device = next(self.parameters()).device
        return self._finish(inputs.tensor.to(device), inputs.mask.to(device))


_KINDS = {"lut": LUTConditioner, "tensor": TensorConditioner}


class ConditionProvider(nn.Module):
    """The conditioners of a model, by name, built from config.json's `conditioners`."""

    def __init__(self, spec: dict, output_dim: int) -> None:
        super().__init__()
        modules = {}
        for name, entry in spec.items():
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind not in _KINDS or not isinstance(entry.get(kind), dict):
                raise ConfigError(f"conditioner {name!r}: expected {{'type': 'lut'|'tensor', '<type>': {{...}}}}, "
                                  f"got {entry!r}")
            try:
                modules[name] = _KINDS[kind](**entry[kind], output_dim=output_dim)
            except TypeError as exc:
                raise ConfigError(f"conditioner {name!r}: {exc}") from exc
        self.conditioners = nn.ModuleDict(modules)

    def forward(self, text: dict[str, list[str | None]] | None = None,
                tensors: dict[str, TensorInput] | None = None) -> dict[str, Condition]:
        """Embed a batch of conditions: text values per name (lists of B strings/None), tensors per name."""
        text, tensors = text or {}, tensors or {}
        out = {}
        for name, module in self.conditioners.items():
            given = text if isinstance(module, LUTConditioner) else tensors
            if name not in given:
                raise ConfigError(f"the model needs the condition {name!r} "
                                  f"({'a string' if given is text else 'a tensor'}); got {sorted(text) + sorted(tensors)}")
            out[name] = module(given[name])
        return out


def sin_embedding(length: int, dim: int, device: torch.device, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of positions 0..length-1 -> [1, length, dim] (cos half, then sin half)."""
    half = dim // 2
    positions = torch.arange(length, device=device, dtype=torch.float32).view(1, -1, 1)
    scale = torch.arange(half, device=device, dtype=torch.float32).view(1, 1, -1) / max(half - 1, 1)
    phase = positions / (torch.full([], max_period, device=device) ** scale)
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class ConditionFuser:
    """How conditions enter the LM, from config.json's `fuser` ({"sum": [...], "cross": [...]})."""

    def __init__(self, spec: dict) -> None:
        spec = dict(spec)
        self.sum_names = list(spec.pop("sum", []) or [])
        self.cross_names = list(spec.pop("cross", []) or [])
        if spec.pop("prepend", []):
            raise ConfigError("fuser 'prepend' is not supported (Kyutai's LM refuses it too)")
        self.pos_emb = bool(spec.pop("cross_attention_pos_emb", False))
        self.pos_emb_scale = float(spec.pop("cross_attention_pos_emb_scale", 1.0))
        if spec:
            raise ConfigError(f"unknown fuser key(s): {', '.join(sorted(spec))}")

    def names(self) -> list[str]:
        return self.sum_names + self.cross_names

    def sum(self, conditions: dict[str, Condition]) -> torch.Tensor | None:
        """[B, 1, dim] added to every step's input, or None."""
        out = None
        for name in self.sum_names:
            values = conditions[name].values
            if values.shape[1] != 1:
                raise ConfigError(f"condition {name!r} is fused by sum but has {values.shape[1]} steps (needs 1)")
            out = values if out is None else out + values
        return out

    def cross(self, conditions: dict[str, Condition]) -> torch.Tensor | None:
        """[B, S, dim] cross-attention source, or None."""
        if not self.cross_names:
            return None
        out = torch.cat([conditions[name].values for name in self.cross_names], dim=1)
        if self.pos_emb:
            out = out + self.pos_emb_scale * sin_embedding(out.shape[1], out.shape[2], out.device).to(out.dtype)
        return out


def check_condition_spec(conditioners: dict, fuser: dict) -> None:
    """Fail early, with the key named, on conditioner / fuser configs that cannot be built."""
    for name, entry in conditioners.items():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in _KINDS or not isinstance(entry.get(kind), dict) or "dim" not in entry[kind]:
            raise ConfigError(f"conditioners[{name!r}]: expected {{'type': 'lut' or 'tensor', '<type>': "
                              f"{{'dim': ..., ...}}}}, got {entry!r}")
    fused = ConditionFuser(fuser).names() if fuser else []
    missing = [n for n in fused if n not in conditioners]
    if missing:
        raise ConfigError(f"fuser uses condition(s) {missing} that `conditioners` does not define")
