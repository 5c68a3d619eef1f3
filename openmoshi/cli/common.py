"""Helpers shared by the subcommands: devices, dtypes, threads, progress."""

from __future__ import annotations

import argparse
import os

import torch

from ..errors import ConfigError
from ..nn.kv_cache import KV_CACHE_KINDS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_device_arguments(parser: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtype", default=default_dtype, choices=["auto", *DTYPES],
                        help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch's operators (0 = fit the machine: `serve` leaves cores for "
                             "Opus, the event loop and a browser, `infer` leaves one core, other commands "
                             "use every core this process may run on)")


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
    threads = getattr(args, "threads", 0)
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (fit the machine) or a positive count, got {threads}")
    torch.set_num_threads(threads or default_threads(usable_cores(), getattr(args, "command", None)))
    return device, dtype


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroups' cpusets), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Cores a command leaves to others when --threads is 0. `serve` must hold real time: its Opus decoding and
# encoding, the event loop and usually a browser on the same machine (~0.9 core) need a core that torch's
# spinning intra-op workers would otherwise take, so oversubscribing costs whole seconds of missed audio.
# `infer` is offline but shares the machine too. Batch jobs (training, codec, eval) use every core.
RESERVED_CORES = {"serve": 2, "infer": 1, "client": None}


def default_threads(cores: int, command: str | None = None) -> int:
    """Torch intra-op threads for `command` on a machine with `cores` usable cores (at least 1).

    serve: 1 thread up to 2 cores, else cores - 2; infer: cores - 1; client: 1 (its work is Opus and audio,
    not torch); anything else: all cores.
    """
    cores = max(1, int(cores))
    if command not in RESERVED_CORES:
        return cores
    reserved = RESERVED_CORES[command]
    if reserved is None:
        return 1
    return max(1, cores - reserved)


QUANTIZE = {"int8": 8, "int4": 4}


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", default=None, choices=sorted(QUANTIZE),
                        help="run the LM with int8 (per channel) or int4 (groups of 32) weights, quantized while "
                             "loading (Mimi's transformers then run in int8); a folder written by `openmoshi "
                             "quantize` loads quantized without this option")


def add_kv_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache", default="auto", choices=["auto", *KV_CACHE_KINDS],
                        help="how the LM's attention cache stores past keys and values: float (the model's "
                             "dtype), bf16, int8 with one scale per head and step (a quarter of fp32's memory: "
                             "~0.26 instead of 1 MiB per 80 ms step at 7B), or int4 in groups of 32 (~0.14 MiB "
                             "per step; the least memory, a larger rounding error); auto (default) = int8 with "
                             "int4 weights on CPU, else float")


def quantize_bits(args: argparse.Namespace) -> int | None:
    name = getattr(args, "quantize", None)
    return None if name is None else QUANTIZE[name]
