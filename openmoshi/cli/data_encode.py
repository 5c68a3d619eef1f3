"""Precompute the Mimi codes of audio data once, so LM training reads them instead of running the codec.

  openmoshi data encode --model MODEL --data train.jsonl --out codes/
  openmoshi train lm --init MODEL --data train.jsonl --codes codes/ ...

With --user-variants N, every stereo dialogue also gets N augmented versions of its user channel (gain, noise,
reverb, echo of Moshi's channel), encoded once; `train lm --set data.augment_user=true --codes OUT` then gives
each item one of them (or the recording), so precomputed codes still vary the user's room and microphone.

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
    parser.add_argument("--user-variants", type=int, default=0, metavar="N",
                        help="also encode N augmented versions of each stereo dialogue's user channel (default 0)")
    parser.add_argument("--augment-seed", type=int, default=0, help="seed of the user-channel augmentations")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_codec
    from ..data.codes import write_shards, write_user_variants
    from ..data.sources import read_manifest
    from ..errors import ConfigError

    if args.user_variants < 0:
        raise ConfigError(f"--user-variants must be >= 0, got {args.user_variants}")
    device, _ = resolve_device(args)
    items = read_manifest(args.data)
    mimi = load_codec(args.model, device, num_codebooks=args.codebooks)
    with tqdm(total=len(items), unit="file", disable=args.quiet) as bar:
        folder = write_shards(mimi, items, args.out, args.shard_frames, bar.update)
    if args.user_variants:
        with tqdm(total=len(items), unit="file", desc="user variants", disable=args.quiet) as bar:
            write_user_variants(mimi, items, args.out, args.user_variants, args.augment_seed,
                                shard_frames=args.shard_frames, progress=bar.update)
    print(f"{len(items)} file(s) encoded -> {folder}"
          + (f" (+ {args.user_variants} augmented user channels each)" if args.user_variants else ""))
    return 0
