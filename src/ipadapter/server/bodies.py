"""A request body (JSON) -> a checked :class:`~ipadapter.jobs.engine.Job`, through ``job_from_options``.

The body holds the command line's generation options (:data:`ipadapter.jobs.engine.OPTIONS`) with images as
base64 data instead of paths. The server fills in what it serves (base, base config, image encoder, motion
adapter); adapters and ControlNets are picked by the names the server was started with. Nothing a client sends
can name a file or a model the server was not started with: a string that is not base64 image data is refused.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import InputError
from ..fields import Option
from ..jobs.job import Job
from ..jobs.options import OPTIONS, SET_BY_SERVER, Limits, job_from_options
from ..modes import MODES
from ..prompt.images import load_image
from .config import ServerConfig

MAX_IMAGES = 16  # num_images per request
MAX_FRAMES = 64  # video frames per request
MAX_STEPS = 500  # denoising steps per request

_IMAGE = {"type": "string", "description": "base64 image data (PNG, JPEG, WebP...); a data: URL works too"}
# What the server reads differently from a file-based front end, in the schema's words.
_SERVER_HELP = {
    "adapter": "a served adapter's name (GET /v1/models); default: the first",
    "controlnet": "served ControlNet name(s), one control image each",
    "image": "reference image(s): base64 data, each optionally ending in :WEIGHT; one, or a list",
    "recipe": "a whole recipe (recipe files' schema); every image, mask, negative_image and composition_image "
    "path holds base64 data, every adapter path a served adapter's name",
}


def _schema(option: Option) -> dict[str, Any]:
    """The JSON schema of ``option``'s value, from its declaration."""
    one: dict[str, Any]
    if option.kind in ("int", "number"):
        one = {"type": "integer" if option.kind == "int" else "number"}
        if option.low is not None:
            one["exclusiveMinimum" if option.low_open else "minimum"] = option.low
        if option.high is not None:
            one["maximum"] = option.high
        if option.multiple:
            one["multipleOf"] = option.multiple
    elif option.kind == "bool":
        one = {"type": "boolean"}
    elif option.kind == "choice":
        one = {"type": "string", "enum": list(option.choices)}
    elif option.kind == "weights":
        one = {"oneOf": [{"type": "string"}, {"type": "object", "additionalProperties": {"type": "number"}}]}
    elif option.kind == "recipe":
        one = {"type": "object"}
    elif option.kind == "faces":  # the server takes a face's embedding (no server-side files)
        one = {"type": "array", "items": {"type": "number"}, "minItems": 512, "maxItems": 512}
    elif option.kind == "image":
        one = {"oneOf": [_IMAGE, {"type": "array", "items": _IMAGE}]} if option.per_frame else dict(_IMAGE)
    else:
        one = {"type": "string"}
    schema = {"oneOf": [one, {"type": "array", "items": one}]} if option.many else one
    default = option.default if not isinstance(option.default, dict) else None
    extra = {"default": default} if default not in (None, "") else {}
    return {"description": _SERVER_HELP.get(option.name, option.help), **schema, **extra}


# key -> JSON schema of its value: every option of the table the server accepts.
FIELDS: dict[str, dict[str, Any]] = {
    name: _schema(option) for name, option in OPTIONS.items() if option.server is None
}
# What a request asks of its result besides the images (the command line's --influence-map, a manifest's key)
RESULT_FIELDS = ("influence_map",)
FIELDS["influence_map"] = {
    "type": "boolean",
    "default": False,
    "description": "also return influence maps (where each adapter / reference acted): per image a figure, and "
    "an overlay on the image per adapter / reference (the response's 'influence')",
}
REFUSED = {name: option.server for name, option in OPTIONS.items() if option.server is not None}
SERVER_KEYS = tuple(k for k, why in REFUSED.items() if why == SET_BY_SERVER)  # filled by the server

REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": FIELDS,
    "example": {"prompt": "a cat", "image": "<base64 PNG>", "scale": 0.7, "steps": 30, "seed": 0},
}


class NotJson(InputError):
    """The body is not a JSON object at all (HTTP 400, where a usable object with bad values gets 422)."""


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or NotJson saying where the syntax breaks."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise NotJson("the request body is not UTF-8 text; send a JSON object") from None
    except RecursionError:
        raise NotJson("the request body's JSON is nested too deeply; send a flat JSON object") from None
    except json.JSONDecodeError as e:
        raise NotJson(
            f"the request body is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); send a JSON "
            'object like {"prompt": "a cat", "image": "<base64>"}'
        ) from None
    if not isinstance(body, dict):
        raise NotJson(f"the request body is a JSON {type(body).__name__}; expected a JSON object")
    return body


_DATA_URL = re.compile(r"data:[\w.+-]*/?[\w.+-]*(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)


def _short(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def decode_image_data(value: Any, what: str, max_pixels: int) -> bytes:
    """Base64 image data (optionally a data: URL) -> the file's bytes, after checking its pixel count.

    Only the image header is read here: a picture over ``max_pixels`` is refused before it is decoded.
    """
    if not isinstance(value, str):
        raise InputError(f"{what}: got {type(value).__name__}; expected base64 image data (a string)")
    text = value.strip()
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    text = "".join(text.split())  # line-wrapped base64 is fine
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{what}: {_short(value)} is not base64 image data; paths are not accepted: send the image file's "
            "bytes, base64-encoded (a data: URL works too)"
        ) from None
    if not data:
        raise InputError(f"{what}: empty (0 bytes); send a PNG, JPEG or WebP image, base64-encoded")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise InputError(
            f"{what} is far larger than this server's limit of {max_pixels:,} pixels: downscale it first"
        ) from None
    except Exception:  # noqa: BLE001 - any failure to read a header means: not an image
        raise InputError(
            f"{what}: the base64 data ({len(data)} bytes) is not a readable image; expected a PNG, JPEG or WebP "
            "file, base64-encoded (paths are not accepted)"
        ) from None
    if width * height > max_pixels:
        raise InputError(
            f"{what} is {width}x{height} = {width * height:,} pixels; this server accepts at most "
            f"{max_pixels:,}: downscale it first"
        )
    return data


@dataclass
class Served:
    """What a request may use: the config's names and the modes the loaded base can run."""

    config: ServerConfig
    modes: list[str]
    native_size: int = 512  # the base's default width and height


@dataclass
class Prepared:
    """A request ready to run: its job (the queue's ticket takes it over)."""

    job: Job
    fps: float = 8.0


def _served_name(value: Any, names: list[str], key: str, what: str) -> None:
    if not isinstance(value, str) or value not in names:
        raise InputError(
            f"{key}: {value!r} is not a served {what}; served: {', '.join(names) or 'none'} (see GET /v1/models)"
        )


def _check_keys(body: dict[str, Any]) -> None:
    for key in body:
        if key in REFUSED:
            raise InputError(f"'{key}' {REFUSED[key]}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        near = [m for key in unknown for m in difflib.get_close_matches(str(key), FIELDS, n=1)]
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
        raise InputError(
            f"unknown key(s) {', '.join(map(repr, unknown))}{hint}; the fields are listed in GET /openapi.json "
            "(e.g. prompt, image, scale, steps, seed)"
        )


def _check_controlnets(body: dict[str, Any], config: ServerConfig) -> None:
    """Every ControlNet named is one this server serves (counts and scales: ``job_from_options``)."""
    nets = body.get("controlnet") or []
    for name in [nets] if isinstance(nets, str) else nets if isinstance(nets, list) else [nets]:
        _served_name(name, config.controlnets, "controlnet", "ControlNet")


def _recipe_options(recipe: Any, config: ServerConfig) -> Any:
    """The body's recipe with the server's image encoder filled in, after checking what it names."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("adapter"), dict | list):
        return recipe  # Recipe.from_dict says what is wrong with its structure
    entries = recipe["adapter"] if isinstance(recipe["adapter"], list) else [recipe["adapter"]]
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            out.append(entry)
            continue
        where = f"recipe: adapter[{i}]"
        if "image_encoder" in entry:
            raise InputError(f"{where}.image_encoder is set by the server; leave it out")
        if "path" in entry:
            _served_name(entry["path"], config.adapters, f"{where}.path", "adapter")
        images = entry.get("image")
        for j, ref in enumerate(images if isinstance(images, list) else [images]):
            if isinstance(ref, dict) and "embeds" in ref:
                raise InputError(f"{where}.image[{j}].embeds {REFUSED['embeds']}")
        extra = {"image_encoder": config.image_encoder} if config.image_encoder else {}
        out.append({**entry, **extra})
    return {**recipe, "adapter": out}


def options_from_body(body: dict[str, Any], served: Served) -> dict[str, Any]:
    """The body as ``job_from_options`` options: server keys filled in, served names and limits checked."""
    config = served.config
    _check_keys(body)
    options = dict(body)
    mode = body.get("mode") or "t2i"
    if isinstance(mode, str) and mode in MODES and mode not in served.modes:
        why = " (no motion adapter is served)" if mode == "video" else ""
        raise InputError(
            f"mode '{mode}' is not available on this server{why}; available: {', '.join(served.modes)}"
        )
    if body.get("recipe") is not None:
        options["recipe"] = _recipe_options(body["recipe"], config)
    else:
        options["adapter"] = body.get("adapter") or config.adapters[0]
        _served_name(options["adapter"], config.adapters, "adapter", "adapter")
        options["image_encoder"] = config.image_encoder
    _check_controlnets(body, config)
    options.pop("influence_map", None)  # the result's extra: build_request reads it
    options.update(base=config.base, base_config=config.base_config)
    if mode == "video":
        options["motion_adapter"] = config.motion_adapter
    return {k: v for k, v in options.items() if v is not None}


def build_request(body: dict[str, Any], served: Served) -> Prepared:
    """Check ``body`` and decode its images: a Job ready for the queue (InputError otherwise)."""
    max_pixels = served.config.max_pixels

    def locate(value: Any, what: str) -> Image.Image:
        """Base64 -> a decoded image in its own mode (the library converts it: RGB, or a grey mask)."""
        return load_image(decode_image_data(value, what, max_pixels), what, convert=lambda img: img.copy())

    limits = Limits(
        max_pixels=max_pixels,
        max_images=MAX_IMAGES,
        max_steps=MAX_STEPS,
        max_frames=MAX_FRAMES,
        raise_with=" on this server",
        side=served.native_size,
    )
    influence = body.get("influence_map", False)
    if not isinstance(influence, bool):
        raise InputError(f"influence_map: got {influence!r}; expected true or false")
    if influence and served.config.compile:
        raise InputError(
            "influence_map: this server runs a compiled denoiser (started with --compile), which cannot record "
            "influence maps; leave influence_map out, or use a server started without --compile"
        )
    job = job_from_options(options_from_body(body, served), locate=locate, record_paths=False, limits=limits)
    if influence:
        job = dataclasses.replace(job, influence=True)
    return Prepared(job, job.fps)
