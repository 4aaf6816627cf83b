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


def _strength(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{value} is outside (0, 1]; 1.0 repaints everything, small values keep more of the init image"
        )
    return value


def _positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be greater than 0")
    return value


MODE_OF = {"generate": "t2i", "img2img": "img2img", "inpaint": "inpaint", "video": "video"}


def _add_generation_options(p: argparse.ArgumentParser, command: str) -> None:
    from .schedulers import SCHEDULERS

    video = command == "video"
    p.add_argument(
        "--base", required=True, help="diffusers folder, hub id, or single-file .safetensors/.ckpt"
    )
    p.add_argument(
        "--base-config", help="for a single-file base: a diffusers folder/hub id of the same family"
    )
    p.add_argument(
        "--adapter",
        help="adapter file, or owner/repo/path/in/repo.safetensors (or use --recipe; neither, and no --image: the plain base model)",
    )
    p.add_argument(
        "--image-encoder", help="CLIP vision model folder or hub path (default: from the adapter's repo)"
    )
    if video:
        p.add_argument(
            "--image",
            action="append",
            default=[],
            help="reference image PATH[:WEIGHT]: once for all frames, once per frame (repeat it), or a "
            "folder of one image per frame (sorted by name); with --combine, several references "
            "combined for every frame",
        )
        p.add_argument("--motion-adapter", required=True, help="AnimateDiff motion adapter: folder or hub id")
        p.add_argument("--frames", type=_positive_int, default=16, help="number of frames (default 16)")
        p.add_argument("--fps", type=_positive_float, default=8.0, help="frames per second (default 8)")
        p.add_argument("--vae-slicing", action="store_true", help="decode frames one by one (less memory)")
        p.add_argument(
            "--cpu-offload",
            action="store_true",
            help="keep idle models in CPU memory (CUDA only; much less GPU memory, a bit slower)",
        )
    else:
        p.add_argument(
            "--image",
            action="append",
            default=[],
            help="reference image PATH[:WEIGHT]; repeat for several references (see --combine)",
        )
    _add_control_options(p)
    if command in ("img2img", "inpaint"):
        p.add_argument("--init", required=True, help="the image to start from (its size is the output size)")
        default = 1.0 if command == "inpaint" else 0.8
        p.add_argument(
            "--strength",
            type=_strength,
            default=default,
            help=f"how much to repaint, in (0, 1] (default {default})",
        )
    if command == "inpaint":
        p.add_argument("--mask", required=True, help="greyscale mask: white = repaint, black = keep")
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        help="ControlNet folder or hub id; repeat for several, each with its --control-image",
    )
    p.add_argument(
        "--control-image",
        action="append",
        default=[],
        help="conditioning image per --controlnet, in the same order"
        + (" (or a folder with one image per frame)" if video else ""),
    )
    p.add_argument(
        "--control-scale",
        action="append",
        default=[],
        type=_finite,
        help="ControlNet strength: once for all or once per --controlnet (default 1.0)",
    )
    p.add_argument("--prompt", default="", help="text prompt (default: empty)")
    p.add_argument("--negative-prompt", default=None, help="negative text prompt")
    p.add_argument("--scale", type=_scale, help="image prompt strength, >= 0 (default 1.0)")
    p.add_argument("--steps", type=_positive_int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=_finite, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument(
        "--seed", type=int, help="seed of a CPU torch.Generator (same pixels as diffusers' examples)"
    )
    size_default = "the init image's size" if command in ("img2img", "inpaint") else "the model's native size"
    p.add_argument("--width", type=_size, help=f"multiple of 8 (default: {size_default})")
    p.add_argument("--height", type=_size, help=f"multiple of 8 (default: {size_default})")
    if not video:
        p.add_argument("--num-images", type=_positive_int, default=1, help="images to make (default 1)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the base model's)")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA, else float32"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    _add_compile_option(p)
    if video:
        p.add_argument("--output", default="output.gif", help=".gif or .mp4 path (default output.gif)")
    else:
        p.add_argument(
            "--output", default="output.png", help="PNG path; with several images, -1, -2... are added"
        )
    p.add_argument("--json", action="store_true", help="print the written files and parameters as JSON")


def _add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the denoiser with torch.compile (the first generation takes a while; later "
        "ones of the same size are faster)",
    )


def _add_control_options(p: argparse.ArgumentParser) -> None:
    """How the image prompt is used: the single-adapter shorthand of a recipe (README: Fine control)."""
    from .layers import CURVE_NAMES, PRESET_NAMES
    from .recipe import COMBINE_MODES, CROP_MODES

    g = p.add_argument_group("image prompt control")
    g.add_argument(
        "--recipe",
        help="a recipe file (.toml or .json): adapters, references and their options; "
        "replaces --adapter/--image and the options below",
    )
    g.add_argument(
        "--embeds",
        action="append",
        default=[],
        help="reference from an `ipadapter embed` file, FILE[:WEIGHT]; repeatable",
    )
    g.add_argument(
        "--image-mask",
        action="append",
        default=[],
        help="regional mask per reference (white = where it acts), in the order of --image then --embeds",
    )
    g.add_argument("--combine", choices=COMBINE_MODES, help="how several references combine (default concat)")
    g.add_argument("--crop", choices=CROP_MODES, help="how a non-square reference is fitted (default center)")
    g.add_argument("--negative-image", help="image whose tokens replace the unconditional image tokens")
    g.add_argument("--layer-weights", help='weight per transformer block, e.g. "t3=0.5,t6=1.0" (unlisted: 0)')
    g.add_argument("--preset", choices=PRESET_NAMES, help="blocks for style / composition (SD1.5 and SDXL)")
    g.add_argument(
        "--composition-weight", type=_scale, help="composition blocks' weight in style+composition"
    )
    g.add_argument("--curve", choices=CURVE_NAMES, help="weight curve over the transformer blocks")
    g.add_argument("--start", type=_finite, help="denoising progress at which the image prompt starts (0-1)")
    g.add_argument("--end", type=_finite, help="denoising progress at which it ends (0-1)")


def _prompt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The image prompt's flags (adapter, references and their options) as options."""
    from .generation import PROMPT_KEYS

    return {k: getattr(args, k) for k in PROMPT_KEYS}


def _recipe(args: argparse.Namespace, video: bool) -> Any:
    """The recipe this command runs: --recipe, or one adapter made of the flags. None: per-frame video."""
    from .errors import InputError
    from .generation import per_frame_video, recipe_from_options
    from .recipe import Recipe

    options = _prompt_options(args)
    if args.recipe:
        given = [k for k, v in options.items() if v not in (None, [])]
        if given:
            clash = ", ".join(f"--{k.replace('_', '-')}" for k in given)
            raise InputError(f"--recipe replaces {clash}: put them in the recipe file or drop --recipe")
        recipe = Recipe.load(args.recipe)
        recipe.check_files()
        return recipe
    start, end = (0.0 if args.start is None else args.start), (1.0 if args.end is None else args.end)
    if not 0.0 <= start < end <= 1.0:  # said in the flags' words (the recipe would name its own fields)
        raise InputError(
            f"--start {start:g} --end {end:g}: expected 0 <= start < end <= 1, the part of the "
            "denoising run the image prompt acts in; e.g. --start 0.2 --end 0.8"
        )
    if video and args.adapter and args.image and per_frame_video({**options, "mode": "video"}):
        return None  # plain --image for a video: one reference for all frames, or one per frame
    return recipe_from_options(options)  # its files are read by _load_references, in the flags' words


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    from .recipe import CROP_MODES

    p.add_argument(
        "--adapter", required=True, help="the adapter the embeddings are for (file, hub path or name)"
    )
    p.add_argument("--image-encoder", help="CLIP vision model (default: from the adapter's repo)")
    p.add_argument("--image", required=True, help="the reference image")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--crop", choices=CROP_MODES, default="center", help="how a non-square image is fitted")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Encode a reference once and store its features, for --embeds / `embeds =` in a recipe."""
    from .errors import InputError
    from .images import image_key, load_image

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise InputError(f"--output '{output}' must end in .safetensors")
    if output.exists() and not args.force:
        raise InputError(f"output '{output}' exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        raise InputError(
            f"output folder '{output.parent}' does not exist; create it or choose another --output"
        )
    image = load_image(args.image)
    if args.quiet:
        _quiet_libraries()
    from .adapter import check_encoder, open_adapter
    from .embeds import save_embeds
    from .encoder import ImageEncoder
    from .pipelines import pick_device, pick_dtype
    from .sources import default_encoder, load_image_encoder
    from .variants import detect

    ckpt, source = open_adapter(args.adapter)
    spec = detect(ckpt)
    where = args.image_encoder or default_encoder(source, spec)
    device = pick_device(args.device)
    encoder = ImageEncoder(load_image_encoder(where, dtype=pick_dtype(None, device), device=device))
    check_encoder(spec, encoder, source)
    features = encoder.features([image], spec.feature, args.crop)[0]
    variant = "/".join(spec.names) or spec.layout
    save_embeds(
        output,
        features,
        encoder.negative_features(spec.feature),
        feature=spec.feature,
        encoder=encoder,
        encoder_name=str(where),
        crop=args.crop,
        variant=variant,
        image_sha1=image_key(image),
    )
    if not args.json:
        print(f"wrote {output} ({spec.feature} features {list(features.shape)} for {variant})")
    return {"output": str(output), "feature": spec.feature, "shape": list(features.shape), "variant": variant}


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="a .jsonl file: one job per line, the generation options as JSON keys")
    p.add_argument("--output", required=True, help="folder for the results (made if missing)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (default auto; under "
        "accelerate launch: each process's own device)",
    )
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA")
    _add_compile_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_batch(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run every job of a manifest, models loaded once; resumable; failures reported per line."""
    if args.quiet:
        _quiet_libraries()
    from .batch import run_batch

    return run_batch(
        Path(args.manifest),
        Path(args.output),
        device=args.device,
        dtype=args.dtype,
        quiet=args.json,
        compile=args.compile,
    )


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", required=True, help="the base model served (diffusers folder, hub id, single file)"
    )
    p.add_argument(
        "--base-config", help="for a single-file base: a diffusers folder/hub id of the same family"
    )
    p.add_argument(
        "--adapter",
        required=True,
        action="append",
        help="adapter served; repeat for several (requests name them as given here)",
    )
    p.add_argument("--image-encoder", help="CLIP vision model (default: from the adapter's repo)")
    p.add_argument("--controlnet", action="append", default=[], help="ControlNet served; repeatable")
    p.add_argument("--motion-adapter", help="AnimateDiff motion adapter served (enables mode video)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=32,
        help="jobs waiting or running at most; more get 429 (default 32)",
    )
    p.add_argument("--token-file", help="file holding a bearer token every request must send")
    p.add_argument(
        "--max-body-mb", type=_positive_float, default=32.0, help="largest request body (default 32)"
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=4096 * 4096,
        help="largest decoded image, in pixels (default 4096x4096)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the denoiser with torch.compile, warmed up at start (slower start, faster "
        "requests of the native size)",
    )


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the models once and serve the REST API and the web page until interrupted."""
    from .errors import InputError

    token = None
    if args.token_file:
        path = Path(args.token_file)
        if not path.is_file():
            raise InputError(f"--token-file '{path}': no such file")
        token = path.read_text().strip()
        if not token:
            raise InputError(f"--token-file '{path}' is empty; put the token on its first line")
    if args.quiet:
        _quiet_libraries()
    from .server import ServerConfig, serve

    config = ServerConfig(
        base=args.base,
        base_config=args.base_config,
        adapters=list(args.adapter),
        image_encoder=args.image_encoder,
        controlnets=list(args.controlnet),
        motion_adapter=args.motion_adapter,
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        token=token,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_pixels=args.max_pixels,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
    )
    serve(config)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Options of `ipadapter train`; unset ones come from the run being resumed, else from TrainConfig."""
    p.add_argument("--base", help="base model: diffusers folder, hub id or single file (SD1.5 / SDXL family)")
    p.add_argument(
        "--base-config", help="for a single-file base: a diffusers folder/hub id of the same family"
    )
    p.add_argument("--image-encoder", help="CLIP vision model (default: the official one for the variant)")
    p.add_argument("--variant", choices=["basic", "plus"], help="adapter layout to train (default plus)")
    p.add_argument(
        "--data",
        help="image folder with .txt captions, .jsonl/.json manifest, saved HF dataset, "
        "hf://owner/name, or WebDataset .tar shards (glob/brace pattern)",
    )
    p.add_argument("--image-column", help="manifest/dataset image field (default image)")
    p.add_argument("--text-column", help="manifest/dataset caption field (default text)")
    p.add_argument(
        "--output", help="run folder: checkpoints, logs, validation images, ip-adapter.safetensors"
    )
    p.add_argument("--resume", metavar="FOLDER", help="continue the run stored in FOLDER (same settings)")
    p.add_argument("--init-adapter", help="start from an existing adapter of the same layout (fine-tuning)")
    p.add_argument("--resolution", type=_size, help="training size, multiple of 8 (default 512)")
    p.add_argument("--batch-size", type=_positive_int, help="examples per device per step (default 8)")
    p.add_argument("--grad-accum", type=_positive_int, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=_positive_float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=_finite, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps in all (default 1000)")
    p.add_argument("--num-tokens", type=_positive_int, help="image tokens (default 4 basic, 16 plus)")
    for what in ("text", "image", "both"):
        p.add_argument(f"--drop-{what}", type=_finite, help=f"rate of dropping the {what} (default 0.05)")
    p.add_argument("--seed", type=int, help="seed of everything random in the run (default 42)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default no")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="save memory, ~25%% slower"
    )
    p.add_argument(
        "--max-grad-norm", type=_positive_float, help="clip gradients to this norm (default: no clip)"
    )
    p.add_argument("--random-crop", action="store_true", default=None, help="random instead of centre crops")
    p.add_argument("--random-flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument(
        "--cache-dir", help="precompute VAE latents and image features here once (centre crops only)"
    )
    p.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default 500)")
    p.add_argument("--keep-checkpoints", type=_positive_int, help="checkpoints kept (default 3)")
    p.add_argument("--validate-every", type=int, help="steps between validation images (default 0 = never)")
    p.add_argument("--validation-image", help="reference image for validation images")
    p.add_argument("--validation-prompt", help="prompt for validation images (default empty)")
    p.add_argument("--export-dtype", choices=["float16", "float32", "bfloat16"], help="default float16")
    p.add_argument("--num-workers", type=int, help="data loading worker processes (default 0)")
    p.add_argument("--log-every", type=_positive_int, help="steps between logged losses (default 10)")
    p.add_argument(
        "--report-to",
        choices=["auto", "tensorboard", "none"],
        help="loss logging in OUTPUT/logs (default auto: TensorBoard when the package is installed)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic GPU kernels: reruns and resumed runs repeat bit for bit (slower)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_train(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train (or resume) an adapter; the result is an ordinary official-format adapter file."""
    import torch

    from .errors import InputError

    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("command", "debug", "json", "quiet")
    }
    resume = given.pop("resume", None)
    saved: dict[str, Any] = {}
    if resume:
        if "output" in given and Path(given["output"]).resolve() != Path(resume).resolve():
            raise InputError(
                f"--resume '{resume}' and --output '{given['output']}' differ; a run resumes in its "
                "own folder: drop --output"
            )
        config_file = Path(resume) / "train_config.json"
        if not config_file.is_file():
            raise InputError(
                f"--resume: '{resume}' holds no training run (train_config.json missing); start a "
                "new run with --output"
            )
        saved = json.loads(config_file.read_text())
        given["output"] = resume
    missing = [f"--{k}" for k in ("base", "data", "output") if k not in given and k not in saved]
    if missing:
        raise InputError(
            f"missing {', '.join(missing)}; a new run needs a base model, data and an output folder"
        )
    if args.quiet:
        _quiet_libraries()
    from .training.trainer import TrainConfig, Trainer

    config = TrainConfig(**{**saved, **given, "resume": bool(resume)})
    trainer = Trainer(config)
    trainer.setup()
    final = trainer.train()
    if not trainer.accelerator.is_main_process:
        return None  # one report per run, from the main process
    if not args.json:
        processes = trainer.accelerator.num_processes
        engine = (
            ""
            if trainer.engine == "plain"
            else f" ({'DeepSpeed' if trainer.engine == 'deepspeed' else 'FSDP'})"
        )
        print(
            f"wrote {final} after {trainer.step} steps on {processes} process{'es' if processes > 1 else ''}{engine}"
        )
    train_s = trainer.seconds["train"]
    return {
        "output": str(final),
        "steps": trainer.step,
        "skipped": len(trainer.skipped),
        "seconds": trainer.seconds,
        "processes": trainer.accelerator.num_processes,
        "engine": trainer.engine,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "samples_per_second": trainer.samples / train_s if train_s else None,
    }


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
    p.add_argument("--steps", type=_positive_int, default=20, help="denoising steps (default 20)")
    p.add_argument("--guidance", type=_finite, default=5.0, help="classifier-free guidance (default 5)")
    p.add_argument(
        "--scale",
        type=_scale,
        default=defaults.get("scale", 0.6),
        help=f"image prompt scale (default {defaults.get('scale', 0.6)})",
    )
    p.add_argument("--size", type=_size, help="generation size (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first generation (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


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
    p.add_argument("--count", type=_positive_int, default=50, help="references (default 50)")
    p.add_argument("--output", help="write the report here (.md or .json)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")


def _attached(args: argparse.Namespace) -> tuple[Any, int]:
    """eval / demo: the base with the adapter attached, and the image side to generate at."""
    if args.quiet:
        _quiet_libraries()
    from .adapter import attach
    from .pipelines import load_pipeline, native_size, pick_device, pick_dtype

    device = pick_device(args.device)
    pipe = load_pipeline(args.base, dtype=pick_dtype(None, device), device=device)
    pipe.set_progress_bar_config(disable=True)
    ip = attach(pipe, args.adapter, args.image_encoder, scale=args.scale)
    return ip, args.size or native_size(pipe)


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Text only vs image prompt vs image prompt + text on held-out shapes: CLIP-I, CLIP-T, attributes."""
    import tempfile

    from .errors import InputError
    from .mini.shipped import resolve_base

    base = Path(resolve_base(args.base))
    build_root = base.parent if (base / "model_index.json").is_file() else None
    scorer = args.scorer or (
        str(build_root / "clip") if build_root and (build_root / "clip").is_dir() else None
    )
    if scorer is None:
        raise InputError(
            "no CLIP scorer: pass --scorer with a CLIPModel folder or hub id (a mini build has clip/)"
        )
    refs_folder = args.references
    if refs_folder is None and build_root and (build_root / "data" / "eval" / "metadata.jsonl").is_file():
        refs_folder = str(build_root / "data" / "eval")
    if refs_folder is not None and not (Path(refs_folder) / "metadata.jsonl").is_file():
        raise InputError(f"--references '{refs_folder}' has no metadata.jsonl; expected a shapes folder")
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".md", ".json"):
        raise InputError(f"--output '{output}' must end in .md or .json")
    ip, size = _attached(args)
    from .mini.evaluate import Scorer, evaluate, markdown, references
    from .mini.shapes import write_dataset

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
        output.write_text(json.dumps(results, indent=2) if output.suffix.lower() == ".json" else table + "\n")
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
    from .errors import InputError

    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise InputError(f"--output '{output}' must be a .png file")
    if not output.parent.is_dir():
        raise InputError(
            f"output folder '{output.parent}' does not exist; create it or choose another --output"
        )
    ip, size = _attached(args)
    from .mini.demo import contact_sheet, run_demo

    rows = run_demo(ip, size=size, steps=args.steps, guidance=args.guidance, seed=args.seed)
    contact_sheet(rows).save(output)
    if not args.json:
        print(f"wrote {output}: {len(rows)} references x (text only | image prompt | image + text)")
    return {"output": str(output), "rows": len(rows)}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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

    modes = {
        "generate": "text-to-image with a reference image as image prompt",
        "img2img": "image-to-image: repaint an init image guided by the reference and the prompt",
        "inpaint": "repaint the masked part of an init image (white = repaint)",
        "video": "AnimateDiff video with a motion adapter; one reference for all frames or one per frame",
    }
    for command, help_text in modes.items():
        _add_generation_options(sub.add_parser(command, help=help_text), command)
    _add_batch_options(
        sub.add_parser("batch", help="run a .jsonl manifest of jobs (resumable; accelerate-ready)")
    )
    _add_serve_options(sub.add_parser("serve", help="REST API with a job queue, and a web page"))
    _add_embed_options(
        sub.add_parser("embed", help="store a reference's encoder features for reuse (--embeds FILE)")
    )
    _add_train_options(
        sub.add_parser("train", help="train an adapter on image-text pairs (accelerate-ready)")
    )
    _add_eval_options(
        sub.add_parser("eval", help="CLIP-I / CLIP-T / attribute scores: text vs image vs both")
    )
    _add_demo_options(
        sub.add_parser("demo", help="contact sheet of the shipped miniature model: text vs image vs both")
    )
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _image_list(values: Sequence[str], what: str) -> list[Any]:
    """Images named on the command line; a folder stands for its images, sorted by name."""
    from .errors import InputError
    from .images import load_image

    paths: list[Path] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{what} folder '{path}' has no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        else:
            paths.append(path)
    return [load_image(p, what) for p in paths]


def _controls(args: argparse.Namespace, frames: int | None) -> tuple[list[Any], float | list[float]]:
    """Control images (per ControlNet; for video, a frame list each) and scales, counts checked."""
    from .errors import InputError

    nets, images, scales = args.controlnet, args.control_image, args.control_scale
    if len(images) != len(nets):
        raise InputError(
            f"{len(nets)} --controlnet but {len(images)} --control-image; give one control image per "
            "ControlNet, in the same order"
        )
    if scales and not nets:
        raise InputError("--control-scale without --controlnet; add a --controlnet and its --control-image")
    if scales and len(scales) not in (1, len(nets)):
        raise InputError(
            f"{len(scales)} --control-scale for {len(nets)} ControlNets; give one for all or one per ControlNet"
        )
    controls = []
    for value in images:
        loaded = _image_list([value], "control image")
        if frames is None:
            if len(loaded) != 1:
                raise InputError(f"control image '{value}' is a folder; image modes take one control image")
            controls.append(loaded[0])
        elif len(loaded) not in (1, frames):
            raise InputError(
                f"control image folder '{value}' has {len(loaded)} images for {frames} frames; give one for "
                "all frames or one per frame"
            )
        else:
            controls.append(loaded * frames if len(loaded) == 1 else loaded)
    scale: float | list[float] = 1.0
    if scales:
        scale = scales[0] if len(nets) == 1 else scales * len(nets) if len(scales) == 1 else list(scales)
    return controls, scale


def _load_references(recipe: Any) -> tuple[Any, list[str]]:
    """``recipe`` with its references, masks and negative images decoded now (a bad file fails before models
    load), and the references' content hashes (for the output's metadata)."""
    from .errors import InputError
    from .generation import load_recipe_inputs
    from .images import image_key

    def embeds_file(value: str, what: str) -> str:
        if not Path(value).is_file():
            raise InputError(f"{what} '{value}': no such file; make one with `ipadapter embed`")
        return value

    loaded = load_recipe_inputs(recipe, lambda value, what: value, embeds_file)
    hashes = [
        image_key(ref.path) for entry in loaded.adapters for ref in entry.images if ref.path is not None
    ]
    return loaded, hashes


def _init_image(args: argparse.Namespace) -> Any:
    """The init image at the requested size, cropped to multiples of 8 (what the VAE needs)."""
    from .generation import fit_init
    from .images import load_image

    return fit_init(load_image(args.init, "init image"), args.width, args.height)


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    """generate / img2img / inpaint / video: one flow, the mode picks the pipeline and its inputs."""
    from .errors import InputError
    from .generation import plain_options
    from .images import image_key, load_mask
    from .media import VIDEO_SUFFIXES, save_images, save_video

    mode = MODE_OF[args.command]
    video = mode == "video"
    # Cheap checks first: nothing is loaded until every input is known to be usable.
    frames = args.frames if video else None
    plain = not args.recipe and plain_options(_prompt_options(args))  # no image prompt: the base model
    recipe = None if plain else _recipe(args, video)
    references: list[Any] = []
    hashes: list[str] = []
    if plain:
        pass
    elif recipe is None:  # video: one reference for all frames or one per frame
        references = _image_list(args.image, "reference image")
        if len(references) not in (1, frames):
            raise InputError(
                f"{len(references)} reference images for {frames} frames; give one reference for all frames "
                "or one per frame (--image repeated, or a folder)"
            )
        hashes = [image_key(r) for r in references]
    else:
        loaded, hashes = _load_references(recipe)
    call: dict[str, Any] = {"prompt": args.prompt}
    if mode in ("img2img", "inpaint"):
        init = _init_image(args)
        call.update(image=init, strength=args.strength)
        if mode == "inpaint":
            mask, note = load_mask(args.mask, init.size)
            if note:
                print(f"ipadapter: note: {note}", file=sys.stderr)
            call.update(mask_image=mask, width=init.width, height=init.height)
    elif args.width or args.height:
        call.update({k: v for k, v in (("width", args.width), ("height", args.height)) if v})
    controls, control_scale = _controls(args, frames)
    output = Path(args.output)
    if not output.parent.is_dir():
        raise InputError(
            f"output folder '{output.parent}' does not exist; create it or choose another --output"
        )
    if video and output.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"output '{output}' must be a .gif or .mp4 file")
    if not video and output.suffix.lower() != ".png":
        raise InputError(f"output '{output}' must be a .png file (it carries the generation parameters)")
    # Every input is usable: now the heavy libraries.
    if args.quiet:
        _quiet_libraries()
    from .generation import Engine, Job
    from .recipe import AdapterRecipe, Recipe, Reference

    if plain:
        job_recipe, per_frame = None, False
    elif recipe is None:  # one reference per frame (or one for all): the single adapter's references
        scale = 1.0 if args.scale is None else args.scale
        entry = AdapterRecipe(
            path=args.adapter,
            image_encoder=args.image_encoder,
            scale=scale,
            images=[Reference(r) for r in references],
        )
        job_recipe, per_frame = Recipe([entry]), True
    else:
        job_recipe, per_frame = loaded, False
    job = Job(
        base=args.base,
        base_config=args.base_config,
        mode=mode,
        recipe=job_recipe,
        per_frame=per_frame,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=getattr(args, "num_images", 1),
        scheduler=args.scheduler,
        init=call.get("image"),
        strength=call.get("strength"),
        mask=call.get("mask_image"),
        width=call.get("width"),
        height=call.get("height"),
        controlnets=list(args.controlnet),
        control_images=controls,
        control_scale=control_scale,
        motion_adapter=getattr(args, "motion_adapter", None),
        frames=frames or 16,
        vae_slicing=getattr(args, "vae_slicing", False),
        cpu_offload=getattr(args, "cpu_offload", False),
    )
    result = Engine(args.device, args.dtype, compile=args.compile).run(job)

    params = dict(result.params)
    if args.recipe:
        params["adapter"] = [a.path for a in recipe.adapters]
    if not plain:
        params.update(
            image=args.image if video or len(args.image) != 1 else args.image[0],
            image_sha1=hashes[0] if len(hashes) == 1 and not video else hashes,
        )
    if recipe is not None:
        params["recipe"] = recipe.to_dict()
    if mode in ("img2img", "inpaint"):
        params["init"] = args.init
    if mode == "inpaint":
        params["mask"] = args.mask
    if args.controlnet:
        params.update(controlnet=args.controlnet, control_image=args.control_image)
    if video:
        params["fps"] = args.fps
        written = [save_video(result.images, output, args.fps, params)]
    else:
        written = save_images(result.images, output, params)
    if not args.json:
        for path in written:
            print(f"wrote {path}")
    return {"outputs": [str(p) for p in written], "parameters": params}


COMMANDS = {"inspect": cmd_inspect, "convert": cmd_convert, "generate": cmd_generate, "img2img": cmd_generate,
            "inpaint": cmd_generate, "video": cmd_generate, "train": cmd_train,
            "eval": cmd_eval, "demo": cmd_demo, "embed": cmd_embed, "batch": cmd_batch, "serve": cmd_serve}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ipadapter`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        from .errors import IPAdapterError

        if not debug:
            _quiet_environment()
        args = build_parser().parse_args(argv)
        args.quiet = not debug
        if args.quiet and args.command in ("inspect", "convert"):
            _quiet_libraries()
        result = COMMANDS[args.command](args)
        if getattr(args, "json", False) and result is not None:
            print(json.dumps(result, indent=2))
        if args.command == "batch" and result and result.get("failed"):
            return EXIT_USAGE  # some lines failed (each reported with its line number); the rest ran
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
        print(
            f"ipadapter: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _quiet_environment() -> None:
    """Before anything heavy is imported: library chatter would bury our one-line messages."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(name, "error")


def _quiet_libraries() -> None:
    """Once the heavy libraries are needed: silence their loggers and loading bars (the denoising bar stays)."""
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
