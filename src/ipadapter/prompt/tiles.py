"""Tiled references and the "ClipVision enhancer", after ComfyUI_IPAdapter_plus (cubiq).

Two ways to let a detailed or oddly shaped reference speak through an encoder that sees 224 x 224 pixels:

- :func:`tile_reference` cuts the reference into 256 x 256 tiles (ComfyUI's *IPAdapter Tiled* geometry) and gives
  each tile a mask over the prepared reference, so that each tile drives its own region of the output picture.
- :func:`split_grid`, :func:`enhance_features` and :func:`enhance_rows` encode a grid of tiles of one reference,
  stitch their features back into one feature set of the full reference's shape and blend it with the full
  encoding (ComfyUI's ``enhance_tiles`` / ``enhance_ratio``).

:func:`sharpen` is contrast adaptive sharpening (CAS), as ComfyUI applies it to tiled references.

Centre crops follow torchvision's ``CenterCrop`` rounding: ``top = int(round((H - th) / 2.0))`` and
``left = int(round((W - tw) / 2.0))`` (Python's ``round``: halves go to the even neighbour).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

TILE_SIZE = 256  # ComfyUI's tile side: 256 rather than 224, more often a multiple of the latent size
MAX_GRID = 16  # ComfyUI caps enhance_tiles at 16
FEATURES = ("hidden", "pooled")


# ---------------------------------------------------------------------------------------------- sharpening


def sharpen(image: Image.Image, amount: float) -> Image.Image:
    """Contrast adaptive sharpening of ``image`` by ``amount`` in [0, 1]; an 8-bit RGB image comes back.

    The formula of ComfyUI's ``contrast_adaptive_sharpening``: per pixel and channel, on float32 values in [0, 1]
    with one pixel of zero padding around the picture, the minimum and maximum of the cross (the pixel and its 4
    neighbours) and of the 4 diagonal neighbours are added, ``amp = sqrt(min(mn, 2 - mx) / mx)`` and the weight
    of the 4 cross neighbours is ``w = -amp * (amount * (1/5 - 1/8) + 1/8)``; the result
    ``(w * (up + left + right + down) + centre) / (1 + 4 w)`` is clamped to [0, 1] (NaN, from a black 3 x 3
    neighbourhood, becomes 0) and rounded to 8 bits. ``amount`` 0 returns the image unchanged (as RGB).
    """
    amount = _unit(amount, "sharpening amount", "use 0 for none, up to 1 for the strongest")
    rgb = image.convert("RGB")
    if amount == 0:
        return rgb.copy()
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
    return _to_rgb8(_cas(x, amount))


def _cas(x: np.ndarray, amount: float) -> np.ndarray:
    """CAS on a float32 (H, W, C) array in [0, 1]; returns a float32 (H, W, C) array in [0, 1]."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)))  # zero padding, 1 pixel on each side of H and W
    h, w = x.shape[:2]

    def at(dy: int, dx: int) -> np.ndarray:  # the neighbour at offset (dy, dx) in {0, 1, 2}^2 of each pixel
        return p[dy : dy + h, dx : dx + w]

    up, left, centre, right, down = at(0, 1), at(1, 0), at(1, 1), at(1, 2), at(2, 1)
    corners = np.stack([at(0, 0), at(0, 2), at(2, 0), at(2, 2)])
    cross = np.stack([up, left, centre, right, down])
    lo = np.maximum(cross.min(axis=0), 0) + np.maximum(corners.min(axis=0), 0)
    hi = np.minimum(cross.max(axis=0), 1) + np.minimum(corners.max(axis=0), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        amp = np.sqrt((np.float32(1.0) / hi) * np.minimum(lo, np.float32(2.0) - hi))
        weight = -amp * np.float32(amount * (1 / 5 - 1 / 8) + 1 / 8)
        out = ((up + left + right + down) * weight + centre) * (np.float32(1.0) / (1 + 4 * weight))
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)


def _to_rgb8(x: np.ndarray) -> Image.Image:
    """A float (H, W, 3) array in [0, 1] as an 8-bit RGB image (rounded)."""
    return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------- tiled references


def _center_box(width: int, height: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """PIL box of a ``tw`` x ``th`` centre crop, rounded as torchvision's ``CenterCrop``."""
    top = int(round((height - th) / 2.0))
    left = int(round((width - tw) / 2.0))
    return left, top, left + tw, top + th


def _prepare_size(width: int, height: int) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
    """(crop box before resizing or None, (width, height) after resizing) of ComfyUI's tiled preparation."""
    ratio = height / width
    if 0.75 < ratio < 1.33:  # almost square: the centred square, at twice the tile size
        side = min(width, height)
        return _center_box(width, height, side, side), (2 * TILE_SIZE, 2 * TILE_SIZE)
    if height < width:  # short side to one tile, long side in proportion
        return None, (int(TILE_SIZE * width / height), TILE_SIZE)
    return None, (TILE_SIZE, int(TILE_SIZE * height / width))


def tile_reference(
    image: Image.Image, mask: Image.Image | None = None, sharpening: float = 0.0
) -> list[tuple[Image.Image, Image.Image]]:
    """Cut a reference into 256 x 256 tiles with a mask each, as ComfyUI's *IPAdapter Tiled* does.

    Preparation (``h``/``w`` are the reference's height and width): if ``0.75 < h / w < 1.33`` the centred
    ``min(h, w)`` square is resized to 512 x 512; otherwise the short side becomes 256 and the long side
    ``int(256 * long / short)`` (LANCZOS). A reference with ``h / w > 4`` or ``< 0.25`` is then centre-cropped to
    1024 x 256 (or 256 x 1024), so at most 4 tiles lie along its long side. Sharpening (:func:`sharpen`) follows
    when ``sharpening > 0``. Centre crops round as torchvision's ``CenterCrop``:
    ``top = int(round((H - th) / 2.0))``, ``left = int(round((W - tw) / 2.0))``.

    Tiles: ``ceil(W / 256)`` x ``ceil(H / 256)`` of the prepared reference (W x H), overlapping evenly
    (``overlap = (n * 256 - side) / (n - 1)``), tile ``i`` starting at ``int(i * (256 - overlap))``; returned
    row-major (top row first, left to right) as pairs (tile as RGB 256 x 256, mask as "L" at the prepared
    reference's size: the tile's rectangle is 255 — or the user mask's value there — and the rest 0). The masks
    cover the whole prepared reference: the caller maps them onto the output picture.

    ``mask`` ("L", any size, white where the reference acts) is first resized to the reference's size (bicubic),
    then follows the same crops and resizes (bicubic) as the image.
    """
    sharpening = _unit(sharpening, "sharpening", "use 0 for none, up to 1 for the strongest")
    rgb = image.convert("RGB")
    width, height = rgb.size
    if width < 1 or height < 1:
        raise InputError(f"reference image is {width}x{height} pixels; expected a non-empty image")
    user = None
    if mask is not None:
        user = _mask_float(mask).resize((width, height), Image.Resampling.BICUBIC)

    box, size = _prepare_size(width, height)
    if box is not None:
        rgb = rgb.crop(box)
        user = user.crop(box) if user is not None else None
    rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    user = user.resize(size, Image.Resampling.BICUBIC) if user is not None else None

    ratio = height / width
    if ratio > 4 or ratio < 0.25:  # at most 4 tiles along the long side
        tw, th = (4 * TILE_SIZE, TILE_SIZE) if height < width else (TILE_SIZE, 4 * TILE_SIZE)
        crop = _center_box(rgb.width, rgb.height, tw, th)
        rgb = rgb.crop(crop)
        user = user.crop(crop) if user is not None else None

    if sharpening > 0:
        rgb = sharpen(rgb, sharpening)

    pw, ph = rgb.size
    weights = np.ones((ph, pw), np.float32) if user is None else np.asarray(user, dtype=np.float32)
    out = []
    for top in _starts(ph):
        for left in _starts(pw):
            tile = rgb.crop((left, top, left + TILE_SIZE, top + TILE_SIZE))
            region = np.zeros((ph, pw), np.float32)
            region[top : top + TILE_SIZE, left : left + TILE_SIZE] = weights[
                top : top + TILE_SIZE, left : left + TILE_SIZE
            ]
            level = np.round(np.clip(region, 0.0, 1.0) * 255.0).astype(np.uint8)
            out.append((tile, Image.fromarray(level, "L")))
    return out


def _starts(side: int) -> list[int]:
    """Start offsets of ComfyUI's evenly overlapping 256-pixel tiles along a side of ``side`` pixels."""
    count = math.ceil(side / TILE_SIZE)
    overlap = max(0, (count * TILE_SIZE - side) / (count - 1 if count > 1 else 1))
    return [int(i * (TILE_SIZE - overlap)) for i in range(count)]


def _mask_float(mask: Image.Image) -> Image.Image:
    """A user mask as a float ("F") image in [0, 1]."""
    if mask.width < 1 or mask.height < 1:
        raise InputError(f"tile mask is {mask.width}x{mask.height} pixels; expected a non-empty grey image")
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
    return Image.fromarray(grey, "F")


# ---------------------------------------------------------------------------------------------- enhancer


def split_grid(image: Image.Image, grid: int) -> list[Image.Image]:
    """The ``grid`` x ``grid`` tiles of ``image``, row-major, each ``H // grid`` x ``W // grid`` pixels.

    As ComfyUI's ``split_tiles``: the pixels beyond ``grid * (W // grid)`` (and ``grid * (H // grid)``) are dropped.
    """
    grid = _grid(grid)
    tw, th = image.width // grid, image.height // grid
    if tw < 1 or th < 1:
        raise InputError(
            f"reference image is {image.width}x{image.height} pixels, too small for a {grid}x{grid} enhance_tiles "
            "grid; use a larger image or fewer tiles"
        )
    return [
        image.crop((j * tw, i * th, (j + 1) * tw, (i + 1) * th)) for i in range(grid) for j in range(grid)
    ]


def enhance_features(full: torch.Tensor, tiles: torch.Tensor, grid: int, feature: str) -> torch.Tensor:
    """Merge the encoder features of one reference's ``grid`` x ``grid`` tiles into the shape of ``full``.

    ``tiles`` holds the tiles' features row-major, ``(grid * grid, *full.shape)``. ``feature`` "hidden": features
    ``(T, D)``, a class token then a square ``p`` x ``p`` patch grid (ComfyUI's ``merge_hiddenstates``): the class
    tokens are averaged, the tiles' patch grids are laid side by side into one ``grid * p`` square and average-pooled
    back to ``p`` x ``p``. ``feature`` "pooled": features ``(D,)`` viewed as a ``sqrt(D)`` square, stitched and
    pooled back the same way (ComfyUI's ``merge_embeddings``). Returns ``full``'s shape and dtype.
    """
    grid = _grid(grid)
    if feature not in FEATURES:
        raise InputError(f"encoder feature '{feature}' is not one of {', '.join(FEATURES)}")
    expected = (grid * grid, *full.shape)
    if tuple(tiles.shape) != expected:
        raise InputError(
            f"enhance_tiles: tile features have shape {tuple(tiles.shape)}; expected {expected} "
            f"({grid}x{grid} tiles of the full reference's features); encode every tile with the same encoder"
        )
    if feature == "hidden":
        merged = _merge_hidden(tiles, grid)
    else:
        merged = _merge_pooled(tiles, grid)
    return merged.to(full.dtype)


def _merge_hidden(tiles: torch.Tensor, grid: int) -> torch.Tensor:
    if tiles.dim() != 3:
        raise InputError(
            f"enhance_tiles: hidden-state features have shape {tuple(tiles.shape[1:])}; expected (tokens, dim)"
        )
    n, tokens, dim = tiles.shape
    side = math.isqrt(tokens - 1)
    if tokens < 2 or side * side != tokens - 1:
        raise InputError(
            f"enhance_tiles needs hidden states of a class token and a square patch grid ({tokens} tokens given); "
            "use enhance_tiles 1 with this encoder"
        )
    cls = tiles[:, 0, :].mean(dim=0, keepdim=True)  # (1, D)
    patches = tiles[:, 1:, :].reshape(grid, grid, side, side, dim)  # (gy, gx, py, px, D)
    canvas = patches.permute(0, 2, 1, 3, 4).reshape(grid * side, grid * side, dim)  # rows: gy*py, cols: gx*px
    pooled = torch.nn.functional.adaptive_avg_pool2d(canvas.permute(2, 0, 1), (side, side))  # (D, p, p)
    return torch.cat([cls, pooled.permute(1, 2, 0).reshape(side * side, dim)], dim=0)  # (T, D)


def _merge_pooled(tiles: torch.Tensor, grid: int) -> torch.Tensor:
    if tiles.dim() != 2:
        raise InputError(
            f"enhance_tiles: pooled features have shape {tuple(tiles.shape[1:])}; expected (dim,)"
        )
    dim = tiles.shape[1]
    side = math.isqrt(dim)
    if side * side != dim:
        raise InputError(
            f"enhance_tiles needs a square feature size for this encoder's pooled features ({dim} given); "
            "use enhance_tiles 1 or a plus (hidden-state) adapter"
        )
    squares = tiles.reshape(grid, grid, side, side)  # (gy, gx, sy, sx)
    canvas = squares.permute(0, 2, 1, 3).reshape(1, grid * side, grid * side)
    return torch.nn.functional.adaptive_avg_pool2d(canvas, (side, side)).reshape(dim)


def enhance_rows(full: torch.Tensor, merged: torch.Tensor, ratio: float, references: int) -> torch.Tensor:
    """Blend one reference's full and merged tile features, as ComfyUI's ``encode_image_masked``.

    With a single reference (``references == 1``) two rows come back, ``[full * ratio, merged]``, that the caller
    treats as two references; with several, one row ``full * ratio + merged * (1 - ratio)``.
    """
    ratio = _unit(ratio, "enhance_ratio", "use 1 for the full image only, lower to mix in the tiles")
    if isinstance(references, bool) or not isinstance(references, int) or references < 1:
        raise InputError(f"references is {references!r}; expected a whole number of references, at least 1")
    if full.shape != merged.shape:
        raise InputError(
            f"enhance_tiles: full features {tuple(full.shape)} and merged tile features {tuple(merged.shape)} "
            "differ in shape; merge the tiles with enhance_features first"
        )
    if references == 1:
        return torch.stack([full * ratio, merged])
    return (full * ratio + merged * (1 - ratio))[None]


# ---------------------------------------------------------------------------------------------- checks


def _unit(value: float, name: str, hint: str) -> float:
    """``value`` as a float in [0, 1], or an InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} is {value!r}; expected a number from 0 to 1 ({hint})")
    return float(value)


def _grid(grid: int) -> int:
    if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= MAX_GRID:
        raise InputError(
            f"enhance_tiles is {grid!r}; expected a whole number from 1 to {MAX_GRID} (1 turns the enhancer off)"
        )
    return grid
