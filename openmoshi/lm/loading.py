"""Loading and saving Moshi LMs in Kyutai's layout: a folder (or `hf://owner/repo`) with config.json,
model.safetensors and optionally lora.safetensors; or a bare .safetensors file holding the 7B.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..checkpoint import (
    HF_PREFIX,
    ModelSource,
    hf_download,
    load_into,
    read_safetensors,
    save_safetensors,
    split_hf,
    stored_float_dtype,
)
from ..errors import CheckpointError, ConfigError
from .config import LMConfig
from .model import LMModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LORA_NAME = "lora.safetensors"
_SAFETENSORS = (".safetensors", ".sft", ".sfts")


def _is_hf(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(HF_PREFIX)


def _is_weights_file(name: str | Path) -> bool:
    return str(name).endswith(_SAFETENSORS)


def read_config(source: str | Path) -> tuple[LMConfig, dict | None]:
    """The LM config of a model folder, `hf://owner/repo`, config.json file or bare weights file.

    Returns (config, raw config.json dict); a source without config.json is a legacy Moshi 7B repo
    (raw is None then), as in Kyutai's loader.
    """
    if _is_hf(source):
        repo, filename = split_hf(str(source))
        if filename and _is_weights_file(filename):
            return LMConfig.moshi_7b(), None
        try:
            path = hf_download(repo, filename or CONFIG_NAME)
        except FileNotFoundError:
            logger.warning("%s has no %s: assuming the Moshi 7B config", source, CONFIG_NAME)
            return LMConfig.moshi_7b(), None
        return _parse_config(path)
    path = Path(source)
    if path.is_file():
        if _is_weights_file(path):
            return LMConfig.moshi_7b(), None
        return _parse_config(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return _parse_config(path / CONFIG_NAME)
        logger.warning("%s has no %s: assuming the Moshi 7B config", path, CONFIG_NAME)
        return LMConfig.moshi_7b(), None
    raise CheckpointError(f"model source not found: {source} (expected a folder, a .safetensors file or "
                          "hf://owner/repo)")


def _parse_config(path: Path) -> tuple[LMConfig, dict]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable JSON file ({exc})") from exc
    try:
        return LMConfig.from_kyutai(raw), raw
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _weights_path(source: str | Path, cfg: LMConfig) -> Path:
    if _is_hf(source):
        _, filename = split_hf(str(source))
        if filename and _is_weights_file(filename):
            return ModelSource.around(source).require(str(source), "LM weights")
    elif _is_weights_file(source):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        return path
    return ModelSource.around(source).require(cfg.moshi_name, "LM weights")


def stored_dtype(source: str | Path) -> torch.dtype:
    """The dtype an LM's weights are stored in (bf16 for Kyutai's releases), without reading them."""
    cfg, _ = read_config(source)
    return stored_float_dtype(_weights_path(source, cfg)) or torch.float32


def load_lm(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            lora_weights: str | Path | None = None) -> LMModel:
    """Load a Moshi LM in eval mode, weights cast to `dtype` on `device`.

    LoRA weights (config.json `lora: true`, file `lora_name` or lora.safetensors, or `lora_weights` given
    here) are fused into the base weights: W += lora_scaling * B @ A.
    """
    cfg, _ = read_config(source)
    if cfg.quantize or cfg.quantization:  # int8 / int4 weights (a folder from `openmoshi quantize`, Kyutai's q8)
        from .quantized import load_quantized_lm
        return load_quantized_lm(source, device=device, dtype=dtype)
    weights = _weights_path(source, cfg)
    with torch.device("meta"):  # built without memory, then the checkpoint tensors become the parameters
        lm = LMModel(cfg)
    logger.info("loading the LM from %s", weights)
    state = read_safetensors(weights, device=device, dtype=dtype)  # cast tensor by tensor: one copy in memory
    load_into(lm, state, weights, dtype=dtype, assign=True)
    del state
    if lora_weights is not None or cfg.lora:
        if lora_weights is None:
            lora_weights = ModelSource.around(source).require(cfg.lora_name or LORA_NAME, "LoRA weights")
        elif isinstance(lora_weights, str) and lora_weights.startswith(HF_PREFIX):
            lora_weights = ModelSource.around(source).require(lora_weights, "LoRA weights")
        fuse_lora(lm, read_safetensors(lora_weights, device=device), cfg.lora_scaling, lora_weights)
        lm.cfg = cfg.replace(lora=False, lora_name=None)
    if cfg.model_type == "hibiki":
        # As Kyutai does: Hibiki sometimes samples EOS (2) too early; reading it as PAD (3) keeps it going.
        with torch.no_grad():
            lm.text_emb.weight[2] = lm.text_emb.weight[3]
    return lm.eval()


_ATTN_BLOCK = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)$")
_ATTN_STACKED = re.compile(r"^(.*\.self_attn)\.(in_proj|out_proj)$")


@torch.no_grad()
def fuse_lora(lm: LMModel, state: dict[str, torch.Tensor], scaling: float, source: str | Path) -> None:
    """Add scaling * B @ A of each LoRA pair in `state` (Kyutai's `<linear>.lora_A.weight` / `lora_B.weight`
    names) to the weight of that linear layer."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", key)
        if not match:
            raise CheckpointError(f"{source}: {key} is not a LoRA tensor (expected <layer>.lora_A.weight or "
                                  "<layer>.lora_B.weight)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    params = dict(lm.named_parameters())
    for prefix, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{source}: {prefix} has only {sorted(pair)} (LoRA needs lora_A and lora_B)")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        block = _ATTN_BLOCK.match(prefix)
        stacked = _ATTN_STACKED.match(prefix)
        if block or stacked:
            attn_name, kind = (block or stacked).group(1), (block or stacked).group(2)
            name = f"{attn_name}.in_proj_weight" if kind.startswith("in_proj") else f"{attn_name}.out_proj.weight"
            if name not in params:
                raise CheckpointError(f"{source}: LoRA layer {prefix} matches no weight of the model ({name})")
            n = lm.get_submodule(attn_name).cfg.num_weight_sets
            weight = params[name]
            rows = weight.shape[0] // n
            if block:
                i = int(block.group(3))
                if i >= n:
                    raise CheckpointError(f"{source}: {prefix} refers to weight set {i}, the layer has {n}")
                _add_lora(weight[i * rows:(i + 1) * rows], a, b, scaling, prefix, source)
            else:
                if a.shape[0] % n or b.shape[0] % n:
                    raise CheckpointError(f"{source}: {prefix} LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} "
                                          f"do not split into {n} weight sets")
                for i, (ai, bi) in enumerate(zip(a.chunk(n), b.chunk(n))):
                    _add_lora(weight[i * rows:(i + 1) * rows], ai, bi, scaling, prefix, source)
        else:
            name = f"{prefix}.weight"
            if name not in params:
                raise CheckpointError(f"{source}: LoRA layer {prefix} matches no weight of the model ({name})")
            _add_lora(params[name], a, b, scaling, prefix, source)


def _add_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, prefix: str,
              source: str | Path) -> None:
    out_dim, in_dim = weight.shape
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dim or b.shape[0] != out_dim or b.shape[1] != a.shape[0]:
        raise CheckpointError(f"{source}: LoRA {prefix} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                              f"which do not fit its weight {tuple(weight.shape)}")
    delta = (b.to(weight.device) @ a.to(weight.device)) * scaling
    weight.add_(delta.to(weight.dtype))


def save_lm(lm: LMModel, folder: str | Path, dtype: torch.dtype | None = None,
            config: LMConfig | None = None) -> Path:
    """Write `lm` as a Kyutai model folder: config.json + model.safetensors (weights cast to `dtype` if given).

    `config` replaces `lm.cfg` in config.json (same architecture; e.g. other file names).
    """
    if lm.cfg.quantize or lm.cfg.quantization:
        from .quantized import save_quantized_lm
        return save_quantized_lm(lm, folder, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = (config or lm.cfg).replace(lora=False, lora_name=None)
    state = {k: (v.to(dtype) if dtype is not None and v.dtype.is_floating_point else v)
             for k, v in lm.state_dict().items()}
    if _is_weights_file(cfg.moshi_name) and "/" not in cfg.moshi_name:
        weights_name = cfg.moshi_name
    else:
        weights_name = "model.safetensors"
        cfg = cfg.replace(moshi_name=weights_name)
    save_safetensors(state, folder / weights_name)
    (folder / CONFIG_NAME).write_text(json.dumps(cfg.to_kyutai(), indent=2) + "\n")
    return folder
