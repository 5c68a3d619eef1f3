"""Evaluate a Moshi LM on held-out data: per-stream cross-entropy, text bits per byte, per-codebook audio
cross-entropy and accuracy, text padding fraction.

  openmoshi eval lm --model runs/ft/model --data held_out.jsonl
  openmoshi eval lm --model hf://kyutai/moshiko-pytorch-bf16 --data corpus.jsonl --json

--data: JSONL manifests of {path, duration} (stereo dialogues or mono speech with NAME.json alignments),
or text corpora (.txt, .jsonl of {text}). Cross-entropies are in nats per token.

--listening (dialogues): the first text token of each of Moshi's turns, predicted with the crop's own user audio
and with another crop's: turn_start_acc vs turn_start_acc_other_user. A model that listens loses accuracy when it
hears someone else; one that does not scores the same. word_acc vs word_acc_other_user: the same over every word
token of Moshi's text.
"""

from __future__ import annotations

import argparse
import json
import math
import random

from tqdm import tqdm

from .common import add_device_arguments, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or hf://owner/repo in Kyutai's layout")
    parser.add_argument("--data", required=True, nargs="+", help="manifests or text corpora to evaluate on")
    parser.add_argument("--codes", help="precomputed codes folder (`openmoshi data encode`); default: encode here")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per evaluated crop (default 10)")
    parser.add_argument("--max-items", type=int, default=0, help="evaluate at most this many crops (0 = all)")
    parser.add_argument("--batch-size", type=int, default=4, help="crops per forward pass")
    parser.add_argument("--listening", action="store_true",
                        help="also score the first text token of each of Moshi's turns with the crop's own user "
                             "audio and with another crop's (dialogues; batches of 2 or more)")
    parser.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                        help="evaluate crops drawn at random with this seed (default: the first crops in order)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..bundle import load_model
    from ..data.codes import CodeShards, codec_key
    from ..data.lm_dataset import AudioLMDataset, TextLMDataset
    from ..data.sources import read_manifest, read_text_documents
    from ..errors import OpenMoshiError
    from ..eval.lm import evaluate_grids
    from ..train.lm.task import is_audio_manifest

    device, _ = resolve_device(args)
    if args.duration <= 0 or args.batch_size < 1:
        raise OpenMoshiError("--duration must be > 0 and --batch-size at least 1")
    if args.listening and args.batch_size < 2:
        raise OpenMoshiError("--listening compares each crop with another crop's user audio in the same batch: "
                             "give --batch-size 2 or more")
    bundle = load_model(args.model, device=device, dtype=torch.float32)
    lm = bundle.lm.eval()
    audio = [s for s in args.data if is_audio_manifest(s)]
    text = [s for s in args.data if s not in audio]
    datasets: list = []
    if audio:
        shards = CodeShards(args.codes, codec_key(bundle.mimi)) if args.codes else None
        items = [it for s in audio for it in read_manifest(s)]
        datasets.append(AudioLMDataset(items, lm.cfg, bundle.tokenizer, args.duration,
                                       mimi=None if shards else bundle.mimi, shards=shards))
    if text:
        docs = [d for s in text for d in read_text_documents(s)]
        datasets.append(TextLMDataset(docs, lm.cfg, bundle.tokenizer, math.ceil(args.duration * 12.5 - 1e-6)))
    grids = []
    crops = [(data, i) for data in datasets for i in range(len(data))]
    if args.shuffle is not None:
        random.Random(args.shuffle).shuffle(crops)
    if args.max_items:
        crops = crops[:args.max_items]
    for data, i in tqdm(crops, unit="crop", disable=args.quiet or args.json):
        grids.append(data[i])
    metrics = evaluate_grids(lm, grids, bundle.tokenizer, device, args.batch_size, listening=args.listening)
    metrics["items"] = len(grids)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        width = max(len(k) for k in metrics)
        print(f"{'metric':<{width}}  value")
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0
