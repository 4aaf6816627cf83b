"""``ipadapter demo``: the product in one picture, offline, from the shipped miniature family.

Each row of the contact sheet is one reference (a held-out shape/colour pairing the adapter never saw in
training) and four columns: the reference, the base model given only the reference's caption, the image
prompt with an empty text, and the image prompt with a text that names another background (the paper's
"text compatible" claim: the object follows the picture, the background follows the words).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

from .shapes import caption_for, render

# (shape, colour, background, texture, the background the image+text column asks for)
DEMO_SCENES: tuple[tuple[str, str, str, str, str], ...] = (
    ("triangle", "white", "blue", "plain", "yellow"),  # (triangle, white) is held out
    ("ring", "red", "white", "plain", "blue"),  # (ring, red) is held out
    ("square", "green", "purple", "striped", "white"),
    ("star", "yellow", "black", "plain", "green"),
)
COLUMNS = ("reference", "text only", "image prompt", "image + text")


@dataclass
class DemoRow:
    reference: Image.Image
    caption: str
    text: str  # the image+text column's prompt
    images: list[Image.Image]  # text only, image prompt, image + text


def scene(shape: str, color: str, background: str, texture: str, size: int) -> Image.Image:
    """One centred reference picture (the same pixels on every run)."""
    margin = round(size * 0.15)
    box = (margin, margin, size - margin, size - margin)
    return render(shape, color, background, texture, box, size)


def run_demo(ip: Any, *, size: int, steps: int = 20, guidance: float = 5.0, seed: int = 0) -> list[DemoRow]:
    """Generate the sheet's rows with an attached adapter handle ``ip`` (its scale is used as it is)."""
    refs = [scene(s, c, b, t, size) for s, c, b, t, _ in DEMO_SCENES]
    captions = [caption_for(s, c, b, t) for s, c, b, t, _ in DEMO_SCENES]
    texts = [f"on a {new} background" for *_, new in DEMO_SCENES]

    def call(prompts: list[str], with_image: bool) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        common = {
            "prompt": prompts,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": generators,
            "height": size,
            "width": size,
        }
        return (ip(refs, **common) if with_image else ip.pipe(**common)).images

    columns = [call(captions, False), call([""] * len(refs), True), call(texts, True)]
    return [
        DemoRow(ref, caption, text, [col[i] for col in columns])
        for i, (ref, caption, text) in enumerate(zip(refs, captions, texts, strict=True))
    ]


def contact_sheet(rows: list[DemoRow], cell: int = 128) -> Image.Image:
    """Rows of ``reference | text only | image prompt | image + text``, with headers and each row's texts."""
    header, caption_h, pad = 18, 30, 6
    width = len(COLUMNS) * (cell + pad) + pad
    height = header + len(rows) * (cell + caption_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(COLUMNS):
        draw.text((pad + j * (cell + pad), 4), name, fill=(20, 20, 20))
    for i, row in enumerate(rows):
        top = header + i * (cell + caption_h + pad)
        for j, image in enumerate([row.reference, *row.images]):
            sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (pad + j * (cell + pad), top))
        draw.text((pad, top + cell + 2), f'text only: "{row.caption}"', fill=(60, 60, 60))
        draw.text((pad, top + cell + 15), f'image + text: "{row.text}"', fill=(60, 60, 60))
    return sheet
