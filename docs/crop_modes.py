"""Draw docs/crop-modes.png: what the image encoder sees of a wide reference under each --crop mode.

    python docs/crop_modes.py

The encoder's input is made by the library's own preparation (``fit_square``, then CLIP's resize and centre
crop), un-normalised for display. ``tiled`` shows its square tiles side by side, each outlined: every tile is
encoded on its own and acts on its part of the picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessorPil

from ipadapter.prompt.images import CROP_MODES, fit_square
from ipadapter.prompt.tiles import tile_reference

SIZE = 160  # encoder input side drawn (224 for ViT-H; smaller keeps the figure small)


def wide_reference() -> Image.Image:
    """A 3:1 picture with a shape at each end and one in the middle."""
    w, h = 480, 160
    ramp = np.linspace(0, 1, w)[None, :, None]
    sky = (np.array([70, 130, 200]) * (1 - ramp) + np.array([250, 200, 120]) * ramp).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).copy())
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 30, 120, 130), fill=(220, 30, 40))
    draw.rectangle((190, 30, 290, 130), fill=(40, 170, 60))
    draw.polygon([(360, 130), (460, 130), (410, 30)], fill=(30, 40, 160))
    return image


def encoder_view(image: Image.Image, crop: str) -> Image.Image:
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    pixels = processor(images=[fit_square(image, crop, SIZE)], return_tensors="np").pixel_values[0]
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    rgb = ((pixels * std + mean).clip(0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(rgb)


def tiles_view(image: Image.Image) -> Image.Image:
    """The tiles of ``--crop tiled`` in a row, at a quarter of SIZE each (outlined)."""
    tiles = [tile for tile, _ in tile_reference(image)]
    side = SIZE // 2
    row = Image.new("RGB", (len(tiles) * (side + 4), side), "white")
    for i, tile in enumerate(tiles):
        small = tile.resize((side, side), Image.Resampling.BICUBIC)
        ImageDraw.Draw(small).rectangle((0, 0, side - 1, side - 1), outline="black")
        row.paste(small, (i * (side + 4), 0))
    return row


def figure() -> Image.Image:
    ref = wide_reference()
    pad, label_h = 12, 22
    tiled = tiles_view(ref)
    width = ref.width + (len(CROP_MODES) - 1) * (SIZE + pad) + tiled.width + 3 * pad
    sheet = Image.new("RGB", (width, SIZE + label_h + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(ref, (pad, pad + label_h + (SIZE - ref.height) // 2))
    draw.text((pad, pad), "reference (480x160)", fill="black")
    x = ref.width + 2 * pad
    for crop in CROP_MODES:
        view = tiled if crop == "tiled" else encoder_view(ref, crop)
        sheet.paste(view, (x, pad + label_h + (SIZE - view.height) // 2))
        draw.text((x, pad), f"--crop={crop}", fill="black")
        x += view.width + pad
    return sheet


if __name__ == "__main__":
    out = Path(__file__).with_name("crop-modes.png")
    figure().save(out)
    print(f"wrote {out}")
