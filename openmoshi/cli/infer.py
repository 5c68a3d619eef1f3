"""Run Moshi on recordings of the user and write its answers.

  openmoshi infer --model tiny-moshi question.wav other.mp3 --out answers/
  openmoshi infer --model hf://kyutai/moshiko-pytorch-bf16 --device cuda talk.wav --out answers/ --greedy

For each input NAME.ext, writes to --out:
  NAME.moshi.wav        Moshi's voice, 24 kHz, as long as the input
  NAME.stereo.wav       left = Moshi, right = the user, time-aligned
  NAME.transcript.json  Moshi's inner monologue: raw text, words with start/end in seconds, text tokens
Inputs may be wav/flac/ogg/mp3 at any rate and channel count (resampled to 24 kHz mono, and said so), and of
any length: they are streamed through the model and the answers written as they come (memory does not grow
with the length). Existing answers are never replaced without --overwrite.
Sampling defaults are Kyutai's (audio 0.8 / top-k 250, text 0.7 / top-k 25) overridden by the model's
lm_gen_config, then by these options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from ..audio.stream import AudioStream, open_audio
from ..errors import OpenMoshiError
from .common import (
    add_device_arguments,
    add_kv_cache_argument,
    add_quantize_argument,
    quantize_bits,
    resolve_device,
)

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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace answers already in --out (by default infer refuses to)")
    add_device_arguments(parser)
    add_quantize_argument(parser)
    add_kv_cache_argument(parser)


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

    if args.batch_size < 1:
        raise OpenMoshiError("--batch-size must be at least 1")
    _check_out(args.out)
    _check_names(args.inputs, args.out, args.overwrite)
    device, dtype = resolve_device(args)
    failed: list[str] = []
    opened: list[AudioStream] = []
    for path in args.inputs:
        try:
            audio = open_audio(path)
            if audio.duration < MIN_SECONDS:
                raise OpenMoshiError(f"{path}: {audio.duration:.3f} s of audio, need at least {MIN_SECONDS} s")
        except OpenMoshiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed.append(str(path))
            continue
        for note in audio.notes:
            print(f"{path}: {note}")
        opened.append(audio)
    if not opened:
        print(f"nothing to do: {len(failed)} input(s) failed", file=sys.stderr)
        return 1
    bundle = load_model(args.model, device=device, dtype=dtype, quantize=quantize_bits(args),
                        kv_cache=args.kv_cache)
    generation = _generation(args, bundle.generation)
    args.out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(opened), args.batch_size):
        group = opened[start:start + args.batch_size]
        try:
            _answer_group(args, bundle, generation, group)
        except OpenMoshiError as exc:  # e.g. a file that turned out truncated while reading it
            print(f"error: {exc}", file=sys.stderr)
            failed.extend(str(a.path) for a in group)
    if failed:
        print(f"{len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


OUTPUT_SUFFIXES = (".moshi.wav", ".stereo.wav", ".transcript.json")


def _check_out(out: Path) -> None:
    """--out must be a folder we can write (checked before the model loads)."""
    if out.exists() and not out.is_dir():
        raise OpenMoshiError(f"--out {out} is a file, not a folder: pass a folder for the answers")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OpenMoshiError(f"--out {out}: cannot write in {existing} (permission denied)")


def _check_names(inputs: list[Path], out: Path, overwrite: bool) -> None:
    """Two inputs may not write the same outputs; existing outputs are kept unless --overwrite."""
    seen: dict[str, Path] = {}
    for path in inputs:
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise OpenMoshiError(f"{seen[path.stem]} and {path} would both write {out / path.stem}.*: "
                                 "rename one of them or run them separately with different --out folders")
        seen[path.stem] = path
    if overwrite:
        return
    clash = [out / (stem + suffix) for stem in seen for suffix in OUTPUT_SUFFIXES if (out / (stem + suffix)).exists()]
    if clash:
        more = f" and {len(clash) - 1} more" if len(clash) > 1 else ""
        raise OpenMoshiError(f"{clash[0]}{more} already exist(s): pass --overwrite to replace, or another --out")


def _answer_group(args: argparse.Namespace, bundle, generation: dict, group: list[AudioStream]) -> None:
    """Streams one batch of recordings through the model, writing the answers as they come."""
    from ..generation.offline import RealTimeMeter, stream_answers
    from ..generation.transcript import TranscriptWriter

    rate = bundle.sample_rate
    frames = max(int(a.duration * bundle.mimi.frame_rate + 0.999) for a in group)
    meter = RealTimeMeter(len(group) / bundle.mimi.frame_rate)
    partial = [args.out / f"{a.path.stem}.partial" for a in group]
    writers = []
    for audio, temp in zip(group, partial):
        temp.mkdir(parents=True, exist_ok=True)
        writers.append((soundfile.SoundFile(temp / "moshi.wav", "w", rate, 1, "PCM_16"),
                        soundfile.SoundFile(temp / "stereo.wav", "w", rate, 2, "PCM_16")))
    pad_ids = (bundle.config.existing_text_padding_id, bundle.config.existing_text_end_padding_id)
    # the transcript is written as it comes too: memory does not grow with the recording's length
    transcripts = [TranscriptWriter(temp / "transcript.json", bundle.tokenizer, bundle.mimi.frame_rate, pad_ids)
                   for temp in partial]
    try:
        with tqdm(total=frames, unit="frame", desc=", ".join(a.path.name for a in group)[:40],
                  disable=args.quiet) as bar:
            def on_step(done: int) -> None:
                bar.update(1)
                bar.set_postfix_str(f"{meter.factor(done):.2f}x real time")

            for answer in stream_answers(bundle, [a.blocks() for a in group], generation, args.seed, on_step):
                moshi = answer.moshi[0].clamp(-1, 1).numpy()
                user = answer.user[0].clamp(-1, 1).numpy()
                mono, stereo = writers[answer.row]
                mono.write(moshi)
                stereo.write(np.stack([moshi, user], axis=1))
                transcripts[answer.row].add(answer.token)
    finally:
        for mono, stereo in writers:
            mono.close()
            stereo.close()
    for audio, temp, transcript in zip(group, partial, transcripts):
        stem = audio.path.stem
        transcript.close()
        for name, suffix in (("moshi.wav", ".moshi.wav"), ("stereo.wav", ".stereo.wav"),
                             ("transcript.json", ".transcript.json")):
            os.replace(temp / name, args.out / (stem + suffix))
        temp.rmdir()
        print(f"{audio.path.name}: {audio.duration:.2f} s -> {args.out / (stem + '.moshi.wav')}, "
              f"{transcript.words} words: {transcript.text[:60]!r}")
