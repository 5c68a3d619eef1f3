"""Options shared by the `openmoshi train STAGE` commands, mapped onto a stage's config tree."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError
from ..train.config import apply_overrides

# option dest -> config path; an option left unset keeps the preset's value
COMMON_OPTIONS = {
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "checkpoint_every": "train.checkpoint_every",
    "eval_every": "train.eval_every",
    "grad_accum": "train.grad_accum",
    "num_workers": "train.num_workers",
    "device": "train.device",
    "threads": "train.threads",
    "parallel": "train.parallel",
}


def add_common_arguments(parser: argparse.ArgumentParser, presets: dict[str, Callable[[], Any]],
                         default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(presets),
                        help=f"named starting configuration (default {default_preset}); options below override it")
    parser.add_argument("--data", nargs="+", type=Path, default=None,
                        help="training data: folders (searched recursively) and/or JSONL manifests")
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder; re-running the same command on an existing folder resumes it")
    parser.add_argument("--max-steps", type=int, help="optimizer steps of the whole run")
    parser.add_argument("--batch-size", type=int,
                        help="global batch (items per step), split evenly over torchrun processes")
    parser.add_argument("--seed", type=int, help="seed of initialisation, data order and every random draw")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints and RUN/model exports")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations, samples and plots")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step on each process")
    parser.add_argument("--num-workers", type=int, help="data loader worker processes per training process")
    parser.add_argument("--device", help="cpu, cuda or auto (each torchrun process takes cuda:LOCAL_RANK)")
    parser.add_argument("--threads", type=int, help="CPU threads per process (0 = torch's default)")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"],
                        help="how torchrun processes split the model: ddp (default; every process holds all "
                             "weights) or fsdp (FSDP2: weights, gradients and optimizer state sharded per "
                             "transformer layer; checkpoints and RUN/model stay the same)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set any config value, e.g. --set train.log_every=5 --set optim.lr=3e-4 "
                             "(repeatable; see RUN/config.json for every key)")
    parser.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")


def build_config(args: argparse.Namespace, presets: dict[str, Callable[[], Any]],
                 stage_options: dict[str, str]) -> Any:
    """Preset, then explicit options, then --set overrides."""
    if args.preset not in presets:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {sorted(presets)}")
    cfg = presets[args.preset]()
    overrides = []
    for dest, path in {**COMMON_OPTIONS, **stage_options}.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        overrides.append(f"{path}={value}")
    return apply_overrides(cfg, overrides + list(args.overrides))
