"""Many jobs with models loaded once: ``batch`` (a manifest) and ``serve`` (a REST API and a web page)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..batch import run_batch
from ..errors import InputError
from ..quiet import quiet_libraries
from .common import (
    add_compile_option,
    add_device,
    add_limit_options,
    limits_from,
    positive_float,
    positive_int,
)


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="a .jsonl file: one job per line, the generation options as JSON keys")
    p.add_argument("--output", required=True, help="folder for the results (made if missing)")
    add_device(p, "; under accelerate launch: each process's own device")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA")
    add_compile_option(p)
    add_limit_options(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_batch(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run every job of a manifest, models loaded once; resumable; failures reported per line."""
    if args.quiet:
        quiet_libraries()

    return run_batch(
        Path(args.manifest),
        Path(args.output),
        device=args.device,
        dtype=args.dtype,
        quiet=args.json,
        compile=args.compile,
        limits=limits_from(args),
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
        type=positive_int,
        default=32,
        help="jobs waiting or running at most; more get 429 (default 32)",
    )
    p.add_argument("--token-file", help="file holding a bearer token every request must send")
    p.add_argument(
        "--max-body-mb", type=positive_float, default=32.0, help="largest request body (default 32)"
    )
    p.add_argument(
        "--body-timeout",
        type=positive_float,
        default=30.0,
        help="seconds a client has to send its whole request body; slower get 408 (default 30)",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=4096 * 4096,
        help="largest decoded image, in pixels (default 4096x4096)",
    )
    add_device(p)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on CUDA")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the denoiser with torch.compile, warmed up at start (slower start, faster "
        "requests of the native size)",
    )


def cmd_serve(args: argparse.Namespace) -> None:
    """Load the models once and serve the REST API and the web page until interrupted."""
    token = None
    if args.token_file:
        path = Path(args.token_file)
        if not path.is_file():
            raise InputError(f"--token-file '{path}': no such file")
        token = path.read_text().strip()
        if not token:
            raise InputError(f"--token-file '{path}' is empty; put the token on its first line")
    if args.quiet:
        quiet_libraries()
    # heavy (fastapi): imported only when the server starts (CLI start-up)
    from ..server import ServerConfig, serve

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
        body_timeout=args.body_timeout,
        max_pixels=args.max_pixels,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
    )
    serve(config)


def register(sub: Any) -> None:
    """Add ``batch`` and ``serve`` to the subcommands ``sub``."""
    p = sub.add_parser("batch", help="run a .jsonl manifest of jobs (resumable; accelerate-ready)")
    _add_batch_options(p)
    p.set_defaults(run=cmd_batch)
    p = sub.add_parser("serve", help="REST API with a job queue, and a web page")
    _add_serve_options(p)
    p.set_defaults(run=cmd_serve)
