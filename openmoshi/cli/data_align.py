"""Word timings for real recordings, in moshi-finetune's format (NAME.json beside each audio file).

Stereo files: channel 0 is Moshi (SPEAKER_MAIN), channel 1 the user (SPEAKER_USER), each transcribed on its own;
mono files: one speaker, SPEAKER_MAIN. Finished files are skipped, so an interrupted run resumes; a file that
fails leaves NAME.json.err and the run continues. A manifest DIR/data.jsonl lists the aligned files.

Needs an aligner extra: `pip install whisper-timestamped openai-whisper` (default) or `pip install
faster-whisper`. Weights are never downloaded here: give a local file/folder or have them in the cache.

  openmoshi data align recordings/ --model medium
  openmoshi data align recordings/ --aligner faster-whisper --model /models/faster-whisper-medium
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.align import ALIGNERS, align_folder, audio_files, make_aligner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="folder of recordings (searched recursively) or one file")
    parser.add_argument("--aligner", default="whisper-timestamped", choices=sorted(ALIGNERS),
                        help="alignment backend")
    parser.add_argument("--model", default="medium",
                        help="Whisper model: a name (medium, small, ...), a Hugging Face id, or a local path")
    parser.add_argument("--language", default="en", help="spoken language (empty: let Whisper detect it)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--beam-size", type=int, default=5, help="beam size (1 = greedy)")
    parser.add_argument("--temperatures", default="0,0.2,0.4,0.6,0.8,1.0",
                        help="temperature fallback schedule, comma-separated")
    parser.add_argument("--vad", action="store_true",
                        help="voice activity detection before Whisper (auditok; faster-whisper: Silero)")
    parser.add_argument("--main-only", action="store_true",
                        help="transcribe only channel 0 (Moshi), as moshi-finetune's annotate.py does")
    parser.add_argument("--overwrite", action="store_true", help="realign files that already have a .json")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    files = audio_files(args.data)
    aligner = make_aligner(args.aligner, model=args.model, device=args.device, language=args.language or None,
                           beam_size=args.beam_size,
                           temperatures=tuple(float(t) for t in args.temperatures.split(",") if t.strip()),
                           vad=args.vad)
    with tqdm(total=len(files), unit="file", desc="align") as bar:
        counts = align_folder(args.data, aligner, overwrite=args.overwrite, main_only=args.main_only,
                              progress=lambda _: bar.update(1))
    print(f"aligned {counts['aligned']}, skipped {counts['skipped']} (already done), failed {counts['failed']}"
          + (" (see the .json.err files)" if counts["failed"] else "")
          + (f"; manifest {counts['manifest']}" if "manifest" in counts else ""))
    return 1 if counts["failed"] and not counts["aligned"] and not counts["skipped"] else 0
