"""Load and save Mimi in Kyutai's layout (`tokenizer-e351c8d8-checkpoint125.safetensors`).

A non-default Mimi carries its Kyutai-style config in the safetensors metadata (key `mimi_config`), and a
model folder may also name one in config.json (`mimi_config_name`), as Kyutai's repos do.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import (HF_PREFIX, ModelSource, hf_download, load_into, read_safetensors,
                          save_safetensors, split_hf)
from ..errors import CheckpointError, ConfigError
from .config import MimiConfig, mimi_official
from .mimi import Mimi

MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
METADATA_KEY = "mimi_config"


def _config_from_metadata(path: Path) -> MimiConfig | None:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    if METADATA_KEY not in meta:
        return None
    try:
        return MimiConfig.from_kyutai(json.loads(meta[METADATA_KEY]))
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path}: invalid Mimi config in metadata ({exc})") from exc


def _locate(source: str | Path) -> tuple[Path, MimiConfig | None]:
    """Weights file and, if the source names one, its Mimi config."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        repo, filename = split_hf(text)
        if filename:
            try:
                return hf_download(repo, filename), None
            except FileNotFoundError as exc:
                raise CheckpointError(str(exc)) from exc
        model = ModelSource(text)
    elif Path(text).expanduser().is_file():
        return Path(text).expanduser(), None
    else:
        model = ModelSource(text)
    raw = model.config() or {}
    weights = model.require(raw.get("mimi_name", MIMI_NAME), "Mimi weights")
    cfg = None
    if raw.get("mimi_config_name"):
        path = model.require(raw["mimi_config_name"], "Mimi config")
        try:
            cfg = MimiConfig.from_kyutai(json.loads(path.read_text()))
        except ValueError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    return weights, cfg


def load_mimi(source: str | Path, num_codebooks: int = 8, device: str | torch.device = "cpu",
              config: MimiConfig | dict | None = None, mapped: bool = True) -> Mimi:
    """Mimi from a safetensors file, a model folder, or `hf://owner/repo[/file]`, in eval mode.

    `num_codebooks` picks how many of the checkpoint's levels encode and decode use (Moshi uses 8).
    The shapes come from `config`, else from the file's metadata or the folder's config, else the official ones.
    `mapped`: see checkpoint.read_safetensors (False when some weights will be replaced, e.g. quantized).
    """
    weights, folder_cfg = _locate(source)
    if isinstance(config, dict):
        config = MimiConfig.from_kyutai(config)
    cfg = config or folder_cfg or _config_from_metadata(weights) or mimi_official()
    if not 1 <= num_codebooks <= cfg.quantizer.n_q:
        raise ConfigError(f"num_codebooks must be in 1..{cfg.quantizer.n_q} for this Mimi, got {num_codebooks}")
    with torch.device("meta"):
        model = Mimi(cfg)
    load_into(model, read_safetensors(weights, device, mapped=mapped), weights, dtype=torch.float32, assign=True)
    model.set_num_codebooks(num_codebooks)
    return model.to(device).eval()


def save_mimi(model: Mimi, path: str | Path) -> Path:
    """Write the weights in Kyutai's layout; `path` is a .safetensors file or a folder (official file name)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / MIMI_NAME
    metadata = {METADATA_KEY: json.dumps(model.cfg.to_kyutai())}
    save_safetensors(model.state_dict(), path, metadata)
    return path
