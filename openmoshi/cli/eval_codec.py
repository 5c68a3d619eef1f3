"""Evaluate a codec: `openmoshi eval codec --checkpoint M DATA... [--json]`.

Metrics (means over files): mel distance (DAC's), multi-resolution STFT distance, SI-SDR (dB), waveform L1,
wideband PESQ and STOI (when `pesq` / `pystoi` are installed), bitrate, and per level the share of codewords
used and the entropy of the codes (bits); with --teacher, the cosine between the semantic level's projection
and the teacher's features; with --phone-purity, how well codebook 0 alone tells which phoneme is spoken
(a code -> phoneme map fitted on --purity-fit files, e.g. training voices, and scored on DATA, e.g. held-out ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_device_arguments, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="+", type=Path, help="audio folders, files or JSONL manifests")
    parser.add_argument("--checkpoint", required=True,
                        help="codec: a training run's RUN/model folder, a .safetensors file or hf://owner/repo")
    parser.add_argument("--num-codebooks", "-k", type=int, default=8, help="RVQ levels to use (default 8)")
    parser.add_argument("--seconds", type=float, default=0.0, help="evaluate only the first S seconds of each file")
    parser.add_argument("--max-files", type=int, default=0, help="evaluate at most this many files (0 = all)")
    parser.add_argument("--teacher", default="", help="WavLM/HuBERT folder or id, or phonemes / letters (word "
                        "alignments beside the files): also report teacher cosine")
    parser.add_argument("--teacher-layer", type=int, default=-1, help="teacher hidden-state index")
    parser.add_argument("--phone-purity", choices=["phonemes", "letters"], default="",
                        help="also report codebook 0's phone purity (needs the word alignments NAME.json beside "
                             "the files; phonemes need espeak-ng)")
    parser.add_argument("--purity-fit", nargs="+", type=Path,
                        help="files whose codes fit the code -> phoneme map (default: DATA itself); give other "
                             "speakers than DATA's to measure what holds across voices")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser, default_dtype="float32")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.codec import evaluate_codec
    if args.purity_fit and not args.phone_purity:
        raise ConfigError("--purity-fit fits the map of --phone-purity: give --phone-purity phonemes|letters too")
    device, _ = resolve_device(args)
    metrics = evaluate_codec(args.checkpoint, args.data, args.num_codebooks, args.seconds, args.teacher,
                             args.teacher_layer, args.max_files, str(device), progress=not args.quiet,
                             purity_units=args.phone_purity, purity_fit=args.purity_fit)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    main = [k for k in metrics if not k.startswith(("usage_", "entropy_bits_"))]
    width = max(len(k) for k in main)
    for k in main:
        print(f"{k:<{width}}  {metrics[k]:.4f}")
    levels = sorted(int(k.split("_")[-1]) for k in metrics if k.startswith("usage_"))
    print("level  usage  entropy_bits")
    for i in levels:
        print(f"{i:>5}  {metrics[f'usage_{i}']:.3f}  {metrics[f'entropy_bits_{i}']:.3f}")
    return 0
