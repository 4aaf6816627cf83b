"""Reference images: safe decoding and mode conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ipadapter.prompt.images as enc
from ipadapter import InputError, load_image


def test_transparency_goes_over_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert (
        out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    )


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("L", 100, (100, 100, 100)),
        ("LA", (100, 255), (100, 100, 100)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),
        ("F", 0.0, (0, 0, 0)),
    ],
)
def test_modes_become_rgb(mode: str, value, expected: tuple) -> None:
    out = load_image(Image.new(mode, (3, 2), value))
    assert out.mode == "RGB" and out.size == (3, 2) and out.getpixel((0, 0)) == expected


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert load_image(p).getpixel((0, 0)) == (10, 20, 30)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "text.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "f.png"
    )
    data = (tmp_path / "f.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(enc, "MAX_IMAGE_PIXELS", 6000)  # 10,000 px: over the limit (PIL warns)
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(enc, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit (PIL raises)
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(tmp_path / "big.png")
    assert Image.MAX_IMAGE_PIXELS != 1000  # the global limit is restored


def test_masks_grey_rgb_alpha_and_colour() -> None:
    grey_rgb = Image.new("RGB", (8, 8), (200, 200, 200))
    mask, note = enc.load_mask(grey_rgb, (8, 8))
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 200 and note is None
    strokes = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # white strokes on a transparent layer
    strokes.putpixel((2, 3), (255, 255, 255, 255))
    mask, _ = enc.load_mask(strokes)
    assert mask.getpixel((2, 3)) == 255 and mask.getpixel((0, 0)) == 0  # transparent = keep
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert enc.load_mask(sixteen)[0].getpixel((0, 0)) == 255
    with pytest.raises(InputError, match=r"has colour \(pixel \(10, 200, 10\)"):
        enc.load_mask(Image.new("RGB", (4, 4), (10, 200, 10)))
    mask, note = enc.load_mask(Image.new("L", (4, 4), 255), (8, 6))
    assert mask.size == (8, 6) and "4x4" in note and "8x6" in note
