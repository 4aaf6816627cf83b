"""Drawing and writing :class:`~ipadapter.prompt.influence.InfluenceMaps` (numpy and PIL only).

A figure per output picture: one row per panel (an adapter, or one reference of it) with its label, an
"all" tile (the norm summed over blocks) and a smaller tile per transformer block, each the heat laid over a
greyed, dimmed copy of the picture (black without one). Colours come from a 9-stop viridis written out here,
linearly interpolated; a colour's opacity grows with the value (``ALPHA * sqrt(value / max)``), so a place
where the image prompt did nothing shows the picture as it is. The block tiles share one scale (0 .. the
largest block value of the picture), the "all" tiles another (0 .. the largest total); both are drawn as bars
with their end values. Non-finite values are drawn as 0 (the ``.npy`` files keep them as recorded).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..files import atomic_paths
from .influence import InfluenceMaps

# viridis at 0, 1/8, ..., 1 (matplotlib's values, rounded to 8 bits)
VIRIDIS = np.array(
    [
        [68, 1, 84],
        [71, 45, 123],
        [59, 82, 139],
        [44, 114, 142],
        [33, 145, 140],
        [40, 174, 128],
        [94, 201, 98],
        [173, 220, 48],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
ALPHA = 0.85  # opacity of the colour at the top of the scale
DIM = 0.5  # the picture under the colours: its grey levels times this
TILE = 256  # long side of an "all" tile
BLOCK_TILE = 128  # long side of a block tile
BLOCK_COLUMNS = 8  # block tiles per line; more blocks wrap onto further lines of the same row
LABEL_WIDTH = 150  # panel labels wrap to this width
PAD = 10
GAP = 4
BAR = (160, 10)  # colour bar width, height
SUFFIXES = {".png": "a picture", ".npy": "the raw maps"}
WHAT = (
    "Per output picture, panel (adapter or reference) and transformer block: the norm of the image-prompt "
    "branch's contribution to the denoiser at each pixel of the output, averaged over the block's layers and "
    "the denoising steps; the .ratio.npy file holds that norm divided by the text branch's at the same place."
)

Box = tuple[int, int, int, int]  # left, top, right (exclusive), bottom (exclusive)


def colormap(values: np.ndarray) -> np.ndarray:
    """The colour (uint8 RGB, shape ``values.shape + (3,)``) of values in [0, 1] (clipped; NaN counts as 0)."""
    t = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    t = np.clip(t, 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(VIRIDIS))
    rgb = np.stack([np.interp(t, stops, VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def overlay(picture: Image.Image, heat: np.ndarray, vmax: float | None = None) -> Image.Image:
    """``picture`` (greyed and dimmed, at its own size) with ``heat`` (any ``(H, W)``, resized to the picture)
    in colour over it; ``vmax``: the value drawn at full colour (None: the heat's own largest value)."""
    if not isinstance(picture, Image.Image):
        raise InputError(
            f"overlay needs a PIL picture, got {type(picture).__name__}: pass the output picture (PIL.Image)"
        )
    heat = _heat(heat)
    if vmax is None:
        top = _max(heat)
    else:
        try:
            top = float(vmax)
        except (TypeError, ValueError):
            top = math.nan
        if not (math.isfinite(top) and top >= 0):
            raise InputError(
                f"overlay vmax {vmax!r} is not a finite number >= 0: pass one, or None for the heat's max"
            )
    return _tile(picture, heat, picture.size, top)


def check_influence_path(path: str | Path) -> None:
    """Raise :class:`InputError` unless ``path`` names a ``.png`` (a figure) or ``.npy`` (the raw maps) file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise InputError(
            f"influence map '{path}' must end in .png (a picture) or .npy (the raw maps): "
            f"rename it, e.g. '{path.with_suffix('.png').name}'"
        )
    if path.is_dir():
        raise InputError(
            f"influence map '{path}' is a folder, expected a file name: add one, e.g. '{path}/influence.png'"
        )


@dataclass(frozen=True)
class InfluenceLayout:
    """Where :func:`render_influence` puts things: the figure's ``size`` (width, height), one "all" tile box
    per panel (``all_tiles``) and per panel one box per block (``block_tiles``); boxes are (left, top, right,
    bottom), right and bottom exclusive."""

    size: tuple[int, int]
    all_tiles: list[Box]
    block_tiles: list[list[Box]]
    label_boxes: list[Box]
    bars: tuple[Box, Box]  # the "all" scale's bar, the blocks' bar
    rules: list[int]  # the y of the line between two rows


def influence_layout(maps: InfluenceMaps) -> InfluenceLayout:
    """The figure layout for ``maps`` (the same for every output picture)."""
    images, panels, blocks, height, width = _check_maps(maps)
    font = _font()
    line = _line_height(font)
    big = _fit(width, height, TILE)
    small = _fit(width, height, BLOCK_TILE)
    columns = min(blocks, BLOCK_COLUMNS)
    lines = math.ceil(blocks / columns)
    top = PAD + line + GAP  # title
    bar_top = top + GAP
    bars = []
    for k in range(2):  # one line per scale: "caption  min [bar] max"
        y = bar_top + k * (line + GAP)
        left = PAD + _caption_width(font)
        bars.append((left, y + (line - BAR[1]) // 2, left + BAR[0], y + (line - BAR[1]) // 2 + BAR[1]))
    y = bar_top + 2 * (line + GAP) + PAD
    label_left = PAD
    big_left = label_left + LABEL_WIDTH + PAD
    grid_left = big_left + big[0] + 2 * PAD
    grid_width = columns * small[0] + (columns - 1) * GAP
    cell = line + 2 + small[1]
    grid_height = lines * cell + (lines - 1) * GAP
    all_tiles, block_tiles, label_boxes, rules = [], [], [], []
    for p in range(panels):
        label_h = len(_wrap(_label(maps.panels, p, "panel"), font, LABEL_WIDTH)) * line
        row_h = max(label_h, line + 2 + big[1], grid_height)
        label_boxes.append((label_left, y, label_left + LABEL_WIDTH, y + label_h))
        all_tiles.append((big_left, y + line + 2, big_left + big[0], y + line + 2 + big[1]))
        row = []
        for b in range(blocks):
            cx = grid_left + (b % columns) * (small[0] + GAP)
            cy = y + (b // columns) * (cell + GAP) + line + 2
            row.append((cx, cy, cx + small[0], cy + small[1]))
        block_tiles.append(row)
        rules.append(y + row_h + PAD)
        y += row_h + PAD + 1 + PAD
    figure_w = max(grid_left + grid_width + PAD, bars[0][2] + 2 * _text_width(font, "0.000e+00") + PAD)
    figure_w = max(figure_w, PAD + _text_width(font, _title(images - 1, images)) + PAD)
    figure_h = y - PAD - 1
    return InfluenceLayout(
        (figure_w, figure_h), all_tiles, block_tiles, label_boxes, (bars[0], bars[1]), rules[:-1]
    )


def render_influence(maps: InfluenceMaps, index: int = 0, picture: Image.Image | None = None) -> Image.Image:
    """The figure (RGB) of output picture ``index``: a row per panel with its label, the "all blocks" tile and
    a tile per block, each over ``picture`` (greyed and dimmed; black when None), and the two colour scales."""
    images, panels, blocks, height, width = _check_maps(maps)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < images:
        raise InputError(
            f"influence picture index {index!r} is out of range: the maps hold {images} picture(s), pass 0..{images - 1}"
        )
    if picture is not None and not isinstance(picture, Image.Image):
        raise InputError(
            f"influence picture must be a PIL picture or None, got {type(picture).__name__}: pass the output picture"
        )
    index = int(index)
    layout = influence_layout(maps)
    norms = _finite(maps.norms[index])  # (panels, blocks, H, W)
    total = norms.sum(axis=1)  # (panels, H, W)
    block_max, total_max = _max(norms), _max(total)
    font = _font()
    line = _line_height(font)
    figure = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    _text(draw, (PAD, PAD), _title(index, images), font)
    captions = ("all blocks (sum):", "each block:")
    for bar, caption, vmax in zip(layout.bars, captions, (total_max, block_max), strict=True):
        y = bar[1] - (line - BAR[1]) // 2
        _text(draw, (PAD, y), caption, font)
        if vmax <= 0:
            _text(draw, (bar[0], y), _scale_text(vmax), font)
            continue
        low = "0"
        ramp = colormap(np.linspace(0.0, 1.0, BAR[0]))[None, :, :].repeat(BAR[1], axis=0)
        figure.paste(Image.fromarray(ramp, "RGB"), (bar[0], bar[1]))
        draw.rectangle((bar[0] - 1, bar[1] - 1, bar[2], bar[3]), outline=(0, 0, 0))
        _text(draw, (bar[0] - GAP - _text_width(font, low), y), low, font)
        _text(draw, (bar[2] + GAP + 1, y), _scale_text(vmax), font)
    for p in range(panels):
        lx, ly, _, _ = layout.label_boxes[p]
        for k, text in enumerate(_wrap(_label(maps.panels, p, "panel"), font, LABEL_WIDTH)):
            _text(draw, (lx, ly + k * line), text, font)
        box = layout.all_tiles[p]
        _paste_tile(figure, draw, font, box, "all", picture, total[p], total_max)
        for b in range(blocks):
            short = _short(_label(maps.blocks, b, "block"), b)
            _paste_tile(figure, draw, font, layout.block_tiles[p][b], short, picture, norms[p, b], block_max)
    for rule_y in layout.rules:
        draw.line((PAD, rule_y, layout.size[0] - PAD, rule_y), fill=(200, 200, 200))
    return figure


def write_influence(
    path: str | Path, maps: InfluenceMaps, pictures: Sequence[Image.Image] | None = None
) -> list[Path]:
    """Write ``maps`` by ``path``'s suffix: ``.png``, a figure per output picture (over ``pictures`` when
    given); ``.npy``, the norms of each picture ``(panels, blocks, H, W)`` with ``<stem>.ratio.npy`` (the
    ratios) and ``<stem>.json`` (labels, shape, meaning) beside it. One picture: ``path`` itself; several:
    ``stem-1``, ``stem-2``... Each file is written whole or not at all. Returns the main files written."""
    check_influence_path(path)
    path = Path(path)
    images = _check_maps(maps)[0]
    if pictures is not None:
        pictures = list(pictures)
        if len(pictures) != images:
            raise InputError(
                f"influence maps cover {images} picture(s) but {len(pictures)} picture(s) were passed: "
                f"pass one per output picture, or none"
            )
    paths = _numbered(path, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, target in enumerate(paths):
        if path.suffix.lower() == ".png":
            figure = render_influence(maps, i, None if pictures is None else pictures[i])
            with atomic_paths([target]) as (temp,):
                figure.save(temp, format="PNG")
            continue
        norms = np.asarray(maps.norms[i], dtype=np.float32)
        ratio = target.with_name(f"{target.stem}.ratio.npy")
        meta = {
            "panels": [str(p) for p in maps.panels],
            "blocks": [str(b) for b in maps.blocks],
            "shape": list(norms.shape),
            "what": WHAT,
            "picture": i + 1,
            "pictures": images,
            "ratios": ratio.name,
        }
        finals = [target, ratio, target.with_name(f"{target.stem}.json")]
        with atomic_paths(finals) as (temp_norms, temp_ratio, temp_json):
            with open(temp_norms, "wb") as f:
                np.save(f, norms)
            with open(temp_ratio, "wb") as f:
                np.save(f, np.asarray(maps.ratios[i], dtype=np.float32))
            temp_json.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def _numbered(output: Path, count: int) -> list[Path]:
    """``output`` for one result; ``stem-1.ext``, ``stem-2.ext``... for several (``ipadapter.media.numbered``)."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(count)]


def _check_maps(maps: InfluenceMaps) -> tuple[int, int, int, int, int]:
    if not isinstance(maps, InfluenceMaps):
        raise InputError(
            f"expected InfluenceMaps, got {type(maps).__name__}: pass what the influence recorder returned"
        )
    norms, ratios = np.asarray(maps.norms), np.asarray(maps.ratios)
    if norms.ndim != 5 or min(norms.shape) < 1:
        raise InputError(
            f"influence norms have shape {norms.shape}, expected (images, panels, blocks, H, W) with none empty: "
            f"record at least one step with an adapter attached"
        )
    if ratios.shape != norms.shape:
        raise InputError(
            f"influence ratios have shape {ratios.shape} but norms {norms.shape}: build both from the same recording"
        )
    images, panels, blocks, height, width = norms.shape
    if len(maps.panels) != panels or len(maps.blocks) != blocks:
        raise InputError(
            f"influence maps have {len(maps.panels)} panel / {len(maps.blocks)} block label(s) for {panels} panel(s) "
            f"/ {blocks} block(s): give one label each"
        )
    return images, panels, blocks, height, width


def _heat(heat: np.ndarray) -> np.ndarray:
    try:
        arr = np.asarray(heat, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(
            f"influence heat map is not numeric ({e}): pass an (H, W) array of numbers"
        ) from None
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise InputError(
            f"influence heat map has shape {arr.shape}, expected (H, W): pass one map, e.g. total()[0, 0]"
        )
    return arr


def _finite(arr: np.ndarray) -> np.ndarray:
    out = np.asarray(arr, dtype=np.float32)
    return np.where(np.isfinite(out), out, np.float32(0.0))


def _max(arr: np.ndarray) -> float:
    finite = _finite(arr)
    return max(float(finite.max()), 0.0) if finite.size else 0.0


def _fit(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(w, h) with the long side ``long_side`` and ``width:height``'s aspect (each at least 1)."""
    if width >= height:
        return long_side, max(1, round(height * long_side / width))
    return max(1, round(width * long_side / height)), long_side


def _base(picture: Image.Image | None, size: tuple[int, int]) -> np.ndarray:
    """The picture under the colours at ``size``: greyed and dimmed, float (h, w, 3); black without one."""
    if picture is None:
        return np.zeros((size[1], size[0], 3), dtype=np.float64)
    grey = picture.convert("RGB").convert("L")
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    levels = np.round(np.asarray(grey, dtype=np.float64) * DIM)
    return np.repeat(levels[:, :, None], 3, axis=2)


def _tile(picture: Image.Image | None, heat: np.ndarray, size: tuple[int, int], vmax: float) -> Image.Image:
    """``heat`` (any (H, W)) resized to ``size`` and blended over the picture's base at ``size``."""
    base = _base(picture, size)
    heat = _finite(heat)
    if vmax <= 0:
        return Image.fromarray(base.astype(np.uint8), "RGB")
    if heat.shape != (size[1], size[0]):
        heat = np.asarray(Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    t = np.clip(heat.astype(np.float64) / vmax, 0.0, 1.0)
    alpha = (ALPHA * np.sqrt(t))[:, :, None]
    out = base + alpha * (colormap(t).astype(np.float64) - base)
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")


def _paste_tile(
    figure: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    box: Box,
    caption: str,
    picture: Image.Image | None,
    heat: np.ndarray,
    vmax: float,
) -> None:
    size = (box[2] - box[0], box[3] - box[1])
    figure.paste(_tile(picture, heat, size, vmax), (box[0], box[1]))
    _text(draw, (box[0], box[1] - _line_height(font) - 2), _clip(caption, font, size[0]), font)


def _scale_text(vmax: float) -> str:
    """A scale end's value (3 significant digits); a scale whose top is 0 says so."""
    if vmax <= 0:
        return "0 (no influence)"
    return f"{vmax:.3g}"


def _title(index: int, images: int) -> str:
    return f"picture {index + 1} of {images}: where the image prompt acted (norm of its contribution, mean over steps)"


def _label(labels: Sequence[str], i: int, kind: str) -> str:
    text = str(labels[i]).strip()
    return text or f"{kind} {i}"


def _short(label: str, i: int) -> str:
    """A block label's short form: its first word (``"t3 down_blocks.2.attentions.1"`` -> ``"t3"``)."""
    words = label.split()
    return words[0] if words else f"b{i}"


_FONT: ImageFont.ImageFont | ImageFont.FreeTypeFont | None = None


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    global _FONT
    if _FONT is None:
        try:  # Pillow's bundled FreeType font, a little larger than its default 10 px: readable word gaps
            _FONT = ImageFont.load_default(size=13)
        except (TypeError, ImportError, OSError):  # no FreeType: the bitmap font
            _FONT = ImageFont.load_default()
    return _FONT


def _printable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """The bitmap fallback font takes Latin-1 only: anything else becomes '?'."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(_printable(text, font))
    return int(math.ceil(right - min(left, 0)))


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    _, top, _, bottom = font.getbbox("Agy|")
    return int(math.ceil(bottom - min(top, 0))) + 2


def _caption_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    widest = max(_text_width(font, c) for c in ("all blocks (sum):", "each block:"))
    return widest + GAP + _text_width(font, "0") + GAP


def _text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[int, int],
    text: str,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    draw.text(xy, _printable(text, font), fill=(0, 0, 0), font=font)


def _clip(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` cut to fit ``width`` pixels."""
    while len(text) > 1 and _text_width(font, text) > width:
        text = text[:-1]
    return text


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a longer word is cut into pieces)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _text_width(font, word) > width and len(word) > 1:
            piece = _clip(word, font, width)
            lines.append(piece)
            word = word[len(piece) :]
        current = word
    if current:
        lines.append(current)
    return lines or [""]
