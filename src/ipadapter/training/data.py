"""Training data for ``ipadapter train``: image–caption pairs from folders, manifests, datasets or tar shards.

:func:`open_source` turns one string into a :class:`Source` of raw :class:`Sample` records and checks
everything cheap up front (folder non-empty, manifest lines valid and their images present, shards present),
so a bad dataset fails before any model is loaded. :class:`Transform` decodes one sample into the tensors
the trainer needs (VAE pixels with SDXL micro-conditioning, and CLIP pixels for the image encoder); an
unreadable image becomes a "skipped" record that :func:`collate` drops from the batch and reports.

Map-style sources (folder, manifest, dataset saved with ``save_to_disk``) go through
:class:`TrainingDataset` (random access, shuffled with :func:`epoch_order`); streaming sources (``hf://``
hub datasets, tar shards) through :class:`StreamingDataset`. Random crops and flips are drawn from a
generator seeded from (seed, epoch, index), so a resumed run reproduces them exactly.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, ModelNotAvailableError
from ..images import MAX_IMAGE_PIXELS, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_LISTED = 5  # problems named in one validation message; the rest are counted
_WHAT = "training image"


@dataclass
class Sample:
    """One raw record, before decoding.

    ``image`` is a path, encoded bytes, a PIL image or None; ``error`` (when set) says why the record
    can't be used, and the transform reports it as skipped.
    """

    key: str
    image: Any
    text: str
    error: str | None = None


class Source:
    """Raw samples named by a spec string. Map-style sources also support ``len`` and indexing."""

    spec: str
    streaming: bool
    kind: str  # "folder", "jsonl", "json", "dataset", "hub" or "tar"

    def __len__(self) -> int:
        raise TypeError(f"dataset '{self.spec}' is streamed ({self.kind}); it has no length")

    def __getitem__(self, i: int) -> Sample:
        raise TypeError(f"dataset '{self.spec}' is streamed ({self.kind}); it has no random access")

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        size = "streaming" if self.streaming else f"{len(self)} examples"
        return f"<{type(self).__name__} {self.kind} '{self.spec}' ({size})>"


# ----------------------------------------------------------------------------------------------- sources


class _PairSource(Source):
    """A folder of images with captions, or a manifest: a list of (key, image path, caption)."""

    streaming = False

    def __init__(self, spec: str, kind: str, pairs: list[tuple[str, Path, str | Path | None]]) -> None:
        # the caption is text (manifest), a caption file path (folder) or None (no caption)
        self.spec, self.kind, self._pairs = spec, kind, pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> Sample:
        key, image, caption = self._pairs[i]
        if isinstance(caption, Path):
            try:
                caption = caption.read_text(encoding="utf-8", errors="replace").strip()
            except OSError as e:
                return Sample(key, image, "", error=f"caption '{caption}' could not be read ({e})")
        return Sample(key, image, caption or "")


class _DiskDatasetSource(Source):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk``."""

    streaming = False
    kind = "dataset"

    def __init__(self, spec: str, dataset: Any, image_column: str, text_column: str, root: Path) -> None:
        self.spec, self._ds, self._image, self._text, self._root = (
            spec,
            dataset,
            image_column,
            text_column,
            root,
        )

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        row = self._ds[i]
        return _row_sample(f"{i}", row, self._image, self._text, self._root)


class _HubSource(Source):
    """A hub dataset streamed with ``datasets.load_dataset(..., streaming=True)``."""

    streaming = True
    kind = "hub"

    def __init__(self, spec: str, dataset: Any, image_column: str, text_column: str) -> None:
        self.spec, self._ds, self._image, self._text = spec, dataset, image_column, text_column

    def __iter__(self) -> Iterator[Sample]:
        for i, row in enumerate(self._ds):
            yield _row_sample(f"{i}", row, self._image, self._text, None)


class _TarSource(Source):
    """WebDataset-style tar shards, read in order with :mod:`tarfile` in streaming mode."""

    streaming = True
    kind = "tar"

    def __init__(self, spec: str, shards: list[Path], text_column: str) -> None:
        self.spec, self.shards, self._text = spec, shards, text_column

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards:
            yield from self._read_shard(shard)

    def _read_shard(self, shard: Path) -> Iterator[Sample]:
        group: dict[str, bytes] = {}
        key = None
        try:
            with tarfile.open(shard, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    if base.startswith(".") or "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    member_key = f"{folder}/{stem}" if folder else stem
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if member_key != key:
                        if key is not None:
                            yield self._sample(shard, key, group)
                        key, group = member_key, {}
                    group[ext.lower()] = data
        except (tarfile.TarError, OSError, EOFError) as e:
            if key is not None:  # the complete groups before the damage are still usable
                yield self._sample(shard, key, group)
                key = None
            yield Sample(
                f"{shard.name}", None, "", error=f"tar shard '{shard}' could not be read further ({e})"
            )
        if key is not None:
            yield self._sample(shard, key, group)

    def _sample(self, shard: Path, key: str, group: dict[str, bytes]) -> Sample:
        name = f"{shard.name}/{key}"
        image = next((group[ext] for ext in group if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
        text, error = "", None
        if "txt" in group:
            text = group["txt"].decode("utf-8", errors="replace").strip()
        elif "json" in group:
            try:
                meta = json.loads(group["json"])
            except ValueError:
                meta, error = {}, f"'{key}.json' in '{shard}' is not valid JSON"
            if isinstance(meta, dict):
                value = next((meta[c] for c in (self._text, "text", "caption") if c in meta), "")
                text = value if isinstance(value, str) else ""
        if image is None:
            error = f"tar sample '{key}' in '{shard}' has no image member (.jpg, .png, .webp, ...); it has {sorted(group)}"
        return Sample(name, image, text, error=error)


def _row_sample(key: str, row: dict, image_column: str, text_column: str, root: Path | None) -> Sample:
    """A dataset row as a Sample: images as bytes, paths (relative to ``root`` if not found as given) or PIL."""
    image = row.get(image_column)
    if isinstance(image, dict):  # the datasets Image feature with decode=False
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str) and root is not None and not Path(image).is_absolute():
        if not Path(image).exists() and (root / image).exists():
            image = str(root / image)
    text = row.get(text_column)
    error = None if image is not None else f"row {key} has no '{image_column}' value"
    return Sample(key, image, text if isinstance(text, str) else "", error=error)


# ------------------------------------------------------------------------------------------ open_source


def open_source(
    spec: str, *, image_column: str = "image", text_column: str = "text", split: str = "train"
) -> Source:
    """The training data named by ``spec``, resolved and validated (cheap checks only).

    ``spec`` is a folder of images with same-name ``.txt`` captions; a ``.jsonl``/``.json`` manifest; a
    folder saved with ``datasets``' ``save_to_disk``; ``hf://owner/name`` (a hub dataset, streamed); or
    WebDataset tar shards (``data.tar``, ``shards/*.tar``, ``data-{000..009}.tar``).
    """
    spec = str(spec)
    if spec.startswith("hf://"):
        return _open_hub(spec, image_column, text_column, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _open_disk_dataset(spec, path, image_column, text_column, split)
        return _open_folder(spec, path)
    lower = spec.lower()
    if path.is_file() and lower.endswith(".jsonl"):
        return _open_manifest(spec, path, image_column, text_column, lines=True)
    if path.is_file() and lower.endswith(".json"):
        return _open_manifest(spec, path, image_column, text_column, lines=False)
    if lower.endswith(TAR_SUFFIXES):
        return _open_tar(spec, text_column)
    if lower.endswith((".jsonl", ".json")):
        raise InputError(
            f"manifest '{spec}': no such file; expected a .jsonl/.json manifest of image–caption pairs"
        )
    hint = ""
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not path.exists():
        hint = f" (for the hub dataset, write hf://{spec})"
    what = "is a file of an unknown kind" if path.exists() else "does not exist"
    raise InputError(
        f"dataset '{spec}' {what}; expected a folder of images with .txt captions, a .jsonl/.json manifest, "
        f"a folder saved with datasets' save_to_disk, tar shards (data.tar, shards/*.tar, data-{{000..009}}.tar) "
        f"or hf://owner/name{hint}"
    )


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _open_folder(spec: str, folder: Path) -> Source:
    images = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(relative) and path.is_file():
            images.append((relative.as_posix(), path))
    if not images:
        raise InputError(
            f"training folder '{spec}' has no images; expected {', '.join(IMAGE_EXTENSIONS)} files (searched "
            "recursively) with same-name .txt captions beside them, or pass a .jsonl manifest instead"
        )
    images.sort(key=lambda item: item[0])
    pairs: list[tuple[str, Path, str | Path | None]] = []
    for key, path in images:
        caption = path.with_suffix(".txt")
        pairs.append((key, path, caption if caption.is_file() else None))
    return _PairSource(spec, "folder", pairs)


def _problems(name: str, problems: list[str], expected: str) -> InputError:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return InputError(f"{name}: {listed}{more} ({count}); expected {expected}; fix or remove those entries")


def _open_manifest(spec: str, path: Path, image_column: str, text_column: str, lines: bool) -> Source:
    kind = "jsonl" if lines else "json"
    expected = (
        f"{'one JSON object per line' if lines else 'a JSON list of objects'} with '{image_column}' "
        f"(an image path, relative to the manifest's folder) and '{text_column}' (the caption)"
    )
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"manifest '{spec}' could not be read ({e}); expected a UTF-8 text file") from None
    entries: list[tuple[str, Any]] = []  # (where, parsed entry)
    problems: list[str] = []
    if lines:
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"line {number}", json.loads(line)))
            except ValueError:
                problems.append(f"line {number}: not valid JSON")
    else:
        try:
            data = json.loads(content)
        except ValueError as e:
            raise InputError(f"manifest '{spec}' is not valid JSON ({e}); expected {expected}") from None
        if not isinstance(data, list):
            raise InputError(
                f"manifest '{spec}' holds a JSON {type(data).__name__}, not a list; expected {expected}"
            )
        entries = [(f"entry {i}", entry) for i, entry in enumerate(data, start=1)]
    if not entries and not problems:
        raise InputError(f"manifest '{spec}' is empty; expected {expected}")
    root = path.parent
    pairs: list[tuple[str, Path, str | Path | None]] = []
    has_text = False
    for where, entry in entries:
        if not isinstance(entry, dict):
            problems.append(f"{where}: a JSON {type(entry).__name__}, not an object")
            continue
        image = entry.get(image_column)
        if image_column not in entry:
            problems.append(f"{where}: no '{image_column}' field")
            continue
        if not isinstance(image, str) or not image:
            problems.append(f"{where}: '{image_column}' is not a path")
            continue
        text = entry.get(text_column)
        has_text = has_text or text_column in entry
        if text is not None and not isinstance(text, str):
            problems.append(f"{where}: '{text_column}' is not a string")
            continue
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else root / image_path
        if not image_path.is_file():
            problems.append(f"{where}: image '{image}' not found")
            continue
        pairs.append((f"{path.name}:{where.split()[-1]}", image_path, text or ""))
    if problems:
        raise _problems(spec, problems, expected)
    if not has_text:
        raise InputError(
            f"manifest '{spec}': no entry has a '{text_column}' field; expected {expected}. If the captions are "
            "under another name, pass that column name"
        )
    return _PairSource(spec, kind, pairs)


def _check_columns(spec: str, columns: list[str] | None, image_column: str, text_column: str) -> None:
    if columns is None:  # a streamed dataset without declared features: checked per row
        return
    missing = [c for c in (image_column, text_column) if c not in columns]
    if missing:
        raise InputError(
            f"dataset '{spec}' has no column {' or '.join(repr(c) for c in missing)}; its columns are "
            f"{columns}; pass the image and caption column names"
        )


def _undecoded(dataset: Any, image_column: str) -> Any:
    """Keep images encoded until the transform decodes them (so a corrupt one is skipped, not fatal)."""
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None)
    if features and isinstance(features.get(image_column), ImageFeature):
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def _open_disk_dataset(spec: str, path: Path, image_column: str, text_column: str, split: str) -> Source:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as e:  # any failure here means the folder is not a usable dataset
        raise InputError(
            f"dataset '{spec}' could not be loaded ({str(e).strip().splitlines()[0][:160]}); expected a folder "
            "written by datasets' save_to_disk"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise InputError(f"dataset '{spec}' has no split '{split}'; its splits are {list(dataset)}")
        dataset = dataset[split]
    _check_columns(spec, dataset.column_names, image_column, text_column)
    if len(dataset) == 0:
        raise InputError(
            f"dataset '{spec}' is empty; expected rows with '{image_column}' and '{text_column}'"
        )
    return _DiskDatasetSource(spec, _undecoded(dataset, image_column), image_column, text_column, path)


def _open_hub(spec: str, image_column: str, text_column: str, split: str) -> Source:
    name = spec[len("hf://") :].strip("/")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise InputError(f"dataset '{spec}': expected hf://owner/name (a Hugging Face hub dataset id)")
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # offline, missing, private or malformed: all one message
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        reason = (
            "HF_HUB_OFFLINE is set and it can't be streamed offline"
            if offline
            else f"it could not be opened on the Hugging Face hub ({str(e).strip().splitlines()[0][:160]})"
        )
        raise ModelNotAvailableError(
            f"dataset '{name}' is not available: {reason}; check the name and your connection, or save it "
            "locally (datasets' save_to_disk) and pass that folder"
        ) from None
    _check_columns(spec, dataset.column_names, image_column, text_column)
    return _HubSource(spec, _undecoded(dataset, image_column), image_column, text_column)


def expand_braces(pattern: str) -> list[str]:
    """``data-{000..002}.tar`` -> data-000.tar, data-001.tar, data-002.tar; ``{a,b}`` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") or last.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _open_tar(spec: str, text_column: str) -> Source:
    shards: list[Path] = []
    missing: list[str] = []
    for name in expand_braces(os.path.expanduser(spec)):
        if re.search(r"[*?[]", name):
            found = sorted(glob.glob(name, recursive=True))
            shards.extend(Path(f) for f in found if Path(f).is_file())
            if not found:
                missing.append(name)
        elif Path(name).is_file():
            shards.append(Path(name))
        else:
            missing.append(name)
    if not shards:
        raise InputError(
            f"tar shards '{spec}' match no files; expected a .tar file, a glob (shards/*.tar) or a brace "
            "pattern (data-{000..009}.tar) naming existing shards"
        )
    if missing:
        raise _problems(
            f"tar shards '{spec}'", [f"'{m}' not found" for m in missing], "every named shard to exist"
        )
    bad = [f"'{s}' is not a tar file" for s in shards if not tarfile.is_tarfile(s)]
    if bad:
        raise _problems(f"tar shards '{spec}'", bad, "WebDataset .tar shards")
    return _TarSource(spec, list(dict.fromkeys(shards)), text_column)


# ------------------------------------------------------------------------------------------- transform


def _decode(image: Any) -> Image.Image:
    """A sample's image as RGB, with the same guards as :func:`ipadapter.images.load_image`."""
    if image is None:
        raise InputError(f"{_WHAT}: missing")
    if isinstance(image, Image.Image):
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise InputError(
                f"{_WHAT} is too large ({image.width}x{image.height}); the limit is {MAX_IMAGE_PIXELS:,} pixels"
            )
        return load_image(image, _WHAT)
    if not isinstance(image, str | Path | bytes | bytearray | memoryview):
        raise InputError(
            f"{_WHAT}: unsupported value of type {type(image).__name__}; expected a path or bytes"
        )
    return load_image(image, _WHAT)  # paths and encoded bytes: the same guards either way


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass
class Transform:
    """Sample -> training tensors: VAE pixels (resize shortest side, crop, optional flip) and CLIP pixels.

    ``pixel_values`` (3, R, R) in [-1, 1]; ``clip_pixel_values`` (3, S, S) from the original image with the
    inference encoder's preprocessing; ``original_size`` (h, w) before resizing and ``crop_top_left``
    (top, left) in the resized (and possibly flipped) image, as diffusers' SDXL training script records them.
    """

    resolution: int
    clip_size: int
    random_crop: bool = False
    random_flip: bool = False
    _processor: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution <= 0 or self.resolution % 8:
            raise InputError(
                f"resolution {self.resolution!r} is not a positive multiple of 8; the VAE downsamples by 8, "
                "so pick e.g. 512 (SD 1.5) or 1024 (SDXL)"
            )
        if not isinstance(self.clip_size, int) or self.clip_size <= 0:
            raise InputError(
                f"clip_size {self.clip_size!r} is not a positive integer; expected the image encoder's image_size"
            )
        from transformers import CLIPImageProcessorPil

        size = self.clip_size
        self._processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Decode and transform one sample, or return ``{"key", "skipped": reason}`` if it can't be used."""
        if sample.error:
            return {"key": sample.key, "skipped": _one_line(sample.error)}
        try:
            rgb = _decode(sample.image)
        except InputError as e:
            return {"key": sample.key, "skipped": _one_line(str(e))}
        except Exception as e:  # a decoder bug must not end a long training run
            return {
                "key": sample.key,
                "skipped": _one_line(f"{_WHAT}: could not be read ({type(e).__name__}: {e})"),
            }
        width, height = rgb.size
        r = self.resolution
        scale = r / min(width, height)
        size = (max(r, round(width * scale)), max(r, round(height * scale)))
        resized = rgb.resize(size, Image.Resampling.BICUBIC) if size != rgb.size else rgb
        flip = bool(torch.rand((), generator=generator) < 0.5) if self.random_flip else False
        if flip:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.random_crop:
            top = int(torch.randint(0, size[1] - r + 1, (), generator=generator))
            left = int(torch.randint(0, size[0] - r + 1, (), generator=generator))
        else:
            top, left = max(0, round((size[1] - r) / 2)), max(0, round((size[0] - r) / 2))
        crop = resized.crop((left, top, left + r, top + r))
        pixels = (
            torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        )
        clip = self._processor(images=[rgb], return_tensors="pt").pixel_values[0].to(torch.float32)
        return {
            "key": sample.key,
            "text": sample.text,
            "pixel_values": pixels,
            "clip_pixel_values": clip,
            "original_size": torch.tensor([height, width]),
            "crop_top_left": torch.tensor([top, left]),
        }


# -------------------------------------------------------------------------------------------- datasets


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(example_seed(seed, epoch, index))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A deterministic permutation of ``range(n)`` for one epoch."""
    return torch.randperm(n, generator=_generator(seed, epoch, -1)).tolist()


class TrainingDataset(torch.utils.data.Dataset):
    """A map-style source with its transform; item i's crop/flip is seeded from (seed, epoch, i)."""

    def __init__(self, source: Source, transform: Transform, seed: int = 0) -> None:
        if source.streaming:
            raise TypeError(f"dataset '{source.spec}' is streamed; use StreamingDataset")
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the random crops and flips are drawn for."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.transform(self.source[i], _generator(self.seed, self.epoch, i))


class StreamingDataset(torch.utils.data.IterableDataset):
    """The stream's examples rank, rank + world_size, ... forever, skipping this rank's first ``start``.

    Each example's crop/flip is seeded from (seed, epoch, position in the stream). With several DataLoader
    workers, worker w of k takes every k-th of this rank's examples (after ``start``): nothing is repeated,
    but batches interleave, so exact resume needs ``num_workers`` <= 1.
    """

    def __init__(
        self,
        source: Source,
        transform: Transform,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        if start < 0:
            raise ValueError(f"start {start} is negative")
        self.source, self.transform, self.seed = source, transform, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def _positions(self) -> Iterator[tuple[int, int, Sample]]:
        """(epoch, position, sample) of this rank's examples, forever, from this rank's ``start``-th."""
        epoch, skip = 0, self.start
        if not self.source.streaming:  # jump straight to the resume point
            n = len(self.source)
            per_epoch = len(range(self.rank, n, self.world_size))
            if per_epoch == 0:
                raise self._too_small(n)
            epoch, skip = divmod(skip, per_epoch)
            while True:
                for position in range(self.rank + skip * self.world_size, n, self.world_size):
                    yield epoch, position, self.source[position]
                epoch, skip = epoch + 1, 0
        while True:
            seen = mine = 0
            for position, sample in enumerate(self.source):
                seen = position + 1
                if position % self.world_size != self.rank:
                    continue
                mine += 1
                if skip:
                    skip -= 1
                    continue
                yield epoch, position, sample
            if mine == 0:
                raise self._too_small(seen)
            epoch += 1

    def _too_small(self, n: int) -> InputError:
        if n == 0:
            return InputError(f"dataset '{self.source.spec}' is empty; expected image–caption pairs")
        return InputError(
            f"dataset '{self.source.spec}' has {n} examples, fewer than the {self.world_size} training "
            "processes; add data or use fewer processes"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for count, (epoch, position, sample) in enumerate(self._positions()):
            if count % workers == worker:
                yield self.transform(sample, _generator(self.seed, epoch, position))


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the usable examples into a batch; skipped ones are listed under ``"skipped"`` as (key, reason)."""
    good = [e for e in examples if "skipped" not in e]
    batch: dict[str, Any] = {
        "texts": [e["text"] for e in good],
        "keys": [e["key"] for e in good],
        "skipped": [(e["key"], e["skipped"]) for e in examples if "skipped" in e],
    }
    if good:  # every tensor field: images, or cached latents/features, and the SDXL size ids
        for name, value in good[0].items():
            if isinstance(value, torch.Tensor):
                batch[name] = torch.stack([e[name] for e in good])
    return batch
