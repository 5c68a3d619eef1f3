"""Dialogue data in moshi-finetune's format: make it, align it, inspect it, tokenize it.

  openmoshi data synth --out DIR --dialogues N      synthetic two-voice conversations with exact word timings
  openmoshi data align DIR                          word timings for real recordings (Whisper)
  openmoshi data stats DIR                          hours, voices, words per minute, turn-taking statistics
  openmoshi data tokenizer --input corpus.txt ...   a SentencePiece text tokenizer with Kyutai's special ids
  openmoshi data encode ...                         Mimi codes for a data set
"""

from __future__ import annotations

import argparse
import importlib

# data subcommand -> module defining `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "synth": ("openmoshi.cli.data_synth", "synthetic stereo dialogues with exact word timings"),
    "align": ("openmoshi.cli.data_align", "word-level alignments of real recordings with Whisper"),
    "stats": ("openmoshi.cli.data_stats", "statistics of a data set: hours, voices, turn-taking"),
    "tokenizer": ("openmoshi.cli.data_tokenizer", "train a SentencePiece text tokenizer (Helium's options)"),
    "encode": ("openmoshi.cli.data_encode", "encode a data set's audio to Mimi codes"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a subcommand not shipped in this build
            raise
        child = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show full tracebacks and debug logs")
        module.add_arguments(child)
        child.set_defaults(_data_run=module.run)
    parser.set_defaults(_data_parser=parser)


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "_data_run"):
        args._data_parser.print_help()
        return 2
    return int(args._data_run(args) or 0)
