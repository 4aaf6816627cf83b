"""Reading user images safely: references, init and control images (RGB) and inpainting masks (grey).

Light on purpose (PIL and numpy only), so the command line can check every input before loading models.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError

MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused as possible decompression bombs
ImageInput = Image.Image | str | Path | bytes


def load_image(image: ImageInput, what: str = "reference image", convert=None) -> Image.Image:  # noqa: ANN001
    """Open ``image`` safely and return it as RGB (or as ``convert(image)`` makes it).

    Refuses missing, empty, truncated or undecodable files and images over :data:`MAX_IMAGE_PIXELS`.
    Turns the pixels as the EXIF orientation tag says (a phone photo comes out upright). Converts other modes:
    transparency is composited onto white, palette/grey/CMYK become RGB, and 16-bit or float images are scaled
    to 8 bits (floats in 0..1 as such).
    """
    convert = convert or to_rgb
    if isinstance(image, Image.Image):
        return convert(upright(image))
    if isinstance(image, bytes | bytearray | memoryview):  # encoded file contents (datasets, tar shards)
        data = bytes(image)
        if not data:
            raise InputError(f"{what}: empty (0 bytes); expected a PNG, JPEG or WebP image")
        return _decode(io.BytesIO(data), what, "data", convert)
    path = Path(image)
    if path.is_dir():
        raise InputError(f"{what} '{path}' is a folder; expected an image file")
    if not path.is_file():
        raise InputError(f"{what} '{path}': no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{what} '{path}': the file is empty (0 bytes); expected a PNG, JPEG or WebP image")
    return _decode(path, f"{what} '{path}'", "file", convert)


_DECODE_LOCK = threading.Lock()  # PIL's limits are process-wide: one decode at a time changes them


def _decode(source: Any, label: str, kind: str, convert: Any) -> Image.Image:
    with _DECODE_LOCK:
        return _decode_locked(source, label, kind, convert)


def _decode_locked(source: Any, label: str, kind: str, convert: Any) -> Image.Image:
    old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = MAX_IMAGE_PIXELS, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()
                return convert(upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(
            f"{label} is too large to decode safely ({e}); the limit is {MAX_IMAGE_PIXELS:,} pixels: "
            "downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"{label}: not a readable image; expected a PNG, JPEG or WebP {kind}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{label}: could not be decoded ({e}); the {kind} may be truncated") from None
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated


_ORIENTATION = 0x0112  # EXIF tag: how a camera held sideways wants the pixels turned


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (as viewers and diffusers' ``load_image`` show it)."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: the pixels as stored (PIL raises many kinds)
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def load_mask(mask: ImageInput, size: tuple[int, int] | None = None) -> tuple[Image.Image, str | None]:
    """An inpainting mask as greyscale (white = repaint, black = keep), at ``size`` (the init image's).

    Grey, 1-bit, 16-bit and grey-looking RGB masks are accepted; transparent parts of a mask with alpha
    count as black (keep), so strokes painted on a transparent layer work. A colour mask is refused. A mask
    of another size is resized to ``size``; the second value is then a one-line note saying so.
    """
    where = f" '{mask}'" if isinstance(mask, str | Path) else ""
    grey = load_image(mask, "mask", convert=lambda img: _mask_grey(img, where))
    note = None
    if size is not None and grey.size != tuple(size):
        note = (
            f"mask{where} is {grey.size[0]}x{grey.size[1]} but the init image is {size[0]}x{size[1]}; "
            "resized the mask to fit"
        )
        grey = grey.resize(tuple(size), Image.Resampling.BILINEAR)
    return grey, note


def _mask_grey(img: Image.Image, where: str) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    alpha = None
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
        img = img.convert("RGB" if img.mode.startswith("RGB") else "L")
    if img.mode not in ("1", "L"):
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            img = to_rgb(img)
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        spread = rgb.max(axis=-1) - rgb.min(axis=-1)
        if spread.max(initial=0) > 2:  # JPEG noise on a grey mask is fine; real colour is not
            y, x = np.unravel_index(int(spread.argmax()), spread.shape)
            raise InputError(
                f"mask{where} has colour (pixel {tuple(int(v) for v in rgb[y, x])} at x={x}, y={y}); expected a "
                "greyscale mask: white = repaint, black = keep. Convert it to greyscale first"
            )
        img = Image.fromarray(rgb.mean(axis=-1).round().astype(np.uint8), mode="L")
    grey = img.convert("L")
    if alpha is not None:  # transparent = keep
        grey = Image.fromarray(
            (np.asarray(grey, dtype=np.float32) * alpha).round().astype(np.uint8), mode="L"
        )
    return grey


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha over white; high bit depths scaled to 8 bits)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        top = arr.max(initial=0)
        if img.mode == "F" and 0 < top <= 1.0:  # float images in 0..1 (a float TIFF, a tensor saved as is)
            peak = 1.0
        else:
            peak = 65535.0 if img.mode.startswith("I;16") or top > 255 else 255.0
        arr = np.clip(arr / peak * 255.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def image_key(img: Image.Image) -> str:
    """A content hash of an RGB image: equal pixels give equal keys."""
    digest = hashlib.sha1(f"{img.mode}{img.size}".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


CROP_MODES = ("center", "pad", "stretch", "tiled")


def fit_square(image: Image.Image, crop: str, size: int) -> Image.Image:
    """``image`` prepared for a square encoder input by ``crop`` (center: left to CLIP's own centre crop;
    tiled: the reference was split into square tiles before, see :mod:`ipadapter.prompt.tiles`)."""
    if crop in ("center", "tiled"):
        return image
    if crop == "stretch":
        return image.resize((size, size), Image.Resampling.BICUBIC)
    if crop == "pad":
        w, h = image.size
        if w == h:
            return image
        edges = np.concatenate(
            [np.asarray(image)[[0, -1]].reshape(-1, 3), np.asarray(image)[:, [0, -1]].reshape(-1, 3)]
        )
        colour = tuple(int(c) for c in edges.mean(axis=0).round())
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), colour)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas
    raise InputError(f"crop '{crop}' is not one of {', '.join(CROP_MODES)}")
