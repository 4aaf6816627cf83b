"""Per-block weights of an image prompt: presets, explicit ``t3=0.5`` weights and curves (DESIGN.md §3.2).

A host numbers its denoiser's transformer blocks t0, t1, ... in forward order (for a UNet:
:func:`ipadapter.hosts.unet.block_map`); every cross-attention layer inside one block shares that index, so SDXL
has 11 indices and SD1.5 has 16. Presets (InstantStyle and community ones), explicit weights and curves turn into
one weight per block; :func:`layer_scales` expands them to one multiplier per cross-attention layer.

No torch or diffusers import here: the CLI imports this module for option parsing before the heavy libraries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

from ..errors import InputError

PRESET_NAMES = (
    "style",
    "composition",
    "style+composition",
    "strong-style",
    "strong-style+composition",
    "style-precise",
    "composition-precise",
)
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
# The blocks that carry layout (composition), by host: what a composition image and the precise presets act on
COMPOSITION_BLOCKS = {SDXL_BLOCKS: (3,), SD15_BLOCKS: (4, 5)}

_LAYER_WEIGHTS_SYNTAX = 'expected comma-separated "t<index>=<weight>" entries, e.g. "t3=0.5,t6=1.0"'
# Curves that scale whole UNet parts by 0.2: which parts each one weakens
_PART_CURVES = {
    "weak-input": ("input",),
    "weak-output": ("output",),
    "weak-middle": ("middle",),
    "strong-middle": ("input", "output"),
}


@dataclass(frozen=True)
class Block:
    """One transformer block of a denoiser, as its host numbers them.

    ``index`` is t (forward order); ``name`` is the block's module path, e.g. ``"down_blocks.2.attentions.1"``;
    ``part`` is ``"input"``, ``"middle"`` or ``"output"``; ``group`` names the blocks shown together in
    messages (a UNet's ``"down_blocks.2"``).
    """

    index: int
    name: str
    part: str
    group: str = ""


def describe_blocks(blocks: Iterable[Block]) -> str:
    """One line naming the blocks by t, grouped by their ``group``.

    E.g. ``"11 transformer blocks: t0-t1 down_blocks.1, t2-t3 down_blocks.2, t4 mid_block, t5-t7 up_blocks.0,
    t8-t10 up_blocks.1"``.
    """
    groups: dict[str, list[int]] = {}
    for block in sorted(set(blocks), key=lambda block: block.index):
        groups.setdefault(block.group or block.name, []).append(block.index)
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
            "strong-style+composition": {**{t: 1.0 for t in range(SDXL_BLOCKS)}, 3: c},
        }
    elif num_blocks == SD15_BLOCKS:
        # SD1.5 has no single style block: community presets use the outer blocks for style, down_blocks.2 for layout
        style = {t: 1.0 for t in (*range(0, 4), *range(9, 16))}
        table = {
            "style": style,
            "composition": {4: 0.25, 5: 1.0},
            "style+composition": {**style, 4: 0.25 * c, 5: c},
            "strong-style": {t: 1.0 for t in range(SD15_BLOCKS) if t not in (4, 5)},
            "strong-style+composition": {**{t: 1.0 for t in range(SD15_BLOCKS)}, 4: c, 5: c},
        }
    else:
        raise InputError(
            f"preset {preset!r} needs an SD1.5 ({SD15_BLOCKS} transformer blocks) or SDXL ({SDXL_BLOCKS}) UNet, "
            f"this one has {num_blocks}{layout}; give per-block weights instead (layer_weights, e.g. 't0=1.0,t2=0.5')"
        )
    if preset in PRECISE:
        return {t: factor for t, (factor, _) in precise_blocks(preset, num_blocks)[0].items()}
    return table[preset]


PRECISE = ("style-precise", "composition-precise")


def precise_blocks(preset: str, num_blocks: int) -> tuple[dict[int, tuple[float, bool]], set[int]]:
    """ComfyUI's precise presets: ``{t: (factor, boosted)}`` and the swapped blocks.

    A block's weight is ``factor x scale``, or ``factor x boost`` for a boosted block when the boost is given
    (style_boost / composition_boost, absolute as in ComfyUI). At a swapped block the reference's tokens go to the
    negative half of classifier-free guidance and the positive half gets zero tokens, so that block is pushed
    *away* from the reference: style-precise swaps the composition blocks (the style without the reference's
    layout), composition-precise the others (its layout without its style).
    """
    layout = set(COMPOSITION_BLOCKS[num_blocks])
    if num_blocks == SDXL_BLOCKS:
        if preset == "style-precise":
            return {3: (1.0, True), 6: (1.0, False)}, layout
        others = {t: (0.1, True) for t in range(SDXL_BLOCKS)}
        return {**others, 3: (1.0, False), 6: (1.0, True)}, set(range(SDXL_BLOCKS)) - layout
    if preset == "style-precise":
        outer = {t: (1.0, False) for t in (*range(0, 4), *range(9, 16))}
        return {**outer, 4: (0.25, True), 5: (1.0, True)}, layout
    blocks = {t: (1.0, True) for t in (*range(0, 4), *range(9, 16))}
    blocks.update({t: (0.1, True) for t in (6, 7, 8)})
    return {**blocks, 4: (0.25, False), 5: (1.0, False)}, set(range(SD15_BLOCKS)) - layout


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

    unet_parts = parts is None or all(part in PART_NAMES for part in parts)
    if preset is not None and not unet_parts:
        raise InputError(
            f"preset {preset!r} is defined for SD1.5 / SDXL UNet blocks, and this denoiser is a transformer"
            f"{layout}; give per-block weights instead (layer_weights, e.g. 't0=1.0,t2=0.5')"
        )
    if curve in _PART_CURVES and not unet_parts:
        raise InputError(
            f"curve {curve!r} weakens UNet parts (input/middle/output), which this denoiser does not have"
            f"{layout}; use ease-in, ease-out, ease-in-out or reverse-in-out, or per-block weights"
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
                    f"t0..t{num_blocks - 1}"
                    if num_blocks
                    else "none (the denoiser has no transformer blocks)"
                )
                raise InputError(
                    f"layer weight for t{t} is out of range; the denoiser's blocks are {valid}{layout}"
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
    block_of: Mapping[str, Block],
    layer_names: Sequence[str],
    *,
    preset: str | None = None,
    composition_weight: float = 1.0,
    layer_weights: Mapping[str | int, float] | None = None,
    curve: str | None = None,
) -> tuple[float, ...] | None:
    """The multiplier of each cross-attention layer in ``layer_names`` (processor names), in that order.

    ``block_of``: the transformer block of every cross-attention layer of the denoiser (its host's block map).
    ``None`` when no preset, layer_weights or curve is given: every layer runs at the adapter's scale, so the
    caller can skip per-layer work. Otherwise layers of one transformer block get that block's
    :func:`block_weights` value. Raises InputError as :func:`block_weights` does (messages about blocks name this
    UNet's layout), or for a name that is not one of the UNet's cross-attention processors.
    """
    if preset is None and layer_weights is None and curve is None:
        return None
    blocks = sorted(set(block_of.values()), key=lambda block: block.index)
    # Range and preset errors are only actionable with the UNet's layout in view, so they name it.
    weights = _block_weights(
        len(blocks),
        preset,
        composition_weight,
        layer_weights,
        curve,
        [block.part for block in blocks],
        layout=f" ({describe_blocks(blocks)})",
    )
    scales = []
    for name in layer_names:
        if name not in block_of:
            raise InputError(
                f"layer {name!r} is not a cross-attention processor of this UNet; expected one of its "
                f"'...attn2.processor' names, e.g. {next(iter(block_of), 'none: it has no cross-attention')!r}"
            )
        scales.append(weights[block_of[name].index])
    return tuple(scales)


@dataclass(frozen=True)
class LayerPlan:
    """Everything per cross-attention layer that a preset and the weights decide (one entry per layer).

    ``scales``: multipliers of the adapter's scale (None: every layer at the scale). ``swaps``: layers where the
    reference goes to the negative half of guidance (the precise presets). ``boosts``: absolute weights that
    replace ``scale x scales`` (a precise preset's boost; None where the scale rules). ``composition``: the
    layers of the composition blocks (where a composition image acts).
    """

    scales: tuple[float, ...] | None
    swaps: tuple[bool, ...] | None = None
    boosts: tuple[float | None, ...] | None = None
    composition: tuple[bool, ...] | None = None


def layer_plan(
    block_of: Mapping[str, Block],
    layer_names: Sequence[str],
    *,
    preset: str | None = None,
    composition_weight: float = 1.0,
    layer_weights: Mapping[str | int, float] | None = None,
    curve: str | None = None,
    style_boost: float | None = None,
    composition_boost: float | None = None,
    composition_image: bool = False,
) -> LayerPlan:
    """:func:`layer_scales` with what the precise presets and a composition image add (see :class:`LayerPlan`).

    Raises InputError for a boost without its preset, and for a composition image on a denoiser without known
    composition blocks (anything but SD1.5 / SDXL UNets).
    """
    for name, value, wanted in (
        ("style_boost", style_boost, "style-precise"),
        ("composition_boost", composition_boost, "composition-precise"),
    ):
        if value is not None and preset != wanted:
            raise InputError(
                f"{name} is the boost of preset '{wanted}', and the preset is {preset!r}; use preset "
                f"'{wanted}' or drop {name}"
            )
    blocks = sorted(set(block_of.values()), key=lambda block: block.index)
    count = len(blocks)
    if composition_image and (
        count not in COMPOSITION_BLOCKS or any(b.part not in PART_NAMES for b in blocks)
    ):
        raise InputError(
            f"a composition image drives the composition blocks of an SD1.5 or SDXL UNet, and this denoiser "
            f"has none ({describe_blocks(blocks)}); drop composition_image, or give a second adapter entry "
            "with layer weights instead"
        )
    if composition_image and preset is None and layer_weights is None:
        preset = "style+composition"  # two images: the style blocks from the references, the layout from one
    scales = layer_scales(
        block_of,
        layer_names,
        preset=preset,
        composition_weight=composition_weight,
        layer_weights=layer_weights,
        curve=curve,
    )
    layer_block = [block_of[name].index for name in layer_names]
    composition = None
    if composition_image:
        layout = COMPOSITION_BLOCKS[count]
        composition = tuple(t in layout for t in layer_block)
    if preset not in PRECISE:
        return LayerPlan(scales, composition=composition)
    table, swapped = precise_blocks(preset, count)
    boost = style_boost if preset == "style-precise" else composition_boost
    explicit = set(normalize_layer_weights(layer_weights)) if layer_weights is not None else set()
    parts = [block.part for block in blocks]
    per_block: list[float | None] = [None] * count
    if boost is not None:
        for t, (factor, boosted) in table.items():
            if boosted and t not in explicit:
                bend = 1.0 if curve is None else _curve_factor(curve, t, count, parts[t])
                per_block[t] = factor * boost * bend
    return LayerPlan(
        scales,
        swaps=tuple(t in swapped for t in layer_block),
        boosts=tuple(per_block[t] for t in layer_block),
        composition=composition,
    )
