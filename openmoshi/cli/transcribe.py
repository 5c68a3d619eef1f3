"""Transcribe recordings with a speech-to-text model (Kyutai's `stt` family), streaming frame by frame.

  openmoshi transcribe --model hf://kyutai/stt-1b-en_fr talk.wav other.mp3
  openmoshi transcribe --model tiny-stt *.wav --out transcripts/ --format srt,json --batch-size 8

Prints each transcript; with --out, writes NAME.<format> for each input:
  txt   the text
  json  text, words with start/end seconds, end-of-speech times, the raw text tokens
  srt   subtitles (SubRip)          vtt   subtitles (WebVTT)
End of speech comes from the model's extra heads (stt-1b has four; head 2 by default, as Kyutai's services).
A Moshi-style model whose config.json `delays` put the text behind the audio (paper §5.7, e.g. [25, 0, 1, ...]:
2 s) transcribes too: the recording is teacher-forced as its own audio stream, the text is greedy by default.
Inputs may be wav/flac/ogg/mp3 at any rate and channel count (resampled to 24 kHz mono, and said so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from ..audio.io import load_audio
from ..errors import ConfigError, OpenMoshiError
from .common import add_device_arguments, resolve_device

FORMATS = ("txt", "json", "srt", "vtt")
CUE_WORDS, CUE_SECONDS, CUE_GAP = 12, 5.0, 1.0  # subtitle cues: at most this many words / seconds, split at gaps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="FILE", help="recordings to transcribe")
    parser.add_argument("--model", default="hf://kyutai/stt-1b-en_fr",
                        help="stt model folder or hf://owner/repo in Kyutai's layout (default kyutai/stt-1b-en_fr), "
                             "or a Moshi-style model made ASR by its delays")
    parser.add_argument("--out", type=Path, default=None, help="folder for the transcript files (default: print only)")
    parser.add_argument("--format", default="txt,json",
                        help=f"comma-separated output formats among {', '.join(FORMATS)} (default txt,json)")
    parser.add_argument("--batch-size", type=int, default=1, help="recordings transcribed together in one batch")
    parser.add_argument("--temp-text", type=float, default=None,
                        help="text temperature (default: the model's lm_gen_config, greedy for a Moshi-style ASR "
                             "model; 0 = greedy)")
    parser.add_argument("--eos-head", type=int, default=2, help="extra head read for end of speech")
    parser.add_argument("--eos-threshold", type=float, default=0.6,
                        help="end-of-speech probability threshold of that head")
    parser.add_argument("--seed", type=int, default=None, help="random seed when sampling")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def _formats(spec: str) -> list[str]:
    formats = [f.strip().lower() for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format {spec!r}: choose among {', '.join(FORMATS)} (comma-separated)")
    return formats


def run(args: argparse.Namespace) -> int:
    from ..bundle import load_model
    from ..generation.stt import transcribe_recordings
    from ..lm.families import delayed_mode

    formats = _formats(args.format)
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if not 0.0 <= args.eos_threshold <= 1.0:
        raise ConfigError(f"--eos-threshold must be a probability in [0, 1], got {args.eos_threshold}")
    device, dtype = resolve_device(args)
    failed, loaded = [], []
    for path in args.inputs:
        try:
            audio = load_audio(path)
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
    bundle = load_model(args.model, device=device, dtype=dtype)
    delayed_mode(bundle.config, "asr", "openmoshi transcribe")
    if bundle.config.extra_heads_num_heads and not 0 <= args.eos_head < bundle.config.extra_heads_num_heads:
        raise ConfigError(f"--eos-head {args.eos_head}: this model has {bundle.config.extra_heads_num_heads} "
                          "extra heads")
    generation = None if args.temp_text is None else {**bundle.generation, "temp_text": args.temp_text}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(loaded), args.batch_size):
        group = loaded[start:start + args.batch_size]
        with tqdm(total=None, unit="frame", desc=", ".join(p.name for p, _ in group)[:40],
                  disable=args.quiet) as bar:
            def on_step(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            results = transcribe_recordings(bundle, [a.wav for _, a in group], generation, args.seed,
                                            args.eos_head, args.eos_threshold, on_step)
        for (path, audio), result in zip(group, results):
            print(f"{path.name} ({audio.duration:.2f} s): {result.text}")
            if args.out is not None:
                for fmt in formats:
                    (args.out / f"{path.stem}.{fmt}").write_text(render(result, fmt))
    if failed:
        print(f"{len(failed)} of {len(args.inputs)} input(s) failed: {', '.join(failed)}")
        return 1
    return 0


def render(result, fmt: str) -> str:
    """A Transcription as txt, json, srt or vtt text."""
    if fmt == "txt":
        return result.text + "\n"
    if fmt == "json":
        return json.dumps(result.to_json(), indent=2) + "\n"
    cues = _cues(result.words)
    if fmt == "srt":
        return "".join(f"{i}\n{_stamp(a, ',')} --> {_stamp(b, ',')}\n{text}\n\n"
                       for i, (a, b, text) in enumerate(cues, 1))
    return "WEBVTT\n\n" + "".join(f"{_stamp(a, '.')} --> {_stamp(b, '.')}\n{text}\n\n" for a, b, text in cues)


def _cues(words) -> list[tuple[float, float, str]]:
    cues: list[list] = []
    for w in words:
        last = cues[-1] if cues else None
        if last is None or len(last[2]) >= CUE_WORDS or w.end - last[0] > CUE_SECONDS or w.start - last[1] > CUE_GAP:
            cues.append([w.start, w.end, [w.word]])
        else:
            last[1] = max(last[1], w.end)
            last[2].append(w.word)
    return [(a, max(b, a + 0.04), " ".join(text)) for a, b, text in cues]


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"
