"""Evaluate a model: `openmoshi eval STAGE --checkpoint M DATA... [options]`."""

from __future__ import annotations

import argparse

from ._dispatch import add_stage_parsers, run_stage

SUBCOMMANDS = {
    "codec": ("openmoshi.cli.eval_codec", "codec quality: mel/STFT distance, SI-SDR, PESQ, STOI, codebook usage"),
    "lm": ("openmoshi.cli.eval_lm", "LM quality on held-out data"),
    "talk": ("openmoshi.cli.eval_talk", "spoken-dialogue evaluation"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_parsers(parser, SUBCOMMANDS, "stage")


def run(args: argparse.Namespace) -> int:
    return run_stage(args)
