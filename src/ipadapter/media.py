"""Writing results: PNG images and GIF / MP4 videos, each carrying the generation parameters.

Parameters travel as JSON: in a PNG's ``parameters`` text chunk, a GIF's comment, an MP4's ``comment``
metadata tag, so a result can always be traced back to what made it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import InputError
from .files import atomic_path

VIDEO_SUFFIXES = (".gif", ".mp4")


def check_output(path: Path, video: bool, what: str = "output") -> None:
    """Refuse an output file name of the wrong kind: a video is .gif / .mp4, images are .png (the PNG's text
    chunk carries the generation parameters)."""
    suffix = Path(path).suffix.lower()
    if video and suffix not in VIDEO_SUFFIXES:
        raise InputError(f"{what} '{path}' must end in .gif or .mp4 (a video)")
    if not video and suffix != ".png":
        raise InputError(f"{what} '{path}' must end in .png (it carries the generation parameters)")


def numbered(output: Path, count: int) -> list[Path]:
    """``output`` for one result; ``stem-1.ext``, ``stem-2.ext``... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(count)]


def save_images(images: Sequence[Image.Image], output: Path, params: dict[str, Any]) -> list[Path]:
    """Write PNGs carrying ``params`` as JSON in the ``parameters`` text chunk (each file whole or not at all:
    :func:`ipadapter.files.atomic_path`)."""
    paths = numbered(output, len(images))
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        info = PngInfo()
        info.add_text("parameters", json.dumps({**params, "index": i}))
        with atomic_path(path) as temp:
            image.save(temp, format="PNG", pnginfo=info)
    return paths


def _uint8_frames(frames: Sequence[Any]) -> list[np.ndarray]:
    out = []
    for frame in frames:
        if isinstance(frame, Image.Image):
            out.append(np.asarray(frame.convert("RGB")))
            continue
        arr = np.asarray(frame)
        if arr.dtype != np.uint8:  # float frames in [0, 1] (output_type="np")
            arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        out.append(arr)
    return out


def save_video(frames: Sequence[Any], path: Path, fps: float, params: dict[str, Any] | None = None) -> Path:
    """Write ``frames`` (PIL images or HxWx3 arrays) as an animated GIF or an H.264 MP4, by suffix."""
    path = Path(path)
    check_output(path, video=True, what="video output")
    suffix = path.suffix.lower()
    if not frames:
        raise InputError("no frames to write")
    if not (fps > 0):
        raise InputError(f"fps {fps} is not usable; expected a number > 0, e.g. 8")
    arrays = _uint8_frames(frames)
    comment = json.dumps(params or {})
    with atomic_path(path) as temp:
        _write_video(arrays, temp, suffix, fps, comment)
    return path


def _write_video(arrays: list[np.ndarray], path: Path, suffix: str, fps: float, comment: str) -> None:
    if suffix == ".gif":
        images = [Image.fromarray(a) for a in arrays]
        images[0].save(
            path,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=round(1000 / fps),
            loop=0,
            comment=comment.encode(),
            optimize=False,
            disposal=1,
        )
        return
    import imageio_ffmpeg  # MP4 only: keeps imageio_ffmpeg (and subprocess) out of CLI start-up

    height, width = arrays[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",  # what every player reads; needs even sizes (ours are multiples of 8)
        macro_block_size=2,
        quality=8,
        output_params=["-metadata", f"comment={comment}"],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    try:
        for arr in arrays:
            writer.send(np.ascontiguousarray(arr))
    finally:
        writer.close()


def read_video(path: Path) -> list[np.ndarray]:
    """Frames of a GIF or MP4 written by :func:`save_video` (HxWx3 uint8), e.g. to check a result."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        frames = []
        with Image.open(path) as img:
            for i in range(getattr(img, "n_frames", 1)):
                img.seek(i)
                frames.append(np.asarray(img.convert("RGB")))
        return frames
    import imageio_ffmpeg  # MP4 only: keeps imageio_ffmpeg (and subprocess) out of CLI start-up

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    return [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
