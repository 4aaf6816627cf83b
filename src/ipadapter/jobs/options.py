"""Every generation option, declared once, and the one function that turns options into a :class:`Job`.

:data:`OPTIONS` is the table: the command line's flags (``cli.generate``), the server's request schema (and so
``/openapi.json``), batch manifest keys and the recipe's per-call fields (:mod:`ipadapter.prompt.controls`) are
made from it. :func:`job_from_options` is the only validator of a job's options: the command line, ``batch``
and the server all call it, each naming options in its own words (``spell``) and reading images its own way
(``locate``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from ..fields import Option, quoted, table
from ..modes import IMAGE_MODES, INIT_MODES, MODES, STRENGTH
from ..prompt.blocks import parse_layer_weights
from ..prompt.controls import CONTROLS, IMAGE_CONTROLS, REFERENCES
from ..prompt.images import image_key, load_image, load_mask
from ..prompt.recipe import AdapterRecipe, Recipe, Reference
from ..schedulers import SCHEDULERS
from .job import Job

SET_BY_SERVER = "is set by the server (see GET /v1/models); leave it out"

OPTIONS: dict[str, Option] = table(
    Option("mode", "choice", "what to make", default="t2i", choices=MODES),
    # the models
    Option("base", "model", "base model: diffusers folder, hub id, or single-file .safetensors/.ckpt",
           server=SET_BY_SERVER),
    Option("base_config", "model", "for a single-file base: a diffusers folder/hub id of the same family",
           server=SET_BY_SERVER),
    Option("adapter", "model", "adapter file, hub path owner/repo/path/in/repo.safetensors, or name (no "
           "adapter, recipe or image: the plain base model)"),
    Option("image_encoder", "model", "CLIP vision model folder or hub path (default: from the adapter's repo)",
           server=SET_BY_SERVER),
    Option("lora_file", "file", "FaceID: the adapter's LoRA as a separate .safetensors (h94's *_lora files; "
           "replaces the LoRA inside the adapter file)",
           server="is not accepted by the server (a file on the server's side); serve an adapter file that holds its LoRA"),
    Option("recipe", "recipe", "a recipe (a .toml/.json file, or a table): adapters, references and their "
           "options; replaces adapter, image and the image prompt options"),
    # the image prompt of a single adapter
    *REFERENCES.values(),
    *CONTROLS.values(),
    # text and sampling
    Option("prompt", "text", "text prompt", default=""),
    Option("negative_prompt", "text", "negative text prompt"),
    Option("steps", "int", "denoising steps (default: the pipeline's)", low=1),
    Option("guidance", "number", "classifier-free guidance (default: the pipeline's; Flux: its distilled "
           "guidance embedding)"),
    Option("true_cfg_scale", "number", "Flux only: true classifier-free guidance with the negative prompt and "
           "the negative image prompt, two transformer calls per step (diffusers' true_cfg_scale; default 1.0: "
           "off)", low=1, modes=IMAGE_MODES),
    Option("max_sequence_length", "int", "Flux / SD3 only: T5 prompt tokens (default: the pipeline's, 512 "
           "for Flux, 256 for SD3)", low=1, high=512, modes=IMAGE_MODES),
    Option("seed", "int", "seed of a CPU torch.Generator, as diffusers' examples use (default: random, "
           "reported)", low=0, high=2**64 - 1),
    Option("width", "int", "multiple of 8 (default: the model's native size, or the init image's)", low=8,
           multiple=8),
    Option("height", "int", "multiple of 8 (default: the model's native size, or the init image's)", low=8,
           multiple=8),
    Option("num_images", "int", "images to make", default=1, low=1, modes=IMAGE_MODES),
    Option("scheduler", "choice", "sampler (default: the base model's)", choices=tuple(sorted(SCHEDULERS))),
    # images to start from, and ControlNets
    Option("init", "image", "the image to start from (its size is the output size)", modes=INIT_MODES),
    Option("strength", "number", "how much to repaint", default=STRENGTH, low=0, low_open=True, high=1,
           modes=INIT_MODES,
           expect="a number in (0, 1]; 1.0 repaints everything, small values keep more of the init image"),
    Option("mask", "image", "greyscale mask: white = repaint, black = keep", modes=("inpaint",)),
    Option("controlnet", "model", "ControlNet folder or hub id; several, each with its control_image",
           many=True),
    Option("control_image", "image", "conditioning image per ControlNet, in the same order (a video: one "
           "for all frames, or one per frame)", many=True, per_frame=True),
    Option("control_scale", "number", "ControlNet strength: one for all or one per ControlNet (default 1.0)",
           many=True),
    # video
    Option("motion_adapter", "model", "AnimateDiff motion adapter: folder or hub id", modes=("video",),
           server=SET_BY_SERVER),
    Option("frames", "int", "number of frames", default=16, low=1, modes=("video",)),
    Option("fps", "number", "frames per second of the written video", default=8.0, low=0, low_open=True,
           high=120, modes=("video",)),
    Option("vae_slicing", "bool", "decode frames one by one (less memory)", default=False, modes=("video",)),
    Option("cpu_offload", "bool", "keep idle models in CPU memory (CUDA only; much less GPU memory, a bit "
           "slower)", default=False, modes=("video",),
           server="is a setting of the server's process, not of a request; leave it out"),
)  # fmt: skip

PROMPT_KEYS = ("adapter", "image_encoder", *REFERENCES, *CONTROLS)  # what makes an image prompt
CONTROL_KEYS = tuple(k for k in PROMPT_KEYS if k not in ("adapter", "image_encoder", "image", "scale"))
RECORDED_AS_GIVEN = ("image", "init", "mask", "control_image")  # recorded as the user named them
Spell = Callable[[str], str]
Locate = Callable[[str, str], Any]  # (value, what) -> something load_image reads


def split_weight(value: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (path, weight or None); a colon followed by a non-number belongs to the path."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, None


def near(value: str, base_dir: str | Path | None = None) -> str:
    """A relative path made relative to ``base_dir`` (``~`` expanded); absolute ones unchanged."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() or base_dir is None else Path(base_dir) / path)


def local_files(base_dir: str | Path | None = None) -> tuple[Locate, Locate]:
    """``locate`` and ``resolve_file`` for local files (relative paths relative to ``base_dir``): the command
    line's and batch's. ``resolve_file`` refuses a missing file, saying how to make an embeddings file."""

    def locate(value: str, what: str) -> str:
        return near(value, base_dir)

    def resolve_file(value: str, what: str) -> str:
        path = near(value, base_dir)
        if not Path(path).is_file():
            hint = "; make one with `ipadapter embed`" if what == "embeddings" else ""
            raise InputError(f"{what} '{path}': no such file{hint}")
        return path

    return locate, resolve_file


def plain_options(options: dict[str, Any]) -> bool:
    """True when ``options`` name no image prompt at all (no recipe, adapter, reference or image-prompt
    option): the job runs the plain base model."""
    return options.get("recipe") is None and all(options.get(k) in (None, [], "") for k in PROMPT_KEYS)


def per_frame_video(options: dict[str, Any]) -> bool:
    """Plain references for a video with no control options: one for all frames, or one per frame."""
    images = options.get("image") or []
    images = [images] if isinstance(images, str) else images
    plain = all(isinstance(v, str) and split_weight(v)[1] is None for v in images)
    return (
        options.get("mode") == "video"
        and not options.get("recipe")
        and plain
        and not any(options.get(k) not in (None, [], "") for k in CONTROL_KEYS)
    )


def fit_init(init: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """The init image at the requested size, cropped to multiples of 8 (what the VAE needs)."""
    if width or height:
        init = init.resize((width or init.width, height or init.height), Image.Resampling.BICUBIC)
    w, h = init.width // 8 * 8, init.height // 8 * 8
    return init if (w, h) == init.size else init.crop((0, 0, w, h))


@dataclass(frozen=True)
class Limits:
    """The most work one job may ask for, checked before any model loads (every front end has them).

    ``max_pixels``: width x height of an output image (and of an init image); ``max_images``: images per job
    (they run in chunks, so memory stays bounded; the limit bounds the time); ``max_steps``, ``max_frames``.
    ``raise_with``: how the message says to raise a limit, ``{flag}`` standing for the limit's flag
    (``--max-steps``); ``side``: the side assumed for an unset width or height (0: not checked).
    """

    max_pixels: int = 2048 * 2048
    max_images: int = 64
    max_steps: int = 500
    max_frames: int = 128
    raise_with: str = "; raise the limit with {flag} if the machine has the memory and the time"
    side: int = 0

    def check(self, o: dict[str, Any], where: str = "", spell: Spell = quoted) -> None:
        """Refuse checked options ``o`` that ask for more than the limits allow."""
        counts = (("steps", self.max_steps), ("num_images", self.max_images), ("frames", self.max_frames))
        for key, high in counts:
            value = o.get(key)
            if value is not None and value > high:
                raise InputError(
                    f"{where}{spell(key)} is {value}; at most {high} are allowed{self._raise(key)}"
                )
        width, height = (o.get(k) or self.side for k in ("width", "height"))
        if width and height:
            self.check_size(width, height, where)

    def check_size(self, width: int, height: int, where: str = "", what: str = "") -> None:
        """Refuse an image of ``width`` x ``height`` over ``max_pixels``."""
        if width * height > self.max_pixels:
            raise InputError(
                f"{where}{what}{width}x{height} = {width * height:,} pixels; at most {self.max_pixels:,} pixels "
                f"are allowed: ask for a smaller width/height{self._raise('pixels')}"
            )

    def _raise(self, key: str) -> str:
        name = {"num_images": "images"}.get(key, key)
        return self.raise_with.format(flag=f"--max-{name}")


def check_options(options: Any, where: str = "", spell: Spell = quoted) -> dict[str, Any]:
    """Every key known, every value of its declared type and bounds, only options of the job's mode.

    Returns the values normalised (lists for list-valued options, numbers as int/float, ``mode`` filled).
    """
    if not isinstance(options, dict):
        raise InputError(f"{where}a job must be a JSON object; got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        hints = [m for key in unknown for m in difflib.get_close_matches(key, OPTIONS, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise InputError(
            f"{where}unknown key(s) {', '.join(unknown)}{hint}; expected some of: {', '.join(OPTIONS)}"
        )
    checked = {key: OPTIONS[key].check(value, where, spell) for key, value in options.items()}
    mode = checked["mode"] = checked.get("mode") or "t2i"
    for key, value in checked.items():
        modes = OPTIONS[key].modes
        if (
            modes is not None
            and mode not in modes
            and value is not None
            and value is not False
            and value != []
        ):
            raise InputError(
                f"{where}{spell(key)} is for mode {' / '.join(modes)}; this job's mode is {mode}: leave it out"
            )
    if not checked.get("base"):
        raise InputError(f"{where}no base model: give {spell('base')}")
    return checked


def job_from_options(
    options: dict[str, Any],
    *,
    locate: Locate,
    resolve_file: Locate | None = None,
    base_dir: str | Path | None = None,
    where: str = "",
    spell: Spell = quoted,
    record_paths: bool = True,
    notice: Callable[[str], None] | None = None,
    limits: Limits = Limits(),  # noqa: B008 - frozen, never mutated
) -> Job:
    """A :class:`Job` from options as a JSON object (keys and values: :data:`OPTIONS`). The only validator.

    ``locate(value, what)`` turns an image value into something :func:`~ipadapter.prompt.images.load_image`
    reads (a path, or bytes); ``resolve_file(value, what)`` does the same for embeddings and recipe files
    (None: such files are refused). ``base_dir``: where relative paths inside a ``recipe`` table point.
    ``spell``: how messages name an option (``--num-images`` on the command line). ``record_paths``: the result
    records image values as given (paths); otherwise only their content hashes (the server's base64 data).
    ``notice``: told about adjustments (e.g. a mask read as greyscale). ``limits``: the most work the job may
    ask for. Every image is decoded here, so a bad one fails before any model loads.
    """
    o = check_options(options, where, spell)
    limits.check(o, where, spell)
    mode = o["mode"]
    recipe, per_frame = _image_prompt(o, resolve_file, base_dir, where, spell)
    loaded = None if recipe is None else load_recipe_inputs(recipe, locate, resolve_file, where)
    frames = o.get("frames") or 16
    if per_frame and loaded is not None and len(loaded.adapters[0].images) not in (1, frames):
        raise InputError(
            f"{where}{len(loaded.adapters[0].images)} reference images for {frames} frames; give one reference "
            "for all frames or one per frame"
        )
    job: dict[str, Any] = {
        "base": o["base"],
        "base_config": o.get("base_config"),
        "mode": mode,
        "recipe": loaded,
        "per_frame": per_frame,
        "prompt": o.get("prompt") or "",
        "negative_prompt": o.get("negative_prompt"),
        "steps": o.get("steps"),
        "guidance": o.get("guidance"),
        "true_cfg_scale": o.get("true_cfg_scale"),
        "max_sequence_length": o.get("max_sequence_length"),
        "seed": o.get("seed"),
        "num_images": o.get("num_images") or 1,
        "scheduler": o.get("scheduler"),
        "width": o.get("width"),
        "height": o.get("height"),
        "motion_adapter": o.get("motion_adapter"),
        "frames": frames,
        "fps": o.get("fps") or OPTIONS["fps"].default,
        "vae_slicing": bool(o.get("vae_slicing")),
        "cpu_offload": bool(o.get("cpu_offload")),
    }
    job.update(_start_images(o, locate, where, spell, notice, limits))
    job.update(_controlnets(o, frames, locate, where, spell))
    job["record"] = _record(options, o, recipe, loaded, per_frame, record_paths, job)
    return Job(**job)


def _image_prompt(
    o: dict[str, Any], resolve_file: Locate | None, base_dir: str | Path | None, where: str, spell: Spell
) -> tuple[Recipe | None, bool]:
    """(the recipe as given, its files not read yet; one reference per frame?): None for the plain base model."""
    if plain_options(o):
        return None, False
    value = o.get("recipe")
    if value is not None:
        clash = [spell(k) for k in PROMPT_KEYS if o.get(k) not in (None, [])]
        if clash:
            raise InputError(
                f"{where}{spell('recipe')} replaces {', '.join(clash)}: put them in the recipe or drop "
                f"{spell('recipe')}"
            )
        if isinstance(value, dict):
            recipe = Recipe.from_dict(value, base_dir=base_dir, source=f"{where}recipe")
            return recipe, False
        if resolve_file is None:
            raise InputError(f"{where}recipe files are not accepted here; send the recipe as a JSON object")
        recipe = Recipe.load(resolve_file(value, "recipe file"))
        recipe.check_files()
        return recipe, False
    start, end = o.get("start", 0.0), o.get("end", 1.0)
    start, end = 0.0 if start is None else start, 1.0 if end is None else end
    if not start < end:  # said in the options' words (the recipe would name its own fields)
        raise InputError(
            f"{where}{spell('start')} {start:g} {spell('end')} {end:g}: expected 0 <= start < end <= 1, the "
            "part of the denoising run the image prompt acts in; e.g. start 0.2, end 0.8"
        )
    recipe = recipe_from_options(o, where, spell)
    per_frame = per_frame_video(o)
    return recipe, per_frame


def recipe_from_options(options: dict[str, Any], where: str = "", spell: Spell = quoted) -> Recipe:
    """A one-adapter recipe from flag-style options (``adapter``, ``image``, ``embeds``, ``combine``, ...).

    Reference values stay as given (paths, or whatever the caller's ``locate`` understands later).
    """
    if not options.get("adapter"):
        raise InputError(
            f"{where}no adapter: give {spell('adapter')} (a file, hub path or name) or {spell('recipe')}"
        )
    kinds = (("image", "path"), ("embeds", "embeds"), ("face_embeds", "face"), ("face_image", "face"))
    refs = [
        (*(split_weight(v) if isinstance(v, str) else (np.asarray(v, dtype=np.float32)[None], None)), kind)
        for key, kind in kinds
        for v in as_list(options.get(key))
    ]
    if not refs:
        raise InputError(
            f"{where}no reference: give {spell('image')} (or {spell('embeds')}, a FaceID adapter's "
            f"{spell('face_embeds')} / {spell('face_image')}, or a recipe)"
        )
    masks = as_list(options.get("image_mask"))
    if masks and len(masks) != len(refs):
        raise InputError(
            f"{where}{len(masks)} image masks for {len(refs)} references; give one mask per reference (images "
            "first, then embeds, face embeddings, face images) or none"
        )
    crop = options.get("crop") or "center"
    references = [
        Reference(**{kind: path}, weight=1.0 if w is None else w, mask=masks[i] if masks else None, crop=crop)
        for i, (path, w, kind) in enumerate(refs)
    ]
    weights = options.get("layer_weights")
    if isinstance(weights, str):
        weights = parse_layer_weights(weights)
    names = [k for k in CONTROLS if k not in ("scale", "layer_weights")]  # those two: here and below
    control = {k: options[k] for k in names if options.get(k) is not None}
    scale = options.get("scale")
    entry = AdapterRecipe(
        path=options["adapter"],
        image_encoder=options.get("image_encoder"),
        lora_file=options.get("lora_file"),
        scale=1.0 if scale is None else scale,
        images=references,
        layer_weights=weights or None,
        **control,
    )
    return Recipe([entry])


def as_list(value: Any) -> list[Any]:
    """An option's value as a list: None is empty, one value is a list of one."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _face_input(value: Any, locate: Locate, resolve_file: Locate | None, where: str) -> Any:
    """A FaceID reference's face as given: a face-embeddings file (located), or a face image, decoded now."""
    if isinstance(value, str) and value.lower().endswith((".npy", ".safetensors")):
        if resolve_file is None:
            raise InputError(f"{where}: face-embeddings files are not accepted here; send the face image")
        return resolve_file(value, "face embeddings")
    return load_image(
        locate(value if isinstance(value, bytes) else str(value), "face image"), f"{where} face image"
    )


def _start_images(
    o: dict[str, Any],
    locate: Locate,
    where: str,
    spell: Spell,
    notice: Callable[[str], None] | None,
    limits: Limits,
) -> dict[str, Any]:
    """img2img / inpaint: the init image (at the asked size), the strength and the mask, decoded now."""
    mode = o["mode"]
    if mode not in INIT_MODES:
        return {}
    if not o.get("init"):
        raise InputError(f"{where}{mode} needs {spell('init')} (the image to start from)")
    init = load_image(locate(o["init"], "init image"), f"{where}init image")
    if min(o.get("width") or init.width, o.get("height") or init.height) < 8:
        raise InputError(
            f"{where}init image is {init.width}x{init.height}; expected at least 8x8 pixels (the VAE works on "
            "8-pixel blocks); give a larger image or ask for a larger width/height"
        )
    init = fit_init(init, o.get("width"), o.get("height"))
    limits.check_size(init.width, init.height, where, "the init image is ")
    strength = o.get("strength")
    out = {"init": init, "strength": OPTIONS["strength"].default_for(mode) if strength is None else strength}
    if mode == "inpaint":
        if not o.get("mask"):
            raise InputError(f"{where}inpaint needs {spell('mask')} (white = repaint)")
        out["mask"], note = load_mask(locate(o["mask"], "mask"), init.size)
        if note and notice is not None:
            notice(note)
    return out


def _controlnets(o: dict[str, Any], frames: int, locate: Locate, where: str, spell: Spell) -> dict[str, Any]:
    """ControlNets, one control image each (a video: a frame list each) and their scale(s), counts checked."""
    nets, images, scales = o.get("controlnet") or [], o.get("control_image") or [], o.get("control_scale")
    if len(images) != len(nets):
        raise InputError(
            f"{where}{len(nets)} {spell('controlnet')} but {len(images)} {spell('control_image')}; give one "
            "control image per ControlNet, in the same order"
        )
    if scales and not nets:
        raise InputError(
            f"{where}{spell('control_scale')} without {spell('controlnet')}; add a ControlNet and its control image"
        )
    if scales and len(scales) not in (1, len(nets)):
        raise InputError(
            f"{where}{len(scales)} {spell('control_scale')} values for {len(nets)} ControlNet(s); give one for "
            "all or one per ControlNet"
        )
    controls = []
    for i, value in enumerate(images):
        values = value if isinstance(value, list) else [value]
        loaded = [load_image(locate(v, "control image"), f"{where}control image") for v in values]
        if o["mode"] != "video":
            if len(loaded) != 1:
                raise InputError(
                    f"{where}{spell('control_image')} {i} is a list of {len(loaded)} images; image modes take "
                    "one control image per ControlNet"
                )
            controls.append(loaded[0])
        elif len(loaded) not in (1, frames):
            raise InputError(
                f"{where}control image {i} has {len(loaded)} images for {frames} frames; give one for all "
                "frames or one per frame"
            )
        else:
            controls.append(loaded * frames if len(loaded) == 1 else loaded)
    scale: float | list[float] = 1.0
    if scales:
        scale = scales[0] if len(nets) == 1 else scales * len(nets) if len(scales) == 1 else list(scales)
    return {"controlnets": list(nets), "control_images": controls, "control_scale": scale}


def _record(
    options: dict[str, Any],
    o: dict[str, Any],
    given: Recipe | None,
    loaded: Recipe | None,
    per_frame: bool,
    record_paths: bool,
    job: dict[str, Any],
) -> dict[str, Any]:
    """What the result records of the inputs: references (content hashes, and the recipe), and the files as
    the user named them (or, for data sent inline, their content hashes)."""
    record: dict[str, Any] = {}
    if loaded is not None:
        keys = [
            image_key(image)
            for entry in loaded.adapters
            for ref in entry.images
            if isinstance(image := ref.path if ref.path is not None else ref.face, Image.Image)
        ]
        record["image_sha1"] = keys[0] if len(keys) == 1 and o["mode"] != "video" else keys
        if o.get("recipe") is not None:
            record["adapter"] = [entry.path for entry in loaded.adapters]
        if not per_frame and record_paths:
            record["recipe"] = o["recipe"] if isinstance(o.get("recipe"), dict) else given.to_dict()
        elif not per_frame:
            record["recipe"] = recorded_recipe(loaded)
    if record_paths:
        record.update({k: options[k] for k in RECORDED_AS_GIVEN if options.get(k) not in (None, [])})
    else:
        record.update({f"{k}_sha1": image_key(job[k]) for k in ("init", "mask") if job.get(k) is not None})
    if o["mode"] == "video":
        record["fps"] = job["fps"]
    return record


def recorded_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a file would hold it, each image replaced by ``sha1:<content hash>`` (no pixel data)."""

    def named(value: Any) -> Any:
        if isinstance(value, np.ndarray):  # a face's embedding sent inline: its content hash, like an image
            return f"sha1:{hashlib.sha1(np.ascontiguousarray(value, dtype=np.float32).tobytes()).hexdigest()}"
        return f"sha1:{image_key(value)}" if isinstance(value, Image.Image) else value

    entries = [
        dataclasses.replace(
            entry,
            images=[
                dataclasses.replace(r, path=named(r.path), face=named(r.face), mask=named(r.mask))
                for r in entry.images
            ],
            **{name: named(getattr(entry, name)) for name in IMAGE_CONTROLS},
        )
        for entry in recipe.adapters
    ]
    return Recipe(entries).to_dict()


def load_recipe_inputs(
    recipe: Recipe,
    locate: Callable[[str, str], Any],
    resolve_file: Callable[[str, str], str] | None,
    where: str = "",
) -> Recipe:
    """The recipe with every image, mask and negative image decoded, and embeddings files located.

    Messages name a reference by its index only where its adapter has several (``image[1] reference image``),
    and the adapter only where the recipe has several.
    """
    entries = []
    for a, entry in enumerate(recipe.adapters):
        at = f"{where}adapter[{a}]." if len(recipe.adapters) > 1 else where
        refs = []
        for i, ref in enumerate(entry.images):
            label = f"{at}image[{i}] reference image" if len(entry.images) > 1 else f"{at}reference image"
            changes: dict[str, Any] = {}
            if isinstance(ref.path, str | bytes) or hasattr(ref.path, "__fspath__"):
                value = (
                    locate(str(ref.path), "reference image") if not isinstance(ref.path, bytes) else ref.path
                )
                changes["path"] = load_image(value, label)
            if isinstance(ref.face, str | bytes) or hasattr(ref.face, "__fspath__"):
                changes["face"] = _face_input(ref.face, locate, resolve_file, f"{at}image[{i}]")
            if ref.embeds is not None:
                if resolve_file is None:
                    raise InputError(
                        f"{at}image[{i}]: embeddings files are not accepted here; send the image"
                    )
                changes["embeds"] = resolve_file(str(ref.embeds), "embeddings")
            if isinstance(ref.mask, str) or hasattr(ref.mask, "__fspath__"):
                changes["mask"], _ = load_mask(locate(str(ref.mask), "mask"))
            refs.append(dataclasses.replace(ref, **changes) if changes else ref)
        changes = {"images": refs}
        for name in IMAGE_CONTROLS:  # negative_image, composition_image
            value = getattr(entry, name)
            if isinstance(value, str) or hasattr(value, "__fspath__"):
                what = name.replace("_", " ")
                changes[name] = load_image(locate(str(value), what), f"{at}{what}")
        entries.append(dataclasses.replace(entry, **changes))
    return Recipe(entries)
