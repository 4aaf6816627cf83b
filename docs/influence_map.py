"""Draw docs/influence-map.png: where two masked references acted, with the shipped miniature model.

    python docs/influence_map.py

Runs the command line as a user would: ``ipadapter generate --base mini --adapter mini`` with the red circle
on the left half and the green square on the right half (regional masks), and ``--influence-map``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from ipadapter.cli import main

HERE = Path(__file__).parent
EXAMPLES = HERE.parent / "examples"


def mask(left: bool, size: int = 64) -> Image.Image:
    out = Image.new("L", (size, size), 0)
    out.paste(255, (0, 0, size // 2, size) if left else (size // 2, 0, size, size))
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        mask(True).save(folder / "left.png")
        mask(False).save(folder / "right.png")
        argv = ["generate", "--base", "mini", "--adapter", "mini", "--prompt", "", "--seed", "0"]
        argv += ["--image", str(EXAMPLES / "red-circle.png"), "--image-mask", str(folder / "left.png")]
        argv += ["--image", str(EXAMPLES / "green-square.png"), "--image-mask", str(folder / "right.png")]
        argv += ["--output", str(folder / "out.png"), "--influence-map", str(HERE / "influence-map.png")]
        raise SystemExit(main(argv))
