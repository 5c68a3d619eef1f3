"""Mimi configuration: dataclasses with named presets, converted to and from Kyutai's mimi config dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config_checks import QUANTIZER_BOUNDS, SEANET_BOUNDS, TRANSFORMER_BOUNDS, check_fields, check_value
from ..errors import ConfigError
from ..nn.transformer import TransformerConfig
from .quantizer import QuantizerConfig
from .seanet import SeanetConfig


def _mimi_transformer() -> TransformerConfig:
    return TransformerConfig(d_model=512, num_heads=8, num_layers=8, dim_feedforward=2048, causal=True,
                             context=250, norm="layer_norm", layer_scale=0.01, gating="none",
                             positional_embedding="rope", max_period=10_000.0)


@dataclass
class MimiConfig:
    sample_rate: int = 24_000
    channels: int = 1
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: TransformerConfig = field(default_factory=_mimi_transformer)

    @property
    def encoder_frame_rate(self) -> float:
        return self.sample_rate / self.seanet.hop_length

    @property
    def frame_size(self) -> int:
        return int(self.sample_rate / self.frame_rate)

    @property
    def downsample_stride(self) -> int:
        stride = self.encoder_frame_rate / self.frame_rate
        if stride != int(stride) or stride < 1:
            raise ConfigError(f"encoder frame rate {self.encoder_frame_rate} Hz is not an integer multiple "
                              f"of the frame rate {self.frame_rate} Hz")
        return int(stride)

    # ---- Kyutai's dict layout: {"sample_rate", "channels", "frame_rate", "seanet", "quantizer", "transformer"}
    def to_kyutai(self) -> dict:
        t = self.transformer
        return {
            "sample_rate": self.sample_rate, "channels": self.channels, "frame_rate": self.frame_rate,
            "seanet": {k: v for k, v in dataclasses.asdict(self.seanet).items() if k != "weight_norm"}
            | {"causal": True, "norm": "none", "disable_norm_outer_blocks": 0},
            "quantizer": {"dimension": self.quantizer.dimension, "n_q": self.quantizer.n_q,
                          "bins": self.quantizer.bins, "input_dimension": self.quantizer.input_dimension,
                          "output_dimension": self.quantizer.output_dimension},
            "transformer": {
                "d_model": t.d_model, "num_heads": t.num_heads, "num_layers": t.num_layers, "causal": t.causal,
                "layer_scale": t.layer_scale, "context": t.context, "conv_layout": True,
                "max_period": t.max_period, "gating": t.gating, "norm": t.norm,
                "positional_embedding": t.positional_embedding, "dim_feedforward": t.dim_feedforward,
                "input_dimension": self.seanet.dimension, "output_dimensions": [self.seanet.dimension],
            },
        }

    @classmethod
    def from_kyutai(cls, raw: dict) -> "MimiConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"a Mimi config must be a JSON object, got {type(raw).__name__}")
        try:
            seanet = dict(raw["seanet"])
            quantizer = dict(raw["quantizer"])
            transformer = dict(raw["transformer"])
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"a Mimi config needs 'seanet', 'quantizer' and 'transformer' sections ({exc})") from exc
        if seanet.pop("causal", True) is not True:
            raise ConfigError("only causal Mimi models are supported (seanet.causal must be true)")
        norm = seanet.pop("norm", "none")
        if norm not in ("none", "weight_norm"):
            raise ConfigError(f"unsupported seanet norm {norm!r}")
        if seanet.pop("disable_norm_outer_blocks", 0) not in (0,):
            raise ConfigError("seanet.disable_norm_outer_blocks is not supported")
        seanet.pop("trim_right_ratio", None)
        seanet.setdefault("pad_mode", "constant")
        if seanet["pad_mode"] not in ("constant", "replicate"):
            raise ConfigError(f"unsupported seanet pad_mode {seanet['pad_mode']!r}")
        for key in ("conv_layout",):
            transformer.pop(key, None)
        in_dim = transformer.pop("input_dimension", None)
        out_dims = transformer.pop("output_dimensions", None)
        d_model = transformer.get("d_model")
        if (in_dim not in (None, d_model)) or (out_dims not in (None, [d_model], (d_model,))):
            raise ConfigError("Mimi transformers with input/output projections are not supported")
        check_value("sample_rate", raw.get("sample_rate", 24_000), "int", (1000, 768_000))
        check_value("channels", raw.get("channels", 1), "int", (1, 64))
        check_value("frame_rate", raw.get("frame_rate", 12.5), "float", (0.01, 48_000))
        check_fields(seanet, SeanetConfig, SEANET_BOUNDS, "seanet.")
        check_fields(quantizer, QuantizerConfig, QUANTIZER_BOUNDS, "quantizer.")
        check_fields(transformer, TransformerConfig, TRANSFORMER_BOUNDS, "transformer.")
        for key in ("d_model", "num_heads", "num_layers"):
            if key not in transformer:
                raise ConfigError(f"field transformer.{key} is missing")
        try:
            return cls(
                sample_rate=int(raw.get("sample_rate", 24_000)), channels=int(raw.get("channels", 1)),
                frame_rate=float(raw.get("frame_rate", 12.5)),
                seanet=SeanetConfig(**seanet),
                quantizer=QuantizerConfig(**{k: v for k, v in quantizer.items() if k != "q_dropout"}),
                transformer=TransformerConfig(**transformer))
        except TypeError as exc:
            raise ConfigError(f"unknown key in Mimi config: {exc}") from exc


def mimi_official() -> MimiConfig:
    """The released Mimi (tokenizer-e351c8d8-checkpoint125): 24 kHz, 12.5 Hz, 32 levels of 2048."""
    return MimiConfig()


def mimi_tiny() -> MimiConfig:
    """A small Mimi with the official structure for tests and laptops (same rates and frame size)."""
    return MimiConfig(
        seanet=SeanetConfig(dimension=32, n_filters=4),
        quantizer=QuantizerConfig(dimension=16, n_q=8, bins=2048, input_dimension=32, output_dimension=32),
        transformer=TransformerConfig(d_model=32, num_heads=2, num_layers=1, dim_feedforward=64, causal=True,
                                      context=250, norm="layer_norm", layer_scale=0.01, gating="none",
                                      positional_embedding="rope"))


PRESETS = {"official": mimi_official, "tiny": mimi_tiny}
