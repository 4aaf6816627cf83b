"""Which transformer block each cross-attention layer belongs to, and per-block weights (DESIGN.md §3.2).

A UNet's transformer blocks (``down_blocks.i.attentions.j``, ``mid_block.attentions.j``,
``up_blocks.i.attentions.j``) are numbered t0, t1, ... in forward order: every down block, then the mid block,
then every up block. Every cross-attention inside one block shares that index, so SDXL (whose blocks hold several
``transformer_blocks.k``) has 11 indices and SD1.5 has 16. Presets (InstantStyle and community ones), explicit
``t3=0.5`` weights and curves turn into one weight per block; :func:`layer_scales` expands them to one multiplier
per cross-attention processor.

No torch or diffusers import here: the CLI imports this module for option parsing before the heavy libraries, and
the UNet is only read through ``attn_processors`` (its processor names).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, Protocol

from .errors import IncompatibleModelError, InputError

PRESET_NAMES = ("style", "composition", "style+composition", "strong-style")
CURVE_NAMES = (
    "ease-in",
    "ease-out",
    "ease-in-out",
    "reverse-in-out",
    "weak-input",
    "weak-output",
    "weak-middle",
    "strong-middle",
)

PART_NAMES = ("input", "middle", "output")
# Block counts the presets are defined for (DESIGN.md §3.2)
SD15_BLOCKS, SDXL_BLOCKS = 16, 11

_LAYER_WEIGHTS_SYNTAX = 'expected comma-separated "t<index>=<weight>" entries, e.g. "t3=0.5,t6=1.0"'
# "down_blocks.2.attentions.1" -> ("down_blocks", "2", "1"); the mid block has no block number
_BLOCK_RE = re.compile(r"^(?:(down_blocks|up_blocks)\.(\d+)|(mid_block))\.attentions\.(\d+)$")
_PART_OF = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}
# Curves that scale whole UNet parts by 0.2: which parts each one weakens
_PART_CURVES = {
    "weak-input": ("input",),
    "weak-output": ("output",),
    "weak-middle": ("middle",),
    "strong-middle": ("input", "output"),
}


class UNetLike(Protocol):
    """What this module reads from a UNet: the processor names (diffusers' ``attn_processors``)."""

    @property
    def attn_processors(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Block:
    """One transformer block of a UNet.

    ``index`` is t (forward order: down, mid, up); ``name`` is the Transformer2DModel's module path, e.g.
    ``"down_blocks.2.attentions.1"``; ``part`` is ``"input"`` (down), ``"middle"`` (mid) or ``"output"`` (up).
    """

    index: int
    name: str
    part: str


def is_cross_attention(name: str) -> bool:
    """Whether processor ``name`` (of ``unet.attn_processors``) is an IP-Adapter layer: the rule diffusers'
    loader uses too. AnimateDiff's motion modules hold attention layers, but temporal self-attention ones."""
    return name.endswith("attn2.processor") and "motion_modules" not in name


def block_map(unet: UNetLike) -> dict[str, Block]:
    """The transformer block of every cross-attention processor of ``unet``.

    Keys: the processor names :func:`is_cross_attention` accepts, in ``unet.attn_processors`` order. Values: the :class:`Block`
    holding it; all processors of one block share one ``Block``. Works for ``UNet2DConditionModel`` and
    ``UNetMotionModel``. Raises IncompatibleModelError if a cross-attention processor does not sit in a
    ``down_blocks.i.attentions.j`` / ``mid_block.attentions.j`` / ``up_blocks.i.attentions.j`` transformer block.
    """
    names = [name for name in unet.attn_processors if is_cross_attention(name)]
    block_of: dict[str, str] = {}
    sort_key: dict[str, tuple[int, int, int]] = {}
    for name in names:
        path = name.split(".transformer_blocks.", 1)[0]
        match = _BLOCK_RE.match(path)
        if ".transformer_blocks." not in name or match is None:
            raise IncompatibleModelError(
                f"cross-attention layer {name!r} is not inside a transformer block; expected names like "
                "'down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor' (a diffusers UNet2DConditionModel "
                "or UNetMotionModel); per-layer weights need such a UNet"
            )
        kind, number, mid, attention = match.groups()
        kind = kind or mid
        # Forward order: down (0) before mid (1) before up (2); attn_processors lists mid last, so sort explicitly.
        order = ("down_blocks", "mid_block", "up_blocks").index(kind)
        block_of[name] = path
        sort_key[path] = (order, int(number or 0), int(attention))
    ordered = sorted(sort_key, key=sort_key.__getitem__)
    blocks = {path: Block(t, path, _PART_OF[path.split(".", 1)[0]]) for t, path in enumerate(ordered)}
    return {name: blocks[block_of[name]] for name in names}


def _blocks(unet: UNetLike) -> list[Block]:
    """The distinct blocks of ``unet`` in t order."""
    return sorted(set(block_map(unet).values()), key=lambda block: block.index)


def describe_blocks(unet: UNetLike) -> str:
    """One line naming the UNet's blocks by t, grouped by down/mid/up block.

    E.g. ``"11 transformer blocks: t0-t1 down_blocks.1, t2-t3 down_blocks.2, t4 mid_block, t5-t7 up_blocks.0,
    t8-t10 up_blocks.1"``.
    """
    groups: dict[str, list[int]] = {}
    for block in _blocks(unet):
        # "down_blocks.2.attentions.1" -> "down_blocks.2"; "mid_block.attentions.0" -> "mid_block"
        group = block.name.rsplit(".attentions.", 1)[0]
        groups.setdefault(group, []).append(block.index)
    count = sum(len(indices) for indices in groups.values())
    parts = [
        f"t{ts[0]} {group}" if len(ts) == 1 else f"t{ts[0]}-t{ts[-1]} {group}" for group, ts in groups.items()
    ]
    return f"{count} transformer blocks" + (": " + ", ".join(parts) if parts else "")


def _weight_value(value: object, what: str) -> float:
    """A finite weight >= 0 from a number (bool and strings refused: a recipe's "0.5" or true is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{what} is {value!r}; expected a finite number >= 0, e.g. 0.5")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{what} is {value!r}; expected a finite number >= 0, e.g. 0.5")
    return number


def parse_layer_weights(text: str) -> dict[int, float]:
    """Parse the CLI form ``"t3=0.5,t6=1.0"`` into ``{3: 0.5, 6: 1.0}``.

    Spaces are allowed and the ``t`` is optional (``"3=0.5"``). Raises InputError on bad syntax, an empty
    string, a block given twice, or a weight that is not a finite number >= 0. Indices are not range-checked here
    (the UNet is not known yet): :func:`block_weights` does that.
    """
    if not text.strip():
        raise InputError(f"layer weights {text!r} are empty; {_LAYER_WEIGHTS_SYNTAX}")
    entries = [entry.strip() for entry in text.split(",")]
    weights: dict[int, float] = {}
    for entry in entries:
        match = re.fullmatch(r"[tT]?\s*(\d+)\s*=\s*(\S+)", entry)
        if match is None:
            raise InputError(
                f"layer weights {text!r}: entry {entry!r} is not understood; {_LAYER_WEIGHTS_SYNTAX}"
            )
        index, raw = int(match.group(1)), match.group(2)
        try:
            value = float(raw)
        except ValueError:
            raise InputError(
                f"layer weights {text!r}: weight {raw!r} of t{index} is not a number; {_LAYER_WEIGHTS_SYNTAX}"
            ) from None
        if not math.isfinite(value) or value < 0:
            raise InputError(
                f"layer weights {text!r}: weight {raw!r} of t{index} is not a finite number >= 0; "
                f"{_LAYER_WEIGHTS_SYNTAX}"
            )
        if index in weights:
            raise InputError(
                f"layer weights {text!r} give t{index} twice; give each block once ({_LAYER_WEIGHTS_SYNTAX})"
            )
        weights[index] = value
    return weights


def normalize_layer_weights(weights: Mapping[str | int, float]) -> dict[int, float]:
    """The recipe/API form of layer weights as ``{index: weight}``.

    Keys: ``"t3"``, ``"3"`` or ``3`` (not bool, not negative); values: finite numbers >= 0 (bool and strings
    refused). Raises InputError naming the bad key or value, or a block given twice (e.g. ``"t3"`` and ``3``).
    """
    if not isinstance(weights, Mapping):
        raise InputError(
            f"layer weights {weights!r} are not a mapping; expected e.g. {{'t3': 0.5, 't6': 1.0}}"
        )
    out: dict[int, float] = {}
    for key, value in weights.items():
        index = _layer_index(key)
        if index in out:
            raise InputError(f"layer weights give t{index} twice (key {key!r}); give each block once")
        out[index] = _weight_value(value, f"layer weight of {key!r}")
    return out


def _layer_index(key: object) -> int:
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str):
        match = re.fullmatch(r"\s*[tT]?(\d+)\s*", key)
        if match is not None:
            return int(match.group(1))
    raise InputError(
        f"layer weight key {key!r} is not a block index; expected 't3', '3' or 3 (t = block index >= 0)"
    )


def _preset_weights(preset: str, num_blocks: int, composition_weight: float, layout: str) -> dict[int, float]:
    """The preset's block weights (DESIGN.md §3.2); blocks not listed get 0."""
    c = composition_weight
    if num_blocks == SDXL_BLOCKS:
        # t3 = down_blocks.2.attentions.1 carries layout, t6 = up_blocks.0.attentions.1 carries style (InstantStyle)
        table = {
            "style": {6: 1.0},
            "composition": {3: 1.0},
            "style+composition": {3: c, 6: 1.0},
            "strong-style": {t: 1.0 for t in range(SDXL_BLOCKS) if t != 3},
        }
    elif num_blocks == SD15_BLOCKS:
        # SD1.5 has no single style block: community presets use the outer blocks for style, down_blocks.2 for layout
        style = {t: 1.0 for t in (*range(0, 4), *range(9, 16))}
        table = {
            "style": style,
            "composition": {4: 0.25, 5: 1.0},
            "style+composition": {**style, 4: 0.25 * c, 5: c},
            "strong-style": {t: 1.0 for t in range(SD15_BLOCKS) if t not in (4, 5)},
        }
    else:
        raise InputError(
            f"preset {preset!r} needs an SD1.5 ({SD15_BLOCKS} transformer blocks) or SDXL ({SDXL_BLOCKS}) UNet, "
            f"this one has {num_blocks}{layout}; give per-block weights instead (layer_weights, e.g. 't0=1.0,t2=0.5')"
        )
    return table[preset]


def _curve_factor(curve: str, t: int, n: int, part: str | None) -> float:
    if curve == "ease-in":
        return 0.05 + 0.95 * (1 - t / n)
    if curve == "ease-out":
        return 0.05 + 0.95 * (t / n)
    if curve == "ease-in-out":
        return 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2))
    if curve == "reverse-in-out":
        return 0.05 + 0.95 * (abs(t - n / 2) / (n / 2))
    return 0.2 if part in _PART_CURVES[curve] else 1.0


def block_weights(
    num_blocks: int,
    *,
    preset: str | None = None,
    composition_weight: float = 1.0,
    layer_weights: Mapping[str | int, float] | None = None,
    curve: str | None = None,
    parts: Sequence[str] | None = None,
) -> list[float]:
    """The weight of each block t (a list of ``num_blocks``), to be multiplied by the adapter scale.

    - Nothing given: every block 1.0.
    - ``preset`` and/or ``layer_weights``: start from 0.0 everywhere (unlisted blocks are off), apply the preset
      (SD1.5 or SDXL layout, told apart by ``num_blocks`` 16 / 11; ``composition_weight`` is the composition
      blocks' weight in ``"style+composition"``), then each ``layer_weights`` entry sets its block.
    - ``curve`` multiplies each block's weight on top (with nothing else given, it shapes the all-1.0 weights).
      The part-based curves (weak-input, weak-output, weak-middle, strong-middle) need ``parts``: each block's
      ``Block.part``.

    Raises InputError for an unknown preset or curve, a preset on a UNet that is neither 16 nor 11 blocks, a
    layer index >= ``num_blocks``, an empty ``layer_weights``, a bad ``composition_weight`` (not a finite number
    >= 0) or missing / mismatched ``parts``.
    """
    return _block_weights(num_blocks, preset, composition_weight, layer_weights, curve, parts, layout="")


def _block_weights(
    num_blocks: int,
    preset: str | None,
    composition_weight: float,
    layer_weights: Mapping[str | int, float] | None,
    curve: str | None,
    parts: Sequence[str] | None,
    *,
    layout: str,
) -> list[float]:
    """:func:`block_weights`; ``layout`` (e.g. " (11 transformer blocks: ...)") ends the messages about blocks."""
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise InputError(f"number of blocks {num_blocks!r} is not usable; expected an integer >= 0")
    c = _weight_value(composition_weight, "composition weight")
    if preset is not None and preset not in PRESET_NAMES:
        raise InputError(f"unknown preset {preset!r}; expected one of: {', '.join(PRESET_NAMES)}")
    if curve is not None and curve not in CURVE_NAMES:
        raise InputError(f"unknown curve {curve!r}; expected one of: {', '.join(CURVE_NAMES)}")
    explicit = normalize_layer_weights(layer_weights) if layer_weights is not None else None
    if explicit is not None and not explicit:
        # An empty mapping would silently switch the adapter off everywhere; almost surely a mistake.
        raise InputError(
            "layer weights are empty; give at least one entry, e.g. {'t3': 1.0}, or leave them out"
        )

    if preset is None and explicit is None:
        weights = [1.0] * num_blocks
    else:
        weights = [0.0] * num_blocks
        if preset is not None:
            for t, value in _preset_weights(preset, num_blocks, c, layout).items():
                weights[t] = value
        for t, value in (explicit or {}).items():
            if t >= num_blocks:
                valid = (
                    f"t0..t{num_blocks - 1}" if num_blocks else "none (this UNet has no transformer blocks)"
                )
                raise InputError(
                    f"layer weight for t{t} is out of range; this UNet's blocks are {valid}{layout}"
                )
            weights[t] = value

    if curve is not None:
        if curve in _PART_CURVES:
            if parts is None:
                raise InputError(
                    f"curve {curve!r} needs each block's part (input/middle/output); pass parts="
                )
            if len(parts) != num_blocks or any(part not in PART_NAMES for part in parts):
                raise InputError(
                    f"parts {list(parts)!r} do not fit {num_blocks} blocks; expected {num_blocks} entries, "
                    f"each one of: {', '.join(PART_NAMES)}"
                )
        for t in range(num_blocks):
            weights[t] *= _curve_factor(curve, t, num_blocks, parts[t] if parts is not None else None)
    return weights


def layer_scales(
    unet: UNetLike,
    layer_names: Sequence[str],
    *,
    preset: str | None = None,
    composition_weight: float = 1.0,
    layer_weights: Mapping[str | int, float] | None = None,
    curve: str | None = None,
) -> tuple[float, ...] | None:
    """The multiplier of each cross-attention layer in ``layer_names`` (processor names), in that order.

    ``None`` when no preset, layer_weights or curve is given: every layer runs at the adapter's scale, so the
    caller can skip per-layer work. Otherwise layers of one transformer block get that block's
    :func:`block_weights` value. Raises InputError as :func:`block_weights` does (messages about blocks name this
    UNet's layout), or for a name that is not one of the UNet's cross-attention processors.
    """
    if preset is None and layer_weights is None and curve is None:
        return None
    mapping = block_map(unet)
    blocks = sorted(set(mapping.values()), key=lambda block: block.index)
    # Range and preset errors are only actionable with the UNet's layout in view, so they name it.
    weights = _block_weights(
        len(blocks),
        preset,
        composition_weight,
        layer_weights,
        curve,
        [block.part for block in blocks],
        layout=f" ({describe_blocks(unet)})",
    )
    scales = []
    for name in layer_names:
        if name not in mapping:
            raise InputError(
                f"layer {name!r} is not a cross-attention processor of this UNet; expected one of its "
                f"'...attn2.processor' names, e.g. {next(iter(mapping), 'none: it has no cross-attention')!r}"
            )
        scales.append(weights[mapping[name].index])
    return tuple(scales)
