"""Shared helpers: pipelines loaded through the real loaders, and diffusers' own IP-Adapter as reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tiny_models as tm
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

CALL = {"prompt": "a cat", "negative_prompt": "blurry", "num_inference_steps": 2, "height": 32, "width": 32,
        "output_type": "np"}  # fmt: skip


def reference_image(seed: int = 0, size: tuple[int, int] = (56, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def pipeline_class(base: str) -> type:
    return StableDiffusionPipeline if base == "sd15" else StableDiffusionXLPipeline


def load_pipe(models: dict, base: str) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    pipe = pipeline_class(base).from_pretrained(models[base])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoder_folder(models: dict, variant: str) -> Path:
    return models["vit_h"] if tm.VARIANTS[variant][2] is tm.VIT_H else models["big_g"]


def diffusers_pipe(models: dict, variant: str, fmt: str = "safetensors", scale: float = 0.7):
    """diffusers' built-in IP-Adapter on the same tiny checkpoint: the reference we must match."""
    base = tm.VARIANTS[variant][1]
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_folder(models, variant))
    pipe = pipeline_class(base).from_pretrained(
        models[base], image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32)
    )
    pipe.set_progress_bar_config(disable=True)
    path = models["ckpt"][variant, fmt]
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe


def run(pipe, *reference, seed: int = 0, **kwargs) -> np.ndarray:
    """One call with a seeded CPU generator; float images in [0, 1] (video: frames)."""
    out = pipe(*reference, generator=torch.Generator("cpu").manual_seed(seed), **{**CALL, **kwargs})
    return out.frames if hasattr(out, "frames") else out.images
