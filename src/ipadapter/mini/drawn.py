"""Shapes drawn differently from :func:`~ipadapter.mini.shapes.make_example`: free sizes, offsets, rotations, edges.

The training generator draws every object axis-aligned, 45-80 % of the side, supersampled 4x and downsampled
with LANCZOS at the build's 32 px. A user's reference is none of that. :func:`draw_example` draws the same
scenes (shapes, named colours, textures, captions; held-out pairings by ``split`` as in :mod:`.shapes`) with

* the object turned by any angle (circles and rings excepted, which look the same) and 25-85 % of the side
  (the figure's turned extent always fits inside the image, at least :data:`MARGIN` from its edges);
* its centre anywhere that allows;
* its proportions varied: star inner radius, cross arm width and ring thickness each within a band around
  the training generator's values;
* its edges hard (drawn at the output size, no anti-aliasing) or supersampled 2, 4 or 8 times and downsampled
  with a box, bilinear or LANCZOS filter;
* an output side from ``sizes`` (a reference of another size is resized by the encoder's preprocessing).

Every example is a pure function of ``(seed, index, split, sizes)``. The mini build uses it twice: at 32 px
on training pairings as the vision tower's augmentation, and :func:`write_drawn` on held-out pairings with
other sizes as the "drawn" evaluation set, reported beside the generator's own held-out set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .shapes import (
    NAMED_COLORS,
    RGB,
    SPLITS,
    Example,
    _combinations,
    _texture_mask,
    caption_for,
    texture_color,
    write_examples,
)

MARGIN = 0.06  # least distance from the turned figure to the image edge, as a fraction of the side
SIDES = (0.25, 0.85)  # the figure's box side / the image side (shrunk when the turned figure would not fit)
EVAL_SIZES = (32, 48, 64, 96, 128)
FILTERS = (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS)
SUPERSAMPLE = (1, 2, 4, 8)  # 1: hard, aliased edges


def _turn(points: list[tuple[float, float]], angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """``points`` (relative to the centre) turned by ``angle`` radians and moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _outline(shape: str, half: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The polygon of ``shape`` in a box of half-side ``half`` centred on the origin (y down)."""
    if shape == "square":
        return [(-half, -half), (half, -half), (half, half), (-half, half)]
    if shape == "triangle":
        return [(0.0, -half), (half, half), (-half, half)]
    if shape == "star":
        inner = rng.uniform(0.38, 0.52)
        return [
            ((1.0 if k % 2 == 0 else inner) * half * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1.0 if k % 2 == 0 else inner) * half * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    if shape == "cross":
        a = half * rng.uniform(0.28, 0.4)  # half the arm width
        return [(-a, -half), (a, -half), (a, -a), (half, -a), (half, a), (a, a), (a, half), (-a, half),
                (-a, a), (-half, a), (-half, -a), (-a, -a)]  # fmt: skip
    raise ValueError(f"no outline for {shape!r}")


def _reach(shape: str) -> float:
    """Largest distance from the box centre to the figure, in half-sides (bounds the turned figure)."""
    return math.sqrt(2) if shape in ("square", "triangle", "cross") else 1.0


def off_palette(rng: np.random.Generator, away: float = 80.0) -> tuple[RGB, RGB, RGB]:
    """Object, background and texture colours far (``away`` in RGB) from every named colour and each other."""
    named = np.array(list(NAMED_COLORS.values()), dtype=np.float64)
    picks: list[np.ndarray] = []
    while len(picks) < 2:
        rgb = rng.uniform(0, 255, 3)
        if np.sqrt(((named - rgb) ** 2).sum(1)).min() >= away and all(
            np.sqrt(((p - rgb) ** 2).sum()) >= 2 * away for p in picks
        ):
            picks.append(rgb)
    obj, ground = picks
    shade = ground + 0.25 * ((0.0 if ground.mean() > 200 else 255.0) - ground)
    return tuple(tuple(int(round(v)) for v in c) for c in (obj, ground, shade))  # type: ignore[return-value]


def draw_example(
    seed: int,
    index: int,
    split: str = "eval",
    sizes: tuple[int, ...] = EVAL_SIZES,
    unnamed: bool = False,
    scene: tuple[str, str, str, str] | None = None,
) -> Example:
    """Example ``index`` of the drawn stream named by ``seed`` and ``split`` (see the module docstring).

    ``unnamed``: object and background in colours far from every named one (:func:`off_palette`), so the
    picture shows a shape whose colour says nothing about it; its ``color`` and ``background`` are then "".
    ``scene``: draw this (shape, colour, background, texture) of ``split`` instead of a random one (the pose,
    size and edges are still the stream's): another view of a given picture.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    options = _combinations(split)
    if scene is not None and tuple(scene) not in options:
        raise ValueError(f"scene {scene!r} is not a {split} combination; expected one of the {split} split's")
    rng = np.random.default_rng([int(seed), int(index), SPLITS.index(split), 7])
    picked = options[int(rng.integers(len(options)))]  # drawn even for a given scene: the same poses follow
    shape, color, background, texture = tuple(scene) if scene is not None else picked
    size = int(sizes[int(rng.integers(len(sizes)))])
    factor = int(SUPERSAMPLE[int(rng.integers(len(SUPERSAMPLE)))])
    canvas = size * factor
    room = canvas * (1 - 2 * MARGIN) / 2  # largest reach that fits
    half = min(rng.uniform(*SIDES) * canvas / 2, room / _reach(shape))
    reach = half * _reach(shape)
    low, high = canvas * MARGIN + reach, canvas * (1 - MARGIN) - reach
    cx, cy = rng.uniform(low, max(low, high)), rng.uniform(low, max(low, high))
    angle = rng.uniform(0, 2 * math.pi)
    named = (NAMED_COLORS[color], NAMED_COLORS[background], texture_color(background))
    paint = off_palette(rng) if unnamed else named
    image = Image.new("RGB", (canvas, canvas), paint[1])
    mask = _texture_mask(texture, rng, canvas)
    if mask is not None:
        image.paste(paint[2], mask=Image.fromarray(np.ascontiguousarray(mask)))
    draw, fill = ImageDraw.Draw(image), paint[0]
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(rng.uniform(0.17, 0.28) * 2 * half)))
    else:
        draw.polygon(_turn(_outline(shape, half, rng), angle, cx, cy), fill=fill)
    if factor > 1:
        image = image.resize((size, size), FILTERS[int(rng.integers(len(FILTERS)))])
    s = size / canvas
    bounds = tuple(int(round(v * s)) for v in (cx - reach, cy - reach, cx + reach, cy + reach))
    if unnamed:
        color = background = ""
    return Example(image, caption_for(shape, color or "?", background or "?", texture), shape, color, background,
                   texture, bounds)  # type: ignore[arg-type]  # fmt: skip


def write_drawn(
    folder: str | Path, count: int, seed: int = 0, split: str = "eval", sizes: tuple[int, ...] = EVAL_SIZES
) -> Path:
    """Write ``count`` drawn examples as a shapes folder (``NNNNNN.png`` + ``.txt`` + ``metadata.jsonl``).

    The folder has the layout of :func:`~ipadapter.mini.shapes.write_dataset`, so ``ipadapter eval
    --references`` and the encoder probe read it the same way; it is written afresh each time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    examples = (draw_example(seed, i, split, sizes) for i in range(count))
    return write_examples(folder, examples, split, drawn=True)
