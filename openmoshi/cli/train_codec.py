"""Train a Mimi codec: `openmoshi train codec --data DATA... --out RUN [options]`.

The paper's recipe: split RVQ (EMA codebooks, k-means init, dead-code replacement, commitment, quantizer
dropout, quantization rate 0.5), multi-scale STFT discriminator with hinge loss and L1 feature matching,
optional semantic distillation from WavLM/HuBERT, AdamW (0.5, 0.9) lr 8e-4, weight EMA 0.99 for export.
Every checkpoint also writes RUN/model/, a codec that `openmoshi codec encode --checkpoint RUN/model` and
`openmoshi.load_mimi` take. Re-running the same command resumes the run.

  openmoshi train codec --preset tiny --data speech/ --out runs/tiny --max-steps 2000
  torchrun --nproc-per-node 2 -m openmoshi train codec --preset tiny --data speech/ --out runs/tiny2
"""

from __future__ import annotations

import argparse
import json

from ..train.config import to_dict
from .train_common import add_common_arguments, build_config

STAGE_OPTIONS = {
    "data": "data.paths",
    "eval_data": "data.eval_paths",
    "segment_seconds": "data.segment_seconds",
    "init": "model.init",
    "teacher": "distill.teacher",
    "teacher_layer": "distill.layer",
    "losses": "losses.preset",
    "lr": "optim.lr",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..train.codec.config import PRESETS
    add_common_arguments(parser, PRESETS, "tiny")
    parser.add_argument("--eval-data", nargs="+", help="held-out audio for evaluation (default: the training data)")
    parser.add_argument("--segment-seconds", type=float, help="length of the training crops (whole 80 ms frames)")
    parser.add_argument("--init", help="start from an existing codec (folder, .safetensors or hf://...), e.g. "
                                       "Kyutai's Mimi to adapt it to a new language or domain")
    parser.add_argument("--teacher", help="semantic teacher for distillation: a WavLM/HuBERT folder or Hugging "
                                          "Face id (needs transformers), or `phonemes` / `letters`: targets "
                                          "from the word alignments beside the audio files (NAME.json; "
                                          "phonemes need espeak-ng); omitted = no distillation")
    parser.add_argument("--teacher-layer", type=int, help="teacher hidden-state index (default -1, the last)")
    parser.add_argument("--losses", choices=["adversarial", "encodec"],
                        help="adversarial = hinge + feature matching (final Mimi); encodec = + L1 and mel, "
                             "with EnCodec's balancer weights")
    parser.add_argument("--lr", type=float, help="codec learning rate (default 8e-4)")


def run(args: argparse.Namespace) -> int:
    from ..train.codec import PRESETS, CodecTask
    from ..train.loop import Trainer
    cfg = build_config(args, PRESETS, STAGE_OPTIONS)
    if args.show_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    task = CodecTask(cfg, args.out)
    last = Trainer(task, cfg.train, args.out, cfg).fit()
    if last:
        print(f"done: {args.out} (model in {args.out / 'model'}); last loss {last.get('loss', float('nan')):.4g}")
    return 0
