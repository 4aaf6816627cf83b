"""The ``ipadapter`` command. Thin: parse, call the library, translate errors into one line + exit code.

One module per subject, each adding its subcommands (``register``) and translating argv into library calls:
``generate`` (generate / img2img / inpaint / video), ``adapters`` (inspect / convert / embed), ``train``,
``faces`` (face-embed), ``mini`` (eval / demo) and ``serving`` (batch / serve). Errors are translated once, here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import IPAdapterError
from ..quiet import quiet_libraries
from . import adapters, faces, generate, mini, serving, train
from .common import (
    EXIT_INTERNAL,
    EXIT_USAGE,
    CLIError,
    Parser,
    one_line,
    quiet_environment,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand with its options."""
    parser = Parser(
        prog="ipadapter", description="Image prompts (IP-Adapter) for Stable Diffusion 1.5 / SDXL."
    )
    parser.add_argument("--version", action="version", version=f"ipadapter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for subject in (adapters, faces, generate, serving, train, mini):
        subject.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ipadapter`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if not debug:
            quiet_environment()
        args = build_parser().parse_args(argv)
        args.quiet = not debug
        if args.quiet and getattr(args, "light", False):  # commands that never reach the generation path
            quiet_libraries()
        result = args.run(args)
        if getattr(args, "json", False) and result is not None:
            print(json.dumps(result, indent=2))
        if args.command == "batch" and result and result.get("failed"):
            return EXIT_USAGE  # some lines failed (each reported with its line number); the rest ran
        return 0
    except (CLIError, IPAdapterError) as e:
        if debug:
            raise
        print(f"ipadapter: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ipadapter: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the edge: never a traceback without --debug
        if debug:
            raise
        print(
            f"ipadapter: internal error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
