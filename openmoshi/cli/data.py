"""Prepare training data: synthesize dialogues, align words, count, train a tokenizer, precompute Mimi codes.

  openmoshi data encode --model MODEL --data train.jsonl --out codes/
"""

from __future__ import annotations

import argparse
import importlib

# subcommand -> module defining `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "synth": ("openmoshi.cli.data_synth", "synthesize stereo dialogues with word alignments"),
    "align": ("openmoshi.cli.data_align", "word alignments of recordings (moshi-finetune's JSON format)"),
    "stats": ("openmoshi.cli.data_stats", "statistics of a training data set"),
    "tokenizer": ("openmoshi.cli.data_tokenizer", "train a SentencePiece text tokenizer"),
    "encode": ("openmoshi.cli.data_encode", "precompute Mimi codes of audio data, keyed by the codec"),
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
        module.add_arguments(child)
        child.set_defaults(_run=module.run)
    parser.set_defaults(_run=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run(args: argparse.Namespace) -> int:
    return int(args._run(args) or 0)
