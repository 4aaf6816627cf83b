"""The recipe: one description of a whole image prompt (adapters, their references and how each is used).

The same schema serves three readers: the Python API (the typed dataclasses below), the command line
(``--recipe ip.toml``, TOML or JSON) and a server's JSON body. A file looks like::

    [[adapter]]
    path = "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors"
    scale = 0.7
    combine = "average"
      [[adapter.image]]
      path = "a.png"
      weight = 1.0

Light on purpose (no torch/diffusers/transformers): the command line checks a recipe before loading models.
Every problem raises :class:`~ipadapter.errors.InputError` with a one-line message naming the place (file and
key path, e.g. ``ip.toml: adapter[1].image[0].weight``; indices count from 0), what was received, what is
expected and what to do. The dataclasses validate in ``__post_init__``, so objects built in Python are checked
too (their messages name the class and field, e.g. ``Reference.weight``). Objects are checked when built;
changing a field afterwards is not re-checked.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .controls import COMBINE_MODES, CONTROLS, IMAGE_CONTROLS
from .images import CROP_MODES
from .recipe_checks import (
    Where,
    as_choice,
    as_face,
    as_file,
    as_optional_file,
    as_weight,
    at,
    control_field,
    example_of,
    fail,
    key_path,
    listed,
    place_of,
    shown,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["COMBINE_MODES", "CROP_MODES", "AdapterRecipe", "Control", "Recipe", "Reference"]

# Keys of each table in a recipe file, in the order to_dict writes them.
_REFERENCE_KEYS = ("path", "embeds", "face", "weight", "mask", "crop")
_ADAPTER_KEYS = (
    "path",
    "image_encoder",
    "lora_file",
    *CONTROLS,
    "image",
)  # the per-call fields: prompt.controls
_RECIPE_KEYS = ("adapter",)


# ----------------------------------------------------------------------------------------------------------
# The dataclasses.


@dataclass
class Reference:
    """One reference: an image (or its precomputed embeddings) with a weight, an optional mask and a crop.

    - ``path``: the image (file path, PIL image or encoded bytes). Exactly one of ``path`` / ``embeds`` / ``face``.
    - ``embeds``: a file of precomputed image embeddings (skips the image encoder).
    - ``face``: for FaceID adapters, a face: a face-embeddings file (``.npy`` / ``.safetensors``, e.g. from
      ``ipadapter face-embed``) or a face image (detected with InsightFace); in Python also
      :class:`~ipadapter.prompt.faces.FaceEmbeds`, an array or tensor of 512 values per face, or a PIL image.
    - ``weight``: finite number >= 0 (default 1.0): the reference's share when references are combined.
    - ``mask``: where this reference acts (white = here), as a file path or PIL image; only with
      ``combine = "concat"`` (each reference drives its own region).
    - ``crop``: how the image is fitted to the encoder's square input: ``center`` (default) | ``pad`` | ``stretch``.
    """

    path: str | Path | Image.Image | bytes | None = None
    embeds: str | Path | None = None
    face: Any = None
    weight: float = 1.0
    mask: str | Path | Image.Image | None = None
    crop: str = "center"

    def __post_init__(self) -> None:
        here = place_of(self)
        if self.path is not None:
            self.path = as_file(self.path, here, "path", image=True, data=True)
        self.embeds = as_optional_file(self.embeds, here, "embeds")
        self.face = as_face(self.face, here)
        self.weight = as_weight(self.weight, here, "weight")
        self.mask = as_optional_file(self.mask, here, "mask", image=True)
        self.crop = as_choice(self.crop, CROP_MODES, here, "crop", optional=False)
        given = [k for k in ("path", "embeds", "face") if getattr(self, k) is not None]
        if len(given) != 1:
            got = "both " + " and ".join(given) if given else "neither path, embeds nor face"
            fail(
                here.where,
                f"got {got}; expected exactly one of them (an image, precomputed embeddings, or a face for "
                "FaceID adapters); keep one",
            )


def _as_reference(value: Any, where: str, file: bool, base_dir: Path | None) -> Reference:
    """One entry of an image list: a Reference, a path (or, in Python, a PIL image / bytes) or a table."""
    if isinstance(value, Reference):  # already checked when it was built
        return value
    if isinstance(value, Mapping):
        _check_keys(value, _REFERENCE_KEYS, where)
        kwargs = {str(k): v for k, v in value.items()}
        for key in ("path", "embeds", "face", "mask"):
            if key in kwargs:
                kwargs[key] = _resolve(kwargs[key], base_dir)
        with at(where, file):
            return Reference(**kwargs)
    plain = (str, Path) if file else (str, Path, Image.Image, bytes, bytearray)
    if isinstance(value, plain):
        with at(where, file):
            return Reference(path=_resolve(value, base_dir))
    expected = (
        "a file path (string) or a table with path or embeds"
        if file
        else "a Reference, a file path, a PIL image, bytes or a dict with path or embeds"
    )
    fail(where, f"got {shown(value)}; expected {expected}")


def _as_references(value: Any, where: str, file: bool, base_dir: Path | None) -> list[Reference]:
    """A list of references; a single entry counts as a list of one."""
    single = (str, Path, Mapping) if file else (str, Path, Image.Image, bytes, bytearray, Mapping, Reference)
    if isinstance(value, single):
        value = [value]
    if not isinstance(value, list | tuple):
        what = "(file paths, or tables with path or embeds)" if file else "(Reference, path or PIL image)"
        fail(where, f"got {shown(value)}; expected a list of reference images {what}")
    if not value:
        add = 'add [[adapter.image]] with path = "ref.png"' if file else "pass e.g. images=['ref.png']"
        fail(where, f"is empty; expected at least one reference image; {add}")
    return [_as_reference(item, f"{where}[{j}]", file, base_dir) for j, item in enumerate(value)]


@dataclass(kw_only=True)
class Control:
    """How one adapter uses its references in a call (the adapter file itself is not named here).

    - ``images``: the references, at least one. Plain paths, PIL images, bytes and dicts are wrapped into
      :class:`Reference`; a single one may be given without a list. Stored as a list of Reference.
    - ``scale``: finite >= 0, or None for the adapter's own scale.
    - ``combine``: how several references become one prompt: ``concat`` (default: the tokens of every reference
      side by side, each weighted; masks allowed) | ``average`` | ``norm-average`` (weighted means; the weights
      must sum to more than 0) | ``add`` | ``subtract`` (the first minus the others; at least 2 references).
    - ``start`` / ``end``: the part of the denoising run the adapter acts in, as fractions:
      ``0 <= start < end <= 1`` (default the whole run).
    - ``preset``: a layer preset from :data:`ipadapter.prompt.blocks.PRESET_NAMES` (e.g. ``style``), or None.
    - ``composition_weight``: finite >= 0 (default 1.0): the composition blocks' weight in ``style+composition``.
    - ``layer_weights``: per transformer-block weights; keys ``"t3"``, ``"3"`` or ``3`` are stored as ``"t3"``,
      values finite >= 0. Indices are checked against the UNet when attached, not here.
    - ``curve``: a scale curve over the layers from :data:`ipadapter.prompt.blocks.CURVE_NAMES`, or None.
    - ``negative_image``: an image whose features replace the empty negative (file path or PIL image), or None.
    - ``composition_image``: style and composition from two images: this image drives the composition blocks, the
      references the others (SD1.5 / SDXL; the preset defaults to ``style+composition``).
    - ``style_boost`` / ``composition_boost``: the boosts of the ``style-precise`` / ``composition-precise``
      presets (absolute block weights, as in ComfyUI).
    - ``negative_noise`` (``fade`` | ``dissolve`` | ``gaussian`` | ``shuffle``), ``negative_noise_strength``,
      ``negative_noise_blur``, ``noise_seed``: a negative image made of noise (over ``negative_image`` if given).
    - ``embeds_scaling``: ``V only`` (default) | ``K+V`` | ``K+V w/ C penalty`` | ``K+mean(V) w/ C penalty``.
    - ``unfold_batch``: one reference per generated image / frame (a shorter list repeats its last one).
    - ``sharpening``: tiled references' sharpening (0-1). ``enhance_tiles`` / ``enhance_ratio``: the ClipVision
      enhancer (also encode N x N tiles of each reference and merge their features).
    - ``encode_batch_size``: images per image-encoder call (0 = one at a time).
    The fields' ranges and defaults are declared in :data:`ipadapter.prompt.controls.CONTROLS`.
    """

    images: list[Reference]
    scale: float | None = None
    combine: str = "concat"
    start: float = 0.0
    end: float = 1.0
    preset: str | None = None
    composition_weight: float = 1.0
    composition_image: str | Path | Image.Image | None = None
    style_boost: float | None = None
    composition_boost: float | None = None
    layer_weights: dict[str, float] | None = None
    curve: str | None = None
    negative_image: str | Path | Image.Image | None = None
    negative_noise: str | None = None
    negative_noise_strength: float = 1.0
    negative_noise_blur: int = 0
    noise_seed: int | None = None
    embeds_scaling: str = "V only"
    unfold_batch: bool = False
    sharpening: float = 0.0
    enhance_tiles: int = 1
    enhance_ratio: float = 1.0
    encode_batch_size: int = 0
    lora_scale: float | None = None
    s_scale: float | None = None
    face_index: str | int | None = None
    face_model_root: str | None = None
    plus_version: str | None = None

    def __post_init__(self) -> None:
        here = place_of(self)
        self._check_own(here)
        key = "image" if here.file else "images"
        self.images = _as_references(self.images, key_path(here.where, key), here.file, None)
        for name, option in CONTROLS.items():
            setattr(self, name, control_field(getattr(self, name), option, here))
        if self.start >= self.end:
            fail(
                here.where,
                f"start = {self.start!r} is not before end = {self.end!r}; expected 0 <= start < end <= 1 (the adapter acts from start to end of the run); make start smaller than end",
            )
        self._check_combine(here, key)

    def _check_own(self, here: Where) -> None:
        """Hook for subclasses: check their own fields first."""

    def _check_combine(self, here: Where, key: str) -> None:
        combine = example_of(here, "combine", '"concat"' if here.file else "'concat'")
        for j, ref in enumerate(self.images):
            if ref.mask is not None and self.combine != "concat":
                fail(
                    key_path(here.where, f"{key}[{j}].mask"),
                    f"a mask needs {combine} (each masked reference drives its own region), but combine is {self.combine!r}, which merges the references; use {combine} or remove the mask",
                )
        if self.combine == "subtract" and len(self.images) < 2:
            fail(
                key_path(here.where, key),
                f"combine 'subtract' takes the first reference minus the others, so it needs at least 2 references; got {len(self.images)}; add a reference or use another combine mode",
            )
        if self.combine in ("average", "norm-average") and sum(ref.weight for ref in self.images) <= 0:
            fail(
                key_path(here.where, key),
                f"the weights sum to 0, but combine {self.combine!r} divides by their sum; give at least one reference a weight > 0",
            )


@dataclass(kw_only=True)
class AdapterRecipe(Control):
    """One adapter of a recipe: which adapter to attach, and its :class:`Control`.

    - ``path``: the adapter: a local file, a hub path (``owner/repo/file.safetensors``) or a name (e.g. ``mini``).
      A :class:`~pathlib.Path` is stored as str.
    - ``image_encoder``: the image encoder (local folder or hub path), or None to find it next to the adapter.
    - ``lora_file``: a FaceID adapter's LoRA as a separate ``.safetensors`` (replaces the one in its file).
    - ``scale``: None means 1.0 when the adapter is attached.
    """

    path: str
    image_encoder: str | None = None
    lora_file: str | None = None

    def _check_own(self, here: Where) -> None:
        self.path = str(as_file(self.path, here, "path"))
        if self.image_encoder is not None:
            self.image_encoder = str(as_file(self.image_encoder, here, "image_encoder"))
        if self.lora_file is not None:
            self.lora_file = str(as_file(self.lora_file, here, "lora_file"))


@dataclass
class Recipe:
    """A whole image prompt: one or more adapters, each with its references and controls.

    Build it in Python, or read it with :meth:`load` (a ``.toml`` or ``.json`` file) / :meth:`from_dict` (a
    parsed file or a JSON body). Only the recipe file itself is read; :meth:`check_files` tells whether the
    files it names exist.
    """

    adapters: list[AdapterRecipe]
    _source: str | None = field(
        default=None, init=False, repr=False, compare=False
    )  # file name, for messages

    def __post_init__(self) -> None:
        adapters = self.adapters
        if isinstance(adapters, AdapterRecipe):
            adapters = [adapters]
        if not isinstance(adapters, list | tuple):
            fail("Recipe.adapters", f"got {shown(adapters)}; expected a list of AdapterRecipe")
        if not adapters:
            fail("Recipe.adapters", "is empty; expected at least one AdapterRecipe(path=..., images=[...])")
        for i, entry in enumerate(adapters):
            if not isinstance(entry, AdapterRecipe):
                fail(
                    f"Recipe.adapters[{i}]",
                    f"got {shown(entry)}; expected an AdapterRecipe (a Control with the adapter's path)",
                )
        self.adapters = list(adapters)

    # -- reading ------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: str | Path | None = None, source: str = "recipe"
    ) -> Recipe:
        """Build a recipe from the file structure ``{"adapter": [{..., "image": [...]}, ...]}``.

        ``base_dir`` (the recipe file's folder) resolves relative paths: images, masks, embeds and the negative
        image always; the adapter ``path`` and ``image_encoder`` only when that file or folder exists there
        (otherwise they are hub paths or names and stay as given). ``source`` names the data in messages.
        Raises InputError for unknown keys, wrong types, and every rule of the dataclasses.
        """
        base = None if base_dir is None else Path(base_dir)
        if not isinstance(data, Mapping):
            fail(source, f"got {shown(data)}; expected a table with [[adapter]] entries")
        _check_keys(data, _RECIPE_KEYS, source)
        if "adapter" not in data:
            fail(
                source,
                'no [[adapter]] entries; add at least one [[adapter]] table with path = "..." and an image',
            )
        entries = data["adapter"]
        if isinstance(entries, Mapping):
            entries = [entries]
        if not isinstance(entries, list | tuple):
            fail(f"{source}: adapter", f"got {shown(entries)}; expected a list of [[adapter]] tables")
        if not entries:
            fail(
                f"{source}: adapter",
                'is empty; add at least one [[adapter]] table with path = "..." and an image',
            )
        recipe = cls(
            [_adapter_from_dict(entry, f"{source}: adapter[{i}]", base) for i, entry in enumerate(entries)]
        )
        recipe._source = source
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a ``.toml`` or ``.json`` recipe file; relative paths in it are relative to its folder.

        Raises InputError for a missing or unreadable file, another suffix, a syntax error (with the parser's
        line and column) and anything :meth:`from_dict` refuses.
        """
        path = Path(path)
        kind = path.suffix.lower()
        if kind not in (".toml", ".json"):
            fail(f"recipe file '{path}'", "has an unknown suffix; expected a .toml or .json file; rename it")
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            fail(f"recipe file '{path}'", f"{what}; expected a .toml or .json recipe file; check the path")
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Windows editors) is fine
        except UnicodeDecodeError:
            fail(f"recipe file '{path}'", "is not UTF-8 text; save it as UTF-8")
        except OSError as e:
            fail(f"recipe file '{path}'", f"cannot be read ({e.strerror or e}); check its permissions")
        deep = "nests lists or tables too deeply to read; a recipe is a few levels deep: fix the file"
        try:
            data = tomllib.loads(text) if kind == ".toml" else json.loads(text)
        except RecursionError:
            fail(f"recipe file '{path}'", deep)
        except tomllib.TOMLDecodeError as e:
            fail(str(path), f"not valid TOML ({e}); fix the syntax there")
        except json.JSONDecodeError as e:
            fail(
                str(path),
                f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the syntax there",
            )
        try:
            return cls.from_dict(data, base_dir=path.absolute().parent, source=str(path))
        except RecursionError:
            fail(f"recipe file '{path}'", deep)

    # -- writing and checking -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The file structure (``{"adapter": [...]}``); None fields and controls at their declared defaults are
        left out, paths become strings.

        :meth:`from_dict` of the result gives an equal recipe. Raises InputError for a PIL image or bytes,
        which cannot be written to a file.
        """
        adapters = []
        for i, entry in enumerate(self.adapters):
            where, key = self._where(i)
            out: dict[str, Any] = {"path": entry.path}
            for name in _ADAPTER_KEYS[1:-1]:
                value = getattr(entry, name)
                if name in IMAGE_CONTROLS:
                    value = _writable(value, key_path(where, name))
                elif name == "layer_weights" and value is not None:
                    value = dict(value)
                default = CONTROLS[name].default if name in CONTROLS else None
                if value is not None and (default is None or value != default):
                    out[name] = value
            out["image"] = [
                _reference_dict(ref, key_path(where, f"{key}[{j}]")) for j, ref in enumerate(entry.images)
            ]
            adapters.append(out)
        return {"adapter": adapters}

    def check_files(self) -> None:
        """Check that every local file the recipe names (images, masks, embeds, negative images) is a file.

        Adapter and image encoder paths are not checked here (they may be hub paths or names). Raises
        InputError naming the key path of the first missing one.
        """
        for i, entry in enumerate(self.adapters):
            where, key = self._where(i)
            for j, ref in enumerate(entry.images):
                for name in ("path", "embeds", "mask"):
                    _check_file(getattr(ref, name), key_path(where, f"{key}[{j}].{name}"))
            for name in IMAGE_CONTROLS:
                _check_file(getattr(entry, name), key_path(where, name))

    def _where(self, i: int) -> tuple[str, str]:
        """The i-th adapter's place in messages, and the key of its image list."""
        if self._source is None:
            return f"Recipe.adapters[{i}]", "images"
        return f"{self._source}: adapter[{i}]", "image"


# ----------------------------------------------------------------------------------------------------------
# Parsing helpers.


def _check_keys(table: Mapping[Any, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [key for key in table if key not in valid]
    if not unknown:
        return
    hints = [m for key in unknown if isinstance(key, str) for m in difflib.get_close_matches(key, valid, n=1)]
    hint = f" (did you mean {', '.join(repr(h) for h in hints)}?)" if hints else ""
    names = ", ".join(repr(key) for key in unknown)
    plural = "s" if len(unknown) > 1 else ""
    fail(where, f"unknown key{plural} {names}{hint}; valid keys here: {listed(valid)}; fix or remove it")


def _resolve(value: Any, base_dir: Path | None) -> Any:
    """A relative path string made relative to ``base_dir``; anything else unchanged."""
    if base_dir is None or not isinstance(value, str) or not value.strip() or Path(value).is_absolute():
        return value
    return str(base_dir / value)


def _resolve_if_exists(value: Any, base_dir: Path | None) -> Any:
    """Like :func:`_resolve`, but only when the file or folder exists there (else a hub path or a name)."""
    resolved = _resolve(value, base_dir)
    return resolved if resolved is not value and Path(resolved).exists() else value


def _adapter_from_dict(entry: Any, where: str, base_dir: Path | None) -> AdapterRecipe:
    if not isinstance(entry, Mapping):
        fail(where, f"got {shown(entry)}; expected an [[adapter]] table with path and image")
    _check_keys(entry, _ADAPTER_KEYS, where)
    if "path" not in entry:
        fail(where, "missing key 'path'; add path = \"<adapter file, hub path or name>\"")
    if "image" not in entry:
        fail(
            where,
            'missing key \'image\'; add at least one [[adapter.image]] with path = "ref.png" (or image = ["ref.png"])',
        )
    kwargs = {key: value for key, value in entry.items() if key != "image"}
    kwargs["path"] = _resolve_if_exists(kwargs["path"], base_dir)
    if "image_encoder" in kwargs:
        kwargs["image_encoder"] = _resolve_if_exists(kwargs["image_encoder"], base_dir)
    for name in IMAGE_CONTROLS:
        if name in kwargs:
            kwargs[name] = _resolve(kwargs[name], base_dir)
    kwargs["images"] = _as_references(entry["image"], key_path(where, "image"), True, base_dir)
    with at(where, True):
        return AdapterRecipe(**kwargs)


def _writable(value: Any, loc: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    fail(loc, f"{shown(value)} cannot be written to a recipe file; save it to a file and give its path")


def _reference_dict(ref: Reference, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _REFERENCE_KEYS:
        value = getattr(ref, name)
        if name in ("path", "embeds", "face", "mask"):
            value = _writable(value, key_path(where, name))
        if value is not None:
            out[name] = value
    return out


def _check_file(value: Any, loc: str) -> None:
    if not isinstance(value, str | Path):
        return  # None, a PIL image or bytes: nothing on disk
    path = Path(value)
    if not path.exists():
        fail(
            loc,
            f"no such file '{path}'; check the path (relative paths in a recipe file are relative to its folder)",
        )
    if not path.is_file():
        fail(loc, f"'{path}' is not a file (a folder?); expected an image or embeddings file")
