"""Results as JSON: base64 PNGs (or one GIF) carrying their parameters, and influence maps for clients."""

from __future__ import annotations

import base64
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..jobs.job import Result
from ..media import save_video
from ..prompt.influence_render import overlay, render_influence
from .bodies import Prepared


def png_base64(image: Image.Image, params: dict[str, Any]) -> str:
    """The image as PNG carrying ``params`` in its ``parameters`` text chunk (as the CLI writes), base64."""
    info = PngInfo()
    info.add_text("parameters", json.dumps(params))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def gif_base64(frames: list[Image.Image], fps: float, params: dict[str, Any]) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = save_video(frames, Path(folder) / "video.gif", fps, params)
        return base64.b64encode(path.read_bytes()).decode("ascii")


def encode_result(result: Result, prepared: Prepared) -> dict[str, Any]:
    """A Result as the response JSON: base64 PNGs (or one GIF), the parameters, the seed and timings."""
    started = time.perf_counter()
    params = result.params
    out: dict[str, Any] = {"seed": result.seed, "parameters": params}
    if result.video:
        out.update(
            video=gif_base64(result.images, prepared.fps, params), mime="image/gif", frames=len(result.images)
        )
    else:
        out.update(
            images=[png_base64(img, {**params, "index": i}) for i, img in enumerate(result.images)],
            mime="image/png",
        )
    if result.influence is not None:
        out["influence"] = influence_json(result)
    out["seconds"] = {**result.seconds, "encode": round(time.perf_counter() - started, 3)}
    return out


def influence_json(result: Result) -> dict[str, Any]:
    """A result's influence maps for a client: labels, a figure per picture (all panels and blocks) and, per
    picture and panel, the whole denoiser's influence overlaid on the picture (one colour scale per picture)."""
    maps = result.influence
    pictures = [result.images[len(result.images) // 2]] if result.video else result.images
    total = maps.total()  # (images, panels, H, W)
    overlays = []
    for i, picture in enumerate(pictures):
        top = float(total[i].max())
        overlays.append([png_base64(overlay(picture, heat, top), {}) for heat in total[i]])
    return {
        "panels": maps.panels,
        "blocks": maps.blocks,
        "figures": [png_base64(render_influence(maps, i, pic), {}) for i, pic in enumerate(pictures)],
        "overlays": overlays,
        "max": [float(total[i].max()) for i in range(len(pictures))],
    }
