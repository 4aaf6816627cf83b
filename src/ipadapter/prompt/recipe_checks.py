"""How a recipe checks its values and names the place of a problem.

A problem is reported at its place: a file's key path, set by the parser (``ip.toml: adapter[1].image[0].weight``),
or the class and field being built in Python (``Reference.weight``). The field checks here are shared by the
recipe's dataclasses (:mod:`ipadapter.prompt.recipe`); the control fields follow their declarations
(:data:`~ipadapter.prompt.controls.CONTROLS`).
"""

from __future__ import annotations

import contextvars
import math
import numbers
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image

from ..errors import InputError
from ..fields import Option

# ----------------------------------------------------------------------------------------------------------
# Where an error is: a file's key path (set by the parser) or the class being built in Python.


@dataclass(frozen=True)
class Where:
    where: str  # e.g. "ip.toml: adapter[0]" or "Control.images[1]"
    file: bool  # file key names ("image") and TOML examples, or Python field names ("images")


_HERE: contextvars.ContextVar[Where | None] = contextvars.ContextVar("ipadapter_recipe_where", default=None)


@contextmanager
def at(where: str, file: bool) -> Iterator[None]:
    """Build objects inside this block as if they sat at ``where`` (their errors say so)."""
    token = _HERE.set(Where(where, file))
    try:
        yield
    finally:
        _HERE.reset(token)


def place_of(obj: object) -> Where:
    """The place being built: the parser's, or the object's class name when built directly in Python."""
    here = _HERE.get()
    _HERE.set(None)  # nested objects built later (outside an at block) must not inherit it
    return here if here is not None else Where(type(obj).__name__, False)


def key_path(where: str, key: str) -> str:
    return where if not key else f"{where}{key}" if key.startswith("[") else f"{where}.{key}"


def fail(loc: str, message: str) -> NoReturn:
    """Raise the one-line InputError ``<loc>: <message>``."""
    raise InputError(re.sub(r"[\r\n]+", " ", f"{loc}: {message}"))


def shown(value: Any) -> str:
    """A short one-line picture of a received value and its type."""
    if isinstance(value, Image.Image):
        return f"a PIL image ({value.mode}, {value.width}x{value.height})"
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kind = {bool: "a boolean", str: "a string", int: "an integer", float: "a number"}.get(type(value))
    if kind is None:
        kind = (
            "a table" if isinstance(value, Mapping) else "a list" if isinstance(value, list | tuple) else None
        )
    return f"{text} ({kind or type(value).__name__})" if value is not None else "null/None"


def example_of(here: Where, key: str, value: str) -> str:
    return f"{key} = {value}" if here.file else f"{key}={value}"


def listed(names: tuple[str, ...]) -> str:
    return ", ".join(names)


# ----------------------------------------------------------------------------------------------------------
# Field checks shared by the dataclasses.


def as_number(value: Any, here: Where, key: str, example: str) -> float:
    """A finite real number (not a bool) as float."""
    loc = key_path(here.where, key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(loc, f"got {shown(value)}; expected a number; write e.g. {example_of(here, key, example)}")
    try:
        number = float(value)
    except (OverflowError, ValueError):
        number = math.inf
    if not math.isfinite(number):
        fail(loc, f"got {value!r}; expected a finite number; write e.g. {example_of(here, key, example)}")
    return number


def as_weight(value: Any, here: Where, key: str, example: str = "0.8") -> float:
    """A finite number >= 0 as float."""
    number = as_number(value, here, key, example)
    if number < 0:
        fail(
            key_path(here.where, key),
            f"got {value!r}; expected a number >= 0; write e.g. {example_of(here, key, example)}",
        )
    return number


def as_choice(value: Any, names: tuple[str, ...], here: Where, key: str, optional: bool) -> Any:
    if (value is None and optional) or (isinstance(value, str) and value in names):
        return value
    leave = " (or leave it out)" if optional else ""
    fail(
        key_path(here.where, key),
        f"got {shown(value)}; expected one of {listed(names)}{leave}; use one of those names",
    )


def control_field(value: Any, option: Option, here: Where) -> Any:
    """A control field checked against its declaration (:data:`~ipadapter.prompt.controls.CONTROLS`)."""
    key = option.name
    if value is None and option.default is None:
        return None
    if option.kind == "choice":
        return as_choice(value, option.choices, here, key, optional=option.default is None)
    if option.kind == "weights":
        return as_layer_weights(value, here, key)
    if option.kind == "image":
        return as_optional_file(value, here, key, image=True)
    if option.kind == "model":
        return as_optional_file(value, here, key)
    if option.kind == "bool":
        if not isinstance(value, bool):
            fail(key_path(here.where, key), f"got {value!r}; expected true or false")
        return value
    if option.kind == "text":  # e.g. face_index: largest / score / all / 0 (checked where it is used)
        if isinstance(value, bool) or not isinstance(value, str | int):
            fail(
                key_path(here.where, key),
                f"got {value!r}; expected text, e.g. {example_of(here, key, option.example)}",
            )
        return value
    if value is None:  # the scale: None means the adapter's own
        return None
    number = as_number(value, here, key, option.example)
    if option.kind == "int":
        if float(number) != int(number):
            fail(key_path(here.where, key), f"got {value!r}; expected a whole number, e.g. {option.example}")
        number = int(number)
    if (option.low is not None and number < option.low) or (option.high is not None and number > option.high):
        expected = option.expected()
        fail(
            key_path(here.where, key),
            f"got {value!r}; expected {expected}; write e.g. {example_of(here, key, option.example)}",
        )
    return number


def as_file(value: Any, here: Where, key: str, *, image: bool = False, data: bool = False) -> Any:
    """A file reference: a non-empty path (str/Path); in Python also a PIL image (``image``) or bytes (``data``)."""
    loc = key_path(here.where, key)
    ok: tuple[type, ...] = (str, Path)
    if not here.file:
        ok += (Image.Image,) * image + (bytes, bytearray) * data
    if not isinstance(value, ok):
        if here.file:
            expected = "a file path (a string)"
        else:
            expected = (
                "a file path (str or Path)" + ", a PIL image" * image + " or bytes (encoded image)" * data
            )
        fail(loc, f"got {shown(value)}; expected {expected}")
    empty = (
        not value.strip() if isinstance(value, str) else isinstance(value, bytes | bytearray) and not value
    )
    if empty:
        fail(
            loc,
            "got an empty path; expected a file path; give the file's path or leave the key out",
        )
    return value


def as_face(value: Any, here: Where) -> Any:
    """A FaceID reference's face: a file path (face embeddings or a face image); in Python also embeddings (an
    array, a tensor, FaceEmbeds) or a PIL image, checked when they are read."""
    if value is None:
        return None
    if isinstance(value, str | Path):
        return as_file(value, here, "face")
    if not here.file and not isinstance(value, bool | int | float | bytes):
        return value
    fail(
        key_path(here.where, "face"),
        f"got {value!r:.60}; expected a face-embeddings file (.npy / .safetensors) or a face image file",
    )


def as_optional_file(value: Any, here: Where, key: str, *, image: bool = False) -> Any:
    return None if value is None else as_file(value, here, key, image=image)


def as_layer_weights(value: Any, here: Where, key: str = "layer_weights") -> dict[str, float] | None:
    """``{"t3": 0.5, ...}`` from keys ``"t3"`` / ``"3"`` / ``3`` and finite weights >= 0."""
    if value is None:
        return None
    loc = key_path(here.where, key)
    example = "{ t3 = 1.0, t6 = 0.5 }" if here.file else "{'t3': 1.0, 't6': 0.5}"
    if not isinstance(value, Mapping):
        fail(loc, f"got {shown(value)}; expected a table of transformer-block weights like {example}")
    if not value:
        fail(loc, f"is empty; expected at least one block weight like {example}, or leave {key} out")
    out: dict[str, float] = {}
    for raw, weight in value.items():
        match = re.fullmatch(r"[tT]?(\d+)", raw.strip()) if isinstance(raw, str) else None
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            index = raw
        elif match is not None:
            index = int(match.group(1))
        else:
            fail(
                loc,
                f"key {raw!r} is not a transformer-block index; expected keys like 't3' or '3' (block index >= 0), e.g. {example}",
            )
        name = f"t{index}"
        if name in out:
            fail(loc, f"block {name} is given twice (key {raw!r}); give each block once")
        sub = f"{key}.{raw}" if isinstance(raw, str) and re.fullmatch(r"[\w-]+", raw) else f"{key}[{raw!r}]"
        out[name] = as_weight(weight, here, sub, "1.0")
    return out
