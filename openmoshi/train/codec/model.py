"""Mimi in training form: weight norm on the SEANet convs, a differentiable forward, export to Kyutai's layout.

    wav [B, 1, T] -> encoder -> transformer -> downsample -> split RVQ (training path) -> upsample
        -> transformer -> decoder -> wav_hat [B, 1, T]
    semantic branch output [B, 512, F] -> 1x1 projection -> [B, teacher_dim, F] (distillation)
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations, parametrize

from ...codec.config import MimiConfig
from ...codec.loading import save_mimi
from ...codec.mimi import Mimi
from ...codec.quantizer import QuantizedResult
from ...nn.conv import _NormConv1d, _NormConvTranspose1d


def _seanet_convs(mimi: Mimi) -> list[nn.Module]:
    out = []
    for part in (mimi.encoder, mimi.decoder):
        for m in part.modules():
            if isinstance(m, _NormConv1d):
                out.append(m.conv)
            elif isinstance(m, _NormConvTranspose1d):
                out.append(m.convtr)
    return out


@torch.no_grad()
def variance_preserving_init_(mimi: Mimi) -> Mimi:
    """Re-initialises the SEANet convs (and the frame-rate resampling convs) with weights of variance 1 / fan_in
    and zero biases. With torch's default init every conv scales its input's variance by about 1/3 while its
    bias adds a constant, so after the encoder's ~15 convs the latent hardly depends on the audio (std over
    time ~0.1x its mean): at CPU-sized batches and step counts the codebooks then collapse onto one code per
    level. With this init the latent follows the input from the first step."""
    convs = _seanet_convs(mimi)
    for part in (mimi.downsample, mimi.upsample):
        if part is not None:
            convs += [m for m in part.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
    for conv in convs:
        w = conv.weight
        if isinstance(conv, nn.ConvTranspose1d):  # weight [in, out/groups, k]: each output sums in * k / stride
            fan_in = w.shape[0] * w.shape[2] // max(1, conv.stride[0])
        else:  # weight [out, in/groups, k]
            fan_in = w.shape[1] * w.shape[2]
        nn.init.normal_(w, 0.0, fan_in ** -0.5)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    return mimi


def apply_weight_norm(mimi: Mimi) -> Mimi:
    """Reparametrises every SEANet conv weight as g * v / |v| (same function, as Kyutai trains)."""
    for conv in _seanet_convs(mimi):
        if not parametrize.is_parametrized(conv, "weight"):
            parametrizations.weight_norm(conv)
    return mimi


def folded_state_dict(mimi: Mimi) -> dict[str, torch.Tensor]:
    """Mimi's state dict with every weight-norm pair (g, v) replaced by the plain weight g * v / |v|."""
    out: dict[str, torch.Tensor] = {}
    suffix_g, suffix_v = ".parametrizations.weight.original0", ".parametrizations.weight.original1"
    state = mimi.state_dict()
    for key, value in state.items():
        if key.endswith(suffix_g):
            base = key[: -len(suffix_g)]
            out[base + ".weight"] = torch._weight_norm(state[base + suffix_v], value, 0).detach().clone()
        elif not key.endswith(suffix_v):
            out[key] = value.detach().clone()
    return out


def fold_weight_norm(mimi: Mimi) -> Mimi:
    """A new Mimi with plain conv weights (the released layout) computed from the weight-norm parameters."""
    cfg = copy.deepcopy(mimi.cfg)
    cfg.seanet.weight_norm = False
    cfg.transformer.checkpointing = False
    plain = Mimi(cfg).to(next(mimi.parameters()).device)
    plain.load_state_dict(folded_state_dict(mimi))
    plain.set_num_codebooks(mimi.num_codebooks)
    return plain


class TrainableMimi(nn.Module):
    """Mimi plus the distillation projection; `forward` is the differentiable training pass."""

    def __init__(self, mimi: Mimi, teacher_dim: int = 0) -> None:
        super().__init__()
        self.mimi = mimi
        dim = mimi.cfg.quantizer.output_dimension
        self.distill_proj = nn.Conv1d(dim, teacher_dim, 1) if teacher_dim else None

    def forward(self, wav: torch.Tensor, unquantized: torch.Tensor | None = None, n_acoustic: int | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, QuantizedResult, torch.Tensor | None]:
        """wav [B, 1, T] -> (wav_hat [B, 1, T], quantizer result, semantic
        projection [B, teacher_dim, F] or None)."""
        mimi = self.mimi
        length = wav.shape[-1]
        if length % mimi.frame_size:  # a partial last frame is padded, as Mimi.encode does
            wav = F.pad(wav, (0, mimi.frame_size - length % mimi.frame_size))
        latent = mimi.encoder(wav)
        latent = mimi.encoder_transformer(latent)
        latent = mimi.downsample(latent)
        q = mimi.quantizer(latent, mimi.frame_rate, generator, unquantized=unquantized, n_acoustic=n_acoustic)
        z = mimi.upsample(q.x)
        z = mimi.decoder_transformer(z)
        wav_hat = mimi.decoder(z)[..., :length]
        semantic = self.distill_proj(q.semantic) if self.distill_proj is not None else None
        return wav_hat, q, semantic


def export_mimi(mimi: Mimi, out_dir: Path, cfg: MimiConfig) -> Path:
    """Writes out_dir/tokenizer-e351c8d8-checkpoint125.safetensors (plain weights, Kyutai's keys, config in
    metadata) and out_dir/config.json naming it, so openmoshi.load_mimi and Kyutai's loaders take the folder."""
    import json
    plain = fold_weight_norm(mimi).cpu().eval()
    path = save_mimi(plain, out_dir)
    (out_dir / "mimi_config.json").write_text(json.dumps(cfg.to_kyutai(), indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps({"mimi_name": path.name,
                                                     "mimi_config_name": "mimi_config.json"}, indent=2) + "\n")
    return path
