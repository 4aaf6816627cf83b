"""Where training data comes from: image–caption pairs from folders, manifests, datasets or tar shards.

:func:`open_source` turns one string into a :class:`Source` of raw :class:`Sample` records and checks
everything cheap up front (folder non-empty, manifest lines valid and their images present, shards present),
so a bad dataset fails before any model is loaded. Decoding a sample is :mod:`.transform`'s; turning a
source into the examples of a run is :mod:`.datasets`'.

Map-style sources (folder, manifest, dataset saved with ``save_to_disk``) have a length and random access;
streaming sources (``hf://`` hub datasets, tar shards) are read in order.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelNotAvailableError
from .faces import folder_faces, manifest_face

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_LISTED = 5  # problems named in one validation message; the rest are counted


@dataclass
class Sample:
    """One raw record, before decoding.

    ``image`` is a path, encoded bytes, a PIL image or None; ``error`` (when set) says why the record
    can't be used, and the transform reports it as skipped. ``face`` (FaceID runs): a face-embeddings file path
    or the embedding's values (:mod:`.faces`); None elsewhere. ``reference``: the picture the image encoder
    sees instead of ``image`` (a path, from a manifest's reference field); None: the example's own image, as
    in the paper's training.
    """

    key: str
    image: Any
    text: str
    error: str | None = None
    face: Any = None
    reference: Any = None


class Source:
    """Raw samples named by a spec string. Map-style sources also support ``len`` and indexing."""

    spec: str
    streaming: bool
    kind: str  # "folder", "jsonl", "json", "dataset", "hub" or "tar"
    has_references: bool = False  # some examples name a reference picture for the image encoder

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
    """A folder of images with captions, or a manifest: a list of (key, image path, caption), and for FaceID
    runs each example's face file."""

    streaming = False

    def __init__(
        self,
        spec: str,
        kind: str,
        pairs: list[tuple[str, Path, str | Path | None]],
        faces: list[Path] | None = None,
        references: list[Path | None] | None = None,
    ) -> None:
        # the caption is text (manifest), a caption file path (folder) or None (no caption)
        self.spec, self.kind, self._pairs, self._faces = spec, kind, pairs, faces
        self._references = references
        self.has_references = references is not None

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> Sample:
        key, image, caption = self._pairs[i]
        face = self._faces[i] if self._faces is not None else None
        reference = self._references[i] if self._references is not None else None
        if isinstance(caption, Path):
            try:
                caption = caption.read_text(encoding="utf-8", errors="replace").strip()
            except OSError as e:
                return Sample(key, image, "", error=f"caption '{caption}' could not be read ({e})", face=face)
        return Sample(key, image, caption or "", face=face, reference=reference)


class _DiskDatasetSource(Source):
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk``."""

    streaming = False
    kind = "dataset"

    def __init__(
        self,
        spec: str,
        dataset: Any,
        image_column: str,
        text_column: str,
        root: Path,
        face_column: str | None,
    ) -> None:
        self.spec, self._ds, self._image, self._text, self._root = (
            spec,
            dataset,
            image_column,
            text_column,
            root,
        )
        self._face = face_column

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        row = self._ds[i]
        return _row_sample(f"{i}", row, self._image, self._text, self._root, self._face)


class _HubSource(Source):
    """A hub dataset streamed with ``datasets.load_dataset(..., streaming=True)``."""

    streaming = True
    kind = "hub"

    def __init__(
        self, spec: str, dataset: Any, image_column: str, text_column: str, face_column: str | None
    ) -> None:
        self.spec, self._ds, self._image, self._text = spec, dataset, image_column, text_column
        self._face = face_column

    def __iter__(self) -> Iterator[Sample]:
        for i, row in enumerate(self._ds):
            yield _row_sample(f"{i}", row, self._image, self._text, None, self._face)


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


def _rooted(value: Any, root: Path | None) -> Any:
    """A relative path string found under ``root`` (the dataset's folder) rather than as given."""
    if isinstance(value, str) and root is not None and not Path(value).is_absolute():
        if not Path(value).exists() and (root / value).exists():
            return str(root / value)
    return value


def _row_sample(
    key: str,
    row: dict,
    image_column: str,
    text_column: str,
    root: Path | None,
    face_column: str | None = None,
) -> Sample:
    """A dataset row as a Sample: images as bytes, paths (relative to ``root`` if not found as given) or PIL;
    a face (``face_column``) as a file path (the same way) or the embedding's values."""
    image = row.get(image_column)
    if isinstance(image, dict):  # the datasets Image feature with decode=False
        image = image.get("bytes") or image.get("path")
    image = _rooted(image, root)
    text = row.get(text_column)
    error = None if image is not None else f"row {key} has no '{image_column}' value"
    face = _rooted(row.get(face_column), root) if face_column else None
    if face_column and face is None and error is None:
        error = f"row {key} has no '{face_column}' value (the face embedding a FaceID run reads)"
    return Sample(key, image, text if isinstance(text, str) else "", error=error, face=face)


# ------------------------------------------------------------------------------------------ open_source


def open_source(
    spec: str,
    *,
    image_column: str = "image",
    text_column: str = "text",
    split: str = "train",
    face_column: str | None = None,
    face_crops: bool = False,
    reference_column: str | None = None,
) -> Source:
    """The training data named by ``spec``, resolved and validated (cheap checks only).

    ``spec`` is a folder of images with same-name ``.txt`` captions; a ``.jsonl``/``.json`` manifest; a
    folder saved with ``datasets``' ``save_to_disk``; ``hf://owner/name`` (a hub dataset, streamed); or
    WebDataset tar shards (``data.tar``, ``shards/*.tar``, ``data-{000..009}.tar``).

    ``face_column`` (FaceID runs): each example's face embedding (:mod:`.faces`): a manifest's or dataset's
    column, or in a folder a same-name ``.safetensors`` / ``.npy`` beside each image; ``face_crops``: the
    files must carry the aligned face crop too (faceid-plus). A folder's or manifest's face files are checked
    (headers only) here.

    ``reference_column``: in a manifest, an entry's optional field naming the picture the image encoder sees
    for it (relative to the manifest's folder like images); the example's own image where absent. The
    adapter then learns to carry what reference and target share (the same object on another background, a
    subject in another pose). Other kinds of data have no such field.
    """
    spec = str(spec)
    faces = (face_column, face_crops) if face_column else None
    if spec.startswith("hf://"):
        return _open_hub(spec, image_column, text_column, split, face_column)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _open_disk_dataset(spec, path, image_column, text_column, split, face_column)
        return _open_folder(spec, path, faces)
    lower = spec.lower()
    if path.is_file() and lower.endswith(".jsonl"):
        return _open_manifest(spec, path, image_column, text_column, True, faces, reference_column)
    if path.is_file() and lower.endswith(".json"):
        return _open_manifest(spec, path, image_column, text_column, False, faces, reference_column)
    if lower.endswith(TAR_SUFFIXES):
        if face_column:
            raise InputError(
                f"tar shards '{spec}' carry no face embeddings a FaceID run can read; use a .jsonl manifest with "
                f"a '{face_column}' column (a face-embeddings file per image), an image folder or a saved dataset"
            )
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


def _open_folder(spec: str, folder: Path, faces: tuple[str, bool] | None = None) -> Source:
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
    face_files, problems = (
        folder_faces([(key, image) for key, image, _ in pairs], faces[1]) if faces else ([], [])
    )
    if problems:
        what = " with the aligned face crop" if faces and faces[1] else ""
        raise _problems(f"training folder '{spec}'", problems, f"a face-embeddings file{what} beside each "
                        "image: its name with .safetensors or .npy (`ipadapter face-embed IMAGE --output FILE`)")  # fmt: skip
    return _PairSource(spec, "folder", pairs, face_files if faces else None)


def _problems(name: str, problems: list[str], expected: str) -> InputError:
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return InputError(f"{name}: {listed}{more} ({count}); expected {expected}; fix or remove those entries")


def _open_manifest(
    spec: str,
    path: Path,
    image_column: str,
    text_column: str,
    lines: bool,
    faces: tuple[str, bool] | None = None,
    reference_column: str | None = None,
) -> Source:
    kind = "jsonl" if lines else "json"
    face_column, crops = faces or ("", False)
    face_field = (
        f", '{face_column}' (a face-embeddings file{' with the aligned face crop' if crops else ''}, relative "
        "to the manifest's folder too)"
        if faces
        else ""
    )
    expected = (
        f"{'one JSON object per line' if lines else 'a JSON list of objects'} with '{image_column}' "
        f"(an image path, relative to the manifest's folder){face_field} and '{text_column}' (the caption)"
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
    if faces and not any(isinstance(e, dict) and face_column in e for _, e in entries):
        raise InputError(
            f"manifest '{spec}': no entry has a '{face_column}' field; expected {expected}. If the face files are "
            "under another name, pass it as --face-column"
        )
    root = path.parent
    pairs: list[tuple[str, Path, str | Path | None]] = []
    face_files: list[Path] = []
    references: list[Path | None] = []
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
        reference = _manifest_reference(entry, reference_column, root, bool(faces))
        if isinstance(reference, str):
            problems.append(f"{where}: {reference}")
            continue
        references.append(reference)
        if faces:
            face = manifest_face(entry, face_column, root, crops)
            if isinstance(face, str):
                problems.append(f"{where}: {face}")
                continue
            face_files.append(face)
        pairs.append((f"{path.name}:{where.split()[-1]}", image_path, text or ""))
    if problems:
        raise _problems(spec, problems, expected)
    if not has_text:
        raise InputError(
            f"manifest '{spec}': no entry has a '{text_column}' field; expected {expected}. If the captions are "
            "under another name, pass that column name"
        )
    used = references if any(r is not None for r in references) else None
    return _PairSource(spec, kind, pairs, face_files if faces else None, used)


def _manifest_reference(entry: dict, column: str | None, root: Path, faces: bool) -> Path | None | str:
    """An entry's reference picture (a path), None when it names none, or what is wrong with it (a str)."""
    if not column or column not in entry:
        return None
    value = entry[column]
    if faces:
        return (
            f"'{column}' names a reference picture, but FaceID runs read the face file's crop; drop the field "
            "or train another variant"
        )
    if not isinstance(value, str) or not value:
        return f"'{column}' is not a path (the picture the image encoder sees for this example)"
    reference = Path(value).expanduser()
    reference = reference if reference.is_absolute() else root / reference
    return reference if reference.is_file() else f"reference '{value}' not found"


def _check_columns(
    spec: str, columns: list[str] | None, image_column: str, text_column: str, face_column: str | None = None
) -> None:
    if columns is None:  # a streamed dataset without declared features: checked per row
        return
    missing = [c for c in (image_column, text_column, face_column) if c and c not in columns]
    if missing:
        raise InputError(
            f"dataset '{spec}' has no column {' or '.join(repr(c) for c in missing)}; its columns are "
            f"{columns}; pass the image, caption{' and face' if face_column else ''} column names"
        )


def _undecoded(dataset: Any, image_column: str) -> Any:
    """Keep images encoded until the transform decodes them (so a corrupt one is skipped, not fatal)."""
    from datasets import Image as ImageFeature  # optional dependency (the train extra), and heavy

    features = getattr(dataset, "features", None)
    if features and isinstance(features.get(image_column), ImageFeature):
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def _open_disk_dataset(
    spec: str, path: Path, image_column: str, text_column: str, split: str, face_column: str | None = None
) -> Source:
    import datasets  # optional dependency (the train extra), and heavy

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
    _check_columns(spec, dataset.column_names, image_column, text_column, face_column)
    if len(dataset) == 0:
        raise InputError(
            f"dataset '{spec}' is empty; expected rows with '{image_column}' and '{text_column}'"
        )
    undecoded = _undecoded(dataset, image_column)
    return _DiskDatasetSource(spec, undecoded, image_column, text_column, path, face_column)


def _open_hub(
    spec: str, image_column: str, text_column: str, split: str, face_column: str | None = None
) -> Source:
    name = spec[len("hf://") :].strip("/")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise InputError(f"dataset '{spec}': expected hf://owner/name (a Hugging Face hub dataset id)")
    import datasets  # optional dependency (the train extra), and heavy

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
    _check_columns(spec, dataset.column_names, image_column, text_column, face_column)
    return _HubSource(spec, _undecoded(dataset, image_column), image_column, text_column, face_column)


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
