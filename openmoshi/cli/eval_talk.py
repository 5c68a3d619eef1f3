"""Evaluate a Moshi model as a talker: spoken questions on held-out voices and phrasings, and turn-taking.

  openmoshi eval talk --model runs/tiny-talk/model
  openmoshi eval talk --model M --voices-from data/tiny-talk --codec-data held_out_wavs/ --json
  openmoshi eval talk --model M --cases 8 --save-audio listen/
  openmoshi eval talk --model M --voices-from data/tiny-talk --split train --voices test   # diagnostics

Each case is one user recording (24 kHz): 1 s of silence, a question of the tiny-talk domain ("Tell me the
capital of Peru.", "Tell me what seven plus five is.") in a held-out phrasing spoken by a held-out user voice
(espeak-ng), then 4 s of silence. Moshi runs over it offline, frame by frame, as `openmoshi infer` does.

Figures (targets of the shipped tiny-talk model in brackets):
  accuracy            share of cases whose answer word (e.g. "lima", "twelve") is in the text Moshi writes from
                      the question's start to the end of the case; case, punctuation and digits normalised,
                      whole-word match; overall and per kind (colour, capital, sound, plus)   [>= 0.80]
  silent_share_text   of the 80 ms frames overlapping the user's words, the share in which Moshi's text stream
                      writes no word piece (PAD / EPAD)                                        [>= 0.95]
  silent_share_audio  the same from Moshi's audio: a frame counts as speech when its RMS is at most 20 dB under
                      Moshi's level (95th percentile of its frame RMS over all cases) and above -50 dBFS
  onset median / p90  seconds from the question's last word ending to Moshi's first text word starting in
                      that frame or later (0 if within it)                                     [median <= 1 s]
  onset (audio)       the same to Moshi's first audio speech frame after the question's end (median)
  unanswered          cases where Moshi wrote no word after the question ended
  answered early      cases where the answer word came before the question had ended
With --codec-data: the model's Mimi (at the LM's codebook count, or --codec-codebooks) on held-out audio: mel distance, STFT distance,
SI-SDR, PESQ and STOI (when `pesq` / `pystoi` are installed).

User voices: with --voices-from, the *test* voices of that synth set (rebuilt from its synth_config.json), i.e.
voices the model never heard; without it, espeak-ng voices drawn from a seed far from the synth's and checked
against the train voices of a default synth set. Diagnostics (not the score): --split train asks in the training
phrasings, --voices train speaks in the set's training voices; the four combinations tell which of the two unseen
things (wording, voice) a model stumbles on. Sampling: the model folder's defaults (lm_gen_config), seeded;
--greedy for argmax decoding.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .common import add_device_arguments, resolve_device

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (or hf://owner/repo) in Kyutai's layout")
    parser.add_argument("--cases", type=int, default=40,
                        help="number of questions, spread evenly over the four kinds (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the questions, voices and sampling (default 0)")
    parser.add_argument("--voices-from", type=Path, default=None, metavar="DATA_DIR",
                        help="a synth set's folder (`openmoshi data synth --out`): use its held-out test voices")
    parser.add_argument("--split", choices=("test", "train"), default="test",
                        help="test (default): held-out phrasings and voices. train: the training phrasings and, "
                             "with --voices-from, the set's train voices; a diagnostic (does the model answer what "
                             "it was trained on?), not the score")
    parser.add_argument("--voices", choices=("test", "train"), default=None,
                        help="whose voices speak the questions, apart from --split's phrasings (default: as "
                             "--split). `--split test --voices train` asks held-out phrasings in voices the model "
                             "trained on: which of the two unseen things it stumbles on")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperatures 0)")
    parser.add_argument("--temp", type=float, default=None, help="audio temperature (default: the model's)")
    parser.add_argument("--temp-text", type=float, default=None, help="text temperature (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="cases generated together in one batch (default 16); with sampling the draws, so the "
                             "figures, depend on it as on --seed; with --greedy they do not")
    parser.add_argument("--codec-data", nargs="+", type=Path, default=None, metavar="DIR",
                        help="held-out audio (folders, files or manifests): also report the codec's figures")
    parser.add_argument("--codec-codebooks", type=int, default=None, metavar="K",
                        help="RVQ levels for the codec figures (default: as many as the LM reads)")
    parser.add_argument("--codec-seconds", type=float, default=10.0,
                        help="use the first S seconds of each --codec-data file (0 = all; default 10)")
    parser.add_argument("--codec-max-files", type=int, default=50,
                        help="at most this many --codec-data files (0 = all; default 50)")
    parser.add_argument("--save-audio", type=Path, default=None, metavar="DIR",
                        help="write each case as a stereo wav (left = Moshi, right = the user) for listening")
    parser.add_argument("--examples", type=int, default=8, help="example transcripts to show (default 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_arguments(parser)


def _check(args: argparse.Namespace) -> None:
    if args.cases < 1:
        raise ConfigError(f"--cases must be at least 1, got {args.cases}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("temp", "temp_text"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.codec_seconds < 0 or args.codec_max_files < 0:
        raise ConfigError("--codec-seconds and --codec-max-files must be >= 0")
    if args.save_audio is not None and args.save_audio.exists() and not args.save_audio.is_dir():
        raise ConfigError(f"--save-audio {args.save_audio} is a file: give a folder")
    if args.voices == "train" and args.voices_from is None:
        raise ConfigError("--voices train needs --voices-from (the synth set the model trained on)")
    if args.voices_from is not None and not args.voices_from.is_dir():
        raise ConfigError(f"--voices-from {args.voices_from}: no such folder (give a synth set's folder)")
    for path in args.codec_data or []:
        if not path.exists():
            raise ConfigError(f"--codec-data {path}: no such file or folder")


def _generation(args: argparse.Namespace, defaults: dict) -> dict:
    out = dict(defaults)
    if args.temp is not None:
        out["temp"] = args.temp
    if args.temp_text is not None:
        out["temp_text"] = args.temp_text
    if args.greedy:
        out["temp"] = out["temp_text"] = 0.0
    return out


def run(args: argparse.Namespace) -> int:
    import soundfile
    import torch
    from tqdm import tqdm

    from ..bundle import load_model
    from ..data.synth.talk import eval_questions
    from ..eval.talk import build_cases, check_dialogue_model, codec_figures, evaluate_talk, held_out_voices

    _check(args)
    device, dtype = resolve_device(args)
    bundle = load_model(args.model, device=device, dtype=dtype)
    check_dialogue_model(bundle)
    if args.codec_codebooks is not None and not 1 <= args.codec_codebooks <= bundle.mimi.total_codebooks:
        raise ConfigError(f"--codec-codebooks must be in 1..{bundle.mimi.total_codebooks} for this model's Mimi, "
                          f"got {args.codec_codebooks}")
    quiet = args.quiet or args.json
    voice_split = args.voices or (args.split if args.voices_from is not None else "test")
    if not quiet:
        print(f"synthesizing {args.cases} questions: {_split_words(args.split, voice_split)} ...")
    cases = build_cases(eval_questions(args.cases, args.seed, args.split),
                        held_out_voices(args.voices_from, seed=args.seed, split=voice_split))
    with tqdm(total=len(cases), unit="case", desc="talking", disable=quiet,
              bar_format="{l_bar}{bar}| {n:.1f}/{total} cases [{elapsed}<{remaining}]") as bar:
        def progress(done: float) -> None:
            bar.n = done
            bar.refresh()

        report, cases, runs = evaluate_talk(bundle, seed=args.seed, generation=_generation(args, bundle.generation),
                                            batch_size=args.batch_size, progress=None if quiet else progress,
                                            cases=cases)
    report.settings["voices_from"] = str(args.voices_from) if args.voices_from else None
    report.settings["model"] = str(args.model)
    report.settings["split"] = args.split
    report.settings["voice_split"] = voice_split
    if args.codec_data:
        with torch.inference_mode():
            report.codec = codec_figures(bundle.mimi, args.codec_data, args.codec_max_files, args.codec_seconds,
                                         args.codec_codebooks, progress=not quiet)
    if args.save_audio is not None:
        args.save_audio.mkdir(parents=True, exist_ok=True)
        for i, (case, result) in enumerate(zip(cases, runs)):
            stereo = np.stack([result.audio[: len(case.audio)], case.audio], axis=1)
            soundfile.write(args.save_audio / f"case_{i:03d}_{case.question.kind}.wav", stereo, 24_000,
                            subtype="PCM_16")
        (args.save_audio / "cases.json").write_text(json.dumps(report.to_json(len(cases))["per_case"], indent=2))
    if args.json:
        print(json.dumps(report.to_json(args.examples), indent=2))
    else:
        print(format_table(report, args.examples))
        if "train" in (args.split, voice_split):
            print("\n(training phrasings or voices: a diagnostic; the score is --split test with held-out voices)")
        if args.save_audio is not None:
            print(f"\nwrote {len(cases)} stereo wavs (left = Moshi, right = user) to {args.save_audio}")
    return 0


def _split_words(split: str, voice_split: str) -> str:
    names = {"test": "held-out", "train": "training"}
    return f"{names[split]} phrasings, {names[voice_split]} voices"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def format_table(report, examples: int = 8) -> str:
    from ..eval.talk import pick_examples

    s = report.summary
    ok = s["meets_targets"]
    mark = {True: "ok", False: "below target"}
    voices = len(report.settings.get("voices", []))
    split = report.settings.get("split", "test")
    what = _split_words(split, report.settings.get("voice_split", split))
    lines = [f"eval talk: {s['cases']} cases ({what}), {voices} user voice(s)",
             "",
             f"{'answers correct':<28}{_pct(s['accuracy']):>9}   target >= 80%   {mark[ok['accuracy']]}"]
    for kind, acc in s["accuracy_by_kind"].items():
        lines.append(f"{'  ' + kind:<28}{_pct(acc):>9}   ({s['cases_by_kind'][kind]} cases)")
    lines += [f"{'answered early':<28}{s['answered_early']:>9}",
              (f"{'silent in user speech (text)':<28}{_pct(s['silent_share_text']):>9}   target >= 95%   "
               f"{mark[ok['silent_share_text']]}"),
              f"{'silent in user speech (audio)':<28}{_pct(s['silent_share_audio']):>9}",
              (f"{'answer onset median':<28}{_sec(s['onset_median_s']):>9}   target <= 1 s   "
               f"{mark[ok['onset_median_s']]}"),
              f"{'answer onset p90':<28}{_sec(s['onset_p90_s']):>9}",
              f"{'answer onset (audio) median':<28}{_sec(s['onset_audio_median_s']):>9}",
              f"{'unanswered':<28}{s['unanswered']:>9}   (of {s['cases']})"]
    threshold = report.settings.get("audio_threshold_rms")
    if threshold:
        lines.append(f"(audio: a frame is speech above {20 * math.log10(threshold):.1f} dBFS RMS, 20 dB under "
                     "Moshi's level, at least -50 dBFS)")
    if report.codec:
        lines += ["", "codec (held-out audio)"]
        for key, value in report.codec.items():
            lines.append(f"{'  ' + key:<28}{value:>9.4g}" if isinstance(value, float) else f"{'  ' + key:<28}{value:>9}")
    shown = pick_examples(report.scores, examples)
    if shown:
        lines += ["", "examples (question -> Moshi's text after it starts)"]
        for c in shown:
            verdict = "correct" if c.correct else f"wrong, want {c.answer!r}"
            reply = c.reply if len(c.reply) <= 100 else c.reply[:97] + "..."
            lines.append(f"  [{c.kind}] {c.question} -> {reply or '(nothing)'!r}  ({verdict})")
    return "\n".join(lines)
