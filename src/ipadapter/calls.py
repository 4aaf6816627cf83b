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
from PIL import Image

from .errors import InputError
from .prompt.images import load_mask


def base_module(module: Any) -> Any:
    """The module itself, from under a ``torch.compile`` wrapper if it has one."""
    return getattr(module, "_orig_mod", module)


def vae_factor(pipe: Any) -> int:
    """Pixels per latent of ``pipe``'s VAE (8 for the Stable Diffusion families)."""
    return int(getattr(pipe, "vae_scale_factor", 8) or 8)


def native_size(pipe: Any) -> int:
    """The image side a pipeline's UNet was built for (its default height and width)."""
    return int(base_module(pipe.unet).config.sample_size) * vae_factor(pipe)


def output_size(pipe: Any, kwargs: dict[str, Any]) -> tuple[int, int]:
    """The ``(height, width)`` a diffusers pipeline call will make, as its own defaults decide it.

    ``height`` / ``width`` if given; else the init or control ``image``'s size rounded down to a multiple of
    the VAE factor (img2img, inpainting, ControlNet); else the UNet's native size. Regional masks are
    prepared for it; should a pipeline decide otherwise, eager mode adapts and a compiled UNet says so.
    """
    factor = vae_factor(pipe)
    image = kwargs.get("image")
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, Image.Image):
        found = (image.height - image.height % factor, image.width - image.width % factor)
    elif isinstance(image, torch.Tensor) and image.ndim >= 3:
        found = (int(image.shape[-2]), int(image.shape[-1]))
    else:
        found = (native_size(pipe),) * 2
    return int(kwargs.get("height") or found[0]), int(kwargs.get("width") or found[1])


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
    limit = getattr(getattr(pipe.unet, "config", None), "motion_max_seq_length", None)
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
