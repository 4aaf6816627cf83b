"""What every command shares: the parser class, argument types, a quiet environment, exit codes."""

from __future__ import annotations

import argparse
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..errors import InputError
from ..fields import Option
from ..jobs.options import Limits

EXIT_USAGE = 2  # bad input of any kind: options, files, models that do not fit
EXIT_INTERNAL = 1  # a bug or an environment problem we did not anticipate


class CLIError(Exception):
    """Bad command-line usage, reported like any library error."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise CLIError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def number_text(integer: bool) -> Callable[[str], int | float]:
    """An argparse type: the text as an int or a float (bounds are the option's own check's business)."""

    def convert(text: str) -> int | float:
        try:
            return int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not {'a whole number' if integer else 'a number'}"
            ) from None

    return convert


def checked(option: Option) -> Callable[[str], Any]:
    """An argparse type for a declared number option: parsed, then checked against its declaration."""
    parse = number_text(option.kind == "int")

    def convert(text: str) -> Any:
        try:
            return option.check(parse(text), spell=lambda _: "the value")
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def size(text: str) -> int:
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (try {max(8, value // 8 * 8)})")
    return value


def positive_float(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


def add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the denoiser with torch.compile (the first generation takes a while; later "
        "ones of the same size are faster)",
    )


def quiet_environment() -> None:
    """Before anything heavy is imported: library chatter would bury our one-line messages."""
    warnings.filterwarnings("ignore")
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(name, "error")


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def add_device(p: argparse.ArgumentParser, help_extra: str = "") -> None:
    """``--device``; ``help_extra`` continues the "(default auto" remark, e.g. "; under accelerate ...")."""
    p.add_argument(
        "--device", default="auto", help=f"auto, cpu, cuda, cuda:N or mps (default auto{help_extra})"
    )


def check_output_folder(output: str) -> None:
    """Refuse (InputError) an ``--output`` that is a folder, or whose folder is missing or not writable."""
    path = Path(output)
    if path.is_dir():
        raise InputError(f"output '{path}' is a folder; give a file name, e.g. '{path / 'out.png'}'")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"output folder '{parent}' does not exist; create it or choose another --output")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output folder '{parent}' is not writable; choose another --output")


LIMIT_HELP = {
    "pixels": "width x height of an image",
    "images": "images per job (run in chunks)",
    "steps": "denoising steps",
    "frames": "video frames",
}


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """``--max-pixels`` / ``--max-images`` / ``--max-steps`` / ``--max-frames``: raise the limits on one job."""
    defaults = Limits()
    g = p.add_argument_group("limits (checked before any model loads; raise them for big jobs)")
    for name, what in LIMIT_HELP.items():
        default = getattr(defaults, f"max_{name}")
        g.add_argument(
            f"--max-{name}", type=positive_int, default=default, help=f"{what} (default {default:,})"
        )


def limits_from(args: argparse.Namespace) -> Limits:
    """The limits the command's flags set."""
    return Limits(
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_steps=args.max_steps,
        max_frames=args.max_frames,
    )
