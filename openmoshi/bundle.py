"""A whole Moshi model: Mimi + LM + text tokenizer + generation defaults, as one folder in Kyutai's layout.

    folder/
      config.json                                    LM config + file names + lm_gen_config (Kyutai's keys)
      model.safetensors                              LM weights
      tokenizer-e351c8d8-checkpoint125.safetensors   Mimi weights
      tokenizer_spm_32k_3.model                      SentencePiece text tokenizer
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import ModelSource
from .codec import Mimi, MimiConfig, load_mimi, mimi_official, mimi_tiny, save_mimi
from .errors import CheckpointError, ConfigError
from .lm.config import LMConfig
from .lm.loading import read_config, save_lm
from .lm.model import LMModel
from .lm.quantized import load_quantized_lm, release_freed_memory, stored_bits
from .nn.kv_cache import check_kv_cache
from .nn.quant import quantize_modules_

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "lm" / "assets"

# Kyutai's generation defaults (LMGen), overridden per model by config.json's lm_gen_config.
GENERATION_DEFAULTS = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}


@dataclass
class MoshiBundle:
    mimi: Mimi
    lm: LMModel
    tokenizer: Any  # sentencepiece.SentencePieceProcessor
    config: LMConfig
    generation: dict = field(default_factory=dict)  # Generator keyword arguments
    source: str = ""

    @property
    def sample_rate(self) -> int:
        return self.mimi.sample_rate

    @property
    def frame_size(self) -> int:
        return self.mimi.frame_size

    def text_piece(self, token: int) -> str | None:
        """The printable piece of a generated text token; None for padding (PAD / EPAD) and specials."""
        if token in (self.config.existing_text_padding_id, self.config.existing_text_end_padding_id):
            return None
        if not 0 <= token < self.tokenizer.get_piece_size():
            return None
        if self.tokenizer.is_control(token) or self.tokenizer.is_unknown(token):
            return None
        return self.tokenizer.id_to_piece(token)


def load_tokenizer(path: str | Path):
    import sentencepiece
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a SentencePiece model ({exc})") from exc


def generation_defaults(cfg: LMConfig) -> dict:
    """Generator keyword arguments: Kyutai's defaults, then the model's lm_gen_config."""
    out = dict(GENERATION_DEFAULTS)
    for key, value in (cfg.lm_gen_config or {}).items():
        if key in GENERATION_DEFAULTS:
            out[key] = value
        else:
            logger.info("lm_gen_config: %s=%r is not used by openmoshi's generator", key, value)
    return out


def load_codec(source: str | Path, device: str | torch.device = "cpu", cfg: LMConfig | None = None,
               num_codebooks: int | None = None, mapped: bool = True) -> Mimi:
    """The Mimi of a model folder, using as many codebooks as the LM reads per audio stream (`num_codebooks`
    overrides; a codec-only folder without an LM config uses all its codebooks by default). `mapped`: see
    checkpoint.read_safetensors."""
    model = ModelSource(source)
    raw = model.config() if cfg is None else None
    if raw is not None and "mimi_name" in raw and "dim" not in raw:  # a codec-only folder (`train codec`)
        mimi = load_mimi(source, num_codebooks=1, device=device, mapped=mapped)  # names, config: its config.json
        try:
            mimi.set_num_codebooks(num_codebooks or mimi.total_codebooks)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        return mimi
    cfg = cfg or read_config(source)[0]
    n_codebooks = max(cfg.dep_q, cfg.n_q - cfg.dep_q)
    if cfg.tts_config.get("multistream"):
        n_codebooks //= 2
    n_codebooks = num_codebooks or n_codebooks
    mimi_cfg = None
    if cfg.mimi_config_name:
        path = model.require(cfg.mimi_config_name, "Mimi config")
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
        try:
            mimi_cfg = MimiConfig.from_kyutai(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    mimi_path = model.require(cfg.mimi_name, "Mimi weights")
    return load_mimi(mimi_path, num_codebooks=n_codebooks, device=device, config=mimi_cfg, mapped=mapped)


def load_model(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantize: int | None = None, kv_cache: str = "auto") -> MoshiBundle:
    """Load a model folder or `hf://owner/repo` (Kyutai's layout) with everything needed to talk to it.

    quantize=8 or 4: int8 / int4 LM weights (lm/quantized.py), quantized while loading unless the folder
    already holds them; Mimi's transformers then run in int8. kv_cache: how the temporal transformer's
    streaming cache stores keys and values (float | bf16 | int8 | int4, nn/kv_cache.py); "auto" = int8 for int4
    weights on CPU (where memory is what limits), else float.
    """
    model = ModelSource(source)
    cfg, _ = read_config(source)
    if cfg.model_type not in ("moshi", "hibiki", "stt", "tts"):
        raise ConfigError(f"{source}: unknown model_type {cfg.model_type!r}")
    quantized = quantize is not None or stored_bits(cfg) is not None
    mimi = load_codec(source, device, cfg, mapped=not quantized)  # quantized: its float weights must go
    if quantized:  # before the LM is read, so that the float copy is gone by then
        quantize_mimi_(mimi)
        release_freed_memory()  # the float weights of its transformers (~200 MB for the official Mimi)
    tokenizer = load_tokenizer(model.require(cfg.tokenizer_name, "text tokenizer"))
    if tokenizer.get_piece_size() > cfg.text_card:
        raise CheckpointError(f"{source}: the tokenizer has {tokenizer.get_piece_size()} pieces but the LM's "
                              f"text vocabulary is {cfg.text_card}")
    lm = load_quantized_lm(source, device=device, dtype=dtype, quantize=quantize)
    lm.set_kv_cache(resolve_kv_cache(kv_cache, quantize or stored_bits(cfg), device))
    return MoshiBundle(mimi, lm, tokenizer, lm.cfg, generation_defaults(lm.cfg), str(source))


def resolve_kv_cache(kind: str, bits: int | None, device: str | torch.device) -> str:
    """The KV cache kind to use: `kind`, or for "auto" int8 with int4 weights on CPU, else float."""
    if kind != "auto":
        return check_kv_cache(kind)
    return "int8" if bits == 4 and torch.device(device).type == "cpu" else "float"


def quantize_mimi_(mimi: Mimi) -> list[str]:
    """int8 weights for Mimi's transformers (its convolutions stay float32)."""
    return quantize_modules_(mimi, 8, skip=lambda name: "transformer" not in name)


def save_model(bundle: MoshiBundle, folder: str | Path, tokenizer_file: str | Path | None = None) -> Path:
    """Write a bundle as a model folder in Kyutai's layout (loads back with `load_model` and Kyutai's code)."""
    folder = Path(folder)
    cfg = bundle.config
    if bundle.mimi.cfg != mimi_official():
        cfg = cfg.replace(mimi_config_name="mimi_config.json")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mimi_config.json").write_text(json.dumps(bundle.mimi.cfg.to_kyutai(), indent=2) + "\n")
    save_lm(bundle.lm, folder, config=cfg)
    save_mimi(bundle.mimi, folder / cfg.mimi_name)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / cfg.tokenizer_name)
    else:
        (folder / cfg.tokenizer_name).write_bytes(bundle.tokenizer.serialized_model_proto())
    return folder


def package_model(source: str | Path, folder: str | Path, lm_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a model folder with the LM's weights stored in `lm_dtype` (as Kyutai ships its LMs); Mimi stays
    float32. Loads back with `load_model` (which computes in the dtype it is asked for)."""
    bundle = load_model(source)
    bundle.lm.to(lm_dtype)
    return save_model(bundle, folder, tokenizer_file=ModelSource(source).require(bundle.config.tokenizer_name,
                                                                                 "text tokenizer"))


def _mimi_tiny_32() -> MimiConfig:
    """The tiny Mimi with all 32 codebook levels (speech-to-text models read 32)."""
    cfg = mimi_tiny()
    return dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer, n_q=32))


PRESETS = {
    "moshi-7b": (LMConfig.moshi_7b, mimi_official, None),
    "bench": (LMConfig.bench, mimi_official, "tokenizer_tiny.model"),
    "tiny": (LMConfig.tiny, mimi_tiny, "tokenizer_tiny.model"),
    "stt-1b": (LMConfig.stt_1b, mimi_official, None),
    "tiny-moshi-asr": (LMConfig.tiny_moshi_asr, mimi_tiny, "tokenizer_tiny.model"),
    "tiny-moshi-tts": (LMConfig.tiny_moshi_tts, mimi_tiny, "tokenizer_tiny.model"),
    "tiny-stt": (LMConfig.tiny_stt, _mimi_tiny_32, "tokenizer_tiny.model"),
    "tts-1.6b": (LMConfig.tts_1_6b, mimi_official, None),
    "tiny-tts": (LMConfig.tiny_tts, mimi_tiny, "tokenizer_tiny.model"),
    "tiny-hibiki": (LMConfig.tiny_hibiki, mimi_tiny, "tokenizer_tiny.model"),
}


# Trained models kept in the package: `init --preset NAME` copies them (recipes/ says how each was made).
SHIPPED = {"tiny-talk": ASSETS / "tiny-talk"}


def init_model(preset: str, folder: str | Path, seed: int = 0, tokenizer: str | Path | None = None) -> Path:
    """Write a model folder for a preset: a shipped trained model, or fresh random weights (it babbles)."""
    if preset in SHIPPED:
        source = SHIPPED[preset]
        if not (source / "config.json").is_file():
            raise CheckpointError(f"the trained {preset} model is not shipped in this installation ({source} "
                                  f"has no config.json). Build it with `python recipes/{preset.replace('-', '_')}.py` "
                                  f"and copy WORK/model/* into {source}/, or serve WORK/model directly")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_file():
                shutil.copyfile(f, folder / f.name)
        return folder
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join([*PRESETS, *SHIPPED])}")
    lm_preset, mimi_preset, bundled_tokenizer = PRESETS[preset]
    tokenizer = tokenizer or (ASSETS / bundled_tokenizer if bundled_tokenizer else None)
    if tokenizer is None:
        raise ConfigError(f"preset {preset!r} needs Kyutai's SentencePiece model: pass --tokenizer "
                          f"({lm_preset().tokenizer_name})")
    torch.manual_seed(seed)
    cfg = lm_preset()
    tok = load_tokenizer(tokenizer)
    if tok.get_piece_size() > cfg.text_card:
        raise ConfigError(f"the tokenizer has {tok.get_piece_size()} pieces, more than the preset's "
                          f"text vocabulary of {cfg.text_card}")
    cfg = cfg.replace(tokenizer_name=Path(tokenizer).name)
    mimi = Mimi(mimi_preset())
    _fill_codebooks_randomly(mimi, seed)
    lm = LMModel(cfg)
    bundle = MoshiBundle(mimi.eval(), lm.eval(), tok, cfg, generation_defaults(cfg))
    return save_model(bundle, folder, tokenizer_file=tokenizer)


@torch.no_grad()
def _fill_codebooks_randomly(mimi: Mimi, seed: int) -> None:
    """Give a fresh Mimi initialised codebooks (empty EMA codebooks would map everything to code 0)."""
    gen = torch.Generator().manual_seed(seed)
    for name, buffer in mimi.quantizer.named_buffers():
        if name.endswith("embedding_sum"):
            buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.1)
        elif name.endswith(("cluster_usage", "_initialized")):
            buffer.fill_(1.0)
