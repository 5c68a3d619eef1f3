"""Translate speech with a Hibiki model (Kyutai's `hibiki` family): the translated speech and its text.

  openmoshi translate --model hf://kyutai/hibiki-2b-pytorch-bf16 french.wav --out english.wav
  openmoshi translate --model tiny-hibiki a.wav b.mp3 --out translations/ --cfg-coef 3

With one input, --out is the output wav (default NAME.translated.wav); with several, a folder. Beside each wav,
a .json holds the translated text and its words with start/end seconds in the output audio. The model keeps
speaking after the input ends until it writes its end-of-text token (at most --max-extra-seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError, OpenMoshiError
from .common import add_device_arguments, resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help="source speech recordings")
    parser.add_argument("--model", default="hf://kyutai/hibiki-2b-pytorch-bf16",
                        help="hibiki model folder or hf://owner/repo in Kyutai's layout")
    parser.add_argument("--out", type=Path, default=None, help="output wav (one input) or folder (several)")
    parser.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    parser.add_argument("--max-extra-seconds", type=float, default=10.0,
                        help="how long the model may go on after the input ends")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..audio.io import load_audio, save_wav
    from ..bundle import load_model
    from ..generation.translate import translate_recordings
    from ..lm.families import check_family

    if args.max_extra_seconds < 0:
        raise ConfigError("--max-extra-seconds must be >= 0")
    loaded, failed = [], []
    for path in args.inputs:
        try:
            loaded.append((path, load_audio(path)))
        except OpenMoshiError as exc:
            print(f"error: {exc}")
            failed.append(str(path))
    if not loaded:
        print(f"nothing to do: {len(failed)} input(s) failed")
        return 1
    device, dtype = resolve_device(args)
    bundle = load_model(args.model, device=device, dtype=dtype)
    check_family(bundle.config, "hibiki", "openmoshi translate")
    many = len(args.inputs) > 1
    for path, audio in loaded:
        if many or args.out is None:
            folder = args.out or path.parent
            folder.mkdir(parents=True, exist_ok=True)
            out = folder / f"{path.stem}.translated.wav"
        else:
            out = args.out
            out.parent.mkdir(parents=True, exist_ok=True)
        total = int(audio.duration * bundle.mimi.frame_rate) + int(args.max_extra_seconds * bundle.mimi.frame_rate)
        with tqdm(total=total, unit="frame", desc=path.name[:30], disable=args.quiet) as bar:
            result = translate_recordings(bundle, [audio.wav], args.cfg_coef, seed=args.seed,
                                          max_extra_s=args.max_extra_seconds,
                                          on_step=lambda n: bar.update(n - bar.n))[0]
        save_wav(out, result.audio, bundle.sample_rate)
        data = dict(result.transcript.to_json(), finished=result.finished)
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        print(f"{path.name} ({audio.duration:.2f} s) -> {out} ({result.audio.shape[-1] / bundle.sample_rate:.2f} s): "
              f"{result.transcript.text[:60]!r}")
    if failed:
        print(f"{len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}")
        return 1
    return 0
