"""Adapter files: ``inspect``, ``convert`` and ``embed``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..embedding import check_embed_output, embed_reference
from ..errors import CheckpointError, InputError
from ..prompt.images import load_image
from ..prompt.recipe import CROP_MODES
from ..quiet import quiet_libraries
from .common import add_device


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter", required=True, help="the adapter the embeddings are for (file, hub path or name)"
    )
    p.add_argument("--image-encoder", help="CLIP vision model (default: from the adapter's repo)")
    p.add_argument("--image", required=True, help="the reference image")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--crop", choices=CROP_MODES, default="center", help="how a non-square image is fitted")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    add_device(p)
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Encode a reference once and store its features, for --embeds / `embeds =` in a recipe."""
    # the inputs first, then the quiet heavy libraries: a bad --output or --image is reported at once
    output = check_embed_output(args.output, force=args.force)
    image = load_image(args.image)
    if args.quiet:
        quiet_libraries()
    done = embed_reference(
        args.adapter,
        image,
        output,
        image_encoder=args.image_encoder,
        crop=args.crop,
        device=args.device,
        force=args.force,
    )
    if not args.json:
        print(f"wrote {done.output} ({done.feature} features {done.shape} for {done.variant})")
    return done.to_dict()


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    # heavy (torch, transformers): imported only when the command runs (CLI start-up)
    from ..adapters.info import adapter_info, describe
    from ..sources import resolve_adapter

    info = adapter_info(resolve_adapter(args.file))
    if not args.json:
        print(describe(info))
    if info["problems"]:  # after the description: what the file is, then why it cannot be used (exit 2)
        raise CheckpointError(f"{info['file']}: {'; '.join(info['problems'])}; this adapter cannot be used")
    return info


def cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    # heavy (torch): imported only when the command runs (CLI start-up)
    from ..adapters.checkpoint import PICKLE_SUFFIXES, load_checkpoint, save_checkpoint
    from ..adapters.variants import detect

    src, dst = Path(args.input), Path(args.output)
    kinds = ".safetensors or .bin"
    if dst.is_dir() or args.output.endswith(("/", os.sep)):  # before anything is read
        what = "is a folder" if dst.is_dir() else "ends in a path separator"
        raise InputError(f"output '{args.output}' {what}; give a file name ending in {kinds}")
    if dst.suffix.lower() not in (".safetensors", *PICKLE_SUFFIXES):
        raise InputError(f"output '{dst}' must end in {kinds} (its suffix picks the format)")
    if not dst.parent.is_dir():
        raise InputError(f"output folder '{dst.parent}' does not exist; create it or choose another output")
    if dst.exists() and not args.force:
        raise InputError(f"output '{dst}' exists; pass --force to overwrite it")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InputError(f"output '{dst}' is the input file; choose another path")
    ckpt = load_checkpoint(src)
    spec = detect(ckpt)  # refuse to convert something that is not an adapter
    save_checkpoint(ckpt, dst)
    print(f"wrote {dst} ({spec.layout}, {len(ckpt.image_proj) + len(ckpt.ip_adapter)} tensors)")
    return {"output": str(dst)}


def register(sub: Any) -> None:
    """Add ``inspect``, ``convert`` and ``embed`` to the subcommands ``sub``."""
    p = sub.add_parser("inspect", help="describe an IP-Adapter checkpoint: variant, tokens, dims, layers")
    p.add_argument("file", help="an IP-Adapter .safetensors or .bin file, or owner/repo/path on the hub")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(run=cmd_inspect, light=True)

    p = sub.add_parser("convert", help="rewrite a checkpoint in another format (.bin <-> .safetensors)")
    p.add_argument("input", help="the checkpoint to read (.bin or .safetensors)")
    p.add_argument("output", help="the file to write; its suffix picks the format")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(run=cmd_convert, light=True)

    p = sub.add_parser("embed", help="store a reference's encoder features for reuse (--embeds FILE)")
    _add_embed_options(p)
    p.set_defaults(run=cmd_embed)
