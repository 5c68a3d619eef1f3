"""Moshi LM configuration: one dataclass with named presets, converted to and from Kyutai's config.json.

Kyutai's config.json mixes three kinds of keys: the LM constructor arguments (`dim`, `n_q`, `depformer_*`, ...),
file names (`moshi_name`, `mimi_name`, `tokenizer_name`, `lora_name`, ...) and run-time settings
(`model_type`, `lm_gen_config`, `stt_config`, `tts_config`, `lora`, ...). `LMConfig` holds all three so a folder
round-trips. Depth-transformer settings that Kyutai inherits from the temporal transformer when the
`depformer_` key is absent are resolved here into explicit values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config_checks import LM_BOUNDS, check_fields, check_generation
from ..errors import ConfigError
from ..nn.transformer import TransformerConfig

MOSHI_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
MOSHI_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"

_NORMS = ("layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32")
_GATINGS = ("none", "silu", "gelu", "relu", "sigmoid", "tanh", "elu", "mish", "leaky_relu", "softsign", "identity")
_POS_EMBS = ("rope", "none")


@dataclass
class LMConfig:
    """Architecture of a Moshi-family LM (RQ-Transformer) plus the file names and settings of its folder.

    Streams: index 0 is text, 1..dep_q are the generated (Moshi) audio codebooks, the rest the user's.
    """

    # temporal transformer (Helium)
    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int | None = 3000
    causal: bool = True
    norm: str = "rms_norm_f32"
    gating: str = "silu"
    positional_embedding: str = "rope"
    max_period: float = 10_000.0
    layer_scale: float | None = None
    kv_repeat: int = 1
    # vocabularies and streams
    text_card: int = 32000
    text_card_out: int | None = None  # text output vocabulary, when it differs from the input one
    card: int = 2048
    n_q: int = 16
    dep_q: int = 8
    delays: list[int] = field(default_factory=lambda: list(MOSHI_DELAYS))
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    bias_proj: bool = False
    # depth transformer (depformer)
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int | list[int] = int(4.125 * 1024)
    depformer_multi_linear: bool = True
    depformer_weights_per_step: bool = True
    depformer_weights_per_step_schedule: list[int] | None = None
    depformer_pos_emb: str = "none"
    depformer_norm: str | None = None  # a norm before each output head (none in the released models)
    depformer_gating: str = "silu"
    depformer_max_period: float = 10_000.0
    depformer_layer_scale: float | None = None
    depformer_kv_repeat: int = 1
    depformer_context: int | None = 8  # kept for round trips: the depth transformer always sees its whole frame
    # TTS features: two text streams muxed into one token, low-rank depth embeddings, conditioning
    demux_second_text_stream: bool = False
    depformer_low_rank_embeddings: int | None = None
    conditioners: dict = field(default_factory=dict)  # Kyutai's layout, see openmoshi.lm.conditioners
    fuser: dict = field(default_factory=dict)  # {"sum": [names], "cross": [names], "cross_attention_pos_emb": ..}
    cross_attention: bool = False  # cross-attention to the "cross" conditions in every temporal layer
    # small heads on the temporal transformer output (e.g. voice-activity heads of the STT models)
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 6
    gradient_checkpointing: bool = False
    # folder layout and run-time settings (config.json keys read by Kyutai's CheckpointInfo)
    model_type: str = "moshi"
    moshi_name: str = MOSHI_NAME
    mimi_name: str = MIMI_NAME
    tokenizer_name: str = TOKENIZER_NAME
    mimi_config_name: str | None = None
    lora_name: str | None = None
    lora: bool = False
    lora_rank: int = 128
    lora_scaling: float = 2.0
    lm_gen_config: dict = field(default_factory=dict)
    tts_config: dict = field(default_factory=dict)
    stt_config: dict = field(default_factory=dict)
    model_id: dict = field(default_factory=dict)
    # quantized weights (lm/quantized.py): Kyutai's int8 flag, and openmoshi's {"bits": 4, "group_size": 32}
    quantize: bool = False
    quantization: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived values
    @property
    def num_codebooks(self) -> int:
        """Streams in the token grid: text + n_q audio."""
        return self.n_q + 1

    @property
    def n_user(self) -> int:
        """Audio streams given as input only (the user's)."""
        return self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_out(self) -> int:
        return self.text_card if self.text_card_out is None else self.text_card_out

    @property
    def depformer_in_count(self) -> int:
        """How many temporal -> depth projections (`depformer_in.k`) the model holds."""
        if not self.depformer_multi_linear:
            return 1
        if self.depformer_weights_per_step_schedule:
            return max(self.depformer_weights_per_step_schedule) + 1
        return self.dep_q

    def depformer_in_index(self, k: int) -> int:
        if not self.depformer_multi_linear:
            return 0
        if self.depformer_weights_per_step_schedule:
            return self.depformer_weights_per_step_schedule[k]
        return k

    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        need(len(self.delays) == self.n_q + 1,
             f"delays lists {len(self.delays)} values, expected n_q + 1 = {self.n_q + 1} (text first)")
        need(all(isinstance(d, int) and d >= 0 for d in self.delays), f"delays must be integers >= 0: {self.delays}")
        need(0 <= self.dep_q <= self.n_q, f"dep_q ({self.dep_q}) must be between 0 and n_q ({self.n_q})")
        need(self.dim % self.num_heads == 0, f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        need(self.norm in _NORMS, f"norm {self.norm!r} is not supported (one of {_NORMS})")
        need(self.gating in _GATINGS, f"gating {self.gating!r} is not supported (one of {_GATINGS})")
        need(self.positional_embedding in _POS_EMBS,
             f"positional_embedding {self.positional_embedding!r} is not supported (one of {_POS_EMBS})")
        if self.dep_q:
            need(self.depformer_dim % self.depformer_num_heads == 0,
                 f"depformer_dim {self.depformer_dim} is not divisible by depformer_num_heads "
                 f"{self.depformer_num_heads}")
            need(self.depformer_gating in _GATINGS, f"depformer_gating {self.depformer_gating!r} is not supported")
            need(self.depformer_pos_emb in _POS_EMBS,
                 f"depformer_pos_emb {self.depformer_pos_emb!r} is not supported (one of {_POS_EMBS})")
            need(self.depformer_norm is None or self.depformer_norm in _NORMS,
                 f"depformer_norm {self.depformer_norm!r} is not supported")
            schedule = self.depformer_weights_per_step_schedule
            if schedule is not None:
                need(len(schedule) == self.dep_q,
                     f"depformer_weights_per_step_schedule has {len(schedule)} entries, expected dep_q={self.dep_q}")
                need(min(schedule) >= 0, "depformer_weights_per_step_schedule holds a negative index")
            if self.depformer_weights_per_step:
                need(self.depformer_gating != "none", "depformer_weights_per_step needs a gated MLP")
        if self.conditioners or self.fuser or self.cross_attention:
            from .conditioners import check_condition_spec
            check_condition_spec(self.conditioners, self.fuser)
            need(self.cross_attention == bool(self.fuser.get("cross")),
                 "cross_attention must be true exactly when the fuser has 'cross' conditions")
            need(not self.cross_attention or self.kv_repeat == 1, "cross-attention needs kv_repeat = 1")
        need(self.depformer_low_rank_embeddings is None or self.depformer_low_rank_embeddings > 0,
             "depformer_low_rank_embeddings must be a positive integer")

    # ---- transformer configs
    def temporal_config(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), causal=self.causal, context=self.context,
            norm=self.norm, layer_scale=self.layer_scale, gating=self.gating,
            positional_embedding=self.positional_embedding, max_period=self.max_period, kv_repeat=self.kv_repeat,
            checkpointing=self.gradient_checkpointing, cross_attention=self.cross_attention)

    def depth_config(self) -> TransformerConfig:
        # The depth transformer restarts at every frame and sees all of it (Kyutai drops depformer_context).
        return TransformerConfig(
            d_model=self.depformer_dim, num_heads=self.depformer_num_heads, num_layers=self.depformer_num_layers,
            dim_feedforward=self.depformer_dim_feedforward, causal=self.causal, context=None, norm=self.norm,
            layer_scale=self.depformer_layer_scale, gating=self.depformer_gating,
            positional_embedding=self.depformer_pos_emb, max_period=self.depformer_max_period,
            kv_repeat=self.depformer_kv_repeat,
            weights_per_step=self.dep_q if self.depformer_weights_per_step else 0,
            weights_per_step_schedule=self.depformer_weights_per_step_schedule,
            checkpointing=self.gradient_checkpointing)

    # ---- presets
    @classmethod
    def moshi_7b(cls) -> LMConfig:
        """The released Moshi 7B (moshiko / moshika, configs/moshi_7b_202409.json)."""
        return cls()

    @classmethod
    def bench(cls) -> LMConfig:
        """A ~0.3 B model with the 7B's structure, for CPU benchmarks."""
        return cls(dim=1024, num_heads=16, num_layers=12, context=3000, depformer_dim=512, depformer_num_heads=8,
                   depformer_num_layers=4, depformer_dim_feedforward=int(4.125 * 512))

    @classmethod
    def tiny(cls) -> LMConfig:
        """A tiny model with the 7B's structure and the bundled 1000-piece tokenizer, for tests."""
        return cls(dim=64, num_heads=4, num_layers=2, context=250, text_card=1000, depformer_dim=32,
                   depformer_num_heads=2, depformer_num_layers=1, depformer_dim_feedforward=int(4.125 * 32),
                   tokenizer_name="tokenizer_tiny.model")

    @classmethod
    def tiny_moshi_asr(cls) -> LMConfig:
        """`tiny` as a single-stream Moshi in ASR mode through its delays (paper §5.7): the text 2 s (25 steps)
        behind its audio stream, no user stream."""
        return dataclasses.replace(cls.tiny(), n_q=8, dep_q=8, delays=[25, 0, 1, 1, 1, 1, 1, 1, 1])

    @classmethod
    def tiny_moshi_tts(cls) -> LMConfig:
        """`tiny` as a single-stream Moshi in TTS mode through its delays: the audio 2 s behind the text."""
        return dataclasses.replace(cls.tiny(), n_q=8, dep_q=8, delays=[0, 25, 26, 26, 26, 26, 26, 26, 26])

    @classmethod
    def tiny_talk(cls) -> LMConfig:
        """The shipped tiny-talk Moshi (recipes/tiny_talk.py): 4 generated + 4 user codebooks of a 1024-entry tiny
        Mimi, a 512-piece domain tokenizer; 5.5 M parameters. It attends 12 s back, the length of its training
        crops: with 20 s, a conversation through the web page fell apart after 20 s ("A cat says A duck says A"),
        attention spans it had never seen. Text is sampled cool (0.3): at Kyutai's 0.7 stray words broke into
        the user's questions (91 % of their frames silent, against 100 %); greedy (0), replies came later and 5 of
        80 held-out questions went unanswered."""
        return cls(dim=192, num_heads=6, num_layers=4, context=150, text_card=512, card=1024, n_q=8, dep_q=4,
                   delays=[0, 0, 1, 1, 1, 0, 1, 1, 1], depformer_dim=128, depformer_num_heads=4,
                   depformer_num_layers=1, depformer_dim_feedforward=int(4.125 * 128),
                   tokenizer_name="tokenizer_tiny_talk.model", mimi_name="tiny_talk_mimi.safetensors",
                   lm_gen_config={"temp": 0.8, "temp_text": 0.3, "top_k": 50, "top_k_text": 25})

    @classmethod
    def stt_1b(cls) -> LMConfig:
        """kyutai/stt-1b-en_fr: 32 audio streams in, text out 0.5 s behind, 4 end-of-speech heads."""
        return cls(dim=2048, num_heads=16, num_layers=16, context=750, max_period=100_000.0, text_card=8000,
                   n_q=32, dep_q=0, delays=[0] * 33, extra_heads_num_heads=4, extra_heads_dim=6,
                   model_type="stt", mimi_name="mimi-pytorch-e351c8d8@125.safetensors",
                   tokenizer_name="tokenizer_en_fr_audio_8000.model",
                   stt_config={"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
                   lm_gen_config={"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50})

    @classmethod
    def tiny_stt(cls) -> LMConfig:
        """stt-1b's structure at toy size with the bundled 1000-piece tokenizer, for tests."""
        return cls.stt_1b().replace(dim=64, num_heads=4, num_layers=2, context=250, text_card=1000,
                                    tokenizer_name="tokenizer_tiny.model", mimi_name=MIMI_NAME)

    @classmethod
    def tts_1_6b(cls) -> LMConfig:
        """kyutai/tts-1.6b-en_fr's structure: 32 generated codebooks, text demuxed with a lookahead stream, voice by
        cross-attention, guidance distilled into a `cfg` condition, audio 1.28 s behind the text."""
        lut = {"type": "lut", "lut": {"n_bins": 2, "dim": 16, "tokenizer": "noop", "possible_values": ["ok", "bad"]}}
        cfg_lut = {"type": "lut", "lut": {"n_bins": 7, "dim": 16, "tokenizer": "noop",
                                          "possible_values": ["1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0"]}}
        return cls(dim=2048, num_heads=16, num_layers=16, context=500, text_card=8000, n_q=32, dep_q=32,
                   delays=[0, 0] + [2] * 31, depformer_dim=1024, depformer_num_heads=16, depformer_num_layers=4,
                   depformer_dim_feedforward=3072, depformer_low_rank_embeddings=128,
                   depformer_weights_per_step_schedule=[0, 1, 2, 3, 4, 5, 6, 7] + [8] * 8 + [9] * 16,
                   demux_second_text_stream=True, cross_attention=True,
                   conditioners={"control": lut, "cfg": cfg_lut,
                                 "speaker_wavs": {"type": "tensor", "tensor": {"dim": 512}}},
                   fuser={"sum": ["control", "cfg"], "cross": ["speaker_wavs"], "cross_attention_pos_emb": True,
                          "cross_attention_pos_emb_scale": 1.0},
                   model_type="tts", tokenizer_name="tokenizer_spm_8k_en_fr_audio.model",
                   tts_config={"audio_delay": 1.28, "second_stream_ahead": 2}, model_id={"sig": "tiny", "epoch": 0},
                   lm_gen_config={"temp": 0.6, "temp_text": 0.6, "top_k": 250, "top_k_text": 50})

    @classmethod
    def tiny_tts(cls) -> LMConfig:
        """tts-1.6b's structure at toy size (8 codebooks, 4 shared depth weight sets, voices of width 32)."""
        base = cls.tts_1_6b()
        conditioners = dict(base.conditioners, speaker_wavs={"type": "tensor", "tensor": {"dim": 32}})
        return base.replace(dim=64, num_heads=4, num_layers=2, context=250, text_card=1000, n_q=8, dep_q=8,
                            delays=[0, 0] + [2] * 7, depformer_dim=32, depformer_num_heads=2,
                            depformer_num_layers=1, depformer_dim_feedforward=int(4.125 * 32),
                            depformer_low_rank_embeddings=16,
                            depformer_weights_per_step_schedule=[0, 1, 2, 2, 3, 3, 3, 3], conditioners=conditioners,
                            tokenizer_name="tokenizer_tiny.model",
                            tts_config={"audio_delay": 0.32, "second_stream_ahead": 2})

    @classmethod
    def tiny_hibiki(cls) -> LMConfig:
        """Hibiki's structure (Moshi's streams, a `description` condition fused by sum) at toy size."""
        lut = {"type": "lut", "lut": {"n_bins": 4, "dim": 16, "tokenizer": "noop",
                                      "possible_values": ["very_bad", "bad", "good", "very_good"]}}
        return cls.tiny().replace(model_type="hibiki", conditioners={"description": lut},
                                  fuser={"sum": ["description"]},
                                  lm_gen_config={"temp": 0.8, "temp_text": 0.8, "top_k": 250, "top_k_text": 50})

    def replace(self, **changes: Any) -> LMConfig:
        return dataclasses.replace(self, **changes)

    # ---- Kyutai's config.json
    def to_kyutai(self) -> dict:
        """The config.json dict Kyutai's loaders read (explicit values for every depformer setting)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL_OUT and value is None:
                continue
            if f.name in ("lm_gen_config", "tts_config", "stt_config", "model_id") and not value:
                continue
            if f.name in ("gradient_checkpointing", "quantize", "quantization", "demux_second_text_stream",
                          "conditioners", "fuser", "cross_attention") and not value:
                continue
            out[f.name] = list(value) if isinstance(value, list) else value
        return out

    @classmethod
    def from_kyutai(cls, raw: dict) -> LMConfig:
        """Read a Kyutai config.json dict; unsupported features and unknown keys raise ConfigError."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a Moshi config must be a JSON object, got {type(raw).__name__}")
        cfg = dict(raw)
        cfg.pop("depformer_causal", None)  # deprecated by Kyutai, ignored there too
        if "demux_second_stream" in cfg:
            cfg["demux_second_text_stream"] = cfg.pop("demux_second_stream")

        unsupported = []
        for key, is_used in _UNSUPPORTED.items():
            if key in cfg:
                value = cfg.pop(key)
                if is_used(value):
                    unsupported.append(f"{key}={value!r}")
        if unsupported:
            raise ConfigError("this model uses features openmoshi does not support: " + ", ".join(unsupported))
        positional_scale = cfg.pop("positional_scale", 1.0)  # only read by sinusoidal embeddings
        del positional_scale

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in known)
        if unknown:
            raise ConfigError(f"unknown key(s) in the Moshi config: {', '.join(unknown)}")

        # Kyutai's constructor defaults where a key is absent, then the depformer inherits the temporal settings.
        values = dict(_KYUTAI_DEFAULTS)
        values.update(cfg)
        for name in ("gating", "max_period", "layer_scale", "kv_repeat", "num_layers"):
            values.setdefault(f"depformer_{name}", values.get(name))
        if "num_layers" not in values:
            raise ConfigError("the Moshi config has no num_layers")
        values.setdefault("depformer_context", None)
        if values.get("depformer_num_heads") is None:
            raise ConfigError("the Moshi config has no depformer_num_heads")
        if values.get("depformer_dim_feedforward") is None:
            values["depformer_dim_feedforward"] = int(values["hidden_scale"] * values["depformer_dim"])
        if "context" not in cfg:
            values["context"] = None
        check_fields(values, cls, LM_BOUNDS)  # types and ranges, field by field
        check_generation(values.get("lm_gen_config", {}))
        for name in ("delays", "depformer_weights_per_step_schedule"):
            if values.get(name) is not None:
                values[name] = [int(v) for v in values[name]]
        for name in ("max_period", "depformer_max_period", "hidden_scale", "lora_scaling"):
            if values.get(name) is not None:
                values[name] = float(values[name])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid Moshi config: {exc}") from exc


# Optional fields left out of config.json when unset.
_OPTIONAL_OUT = {"text_card_out", "depformer_weights_per_step_schedule", "depformer_norm", "mimi_config_name",
                 "lora_name", "depformer_context", "context", "depformer_low_rank_embeddings"}

# Features of Kyutai's LM that openmoshi does not implement, with the test that a value actually uses them.
_UNSUPPORTED = {
    "norm_emb": bool,
}

# Defaults of Kyutai's LMModel / StreamingTransformer constructors, used for keys a config.json leaves out.
_KYUTAI_DEFAULTS: dict[str, Any] = {
    "delays": [0], "n_q": 8, "dep_q": 8, "card": 1024, "text_card": 32000, "dim": 128, "num_heads": 8,
    "hidden_scale": 4, "norm": "layer_norm", "bias_proj": False, "depformer_dim": 256,
    "depformer_multi_linear": False, "depformer_weights_per_step": False, "depformer_pos_emb": "sin",
    "existing_text_padding_id": 3, "existing_text_end_padding_id": 0, "causal": True,
    "positional_embedding": "sin", "max_period": 10_000.0, "gating": "none", "layer_scale": None,
    "kv_repeat": 1,
}


def moshi_7b() -> LMConfig:
    return LMConfig.moshi_7b()


def bench() -> LMConfig:
    return LMConfig.bench()


def tiny() -> LMConfig:
    return LMConfig.tiny()


PRESETS = {"moshi_7b": moshi_7b, "bench": bench, "tiny": tiny, "stt_1b": LMConfig.stt_1b,
           "tiny_stt": LMConfig.tiny_stt, "tts_1_6b": LMConfig.tts_1_6b, "tiny_tts": LMConfig.tiny_tts,
           "tiny_hibiki": LMConfig.tiny_hibiki, "tiny_talk": LMConfig.tiny_talk}
