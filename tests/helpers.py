"""Shared helpers: pipelines loaded through the real loaders, and diffusers' own IP-Adapter as reference."""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path
from typing import Any

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


def ckpt(models: dict, variant: str = "sd15") -> str:
    """The tiny ``variant`` checkpoint's ``.safetensors`` path (a string: it goes into argv lists too)."""
    return str(models["ckpt"][variant, "safetensors"])


def half_mask(side: str, size: int = 32) -> Image.Image:
    """A square greyscale mask, white on its left or right half."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size) if side == "left" else (size // 2, 0, size, size))
    return mask


def png_pixels(path: Path) -> np.ndarray:
    """An image file's RGB pixels as int16 (differences of two do not wrap around)."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def b64_png(image: Image.Image) -> str:
    """``image`` as a base64 PNG, as the server's requests carry images."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def b64_pixels(data: str) -> np.ndarray:
    """The RGB pixels of a base64 PNG (a server answer)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for process-group rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fails(capsys: Any, argv: list[str], *needles: str) -> str:
    """Run the CLI with ``argv``: it must exit 2 with one error line holding every needle; returns the line."""
    from ipadapter.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("ipadapter: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def mode_setup(models: dict, base: str, mode: str) -> tuple[Any, dict[str, Any]]:
    """A tiny ``base`` pipeline for ``mode`` (t2i, img2img, inpaint, controlnet, video) and the call arguments
    that mode needs (3 steps; an init image, mask, control image or 2 frames)."""
    from ipadapter.pipelines import load_controlnet, load_motion_adapter, mode_pipeline

    init = reference_image(7, (32, 32))
    pipe = load_pipe(models, base)
    extra: dict[str, Any] = {"num_inference_steps": 3}
    if mode == "img2img":
        pipe, extra = mode_pipeline(pipe, "img2img"), {**extra, "image": init, "strength": 0.8}
    elif mode == "inpaint":
        pipe = mode_pipeline(pipe, "inpaint")
        extra.update(image=init, mask_image=half_mask("left"))
    elif mode == "controlnet":
        pipe = mode_pipeline(pipe, "t2i", controlnet=load_controlnet(models["controlnet"][base]))
        extra["image"] = init
    elif mode == "video":
        pipe = mode_pipeline(pipe, "video", motion_adapter=load_motion_adapter(models["motion"]))
        extra["num_frames"] = 2
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def sixteen_block_pipe(models: dict, folder: Path) -> tuple[StableDiffusionPipeline, Path]:
    """The tiny SD1.5 pipeline with a UNet of SD1.5's topology (16 transformer blocks: what the presets are
    defined for), and an adapter checkpoint that fits it, saved in ``folder``."""
    from diffusers import UNet2DConditionModel

    from ipadapter import cross_attention_layers, save_checkpoint

    pipe = load_pipe(models, "sd15")
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 32, 32), layers_per_block=2, sample_size=16, cross_attention_dim=tm.SD15_CROSS,
        attention_head_dim=8, norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()  # fmt: skip
    hidden = tuple(layer.hidden_size for layer in cross_attention_layers(pipe.unet))
    assert len(hidden) == 16
    path = save_checkpoint(tm.make_checkpoint("sd15", hidden=hidden), folder / "ip-adapter_16.safetensors")
    return pipe, path
