"""Synthetic two-voice dialogues with exact word timings, in moshi-finetune's format.

Writes DIR/{train,valid,test}/dialogue_NNNNNN.wav (stereo 24 kHz: left = Moshi, right = the user), a .json of
word alignments beside each ([word, [start, end], speaker], Moshi = SPEAKER_MAIN, user = SPEAKER_USER) and the
manifests DIR/train.jsonl, valid.jsonl, test.jsonl. Moshi always has one voice; user voices (espeak-ng accents
and variants, festival voices when installed) are split so valid/test dialogues have voices never heard in
training. The same --seed writes the same bytes; an interrupted run continues where it stopped when rerun with
the same options (a larger --dialogues extends a set).

  openmoshi data synth --out synth --dialogues 1000 --seed 0
  openmoshi data synth --out mine --script-file dialogues.jsonl   # {"turns": [{"speaker": "user", "text": ...}]}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.synth.pipeline import SynthConfig, default_workers, synthesize_dataset
from ..data.synth.scripts import TOPICS
from ..data.synth.turns import TurnTaking
from ..data.synth.voices import ESPEAK_ACCENTS, MOSHI_VOICE
from ..errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; reruns resume it)")
    parser.add_argument("--dialogues", type=int, default=None,
                        help="number of dialogues (default 100, or one per line of --script-file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (same seed, same bytes)")
    parser.add_argument("--topics", default=",".join(TOPICS),
                        help=f"built-in dialogue topics, comma-separated, from {','.join(TOPICS)}")
    parser.add_argument("--script-file", type=Path, default=None,
                        help='JSONL of dialogues {"turns": [{"speaker": "moshi"|"user", "text": ...}], '
                             '"split"?: ...} used instead of the built-in topics')
    parser.add_argument("--exchanges", default="2,5",
                        help="MIN,MAX topic exchanges per built-in dialogue (between a greeting and a goodbye)")
    parser.add_argument("--user-voices", type=int, default=48, help="number of distinct user voices")
    parser.add_argument("--moshi-voice", default=MOSHI_VOICE,
                        help="Moshi's one voice, ENGINE:NAME[:pPITCH][:rRATE][:gRANGE]")
    parser.add_argument("--engines", default="espeak,festival",
                        help="synthesizers for user voices (festival is skipped when not installed)")
    parser.add_argument("--accents", default=",".join(ESPEAK_ACCENTS),
                        help="espeak-ng voices user voices are drawn from (English accents by default; give "
                             "other languages, e.g. fr,de, for --script-file dialogues in those languages)")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="share of dialogues held out for valid")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="share of dialogues held out for test")
    parser.add_argument("--level-db", type=float, default=-20.0, help="speech loudness of each channel (dBFS RMS)")
    parser.add_argument("--turn-taking", type=Path, default=None,
                        help="JSON file overriding turn-taking settings, e.g. "
                             '{"gap": {"mean": 0.4, "std": 0.3, "low": 0.05, "high": 2}, "overlap_prob": 0.3}; '
                             "see openmoshi/data/synth/turns.py for every key")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    turn_taking = TurnTaking()
    if args.turn_taking is not None:
        try:
            turn_taking = TurnTaking.from_dict(json.loads(args.turn_taking.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"--turn-taking {args.turn_taking}: {exc}") from exc
    dialogues = args.dialogues
    if dialogues is None:
        dialogues = (sum(1 for line in args.script_file.read_text().splitlines() if line.strip())
                     if args.script_file and args.script_file.is_file() else 100)
    try:
        low, high = (int(x) for x in args.exchanges.split(","))
    except ValueError as exc:
        raise ConfigError(f"--exchanges {args.exchanges!r}: expected MIN,MAX such as 2,5") from exc
    cfg = SynthConfig(dialogues=dialogues, seed=args.seed, exchanges=(low, high),
                      topics=tuple(t.strip() for t in args.topics.split(",") if t.strip()),
                      script_file=str(args.script_file.resolve()) if args.script_file else None,
                      user_voices=args.user_voices, moshi_voice=args.moshi_voice,
                      engines=tuple(e.strip() for e in args.engines.split(",") if e.strip()),
                      accents=tuple(a.strip() for a in args.accents.split(",") if a.strip()),
                      valid_fraction=args.valid_fraction, test_fraction=args.test_fraction,
                      level_db=args.level_db, turn_taking=turn_taking)
    bar = tqdm(total=dialogues, unit="dialogue", desc="synth")

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    try:
        summary = synthesize_dataset(args.out, cfg, workers=max(1, args.workers), progress=progress)
    finally:
        bar.close()
    for split in ("train", "valid", "test"):
        print(f"{split:5s}: {summary['dialogues'][split]:6d} dialogues, {summary['hours'][split]:8.3f} h, "
              f"{summary['user_voices'][split]:4d} user voices -> {args.out / (split + '.jsonl')}")
    return 0
