"""Plot a training run's curves: `openmoshi plot RUN` writes RUN/plots/train.png and RUN/plots/eval.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="a training run folder (holding metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from ..train.plots import plot_run
    if not args.run.is_dir():
        raise ConfigError(f"{args.run} is not a folder; pass the --out folder of a training run")
    for path in plot_run(args.run):
        print(path)
    return 0
