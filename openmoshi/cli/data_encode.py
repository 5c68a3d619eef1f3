"""Precompute the Mimi codes of audio data once, so LM training reads them instead of running the codec.

  openmoshi data encode --model MODEL --data train.jsonl --out codes/
  openmoshi train lm --init MODEL --data train.jsonl --codes codes/ ...

The codes go to OUT/<codec key>/ (shards of int16 codes [channels, n_q, frames] per file + index.json). The key
hashes the codec's config and weights: training with another codec never reads them. Re-running resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from .common import add_device_arguments, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model folder or hf://owner/repo whose Mimi encodes the audio (the model you will train)")
    parser.add_argument("--data", required=True, type=Path,
                        help="JSONL manifest of {path, duration} (or a folder of them), as moshi-finetune's")
    parser.add_argument("--out", required=True, type=Path, help="codes folder (one subfolder per codec)")
    parser.add_argument("--shard-frames", type=int, default=1_000_000, help="frames of codes per shard file")
    parser.add_argument("--codebooks", type=int,
                        help="codebooks per channel (default: as many as the model's LM reads; all of a codec-only "
                             "folder). Must match the LM that will read the codes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_codec
    from ..data.codes import write_shards
    from ..data.sources import read_manifest

    device, _ = resolve_device(args)
    items = read_manifest(args.data)
    mimi = load_codec(args.model, device, num_codebooks=args.codebooks)
    with tqdm(total=len(items), unit="file", disable=args.quiet) as bar:
        folder = write_shards(mimi, items, args.out, args.shard_frames, bar.update)
    print(f"{len(items)} file(s) encoded -> {folder}")
    return 0
