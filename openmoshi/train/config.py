"""Typed training configs: the loop settings every stage shares, and overrides from the command line.

A stage's config is a tree of dataclasses (its root holds a `train: TrainConfig` field). Presets are plain
functions returning such a tree; `apply_overrides(cfg, ["train.max_steps=100", "optim.lr=1e-4"])` changes
any leaf with the value parsed according to the field's type; `to_dict` / `from_dict` give the JSON saved
beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


@dataclass
class TrainConfig:
    """Settings of the generic loop (openmoshi.train.loop.Trainer), shared by every stage."""

    seed: int = 0  # seeds model init, data order (with rank and epoch) and every random draw
    max_steps: int = 1000  # optimizer steps of the whole run
    batch_size: int = 8  # global batch (items per optimizer step), split evenly over processes
    grad_accum: int = 1  # micro-batches per optimizer step on each process (divides the per-process batch)
    checkpoint_every: int = 500  # steps between checkpoints (and model/ exports); the last step always saves
    keep_checkpoints: int = 3  # newest checkpoints kept in RUN/checkpoints/
    eval_every: int = 500  # steps between evaluations (samples, plots); 0 = only at the end
    log_every: int = 10  # steps between lines of metrics.jsonl / TensorBoard points
    ema_decay: float = 0.99  # weight EMA used for evaluation and export; 0 turns it off
    device: str = "auto"  # cpu, cuda, auto (cuda when available; each process takes cuda:LOCAL_RANK)
    precision: str = "auto"  # fp32, bf16 (autocast, CUDA only), auto = bf16 on CUDA, fp32 on CPU
    parallel: str = "ddp"  # with several processes: ddp (replicated weights) or fsdp (FSDP2: weights, gradients
    #                        and optimizer state sharded per transformer layer over the processes)
    activation_checkpointing: bool = False  # recompute transformer layers in backward to save memory
    num_workers: int = 0  # data loader worker processes per training process
    threads: int = 0  # CPU threads per process for torch (0 = leave torch's default)
    tensorboard: bool = True  # write TensorBoard event files to RUN/tb (when tensorboard is installed)
    wandb_project: str = ""  # log to this Weights & Biases project as well (needs `pip install wandb`)
    progress: bool = True  # a progress bar on rank 0
    plots: bool = True  # write RUN/plots/*.png at each evaluation (needs matplotlib)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("max_steps, batch_size and grad_accum must all be at least 1")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1 or self.eval_every < 0:
            raise ConfigError("checkpoint_every, keep_checkpoints and log_every must be >= 1, eval_every >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be ddp or fsdp, got {self.parallel!r}")


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain JSON-ready data."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """`value` (JSON data or a command-line string) converted to `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if not value.startswith("[") else json.loads(value)
        return [_convert(v, item_type, where) for v in value]
    if origin is dict or annotation is dict:
        return json.loads(value) if isinstance(value, str) else dict(value)
    if annotation is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return bool(value)
    if annotation in (int, float, str):
        try:
            return annotation(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from exc
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Builds the dataclass `cls` from JSON data (unknown keys are an error, missing ones take defaults)."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """Sets `a.b.c=value` leaves of a dataclass tree in place (validated again) and returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.max_steps=100), got {item!r}")
        key, raw = item.split("=", 1)
        *path, leaf = key.strip().split(".")
        node = cfg
        for name in path:
            if not dataclasses.is_dataclass(node) or not hasattr(node, name):
                raise ConfigError(f"--set {key}: no section {name!r} in the config")
            node = getattr(node, name)
        if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
            known = sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
            raise ConfigError(f"--set {key}: unknown setting {leaf!r}; known here: {known}")
        setattr(node, leaf, _convert(raw, _field_types(type(node))[leaf], key))
    _revalidate(cfg)
    return cfg


def _revalidate(cfg: Any) -> None:
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            _revalidate(getattr(cfg, f.name))
        post = getattr(cfg, "__post_init__", None)
        if post is not None:
            try:
                post()
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc


def save_json(cfg: Any, path: Path) -> None:
    """Writes the config as JSON atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Leaves that differ between two configs as 'key: old -> new' lines."""
    da, db = (to_dict(a), to_dict(b))
    out: list[str] = []

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else k)
        elif x != y:
            out.append(f"{key}: {x!r} -> {y!r}")

    walk(da, db, prefix)
    return out
