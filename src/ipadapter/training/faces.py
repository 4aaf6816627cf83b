"""Precomputed faces for the FaceID variants: one face-embeddings file per training example.

A FaceID example pairs its image (the target) with an InsightFace identity embedding (512 values, what
``ipadapter face-embed`` writes); FaceID-Plus also reads the aligned face crop (224 x 224), which the CLIP image
encoder turns into hidden states as the plus variant does with its reference images (DESIGN.md §3.6).

Where the faces come from: a manifest's face column (a path, relative to the manifest's folder like images
are), a same-name ``.safetensors`` / ``.npy`` file beside each image of a folder, or a dataset's face column (a
path, or the 512 values themselves). :func:`face_file_problem` reads only a file's header (cheap, so every
file of a manifest is checked before any model loads); :func:`decode_face` reads one example's face for a
step, and an unreadable one is skipped like an unreadable image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..prompt.faces import CROP_SIZE, EMBED_DIM, FaceEmbeds, load_face_file

FACE_SUFFIXES = (".safetensors", ".npy")
_MAKE = "make one per example with `ipadapter face-embed IMAGE --output FILE.safetensors`"


def _embeds_shape_problem(shape: tuple[int, ...], dtype: str) -> str | None:
    """Why an embeddings tensor of ``shape`` / ``dtype`` is not one training face, or None."""
    if len(shape) not in (1, 2) or shape[-1] != EMBED_DIM:
        per_face = shape[-1] if shape else 0
        return (
            f"holds an array of shape {list(shape)} ({per_face} values per face); expected ({EMBED_DIM},) or "
            f"(1, {EMBED_DIM}), an InsightFace embedding"
        )
    if len(shape) == 2 and shape[0] != 1:
        return (
            f"holds {shape[0]} faces; a training example takes one (write one face per file: "
            "`ipadapter face-embed --pick largest`)"
        )
    if not any(dtype.lower().startswith(k) for k in ("f", "bf")):
        return f"holds {dtype} values; expected floating-point face embeddings"
    return None


def face_file_problem(path: Path, crops: bool) -> str | None:
    """Why the face-embeddings file ``path`` can't serve one training example, or None (header only).

    ``crops``: the adapter also reads the aligned face crop (faceid-plus), so the file must carry it."""
    suffix = path.suffix.lower()
    if suffix not in FACE_SUFFIXES:
        return f"is not a .safetensors or .npy face-embeddings file; {_MAKE}"
    if not path.is_file():
        return "not found"
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only
            shapes = {"face_embeds": (tuple(array.shape), array.dtype.name)}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                shapes = {}
                for k in f.keys():
                    part = f.get_slice(k)
                    shapes[k] = (tuple(part.get_shape()), str(part.get_dtype()))
    except Exception as e:  # noqa: BLE001 - truncated, not that format, pickled: all unreadable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return f"is not a readable {suffix} file ({reason})"
    key = "face_embeds" if "face_embeds" in shapes else next(iter(shapes), None)
    if key is None or ("face_embeds" not in shapes and len(shapes) != 1):
        return f"holds tensors {sorted(shapes)}; expected 'face_embeds' (and 'face_crops'); {_MAKE}"
    problem = _embeds_shape_problem(*shapes[key])
    if problem or not crops:
        return problem
    if "face_crops" not in shapes:
        return (
            "carries no aligned face crop, which faceid-plus encodes with the image encoder; make it with "
            "`ipadapter face-embed` (it stores the crop unless --no-crops)"
        )
    shape, dtype = shapes["face_crops"]
    if shape != (1, CROP_SIZE, CROP_SIZE, 3) or dtype.lower() not in ("u8", "uint8"):
        return f"has face_crops {dtype} {list(shape)}; expected uint8 [1, {CROP_SIZE}, {CROP_SIZE}, 3]"
    return None


def folder_faces(images: list[tuple[str, Path]], crops: bool) -> tuple[list[Path], list[str]]:
    """Each ``(key, image path)``'s face file, the same name with ``.safetensors`` (or ``.npy``) beside it, and
    the problems found (phrases naming the key)."""
    found, problems = [], []
    for key, image in images:
        face = next((f for s in FACE_SUFFIXES if (f := image.with_suffix(s)).is_file()), None)
        if face is None:
            problems.append(f"{key}: no face file ({image.stem}.safetensors or .npy)")
        elif problem := face_file_problem(face, crops):
            problems.append(f"{key}: face file '{face.name}' {problem}")
        found.append(face)
    return found, problems


def manifest_face(entry: dict, column: str, root: Path, crops: bool) -> Path | str:
    """A manifest entry's face file (relative to ``root``, the manifest's folder), or the problem with it."""
    if column not in entry:
        return f"no '{column}' field (the face-embeddings file a FaceID run reads)"
    value = entry[column]
    if not isinstance(value, str) or not value:
        return f"'{column}' is not a path"
    face = Path(value).expanduser()
    face = face if face.is_absolute() else root / face
    problem = face_file_problem(face, crops)
    return f"face file '{value}' {problem}" if problem else face


def decode_face(value: Any, crops: bool) -> tuple[FaceEmbeds | None, str]:
    """One example's face (a file path, or the values of one embedding) as :class:`FaceEmbeds` and ``""``, or
    None and the one-line reason it can't be used (the example is then skipped)."""
    if value is None:
        return None, "no face embedding"
    try:
        if isinstance(value, str | Path):
            path = Path(value)
            problem = face_file_problem(path, crops)
            if problem:
                return None, f"face file '{path}' {problem}"
            face = load_face_file(path)
        else:
            array = np.asarray(value)
            problem = _embeds_shape_problem(tuple(array.shape), array.dtype.name)
            if problem:
                return None, f"face embedding {problem}"
            if crops:
                return None, "a face given as values carries no aligned face crop, which faceid-plus needs"
            face = FaceEmbeds(array.reshape(1, EMBED_DIM).astype(np.float32), source="face values")
            if not np.isfinite(face.embeds).all():
                return None, "face embedding holds NaN or infinite values"
    except InputError as e:
        return None, " ".join(str(e).split())
    except Exception as e:  # noqa: BLE001 - a reader bug must not end a long run
        return None, f"face could not be read ({type(e).__name__}: {e})"
    return face, ""


def validation_face(path: str, crops: bool) -> FaceEmbeds:
    """The ``--validation-face`` file, checked as a training face is (one-line :class:`InputError`)."""
    face, reason = decode_face(path, crops)
    if face is None:
        raise InputError(f"--validation-face: {reason.removeprefix('face file ')}")
    return face
