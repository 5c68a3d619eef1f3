"""Write a model folder in Kyutai's layout: the shipped trained tiny-talk model, or fresh random weights.

  openmoshi init --preset tiny-talk tiny-talk # the small Moshi recipes/tiny_talk.py trained (shipped)
  openmoshi init --preset tiny tiny-moshi     # ~0.5 M parameters, runs anywhere, babbles (random weights)
  openmoshi init --preset tiny-stt tiny-stt   # speech-to-text structure of kyutai/stt-1b-en_fr, toy size
  openmoshi init --preset tiny-tts tiny-tts   # text-to-speech structure of kyutai/tts-1.6b-en_fr, toy size
  openmoshi init --preset tiny-hibiki tiny-h  # speech translation structure of kyutai/hibiki, toy size
  openmoshi init --preset tiny-moshi-asr asr  # a single-stream Moshi made ASR by its delays (paper 5.7), toy
  openmoshi init --preset tiny-moshi-tts tts  # the same made TTS by its delays (audio 2 s behind the text)
  openmoshi init --preset bench bench-moshi   # the benchmark size (dim 1024, 12 layers), official Mimi
  openmoshi init --preset moshi-7b OUT --tokenizer tokenizer_spm_32k_3.model   # the 7B structure (~31 GB fp32)

The folder loads with `openmoshi infer/serve --model OUT`, with `openmoshi.load_model(OUT)`, and with
Kyutai's own loaders; training starts from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bundle import PRESETS, SHIPPED, init_model


# what to run on a fresh folder, by family (the preset's last word)
_NEXT = {"stt": "transcribe --model {0} speech.wav", "asr": "transcribe --model {0} speech.wav", "tts": "speak --model {0} 'Hello there.' --out hello.wav",
         "hibiki": "translate --model {0} french.wav --out english.wav"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="folder to write (created)")
    parser.add_argument("--preset", default="tiny", choices=sorted([*PRESETS, *SHIPPED]),
                        help="model size (default tiny: random weights); tiny-talk copies the small trained Moshi "
                             "of recipes/tiny_talk.py when this installation ships it")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial weights")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="SentencePiece model to ship (default: the bundled 1000-piece one for tiny/bench)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    if args.output.exists() and any(args.output.iterdir()) and not args.force:
        if (args.output / "config.json").is_file():  # re-running a setup line keeps the model it made
            print(f"{args.output} already holds a model; keeping it (use --force to write a fresh one)")
            return 0
        raise ConfigError(f"{args.output} exists and is not empty; use --force to write into it")
    folder = init_model(args.preset, args.output, seed=args.seed, tokenizer=args.tokenizer)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    if args.preset in SHIPPED:
        print(f"wrote the trained {args.preset} model to {folder} ({size:.1f} MB).")
        print(f"next: openmoshi serve --model {folder}   (then open the page it prints and ask "
              "\"what is the capital of France?\")")
        return 0
    print(f"wrote a fresh {args.preset} model to {folder} ({size:.1f} MB). Random weights: it babbles.")
    next_step = _NEXT.get(args.preset.split("-")[-1], "infer --model {0} speech.wav --out answers")
    print(f"next: openmoshi {next_step.format(folder)}")
    return 0
