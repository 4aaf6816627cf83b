"""One raw :class:`~.data.Sample` -> the tensors a training step needs.

:class:`Transform` decodes the image (with the same guards as inference's image loading) and gives the VAE
pixels (with SDXL micro-conditioning: original size, crop corner) and the CLIP pixels for the image encoder.
An unreadable image becomes a "skipped" record, which :func:`~.datasets.collate` drops from the batch and
reports; a long run never ends on one bad file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from ..errors import InputError
from ..prompt.images import MAX_IMAGE_PIXELS, load_image
from .data import Sample
from .faces import decode_face

_WHAT = "training image"


def _decode(image: Any, what: str = _WHAT) -> Image.Image:
    """A sample's image as RGB, with the same guards as :func:`ipadapter.prompt.images.load_image`."""
    if image is None:
        raise InputError(f"{what}: missing")
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"{what} is too large ({image.width}x{image.height}); the limit is {MAX_IMAGE_PIXELS:,} pixels"
            )
        return load_image(image, what)
    if not isinstance(image, str | Path | bytes | bytearray | memoryview):
        raise InputError(
            f"{what}: unsupported value of type {type(image).__name__}; expected a path or bytes"
        )
    return load_image(image, what)  # paths and encoded bytes: the same guards either way


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def decode_sample(sample: Sample, reference: bool = False) -> tuple[Image.Image | None, str]:
    """A sample's image as RGB and ``""``, or None and the one-line reason it can't be used (then skipped).

    ``reference``: its reference picture instead (the sample must name one).
    """
    if sample.error:
        return None, _one_line(sample.error)
    what = "reference image" if reference else _WHAT
    try:
        return _decode(sample.reference if reference else sample.image, what), ""
    except InputError as e:
        return None, _one_line(str(e))
    except Exception as e:  # a decoder bug must not end a long training run
        return None, _one_line(f"{what}: could not be read ({type(e).__name__}: {e})")


@dataclass
class Transform:
    """Sample -> training tensors: VAE pixels (resize shortest side, crop, optional flip) and CLIP pixels.

    ``pixel_values`` (3, R, R) in [-1, 1]; ``clip_pixel_values`` (3, S, S) from the original image (or the
    sample's reference picture when it names one) with the inference encoder's preprocessing; ``original_size`` (h, w) before resizing and ``crop_top_left``
    (top, left) in the resized (and possibly flipped) image, as diffusers' SDXL training script records them.

    ``faces`` (FaceID runs): also ``face`` (512,), the sample's face embedding; the CLIP pixels then come from
    its aligned face crop when ``face_crops`` (faceid-plus), and there are none without (faceid reads no image
    features). A sample whose face can't be read is skipped like an unreadable image.
    """

    resolution: int
    clip_size: int
    random_crop: bool = False
    random_flip: bool = False
    faces: bool = False
    face_crops: bool = False
    _processor: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution <= 0 or self.resolution % 8:
            raise InputError(
                f"resolution {self.resolution!r} is not a positive multiple of 8; the VAE downsamples by 8, "
                "so pick e.g. 512 (SD 1.5) or 1024 (SDXL)"
            )
        if not isinstance(self.clip_size, int) or self.clip_size <= 0:
            raise InputError(
                f"clip_size {self.clip_size!r} is not a positive integer; expected the image encoder's image_size"
            )

        size = self.clip_size
        self._processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Decode and transform one sample, or return ``{"key", "skipped": reason}`` if it can't be used."""
        rgb, reason = decode_sample(sample)
        face = None
        if rgb is not None and self.faces:
            face, reason = decode_face(sample.face, self.face_crops)
        seen = rgb  # what the image encoder reads
        if rgb is not None and sample.reference is not None:
            seen, reason = decode_sample(sample, reference=True)
        if rgb is None or seen is None or (self.faces and face is None):
            return {"key": sample.key, "skipped": reason}
        width, height = rgb.size
        r = self.resolution
        scale = r / min(width, height)
        size = (max(r, round(width * scale)), max(r, round(height * scale)))
        resized = rgb.resize(size, Image.Resampling.BICUBIC) if size != rgb.size else rgb
        flip = bool(torch.rand((), generator=generator) < 0.5) if self.random_flip else False
        if flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.random_crop:
            top = int(torch.randint(0, size[1] - r + 1, (), generator=generator))
            left = int(torch.randint(0, size[0] - r + 1, (), generator=generator))
        else:
            top, left = max(0, round((size[1] - r) / 2)), max(0, round((size[0] - r) / 2))
        crop = resized.crop((left, top, left + r, top + r))
        pixels = (
            torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        )
        out = {
            "key": sample.key,
            "text": sample.text,
            "pixel_values": pixels,
            "original_size": torch.tensor([height, width]),
            "crop_top_left": torch.tensor([top, left]),
        }
        if face is not None:
            out["face"] = torch.as_tensor(face.embeds[0], dtype=torch.float32)  # (512,)
        clip_image = seen  # faceid-plus: the aligned face crop; faceid: no image features at all
        if face is not None:
            clip_image = face.crops[0] if self.face_crops else None
        if clip_image is not None:
            pixels = self._processor(images=[clip_image], return_tensors="pt").pixel_values[0]
            out["clip_pixel_values"] = pixels.to(torch.float32)
        return out
