"""The shipped miniature family: ``eval`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import atomic_path
from ..mini.shapes import write_dataset
from ..prompt.controls import CONTROLS
from ..quiet import quiet_libraries
from .common import add_device, check_output_folder, checked, finite, positive_int, size


def _add_model_run_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """eval / demo: which model and adapter, and how to generate."""
    for flag, what in (
        ("--base", "base model (diffusers folder, hub id or single file)"),
        ("--adapter", "adapter file or hub path"),
    ):
        name = flag[2:]
        if name in defaults:
            p.add_argument(flag, default=defaults[name], help=f"{what} (default: {defaults[name]})")
        else:
            p.add_argument(flag, required=True, help=what)
    p.add_argument("--image-encoder", help="CLIP vision model (default: from the adapter's layout)")
    p.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=finite, default=5.0, help="classifier-free guidance (default 5)")
    p.add_argument(
        "--scale",
        type=checked(CONTROLS["scale"]),
        default=defaults.get("scale", 0.6),
        help=f"image prompt scale (default {defaults.get('scale', 0.6)})",
    )
    p.add_argument("--size", type=size, help="generation size (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first generation (default 0)")
    add_device(p)


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    _add_model_run_options(p, {})
    p.add_argument(
        "--scorer", help="CLIPModel folder/hub id for CLIP-I/CLIP-T (default: a mini build's clip/)"
    )
    p.add_argument(
        "--references",
        help="shapes folder with metadata.jsonl (default: a mini build's data/eval, "
        "else generated held-out shapes)",
    )
    p.add_argument("--count", type=positive_int, default=50, help="references (default 50)")
    p.add_argument("--output", help="write the report here (.md or .json)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")


def _attached(args: argparse.Namespace) -> tuple[Any, int]:
    """eval / demo: the base with the adapter attached, and the image side to generate at."""
    if args.quiet:
        quiet_libraries()
    # heavy: imported only when models load, after quiet_libraries (CLI start-up)
    from ..adapter import attach
    from ..pipelines import load_pipeline, native_size, pick_device, pick_dtype

    device = pick_device(args.device)
    pipe = load_pipeline(args.base, dtype=pick_dtype(None, device), device=device)
    pipe.set_progress_bar_config(disable=True)
    ip = attach(pipe, args.adapter, args.image_encoder, scale=args.scale)
    return ip, args.size or native_size(pipe)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Text only vs image prompt vs image prompt + text on held-out shapes: CLIP-I, CLIP-T, attributes."""
    from ..mini.shipped import eval_folders  # looked up per call: tests replace shipped.eval_folders

    scorer, refs_folder = eval_folders(args.base, args.scorer, args.references)
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".md", ".json"):
        raise InputError(f"--output '{output}' must end in .md or .json")
    if output is not None:
        check_output_folder(args.output)  # before the models load, not after the run
    ip, size = _attached(args)
    # heavy (torch): only once the inputs are checked
    from ..mini.evaluate import Scorer, evaluate, markdown, references

    with tempfile.TemporaryDirectory() as tmp:
        if refs_folder is None:
            refs_folder = str(
                write_dataset(Path(tmp) / "eval", args.count, seed=args.seed, size=size, split="eval")
            )
        refs = references(refs_folder, args.count)
        results = evaluate(
            ip,
            Scorer(scorer),
            refs,
            steps=args.steps,
            guidance=args.guidance,
            scale=args.scale,
            seed=args.seed,
            size=size,
        )
    table = markdown(results)
    if output is not None:
        with atomic_path(output) as temp:
            temp.write_text(
                json.dumps(results, indent=2) if output.suffix.lower() == ".json" else table + "\n",
                encoding="utf-8",
            )
    if not args.json:
        print(table)
    return {"results": results, "references": refs_folder, "scorer": scorer}


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    # scale 0.8: the shipped mini adapter's best balance of picture and text (README table)
    _add_model_run_options(p, {"base": "mini", "adapter": "mini", "scale": 0.8})
    p.add_argument("--output", default="demo.png", help="the contact sheet, a .png (default ./demo.png)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """reference | text only | image prompt | image + text, for a few held-out shapes, as one picture."""
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise InputError(f"--output '{output}' must be a .png file")
    check_output_folder(args.output)
    ip, size = _attached(args)
    from ..mini.demo import contact_sheet, run_demo  # heavy (torch): only once the inputs are checked

    rows = run_demo(ip, size=size, steps=args.steps, guidance=args.guidance, seed=args.seed)
    with atomic_path(output) as temp:
        contact_sheet(rows).save(temp, format="PNG")
    if not args.json:
        print(f"wrote {output}: {len(rows)} references x (text only | image prompt | image + text)")
    return {"output": str(output), "rows": len(rows)}


def register(sub: Any) -> None:
    """Add ``eval`` and ``demo`` to the subcommands ``sub``."""
    p = sub.add_parser("eval", help="CLIP-I / CLIP-T / attribute scores: text vs image vs both")
    _add_eval_options(p)
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("demo", help="contact sheet of the shipped miniature model: text vs image vs both")
    _add_demo_options(p)
    p.set_defaults(run=cmd_demo)
