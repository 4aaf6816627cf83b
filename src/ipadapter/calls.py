"""What a diffusers pipeline call will do, read from the pipeline and its arguments before it runs.

The handle passes these facts to the image prompt explicitly (nothing in the UNet looks for the pipeline): the
frames of a video call, the output size regional masks are prepared for, the pipeline's native size; and the
argument checks that refuse what diffusers would accept silently or fail on deep inside the loop.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from PIL import Image

from .errors import InputError
from .hosts.attention import compiled_regions
from .prompt.images import load_mask


def base_module(module: Any) -> Any:
    """The module itself, from under a ``torch.compile`` wrapper if it has one."""
    return getattr(module, "_orig_mod", module)


def denoiser(pipe: Any) -> Any:
    """``pipe``'s denoiser (the UNet, or the transformer of Flux / SD3), from under a compile wrapper."""
    model = getattr(pipe, "unet", None)
    return base_module(model if model is not None else pipe.transformer)


def vae_factor(pipe: Any) -> int:
    """Pixels per latent of ``pipe``'s VAE (8 for the real SD, Flux and SD3 models; Flux packs 2x2 latents
    into one token on top of it)."""
    return int(getattr(pipe, "vae_scale_factor", 8) or 8)


def _is_flux(pipe: Any) -> bool:
    return isinstance(base_module(getattr(pipe, "transformer", None)), FluxTransformer2DModel)


def native_size(pipe: Any) -> int:
    """The image side a pipeline makes when no size is given, as its own ``__call__`` decides it.

    UNet pipelines: the UNet's sample size x the VAE factor. Flux / SD3 pipelines: ``default_sample_size`` x
    the VAE factor (Flux: a constant 128 latents; SD3: the transformer's sample size).
    """
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return int(base_module(unet).config.sample_size) * vae_factor(pipe)
    size = getattr(pipe, "default_sample_size", None) or base_module(pipe.transformer).config.sample_size
    return int(size) * vae_factor(pipe)


def output_size(pipe: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    """The ``(height, width)`` a diffusers pipeline call will make, as its own defaults decide it.

    ``height`` / ``width`` if given; else, for UNet pipelines, the init or control ``image``'s size rounded
    down to a multiple of the VAE factor (img2img, inpainting, ControlNet); else the native size (Flux and
    SD3 pipelines resize their images to it in every mode). Flux rounds sizes down to a multiple of twice
    the VAE factor (its 2x2 latent packing). Regional masks are prepared for it; should a pipeline decide
    otherwise, eager mode adapts and a compiled denoiser says so.
    """
    factor = vae_factor(pipe)
    image = kwargs.get("image") if getattr(pipe, "unet", None) is not None else None
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, Image.Image):
        found = (image.height - image.height % factor, image.width - image.width % factor)
    elif isinstance(image, torch.Tensor) and image.ndim >= 3:
        found = (int(image.shape[-2]), int(image.shape[-1]))
    else:
        found = (native_size(pipe),) * 2
    height, width = int(kwargs.get("height") or found[0]), int(kwargs.get("width") or found[1])
    if _is_flux(pipe):
        height, width = height - height % (2 * factor), width - width % (2 * factor)
    return height, width


def num_frames(pipe: Any, kwargs: dict[str, Any]) -> int | None:
    """Frames a video pipeline call will make (its ``num_frames`` argument or default); None for images."""
    try:
        param = inspect.signature(pipe.__call__).parameters.get("num_frames")
    except (TypeError, ValueError):
        return None
    if param is None:
        return None
    return kwargs.get("num_frames", param.default)


def _is_number(value: Any) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse call arguments that diffusers would accept silently or fail on deep inside the loop.

    Returns the arguments to use: an inpainting mask given as an image or path is checked (greyscale) and
    fitted to the init image's size, with a warning saying so.
    """
    strength = kwargs.get("strength")
    if strength is not None and not (_is_number(strength) and 0 < strength <= 1):
        raise InputError(
            f"strength {strength!r} is outside (0, 1]; expected e.g. 0.6 (how much of the init image is "
            "repainted: 1.0 = all of it)"
        )
    frames = kwargs.get("num_frames")
    if frames is not None and not (
        isinstance(frames, numbers.Integral) and not isinstance(frames, bool) and frames > 0
    ):
        raise InputError(f"num_frames {frames!r} is not usable; expected a whole number of frames >= 1")
    unet = getattr(pipe, "unet", None)  # Flux / SD3 pipelines have a transformer, and no motion limit
    limit = getattr(getattr(unet, "config", None), "motion_max_seq_length", None)
    if isinstance(limit, int) and isinstance(frames, int) and frames > limit:
        raise InputError(
            f"{frames} frames asked but the motion adapter handles at most {limit} per clip; ask for fewer frames"
        )
    mask, init = kwargs.get("mask_image"), kwargs.get("image")
    if isinstance(mask, (Image.Image, str, Path)):
        size = init.size if isinstance(init, Image.Image) else None
        mask, note = load_mask(mask, size)
        if note:
            warnings.warn(note, stacklevel=3)
        kwargs = {**kwargs, "mask_image": mask}
    return kwargs


def compiled(pipe: Any, denoiser: Any) -> bool:
    """Whether ``pipe`` runs ``denoiser`` compiled: wrapped by ``torch.compile``, or any of its blocks compiled."""
    for name in ("unet", "transformer"):
        if getattr(getattr(pipe, name, None), "_orig_mod", None) is denoiser:
            return True
    return compiled_regions(denoiser.modules())
