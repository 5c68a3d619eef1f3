"""LoRA on the LM, saved in Kyutai's format.

Each targeted weight W [out, in] becomes W + scaling * B @ A (A [rank, in], B [out, rank]; `scaling` is a raw
multiplier, 2.0 by default, as Kyutai's). It is a parametrization of the weight, so every module keeps
running as it is. A weight holding several stacked weight sets (the depth transformer's per-step attention)
gets one pair per set, as Kyutai's `in_projs.{i}` / `out_projs.{i}` linears do.

Kyutai's `moshi` wraps *every* linear layer of the LM when a config says `lora: true`, so the saved
lora.safetensors lists every one of them: layers left out of the targets are saved with zero pairs.
Names: `<linear>.lora_A.weight` / `<linear>.lora_B.weight`, e.g. `transformer.layers.0.self_attn.in_projs.0`,
`transformer.layers.0.gating.linear_in`, `depformer_in.3`, `linears.7`, `text_linear`.

The frozen base can be held in bf16 (`base_dtype`, hold_frozen_base): the weights that carry adapters and the
frozen embedding tables, while adapters, norms and activations stay fp32. Each use of a weight widens it to the
adapters' dtype before adding B @ A, so a bf16 checkpoint computes exactly as if it had been loaded in fp32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...lm.model import LMModel, TokenEmbedding

_ATTN = re.compile(r"^(.*\.self_attn)\.(in_proj_weight|out_proj\.weight)$")
_EMBEDDINGS = re.compile(r"(^|\.)(emb|text_emb|depformer_emb|depformer_text_emb)(\.|$)")
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = full fine-tuning (no LoRA)
    scaling: float = 2.0  # raw multiplier of B @ A (Kyutai's lora_scaling)
    targets: list[str] = field(default_factory=lambda: ["all"])  # substrings of linear names, or "all"
    train_embeddings: bool = False  # also train the embedding tables (moshi-finetune's ft_embed)
    merged: bool = False  # export merged weights (a plain model folder) instead of lora.safetensors
    base_dtype: str = "auto"  # frozen base weights: bf16, fp32, or auto = bf16 when the --init checkpoint stores
    #                           bf16 (as Kyutai's do; same values, same compute, half the memory), else fp32

    def __post_init__(self) -> None:
        if self.rank < 0 or self.scaling <= 0:
            raise ValueError("lora rank must be >= 0 and lora scaling > 0")
        if self.base_dtype not in ("auto", *BASE_DTYPES):
            raise ValueError(f"lora base_dtype must be auto, fp32 or bf16, got {self.base_dtype!r}")


class LoRADelta(nn.Module):
    """Parametrization W -> W + scaling * blockdiag(B_i @ A_i) over `sets` row blocks of W."""

    def __init__(self, out_features: int, in_features: int, sets: int, rank: int, scaling: float) -> None:
        super().__init__()
        self.sets, self.scaling = sets, scaling
        rows = out_features // sets
        self.lora_A = nn.Parameter(torch.empty(sets, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(sets, rows, rank))
        for a in self.lora_A:  # nn.Linear's default init, as Kyutai's LoRA A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return torch.bmm(self.lora_B, self.lora_A).flatten(0, 1) * self.scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # a bf16 base with fp32 adapters: widened first (exact), so B @ A is never rounded to the base's precision
        dtype = torch.promote_types(weight.dtype, self.lora_A.dtype)
        return weight.to(dtype) + self.delta().to(dtype)


def linear_weights(lm: LMModel) -> list[tuple[str, nn.Module, str, int, list[str]]]:
    """Every linear weight of the LM: (parameter name, owner module, attribute, weight sets, Kyutai names)."""
    out = []
    for name, param in lm.named_parameters():
        if ".parametrizations." in name:  # a LoRA-parametrized weight: its plain name
            if not name.endswith(".original"):
                continue
            owner, rest = name.split(".parametrizations.", 1)
            name = f"{owner}.{rest[: -len('.original')]}"
        if param.dim() != 2 or _EMBEDDINGS.search(name):
            continue
        attn = _ATTN.match(name)
        owner_name, attr = name.rsplit(".", 1)
        if attn:
            attn_module = lm.get_submodule(attn.group(1))
            sets = attn_module.cfg.num_weight_sets
            kind = "in_projs" if attn.group(2).startswith("in_proj") else "out_projs"
            names = [f"{attn.group(1)}.{kind}.{i}" for i in range(sets)]
        else:
            sets, names = 1, [owner_name]
        out.append((name, lm.get_submodule(owner_name), attr, sets, names))
    return out


def _targeted(kyutai_name: str, targets: list[str]) -> bool:
    return "all" in targets or any(t in kyutai_name for t in targets)


def add_lora(lm: LMModel, cfg: LoRAConfig) -> list[nn.Parameter]:
    """Parametrize the targeted linear weights with LoRA pairs, freeze everything else; returns the trainable
    parameters."""
    lm.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for _, owner, attr, sets, names in linear_weights(lm):
        if not _targeted(names[0], cfg.targets):
            continue
        weight = getattr(owner, attr)
        delta = LoRADelta(weight.shape[0], weight.shape[1], sets, cfg.rank, cfg.scaling).to(weight.device)
        parametrize.register_parametrization(owner, attr, delta, unsafe=True)
        trainable += [delta.lora_A, delta.lora_B]
    if not trainable:
        raise ValueError(f"LoRA targets {cfg.targets} match no linear layer of the model")
    if cfg.train_embeddings:
        for name, param in lm.named_parameters():
            if _EMBEDDINGS.search(name) and "lora_" not in name:
                param.requires_grad_(True)
                trainable.append(param)
    return trainable


def hold_frozen_base(lm: LMModel, dtype: torch.dtype, compute: torch.dtype = torch.float32) -> None:
    """After add_lora: frozen weights that carry adapters and frozen embedding tables held in `dtype`, every other
    floating-point parameter and buffer (adapters, norms, linears without adapters) in `compute`. Embedding rows
    are widened to `compute` as they are looked up, so activations stay in `compute`."""
    narrow: set[int] = set()
    for _, owner, attr, _, _ in linear_weights(lm):
        if parametrize.is_parametrized(owner, attr):
            narrow.add(id(owner.parametrizations[attr].original))
    for module in lm.modules():
        if isinstance(module, TokenEmbedding) and not module.weight.requires_grad:
            narrow.add(id(module.weight))
            module.row_dtype = None if dtype == compute else compute
    for module in lm.modules():
        for tensors in (module._parameters, module._buffers):
            for name, t in tensors.items():
                if t is None or not t.is_floating_point():
                    continue
                want = dtype if id(t) in narrow else compute
                if t.dtype == want:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(want)
                else:
                    tensors[name] = t.to(want)


def _deltas(lm: LMModel) -> dict[str, tuple[nn.Module, str, int, list[str], LoRADelta | None]]:
    out = {}
    for _, owner, attr, sets, names in linear_weights(lm):
        delta = None
        if parametrize.is_parametrized(owner, attr):
            delta = next(m for m in owner.parametrizations[attr] if isinstance(m, LoRADelta))
        out[names[0]] = (owner, attr, sets, names, delta)
    return out


def has_lora(lm: LMModel) -> bool:
    return any(d is not None for *_, d in _deltas(lm).values())


def lora_state_dict(lm: LMModel, rank: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Kyutai's lora.safetensors content: a pair per linear layer (zeros where no LoRA was trained)."""
    state = {}
    for owner, attr, sets, names, delta in _deltas(lm).values():
        weight = getattr(owner, attr)
        rows, cols = weight.shape[0] // sets, weight.shape[1]
        for i, name in enumerate(names):
            if delta is not None:
                a, b = delta.lora_A[i], delta.lora_B[i]
            else:
                a, b = weight.new_zeros(rank, cols), weight.new_zeros(rows, rank)
            state[f"{name}.lora_A.weight"] = a.detach().to(dtype or a.dtype).contiguous().cpu()
            state[f"{name}.lora_B.weight"] = b.detach().to(dtype or b.dtype).contiguous().cpu()
    return state


def base_state_dict(lm: LMModel) -> dict[str, torch.Tensor]:
    """The frozen base weights under their plain (Kyutai) names."""
    state = {}
    for key, value in lm.state_dict().items():
        if ".parametrizations." in key:
            if not key.endswith(".original"):
                continue
            owner, rest = key.split(".parametrizations.", 1)
            key = f"{owner}.{rest[: -len('.original')]}"
        state[key] = value
    return state


def merged_state_dict(lm: LMModel) -> dict[str, torch.Tensor]:
    """Weights with the LoRA deltas added in (W + scaling * B @ A), under plain names."""
    state = base_state_dict(lm)
    with torch.no_grad():
        for name, owner, attr, _, _ in linear_weights(lm):
            if parametrize.is_parametrized(owner, attr):
                state[name] = getattr(owner, attr).detach().clone()
    return state
