"""Run Moshi on recordings of the user and write its answers.

  openmoshi infer --model tiny-moshi question.wav other.mp3 --out answers/
  openmoshi infer --model hf://kyutai/moshiko-pytorch-bf16 --device cuda talk.wav --out answers/ --greedy

For each input NAME.ext, writes to --out:
  NAME.moshi.wav        Moshi's voice, 24 kHz, as long as the input
  NAME.stereo.wav       left = Moshi, right = the user, time-aligned
  NAME.transcript.json  Moshi's inner monologue: raw text, words with start/end in seconds, text tokens
Inputs may be wav/flac/ogg/mp3 at any rate and channel count (resampled to 24 kHz mono, and said so).
Sampling defaults are Kyutai's (audio 0.8 / top-k 250, text 0.7 / top-k 25) overridden by the model's
lm_gen_config, then by these options.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from ..audio.io import load_audio, save_wav
from ..errors import OpenMoshiError
from .common import add_device_arguments, add_quantize_argument, quantize_bits, resolve_device

logger = logging.getLogger(__name__)
MIN_SECONDS = 0.08  # one frame


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help="recordings of the user")
    parser.add_argument("--model", default="hf://kyutai/moshiko-pytorch-bf16",
                        help="model folder or hf://owner/repo in Kyutai's layout")
    parser.add_argument("--out", type=Path, default=Path("moshi-answers"), help="output folder")
    parser.add_argument("--batch-size", type=int, default=1, help="recordings generated together in one batch")
    parser.add_argument("--temp", type=float, default=None, help="audio temperature")
    parser.add_argument("--temp-text", type=float, default=None, help="text temperature")
    parser.add_argument("--top-k", type=int, default=None, help="audio top-k")
    parser.add_argument("--top-k-text", type=int, default=None, help="text top-k")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperatures 0)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)
    add_quantize_argument(parser)


def _generation(args: argparse.Namespace, defaults: dict) -> dict:
    out = dict(defaults)
    for key in ("temp", "temp_text", "top_k", "top_k_text"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    if args.greedy:
        out["temp"] = out["temp_text"] = 0.0
    return out


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_model
    from ..generation.offline import RealTimeMeter, answer_recordings

    if args.batch_size < 1:
        raise OpenMoshiError("--batch-size must be at least 1")
    device, dtype = resolve_device(args)
    failed: list[str] = []
    loaded = []
    for path in args.inputs:
        try:
            audio = load_audio(path)
            if audio.duration < MIN_SECONDS:
                raise OpenMoshiError(f"{path}: {audio.duration:.3f} s of audio, need at least {MIN_SECONDS} s")
        except OpenMoshiError as exc:
            print(f"error: {exc}")
            failed.append(str(path))
            continue
        for note in audio.notes:
            print(f"{path}: {note}")
        loaded.append((path, audio))
    if not loaded:
        print(f"nothing to do: {len(failed)} input(s) failed")
        return 1
    bundle = load_model(args.model, device=device, dtype=dtype, quantize=quantize_bits(args))
    generation = _generation(args, bundle.generation)
    args.out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(loaded), args.batch_size):
        group = loaded[start:start + args.batch_size]
        seconds = max(a.duration for _, a in group)
        meter = RealTimeMeter(len(group) / bundle.mimi.frame_rate)
        with tqdm(total=None, unit="frame", desc=", ".join(p.name for p, _ in group)[:40],
                  disable=args.quiet) as bar:
            def on_step(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
                bar.set_postfix_str(f"{meter.factor(done):.2f}x real time")

            answers = answer_recordings(bundle, [a.wav for _, a in group], generation, args.seed, on_step)
        for (path, audio), answer in zip(group, answers):
            _write(args.out, path, audio.wav, answer, bundle.sample_rate)
            words = len(answer.transcript.words)
            print(f"{path.name}: {audio.duration:.2f} s -> {args.out / (path.stem + '.moshi.wav')}, {words} words: "
                  f"{answer.transcript.text[:60]!r}")
        logger.debug("batch of %d (%.1f s) done", len(group), seconds)
    if failed:
        print(f"{len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}")
        return 1
    return 0


def _write(out: Path, path: Path, user: torch.Tensor, answer, sample_rate: int) -> None:
    stem = path.stem
    save_wav(out / f"{stem}.moshi.wav", answer.audio, sample_rate)
    save_wav(out / f"{stem}.stereo.wav", torch.cat([answer.audio, user[:, : answer.audio.shape[-1]]]), sample_rate)
    (out / f"{stem}.transcript.json").write_text(json.dumps(answer.transcript.to_json(), indent=2) + "\n")
