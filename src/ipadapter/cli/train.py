"""``train``: train (or resume) an adapter."""

from __future__ import annotations

import argparse
from typing import Any

from ..quiet import quiet_libraries
from ..training.config import PLUS_VERSIONS, VARIANTS, resumed_config
from .common import finite, positive_float, positive_int, size


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Options of `ipadapter train`; unset ones come from the run being resumed, else from TrainConfig."""
    p.add_argument("--base", help="base model: diffusers folder, hub id or single file (SD1.5 / SDXL family)")
    p.add_argument(
        "--base-config", help="for a single-file base: a diffusers folder/hub id of the same family"
    )
    p.add_argument(
        "--image-encoder",
        help="CLIP vision model (default: the official one for the variant; faceid reads none)",
    )
    p.add_argument(
        "--variant",
        choices=list(VARIANTS),
        help="adapter layout to train (default plus); faceid / faceid-plus read a precomputed face embedding "
        "per example (--face-column)",
    )
    p.add_argument(
        "--data",
        help="image folder with .txt captions, .jsonl/.json manifest, saved HF dataset, "
        "hf://owner/name, or WebDataset .tar shards (glob/brace pattern)",
    )
    p.add_argument("--image-column", help="manifest/dataset image field (default image)")
    p.add_argument("--text-column", help="manifest/dataset caption field (default text)")
    p.add_argument(
        "--face-column",
        help="faceid/faceid-plus: manifest/dataset field with each example's face-embeddings file (from "
        "`ipadapter face-embed`; relative to the manifest like images; faceid-plus needs its aligned crop) "
        "(default face); in an image folder: the same-name .safetensors/.npy beside each image",
    )
    p.add_argument(
        "--reference-column",
        help="manifest field naming the picture the image encoder sees for an example instead of its image "
        "(relative to the manifest like images; optional per entry) (default reference)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        help="faceid/faceid-plus: rank of the UNet LoRA trained with the adapter (default 128, as the official "
        "files; 0: no LoRA)",
    )
    p.add_argument(
        "--plus-version",
        choices=list(PLUS_VERSIONS),
        help="faceid-plus: v1, or v2 (PlusV2: tokens = face tokens + perceiver output) (default v1; load a v2 "
        "result with plus_version='v2')",
    )
    p.add_argument(
        "--output", help="run folder: checkpoints, logs, validation images, ip-adapter.safetensors"
    )
    p.add_argument("--resume", metavar="FOLDER", help="continue the run stored in FOLDER (same settings)")
    p.add_argument("--init-adapter", help="start from an existing adapter of the same layout (fine-tuning)")
    p.add_argument("--resolution", type=size, help="training size, multiple of 8 (default 512)")
    p.add_argument("--batch-size", type=positive_int, help="examples per device per step (default 8)")
    p.add_argument("--grad-accum", type=positive_int, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=positive_float, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--weight-decay", type=finite, help="AdamW weight decay (default 0.01)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps in all (default 1000)")
    p.add_argument(
        "--num-tokens", type=positive_int, help="image tokens (default 4 basic and FaceID, 16 plus)"
    )
    for what in ("text", "image", "both"):
        also = " (FaceID: the face)" if what != "text" else ""
        p.add_argument(
            f"--drop-{what}", type=finite, help=f"rate of dropping the {what}{also} (default 0.05)"
        )
    p.add_argument(
        "--noise-offset",
        type=finite,
        help="offset noise: std of a per-channel constant added to the training noise (default 0; use the "
        "base model's own, e.g. 0.1, when it was trained with one)",
    )
    p.add_argument("--seed", type=int, help="seed of everything random in the run (default 42)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default no")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="save memory, ~25%% slower"
    )
    p.add_argument(
        "--max-grad-norm", type=positive_float, help="clip gradients to this norm (default: no clip)"
    )
    p.add_argument("--random-crop", action="store_true", default=None, help="random instead of centre crops")
    p.add_argument("--random-flip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument(
        "--cache-dir", help="precompute VAE latents and image features here once (centre crops only)"
    )
    p.add_argument("--checkpoint-every", type=positive_int, help="steps between checkpoints (default 500)")
    p.add_argument("--keep-checkpoints", type=positive_int, help="checkpoints kept (default 3)")
    p.add_argument("--validate-every", type=int, help="steps between validation images (default 0 = never)")
    p.add_argument("--validation-image", help="reference image for validation images")
    p.add_argument(
        "--validation-face",
        metavar="FILE",
        help="faceid/faceid-plus: face-embeddings file for validation images (faceid-plus: with its crop)",
    )
    p.add_argument("--validation-prompt", help="prompt for validation images (default empty)")
    p.add_argument("--export-dtype", choices=["float16", "float32", "bfloat16"], help="default float16")
    p.add_argument("--num-workers", type=int, help="data loading worker processes (default 0)")
    p.add_argument("--log-every", type=positive_int, help="steps between logged losses (default 10)")
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
    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("command", "run", "debug", "json", "quiet")
    }
    resume = given.pop("resume", None)
    config = resumed_config(given, resume)
    if args.quiet:
        quiet_libraries()
    # heavy: imported only once the options are checked (CLI start-up)
    import torch

    from ..training.trainer import Trainer

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


def register(sub: Any) -> None:
    """Add ``train`` to the subcommands ``sub``."""
    p = sub.add_parser("train", help="train an adapter on image-text pairs (accelerate-ready)")
    _add_train_options(p)
    p.set_defaults(run=cmd_train)
