"""Commands with stages (`openmoshi train codec`, `openmoshi eval lm`, ...): one module per stage."""

from __future__ import annotations

import argparse
import importlib


def add_stage_parsers(parser: argparse.ArgumentParser, stages: dict[str, tuple[str, str]], dest: str,
                      metavar: str = "STAGE") -> None:
    """One sub-parser per stage whose module is present; each module has add_arguments(parser) and run(args)."""
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    for name, (module_name, help_text) in stages.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # a stage not shipped in this build
            raise
        child = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show full tracebacks and debug logs")
        module.add_arguments(child)
        child.set_defaults(_stage_run=module.run)
    parser.set_defaults(_stage_parser=parser)


def run_stage(args: argparse.Namespace) -> int:
    if not hasattr(args, "_stage_run"):
        args._stage_parser.print_help()
        return 2
    return int(args._stage_run(args) or 0)
