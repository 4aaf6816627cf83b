"""A typed declaration of one option (name, type, bounds, choices, default, help) and its check.

Options are declared once, as rows of :class:`Option`: the per-call controls of an image prompt in
:mod:`ipadapter.prompt.controls`, every generation option in :mod:`ipadapter.jobs.options`. The command line's
flags, the server's JSON schema, batch manifest keys and the recipe's fields are made from those rows.
No torch here: the command line reads the rows before it loads anything.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InputError

# What a value may be, by kind. "image" / "file" / "model": a string naming one (a path, a hub id, base64 data
# on the server); "weights": per-block weights as text ("t3=0.5,t6=1") or a table; "recipe": a recipe table
# (or a recipe file's path); "faces": a face-embeddings file's path, or (JSON) a face's embedding as numbers.
KINDS = ("text", "int", "number", "bool", "choice", "image", "file", "model", "weights", "recipe", "faces")
_NAMED = {"image": "an image", "file": "a file path", "model": "a model name or path", "text": "a string"}


def quoted(key: str) -> str:
    """How messages name an option by default: ``'num_images'`` (the command line says ``--num-images``)."""
    return f"'{key}'"


@dataclass(frozen=True)
class Option:
    """One option. ``many``: a list (a repeated flag; in JSON one value or a list). ``modes``: the modes that
    take it (None: all). ``default``: what an unset option means (None: the pipeline's own default), or a
    mapping mode -> default. ``server``: why the server refuses the option (None: it accepts it).
    ``per_frame``: each value may itself be a list, one per video frame (one list item per ``many`` entry).
    ``expect``: how messages describe a valid value (default: from the kind and bounds); ``example``: a
    valid value, for messages."""

    name: str
    kind: str
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    multiple: int | None = None
    many: bool = False
    per_frame: bool = False
    modes: tuple[str, ...] | None = None
    server: str | None = None
    expect: str = ""
    example: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")

    @property
    def flag(self) -> str:
        """The command-line flag: ``--num-images``."""
        return "--" + self.name.replace("_", "-")

    def default_for(self, mode: str) -> Any:
        """The default in ``mode``."""
        return self.default.get(mode) if isinstance(self.default, dict) else self.default

    def expected(self) -> str:
        """What a valid value is, in words: "a whole number >= 1", "one of: ddim, euler"..."""
        if self.expect:
            return self.expect
        if self.kind == "choice":
            return "one of: " + ", ".join(self.choices)
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("int", "number"):
            text = "a whole number" if self.kind == "int" else "a finite number"
            low, high = (None if b is None else _shown(b, self.kind) for b in (self.low, self.high))
            if low is not None and high is not None and not self.low_open:
                text += f" in [{low}, {high}]"
            elif low is not None:
                text += f" {'>' if self.low_open else '>='} {low}" + (f" and <= {high}" if high else "")
            elif high is not None:
                text += f" <= {high}"
            return text + (f", a multiple of {self.multiple}" if self.multiple else "")
        if self.kind == "weights":
            return 'per-block weights such as "t3=0.5,t6=1" or {"t3": 0.5}'
        if self.kind == "recipe":
            return "a recipe (a table with [[adapter]] entries)"
        return _NAMED[self.kind]

    def check(self, value: Any, where: str = "", spell: Callable[[str], str] = quoted) -> Any:
        """``value`` checked against the declaration and normalised (numbers as int/float, lists for ``many``).

        None stays None. Raises InputError saying what was received and what is expected; ``spell`` names
        the option as the caller's front end does (``--steps``, ``'steps'``).
        """
        if value is None:
            return None
        if self.many:
            one_face = self.kind == "faces" and isinstance(value, list) and _numbers(value)
            values = [value] if one_face or not isinstance(value, list) else value
            return [self._one(v, where, spell) for v in values]
        return self._one(value, where, spell)

    def _one(self, value: Any, where: str, spell: Callable[[str], str]) -> Any:
        name = spell(self.name)
        if self.kind in ("int", "number"):
            return self._number(value, where, name)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InputError(f"{where}{name} is {value!r}; expected true or false")
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise InputError(f"{where}{name} is {value!r}; expected {self.expected()}")
            return value
        if self.kind == "weights":
            if not isinstance(value, str | dict):
                raise InputError(f"{where}{name} is {type(value).__name__}; expected {self.expected()}")
            return value
        if self.kind == "recipe":
            if not isinstance(value, str | dict):
                raise InputError(f"{where}{name} is {type(value).__name__}; expected {self.expected()}")
            return value
        if self.kind == "faces" and isinstance(value, list):
            if not value or not _numbers(value) or not all(math.isfinite(v) for v in value):
                raise InputError(
                    f"{where}{name} holds a list that is not a face embedding; expected a file path or a list of "
                    "finite numbers (512 per face, e.g. InsightFace's normed_embedding)"
                )
            return [float(v) for v in value]
        if self.per_frame and isinstance(value, list):
            return [self._text(v, where, name) for v in value]
        return self._text(value, where, name)

    def _text(self, value: Any, where: str, name: str) -> str:
        if not isinstance(value, str):
            what = f"{_NAMED.get(self.kind, 'a string')} (a string)"
            raise InputError(f"{where}{name} is {type(value).__name__}; expected {what}")
        return value

    def _number(self, value: Any, where: str, name: str) -> int | float:
        integer = self.kind == "int"
        kind = numbers.Integral if integer else numbers.Real
        finite = integer or (isinstance(value, numbers.Real) and math.isfinite(value))
        if isinstance(value, bool) or not isinstance(value, kind) or not finite:
            raise InputError(f"{where}{name} is {value!r}; expected {self.expected()}")
        low_fails = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        high_fails = self.high is not None and value > self.high
        if low_fails or high_fails or (self.multiple and value % self.multiple):
            hint = (
                f" (try {max(self.multiple, int(value) // self.multiple * self.multiple)})"
                if (self.multiple and not low_fails and not high_fails)
                else ""
            )
            raise InputError(f"{where}{name} is {value}; expected {self.expected()}{hint}")
        return int(value) if integer else float(value)


def _numbers(values: list) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def _shown(bound: float, kind: str) -> str:
    return str(int(bound)) if kind == "int" else f"{bound:g}"


def table(*options: Option) -> dict[str, Option]:
    """Rows by name, in the order given (a name twice is a programming error)."""
    out: dict[str, Option] = {}
    for option in options:
        if option.name in out:
            raise ValueError(f"option {option.name} is declared twice")
        out[option.name] = option
    return out
