"""Helpers shared by the subcommands: devices, dtypes, threads, progress."""

from __future__ import annotations

import argparse
import os

import torch

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_device_arguments(parser: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtype", default=default_dtype, choices=["auto", *DTYPES],
                        help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = all cores)")


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {args.device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu")
    dtype_name = getattr(args, "dtype", "auto")
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype_name == "auto" \
        else DTYPES[dtype_name]
    threads = getattr(args, "threads", 0) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return device, dtype


QUANTIZE = {"int8": 8, "int4": 4}


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, choices=sorted(QUANTIZE),
                        help="run the LM with int8 (per channel) or int4 (groups of 32) weights, quantized while "
                             "loading (Mimi's transformers then run in int8); a folder written by `openmoshi "
                             "quantize` loads quantized without this option")


def quantize_bits(args: argparse.Namespace) -> int | None:
    name = getattr(args, "quantize", None)
    return None if name is None else QUANTIZE[name]
