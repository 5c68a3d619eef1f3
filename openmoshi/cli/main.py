"""`openmoshi` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import OpenMoshiError
from ._dispatch import add_module_parsers

# subcommand -> module defining `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "codec": ("openmoshi.cli.codec", "encode audio to Mimi codes and decode codes to audio"),
    "init": ("openmoshi.cli.init", "write a freshly initialised model folder from a preset"),
    "quantize": ("openmoshi.cli.quantize", "write a model folder with int8 or int4 LM weights"),
    "infer": ("openmoshi.cli.infer", "run Moshi on recordings: answers as audio and transcripts"),
    "serve": ("openmoshi.cli.serve", "real-time full-duplex server (websocket + web page)"),
    "client": ("openmoshi.cli.client", "talk to a server from the terminal or stream a file to it"),
    "data": ("openmoshi.cli.data", "dialogue data: synthesize, align, statistics, tokenizer"),
    "train": ("openmoshi.cli.train", "train a codec or LM (resumable, multi-process with torchrun)"),
    "eval": ("openmoshi.cli.eval", "evaluate a trained codec or LM"),
    "plot": ("openmoshi.cli.plot", "plot the curves of a training run folder"),
    "transcribe": ("openmoshi.cli.transcribe", "speech to text with an stt model: timed words, txt/json/srt/vtt"),
    "speak": ("openmoshi.cli.speak", "text to speech with a tts model: a wav and word timings"),
    "translate": ("openmoshi.cli.translate", "speech translation with a Hibiki model: translated speech and text"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmoshi",
        description="openmoshi: Moshi speech-text model and Mimi codec, compatible with Kyutai's checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    add_module_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"), COMMANDS, "_run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except OpenMoshiError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: say what it was, keep the traceback for --debug
        if debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
