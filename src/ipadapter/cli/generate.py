"""The generation commands: ``generate``, ``img2img``, ``inpaint`` and ``video``, one per mode.

Their flags are made from the option table (:data:`ipadapter.jobs.options.OPTIONS`); the command turns them
into options and hands them to :func:`~ipadapter.jobs.options.job_from_options`, the validator every front end
uses, then writes the result. What only a command line has is here: folders standing for their images, the
output file, the device and ``--compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..fields import Option
from ..jobs.engine import Engine
from ..jobs.options import OPTIONS, PROMPT_KEYS, as_list, job_from_options, local_files
from ..media import check_output, numbered, save_images, save_video
from ..modes import COMMAND_OF, MODES
from ..prompt.influence_render import check_influence_path, write_influence
from ..quiet import quiet_libraries
from .common import (
    add_compile_option,
    add_device,
    add_limit_options,
    check_output_folder,
    limits_from,
    number_text,
)

HELP = {
    "t2i": "text-to-image with a reference image as image prompt",
    "img2img": "image-to-image: repaint an init image guided by the reference and the prompt",
    "inpaint": "repaint the masked part of an init image (white = repaint)",
    "video": "AnimateDiff video with a motion adapter; one reference for all frames or one per frame",
}
CLI_HELP = {  # where the command line takes a value differently from the other front ends
    "recipe": "a recipe file (.toml or .json): adapters, references and their options; replaces --adapter, "
    "--image and the options below",
}
REQUIRED = ("base", "init", "mask", "motion_adapter")  # flags every command that has them requires
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_HELP = {  # what a folder means, where a video accepts one
    "image": "; for a video: once for all frames, once per frame (repeat it), or a folder of one image per "
    "frame (sorted by name)",
    "control_image": "; a folder stands for its images (one per frame)",
}


def register(sub: Any) -> None:
    """Add one command per mode to the subcommands ``sub``."""
    for mode in MODES:
        p = sub.add_parser(COMMAND_OF[mode], help=HELP[mode])
        add_option_flags(p, mode)
        p.add_argument(
            "--dtype",
            choices=["float32", "float16", "bfloat16"],
            help="default: float16 on CUDA, else float32",
        )
        add_device(p)
        add_compile_option(p)
        add_limit_options(p)
        if mode == "video":
            p.add_argument("--output", default="output.gif", help=".gif or .mp4 path (default output.gif)")
        else:
            p.add_argument(
                "--output", default="output.png", help="PNG path; with several images, -1, -2... are added"
            )
        p.add_argument(
            "--influence-map",
            metavar="FILE",
            help="also write where each adapter / reference acted: FILE.png (overlaid on the output, one panel "
            "each, per block) or FILE.npy (the raw maps: panels x blocks x H x W, float32)",
        )
        p.add_argument("--json", action="store_true", help="print the written files and parameters as JSON")
        p.set_defaults(run=cmd_generate, mode=mode)


def add_option_flags(p: argparse.ArgumentParser, mode: str) -> None:
    """One flag per option of the table that ``mode`` takes (``mode`` itself is the command)."""
    control = p.add_argument_group("image prompt control")
    for option in OPTIONS.values():
        if option.name == "mode" or (option.modes is not None and mode not in option.modes):
            continue
        group = control if option.name in PROMPT_KEYS[2:] or option.name == "recipe" else p
        group.add_argument(option.flag, dest=option.name, help=_help(option, mode), **_argparse(option, mode))


def _argparse(option: Option, mode: str) -> dict[str, Any]:
    """How argparse reads ``option``: a switch, a choice, a number, a repeatable flag."""
    if option.kind == "bool":
        return {"action": "store_true", "default": None}
    kwargs: dict[str, Any] = {"required": option.name in REQUIRED}
    if option.many:
        kwargs["action"] = "append"
    if option.kind == "choice":
        kwargs["choices"] = option.choices
    elif option.kind in ("int", "number"):
        kwargs["type"] = number_text(option.kind == "int")  # bounds: job_from_options, with the rest
    if option.kind == "recipe":
        kwargs["metavar"] = "FILE"
    return kwargs


def _help(option: Option, mode: str) -> str:
    text = option.help + (VIDEO_HELP.get(option.name, "") if mode == "video" else "")
    if option.name in CLI_HELP:
        return CLI_HELP[option.name]
    default = option.default_for(mode)
    if default not in (None, "", False) and "default" not in text:
        text += f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
    return text.replace("%", "%%")


def flag(key: str) -> str:
    """How messages name an option on the command line."""
    return OPTIONS[key].flag if key in OPTIONS else key


def _images_of(value: str) -> str | list[str]:
    """A folder stands for its images, sorted by name (a list); anything else stays as given."""
    path = Path(value)
    if not path.is_dir():
        return value
    found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise InputError(f"folder '{path}' has no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command's flags as options (what ``batch`` reads from a manifest line), folders expanded."""
    video = args.mode == "video"
    options: dict[str, Any] = {"mode": args.mode}
    for name in OPTIONS:
        value = getattr(args, name, None)
        if name != "mode" and value is not None and value is not False and value != []:
            options[name] = value
    if video and options.get("image"):
        options["image"] = [i for v in options["image"] for i in as_list(_images_of(v))]
    if video and options.get("control_image"):
        options["control_image"] = [_images_of(v) for v in options["control_image"]]
    for name, value in options.items():  # one value of a repeatable flag, as a manifest would write it
        single = isinstance(value, list) and len(value) == 1 and not isinstance(value[0], list)
        if single and not (video and name == "image"):  # a folder's frame list stays one entry
            options[name] = value[0]
    return options


def check_influence_target(path: str, output: Path, args: argparse.Namespace) -> None:
    """``--influence-map``: a .png / .npy whose files are not the output's, and an uncompiled denoiser."""
    check_output_folder(path)
    check_influence_path(path)
    count = 1 if args.mode == "video" else max(int(getattr(args, "num_images", None) or 1), 1)
    clash = set(numbered(Path(path), count)) & set(numbered(output, count))
    if clash:
        raise InputError(
            f"influence map '{path}' would overwrite the output '{sorted(clash)[0]}'; give it another name, e.g. "
            f"'{Path(path).stem}-influence{Path(path).suffix}'"
        )
    if args.compile:
        raise InputError(
            "--influence-map records inside the denoiser, which a compiled one (--compile) cannot do; drop one "
            "of the two"
        )


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    """generate / img2img / inpaint / video: one flow; the mode picks the pipeline and its inputs."""
    video = args.mode == "video"
    # Cheap checks first: nothing is loaded until every input is known to be usable.
    output = Path(args.output)
    check_output_folder(args.output)
    check_output(output, video)
    if args.influence_map:
        check_influence_target(args.influence_map, output, args)
    locate, resolve_file = local_files()
    job = job_from_options(
        options_from_args(args),
        locate=locate,
        resolve_file=resolve_file,
        spell=flag,
        notice=lambda note: print(f"ipadapter: note: {note}", file=sys.stderr),
        limits=limits_from(args),
    )
    if args.influence_map:
        job = dataclasses.replace(job, influence=True)
    # Every input is usable: now the heavy libraries.
    if args.quiet:
        quiet_libraries()

    result = Engine(args.device, args.dtype, compile=args.compile).run(job)
    params = result.params
    if video:
        written = [save_video(result.images, output, job.fps, params)]
    else:
        written = save_images(result.images, output, params)
    out: dict[str, Any] = {"outputs": [str(p) for p in written], "parameters": params}
    if args.influence_map:
        pictures = [result.images[len(result.images) // 2]] if video else result.images  # a video: its middle
        maps = write_influence(args.influence_map, result.influence, pictures)
        written = [*written, *maps]
        out["influence_maps"] = [str(p) for p in maps]
    if not args.json:
        for path in written:
            print(f"wrote {path}")
    return out
