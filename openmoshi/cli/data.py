"""Dialogue data in moshi-finetune's format: make it, align it, inspect it, tokenize it.

  openmoshi data synth --out DIR --dialogues N      synthetic two-voice conversations with exact word timings
  openmoshi data align DIR                          word timings for real recordings (Whisper)
  openmoshi data stats DIR                          hours, voices, words per minute, turn-taking statistics
  openmoshi data tokenizer --input corpus.txt ...   a SentencePiece text tokenizer with Kyutai's special ids
  openmoshi data encode ...                         Mimi codes for a data set
"""

from __future__ import annotations

import argparse

from ._dispatch import add_stage_parsers, run_stage

# data subcommand -> module defining `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "synth": ("openmoshi.cli.data_synth", "synthetic stereo dialogues with exact word timings"),
    "align": ("openmoshi.cli.data_align", "word-level alignments of real recordings with Whisper"),
    "stats": ("openmoshi.cli.data_stats", "statistics of a data set: hours, voices, turn-taking"),
    "tokenizer": ("openmoshi.cli.data_tokenizer", "train a SentencePiece text tokenizer (Helium's options)"),
    "encode": ("openmoshi.cli.data_encode", "encode a data set's audio to Mimi codes"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_parsers(parser, SUBCOMMANDS, "data_command", metavar="SUBCOMMAND")


def run(args: argparse.Namespace) -> int:
    return run_stage(args)
