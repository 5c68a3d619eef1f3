"""Train a model: `openmoshi train STAGE --preset P --data DATA --out RUN [options]`.

Re-running the same command on an existing RUN folder resumes it. Multi-process:
`torchrun --nproc-per-node N -m openmoshi train STAGE ...` (the global --batch-size is split over processes).
"""

from __future__ import annotations

import argparse

from ._dispatch import add_stage_parsers, run_stage

SUBCOMMANDS = {
    "codec": ("openmoshi.cli.train_codec", "train a Mimi codec (adversarial losses, split RVQ, distillation)"),
    "lm": ("openmoshi.cli.train_lm", "train or fine-tune the Moshi LM"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_stage_parsers(parser, SUBCOMMANDS, "stage")


def run(args: argparse.Namespace) -> int:
    return run_stage(args)
