"""Commands with stages (`openmoshi train codec`, `openmoshi eval lm`, ...): one module per stage."""

from __future__ import annotations

import argparse
import importlib


def add_module_parsers(sub: argparse._SubParsersAction, table: dict[str, tuple[str, str]], run_attr: str) -> None:
    """One sub-parser per entry whose module is present; each module has add_arguments(parser) and run(args),
    stored as `run_attr` on the parsed arguments."""
    for name, (module_name, help_text) in table.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # not shipped in this build
            raise
        child = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show full tracebacks and debug logs")
        module.add_arguments(child)
        child.set_defaults(**{run_attr: module.run})


def add_stage_parsers(parser: argparse.ArgumentParser, stages: dict[str, tuple[str, str]], dest: str,
                      metavar: str = "STAGE") -> None:
    """The stages of a command (`train codec`, `data synth`, ...) as sub-parsers; run them with run_stage."""
    add_module_parsers(parser.add_subparsers(dest=dest, metavar=metavar), stages, "_stage_run")
    parser.set_defaults(_stage_parser=parser)


def run_stage(args: argparse.Namespace) -> int:
    if not hasattr(args, "_stage_run"):
        args._stage_parser.print_help()
        return 2
    return int(args._stage_run(args) or 0)
