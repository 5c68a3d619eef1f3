"""Train or fine-tune the Moshi LM, one stage of the paper's recipe at a time.

  openmoshi train lm --stage finetune --init hf://kyutai/moshiko-pytorch-bf16 --data dialogues.jsonl \\
      --out runs/ft --lora-rank 128 --lr 2e-6 --duration 100 --batch-size 16
  openmoshi train lm --stage text --preset tiny --data corpus.jsonl --out runs/text
  torchrun --nproc-per-node 2 -m openmoshi train lm ...        (the global batch is split over processes)

Stages (presets of the paper, every value overridable): text (text corpora), audio (mono speech + word
alignments; acoustic delay 2, text-audio delay jitter +-0.6 s, text masked 30%, every other batch text-only
when text data is given), multistream (stereo, delay 1), finetune (stereo dialogues in moshi-finetune's
format: manifest of {path, duration}, NAME.json alignments beside each wav, channel 0 = Moshi).
Every checkpoint writes RUN/model/, a model folder in Kyutai's layout for `openmoshi infer` / `serve`
(with LoRA: model.safetensors + lora.safetensors + config.json lora/lora_rank/lora_scaling).
Re-running the same command on RUN resumes it.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from ..lm.config import PRESETS
from ..train.config import to_dict
from ..train.lm.config import STAGES, stage_config
from .train_common import add_common_arguments, build_config

# option dest -> config path
STAGE_OPTIONS = {
    "init": "model.init",
    "codec": "model.codec",
    "tokenizer": "model.tokenizer",
    "data": "data.data",
    "text_data": "data.text_data",
    "eval_data": "data.eval_data",
    "codes": "data.codes",
    "duration": "data.duration",
    "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "lora_rank": "lora.rank",
    "lora_scaling": "lora.scaling",
    "lora_targets": "lora.targets",
    "lora_base_dtype": "lora.base_dtype",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGES, default="finetune",
                        help="recipe stage: learning rates, delays and data handling of the paper (default finetune)")
    add_common_arguments(parser, {name: partial(stage_config, "finetune", name) for name in PRESETS}, "tiny")
    for action in parser._actions:
        if action.dest == "preset":
            action.help = "model architecture when training from scratch (ignored with --init; default tiny)"
        if action.dest == "data":
            action.help = ("training data: JSONL manifests of {path, duration} (stereo dialogues or mono speech, "
                           "NAME.json alignments beside each wav), or text corpora (.txt / .jsonl of {text})")
            action.type = str
    parser.add_argument("--init", help="start from this model folder or hf://owner/repo (Kyutai's layout)")
    parser.add_argument("--codec", help="Mimi to encode the audio with (default: the --init model's)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: the --init model's or the preset's)")
    parser.add_argument("--text-data", nargs="+", help="text corpora mixed in as text-only batches (audio stage)")
    parser.add_argument("--eval-data", nargs="+", help="held-out data (default: the first crops of --data)")
    parser.add_argument("--codes", help="folder of codes precomputed by `openmoshi data encode` (default: encode "
                                        "on the fly with the model's frozen Mimi)")
    parser.add_argument("--duration", type=float, help="seconds per training item (crop length)")
    parser.add_argument("--lr", type=float,
                        help="learning rate of the temporal transformer (the depth transformer's keeps the "
                             "stage's ratio, optim.depth_lr_scale)")
    parser.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine decay")
    parser.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank (0 = full fine-tuning)")
    parser.add_argument("--lora-scaling", type=float, help="LoRA scaling, a raw multiplier of B @ A (Kyutai: 2.0)")
    parser.add_argument("--lora-targets", nargs="+",
                        help="linear layers given LoRA: 'all' or name parts (e.g. self_attn gating)")
    parser.add_argument("--lora-base-dtype", choices=["auto", "bf16", "fp32"],
                        help="dtype of LoRA's frozen base weights (adapters, their optimizer state and activations "
                             "stay fp32); auto (default) = bf16 when the --init checkpoint is bf16, as Kyutai's are")


def run(args: argparse.Namespace) -> int:
    from ..train import Trainer
    from ..train.lm.task import LMTask

    presets = {args.preset: partial(stage_config, args.stage, args.preset)} if args.preset in PRESETS else {}
    if args.data is not None:
        args.data = [str(p) for p in args.data]
    cfg = build_config(args, presets, STAGE_OPTIONS)
    if args.show_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    last = Trainer(LMTask(cfg), cfg.train, args.out, cfg).fit()
    if last:
        print(f"done: step {cfg.train.max_steps}, loss {last.get('loss', float('nan')):.4f} -> {args.out / 'model'}")
    return 0
