"""Type and range checks of config values read from files (config.json, mimi_config.json), field by field.

Each dataclass field is checked against its annotation (int, float, bool, str, lists, optional) and a range,
so a bad value gives "field dim: ... got -64" instead of a failure deep inside model construction (or an
allocation of terabytes). Callers prefix the file name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

SIZE_MAX = 1 << 20  # dimensions, vocabularies, heads: far above any real model
LAYERS_MAX = 1024
CONTEXT_MAX = 1 << 20  # steps of attention context (the 7B uses 3000)

Range = tuple[float, float]


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_number(name: str, value: Any, kind: str, bounds: Range) -> None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        wanted = "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    low, high = bounds
    if not ok:
        raise ConfigError(f"field {name} must be {wanted} in [{low:g}, {high:g}], got {_describe(value)}")
    if not low <= value <= high:
        raise ConfigError(f"field {name} must be in [{low:g}, {high:g}], got {value!r}")


def check_value(name: str, value: Any, annotation: str, bounds: Range | None = None) -> None:
    """Checks one value against a type annotation string (as dataclasses store them) and bounds."""
    options = [part.strip() for part in annotation.split("|")]
    if value is None:
        if "None" in options:
            return
        raise ConfigError(f"field {name} may not be null")
    problems = []
    for option in (o for o in options if o != "None"):
        try:
            if option in ("int", "float"):
                _check_number(name, value, option, bounds or (-math.inf, math.inf))
            elif option == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f"field {name} must be true or false, got {_describe(value)}")
            elif option == "str":
                if not isinstance(value, str):
                    raise ConfigError(f"field {name} must be a string, got {_describe(value)}")
            elif option.startswith("list["):
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"field {name} must be a list, got {_describe(value)}")
                inner = option[len("list["):-1]
                for i, item in enumerate(value):
                    check_value(f"{name}[{i}]", item, inner, bounds)
            elif option.startswith("dict") and not isinstance(value, dict):
                raise ConfigError(f"field {name} must be an object, got {_describe(value)}")
            return
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else " or ".join(problems))


def check_fields(values: dict[str, Any], cls: type, bounds: dict[str, Range], prefix: str = "") -> None:
    """Checks every key of `values` that is a field of the dataclass `cls` (unknown keys are left to it)."""
    annotations = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in values.items():
        if name in annotations:
            check_value(prefix + name, value, str(annotations[name]), bounds.get(name))


# Kyutai's generation settings (LMGen) in config.json's lm_gen_config.
GENERATION_FIELDS: dict[str, tuple[str, Range]] = {
    "temp": ("float", (0.0, 100.0)), "temp_text": ("float", (0.0, 100.0)),
    "top_k": ("int", (0, SIZE_MAX)), "top_k_text": ("int", (0, SIZE_MAX)),
}


def check_generation(config: Any) -> None:
    if not isinstance(config, dict):
        raise ConfigError(f"field lm_gen_config must be an object, got {_describe(config)}")
    for key, (kind, bounds) in GENERATION_FIELDS.items():
        if key in config:
            check_value(f"lm_gen_config.{key}", config[key], kind, bounds)


_SIZE: Range = (1, SIZE_MAX)
_COUNT: Range = (0, SIZE_MAX)

LM_BOUNDS: dict[str, Range] = {
    "dim": _SIZE, "num_heads": _SIZE, "num_layers": (1, LAYERS_MAX), "hidden_scale": (1e-3, 1e3),
    "context": (1, CONTEXT_MAX), "max_period": (1.0, 1e12), "layer_scale": (0.0, 1e6), "kv_repeat": (1, 1024),
    "text_card": _SIZE, "text_card_out": _SIZE, "card": _SIZE, "n_q": (0, 1024), "dep_q": (0, 1024),
    "delays": (0, 1024), "existing_text_padding_id": (0, SIZE_MAX), "existing_text_end_padding_id": (0, SIZE_MAX),
    "depformer_dim": _SIZE, "depformer_num_heads": _SIZE, "depformer_num_layers": (0, LAYERS_MAX),
    "depformer_dim_feedforward": _SIZE, "depformer_weights_per_step_schedule": (0, 1024),
    "depformer_max_period": (1.0, 1e12), "depformer_layer_scale": (0.0, 1e6), "depformer_kv_repeat": (1, 1024),
    "depformer_context": (1, CONTEXT_MAX), "extra_heads_num_heads": (0, 1024), "extra_heads_dim": _COUNT,
    "lora_rank": _SIZE, "lora_scaling": (-1e6, 1e6),
}

SEANET_BOUNDS: dict[str, Range] = {
    "channels": (1, 64), "dimension": _SIZE, "n_filters": _SIZE, "n_residual_layers": (0, 64), "ratios": (1, 1024),
    "kernel_size": (1, 1024), "last_kernel_size": (1, 1024), "residual_kernel_size": (1, 1024),
    "dilation_base": (1, 64), "compress": (1, 64),
}
QUANTIZER_BOUNDS: dict[str, Range] = {
    "dimension": _SIZE, "n_q": (1, 1024), "bins": _SIZE, "input_dimension": _SIZE, "output_dimension": _SIZE,
    "n_q_semantic": (0, 1024), "decay": (0.0, 1.0), "epsilon": (0.0, 1.0),
}
TRANSFORMER_BOUNDS: dict[str, Range] = {
    "d_model": _SIZE, "num_heads": _SIZE, "num_layers": (0, LAYERS_MAX), "dim_feedforward": _SIZE,
    "context": (1, CONTEXT_MAX), "layer_scale": (0.0, 1e6), "max_period": (1.0, 1e12), "kv_repeat": (1, 1024),
}
