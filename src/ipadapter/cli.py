"""The ``ipadapter`` command. Thin: parse, call the library, translate errors into one line + exit code."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2  # bad input of any kind: options, files, models that do not fit
EXIT_INTERNAL = 1  # a bug or an environment problem we did not anticipate


class CLIError(Exception):
    """Bad command-line usage, reported like any library error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def _scale(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; expected a number >= 0 (1.0 = full strength)")
    return value


def _size(text: str) -> int:
    value = _positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (try {max(8, value // 8 * 8)})")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .pipelines import SCHEDULERS

    parser = _Parser(
        prog="ipadapter", description="Image prompts (IP-Adapter) for Stable Diffusion 1.5 / SDXL."
    )
    parser.add_argument("--version", action="version", version=f"ipadapter {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="describe an IP-Adapter checkpoint: variant, tokens, dims, layers")
    p.add_argument("file", help="an IP-Adapter .safetensors or .bin file, or owner/repo/path on the hub")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")

    p = sub.add_parser("convert", help="rewrite a checkpoint in another format (.bin <-> .safetensors)")
    p.add_argument("input", help="the checkpoint to read (.bin or .safetensors)")
    p.add_argument("output", help="the file to write; its suffix picks the format")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")

    p = sub.add_parser("generate", help="text-to-image with a reference image as image prompt")
    p.add_argument(
        "--base", required=True, help="diffusers folder, hub id, or single-file .safetensors/.ckpt"
    )
    p.add_argument(
        "--base-config", help="for a single-file base: a diffusers folder/hub id of the same family"
    )
    p.add_argument("--adapter", required=True, help="adapter file, or owner/repo/path/in/repo.safetensors")
    p.add_argument(
        "--image-encoder", help="CLIP vision model folder or hub path (default: from the adapter's repo)"
    )
    p.add_argument("--image", required=True, help="the reference image")
    p.add_argument("--prompt", default="", help="text prompt (default: empty)")
    p.add_argument("--negative-prompt", default=None, help="negative text prompt")
    p.add_argument("--scale", type=_scale, default=1.0, help="image prompt strength, >= 0 (default 1.0)")
    p.add_argument("--steps", type=_positive_int, help="denoising steps (default: the pipeline's, 50)")
    p.add_argument("--guidance", type=_finite, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument(
        "--seed", type=int, help="seed of a CPU torch.Generator (same pixels as diffusers' examples)"
    )
    p.add_argument("--width", type=_size, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=_size, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--num-images", type=_positive_int, default=1, help="images to make (default 1)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the base model's)")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, else float32"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument(
        "--output", default="output.png", help="PNG path; with several images, -1, -2... are added"
    )
    p.add_argument("--json", action="store_true", help="print the written files and parameters as JSON")
    return parser


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from .checkpoint import load_checkpoint
    from .sources import resolve_adapter
    from .variants import detect

    path = resolve_adapter(args.file)
    ckpt = load_checkpoint(path)
    spec = detect(ckpt)
    tensors = list(ckpt.image_proj.values()) + list(ckpt.ip_adapter.values())
    info = {
        "file": str(path),
        "format": "safetensors" if path.suffix == ".safetensors" else "pickle (weights only)",
        **spec.to_dict(),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
    }
    if not args.json:
        print(_describe(info))
    return info


def _describe(info: dict[str, Any]) -> str:
    tokens = info["num_tokens"] or "one per encoder hidden state"
    feature = "pooled image_embeds" if info["feature"] == "pooled" else f"{info['feature']} states"
    sizes = sorted(set(info["hidden_sizes"]))
    lines = [
        f"file:        {info['file']} ({info['format']}, {info['tensors']} tensors, "
        f"{info['parameters']:,} parameters, {'/'.join(info['dtypes'])})",
        f"layout:      {info['layout']}" + ("" if info["supported"] else " (not supported by this version)"),
        f"variant:     {' or '.join(info['names']) or 'no official variant has these dims (custom)'}",
        f"base:        {info['base'] or 'unknown'} (cross-attention dim {info['cross_attention_dim']})",
        f"encoder:     {info['encoder'] or 'unknown'} ({feature}, {info['feature_dim']} dims)",
        f"tokens:      {tokens}",
        f"layers:      {info['num_layers']} cross-attention layers (ids {info['layer_ids'][0]}.."
        f"{info['layer_ids'][-1]}), hidden sizes {sizes}",
    ]
    if info.get("resampler"):
        r = info["resampler"]
        lines.append(
            f"resampler:   dim {r['dim']}, depth {r['depth']}, heads {r['heads']} x {r['dim_head']}, "
            f"{r['num_queries']} queries, in {r['embedding_dim']}, out {r['output_dim']}, ff x{r['ff_mult']}"
        )
    return "\n".join(lines)


def cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    from .checkpoint import load_checkpoint, save_checkpoint
    from .errors import InputError
    from .variants import detect

    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and not args.force:
        raise InputError(f"output '{dst}' exists; pass --force to overwrite it")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise InputError(f"output '{dst}' is the input file; choose another path")
    ckpt = load_checkpoint(src)
    spec = detect(ckpt)  # refuse to convert something that is not an adapter
    save_checkpoint(ckpt, dst)
    print(f"wrote {dst} ({spec.layout}, {len(ckpt.image_proj) + len(ckpt.ip_adapter)} tensors)")
    return {"output": str(dst)}


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from . import __version__
    from .adapter import attach
    from .encoder import image_key, load_image
    from .errors import InputError
    from .pipelines import load_pipeline, pick_device, pick_dtype, set_scheduler

    # Cheap checks first: nothing is loaded until every input is known to be usable.
    reference = load_image(args.image)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise InputError(
            f"output folder '{output.parent}' does not exist; create it or choose another --output"
        )
    if output.suffix.lower() != ".png":
        raise InputError(f"output '{output}' must be a .png file (it carries the generation parameters)")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)

    pipe = load_pipeline(args.base, dtype=dtype, device=device, base_config=args.base_config)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    ip = attach(pipe, args.adapter, args.image_encoder, scale=args.scale)
    call: dict[str, Any] = {"prompt": args.prompt, "num_images_per_prompt": args.num_images}
    optional = {"negative_prompt": args.negative_prompt, "num_inference_steps": args.steps,
                "guidance_scale": args.guidance, "width": args.width, "height": args.height}  # fmt: skip
    call.update({k: v for k, v in optional.items() if v is not None})
    if args.seed is not None:
        call["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    images = ip(reference, **call).images

    params = {
        "tool": f"ipadapter {__version__}", "base": args.base, "adapter": args.adapter,
        "variant": "/".join(ip.spec.names) or ip.spec.layout, "image": args.image, "image_sha1": image_key(reference),
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "scale": args.scale,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "width": images[0].width,
        "height": images[0].height, "scheduler": args.scheduler or type(pipe.scheduler).__name__,
        "dtype": str(dtype).removeprefix("torch."), "device": device,
    }  # fmt: skip
    written = save_images(images, output, params)
    if not args.json:
        for path in written:
            print(f"wrote {path}")
    return {"outputs": [str(p) for p in written], "parameters": params}


def save_images(images: Sequence[Any], output: Path, params: dict[str, Any]) -> list[Path]:
    """Write PNGs carrying ``params`` as JSON in the ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(len(images))]  # fmt: skip
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        info = PngInfo()
        info.add_text("parameters", json.dumps({**params, "index": i}))
        image.save(path, pnginfo=info)
    return paths


COMMANDS = {"inspect": cmd_inspect, "convert": cmd_convert, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ipadapter`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        from .errors import IPAdapterError

        if not debug:
            _quiet_libraries()
        args = build_parser().parse_args(argv)
        result = COMMANDS[args.command](args)
        if getattr(args, "json", False):
            print(json.dumps(result, indent=2))
        return 0
    except (CLIError, IPAdapterError) as e:
        if debug:
            raise
        print(f"ipadapter: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ipadapter: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the edge: never a traceback without --debug
        if debug:
            raise
        print(f"ipadapter: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


def _quiet_libraries() -> None:
    """Library chatter (deprecations, backend notices) would bury our one-line messages."""
    import warnings

    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # loading bars; the denoising bar stays
    import diffusers  # after transformers is quiet: importing diffusers' pipelines triggers its notices

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
