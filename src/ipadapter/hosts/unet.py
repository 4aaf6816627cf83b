"""The SD1.5 / SDXL UNet as a host: its cross-attention layers, their transformer blocks, and the install.

The only module that knows a diffusers UNet's internals (processor names, block paths, ``attn_processors`` /
``set_attn_processor``, the forward pre-hook). Official ``ip_adapter`` key ids count the UNet's attention
processors in ``unet.attn_processors`` order (down blocks, up blocks, mid block last): cross-attention layer k has
id 2k+1 (DESIGN.md §3.1). Transformer blocks are numbered t0, t1, ... in forward order: every down block, then the
mid block, then every up block (DESIGN.md §3.2).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ..errors import IncompatibleModelError
from ..prompt.blocks import Block
from ..prompt.conditioning import ImagePrompt, Step, compiling, progress_of
from .attention import IPAttnProcessor, PassThroughProcessor
from .base import Attachment, Host, HostLayer, install_processors, original_processors

__all__ = [
    "UNET",
    "UNetHost",
    "block_map",
    "cross_attention_layers",
    "is_cross_attention",
    "original_processors",
]

# "down_blocks.2.attentions.1" -> ("down_blocks", "2", None, "1"); the mid block has no block number
_BLOCK_RE = re.compile(r"^(?:(down_blocks|up_blocks)\.(\d+)|(mid_block))\.attentions\.(\d+)$")
_PART_OF = {"down_blocks": "input", "mid_block": "middle", "up_blocks": "output"}


class UNetLike(Protocol):
    """What the block map reads from a UNet: the processor names (diffusers' ``attn_processors``)."""

    @property
    def attn_processors(self) -> Mapping[str, Any]: ...


def is_cross_attention(name: str) -> bool:
    """Whether processor ``name`` (of ``unet.attn_processors``) is an IP-Adapter layer: the rule diffusers'
    loader uses too. AnimateDiff's motion modules hold attention layers, but temporal self-attention ones."""
    return name.endswith("attn2.processor") and "motion_modules" not in name


CrossLayer = HostLayer  # the UNet's name for its host layers


def cross_attention_layers(unet: Any) -> list[CrossLayer]:
    """The UNet's cross-attention layers in the official id order."""
    layers = []
    for name in unet.attn_processors:
        if not is_cross_attention(name):
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        layers.append(CrossLayer(name, len(layers), attn.to_k.out_features, attn.to_k.in_features))
    return layers


def block_map(unet: UNetLike) -> dict[str, Block]:
    """The transformer block of every cross-attention processor of ``unet``.

    Keys: the processor names :func:`is_cross_attention` accepts, in ``unet.attn_processors`` order. Values: the
    :class:`~ipadapter.prompt.blocks.Block` holding it; all processors of one block share one ``Block``. Works for
    ``UNet2DConditionModel`` and ``UNetMotionModel``. Raises IncompatibleModelError if a cross-attention processor
    does not sit in a ``down_blocks.i.attentions.j`` / ``mid_block.attentions.j`` / ``up_blocks.i.attentions.j``
    transformer block.
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
    blocks = {
        path: Block(t, path, _PART_OF[path.split(".", 1)[0]], path.rsplit(".attentions.", 1)[0])
        for t, path in enumerate(ordered)
    }
    return {name: blocks[block_of[name]] for name in names}


# ---------------------------------------------------------------------------------------------------------
# Installing our processors and the pre-hook
# ---------------------------------------------------------------------------------------------------------


def install(unet: Any, layers: list[CrossLayer]) -> Attachment:
    """Replace every processor: ours on cross-attention, pass-through on the rest; hook the UNet."""
    cross = {layer.name: IPAttnProcessor(layer.index) for layer in layers}
    return install_processors(
        unet, lambda name, proc: cross.get(name) or PassThroughProcessor(proc), cross, _before_unet
    )


def _before_unet(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """At every UNet call with an image prompt, hand the processors this step's :class:`Step`.

    It runs inside a compiled UNet's graph, so it reads only the call's arguments (no frames, no pipeline)
    and, under ``torch.compile``, keeps the timestep a tensor; eager mode reads it once, to skip idle branches.
    """
    attention_kwargs = kwargs.get("cross_attention_kwargs") or {}
    prompt = attention_kwargs.get("image_prompt")
    if not isinstance(prompt, ImagePrompt):
        return None
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    t = torch.as_tensor(timestep).flatten()[0]  # pipelines pass one timestep; training the batch's own
    progress = progress_of(t, prompt.train_timesteps, as_tensor=compiling())
    step = Step(progress, (sample.shape[-2], sample.shape[-1]))
    if prompt.recorder is not None:
        prompt.recorder.count(None)
    kwargs = {**kwargs, "cross_attention_kwargs": {**attention_kwargs, "image_prompt_step": step}}
    return args, kwargs


class UNetHost(Host):
    """SD1.5 / SDXL UNets (``UNet2DConditionModel``, AnimateDiff's ``UNetMotionModel``)."""

    kind = "unet"
    noun = "UNet"
    layer_noun = "cross-attention layers"
    attention_kwargs = "cross_attention_kwargs"

    def denoiser(self, pipe: Any) -> Any | None:
        unet = getattr(pipe, "unet", None)
        unet = getattr(unet, "_orig_mod", unet)  # from under torch.compile's wrapper
        return unet if hasattr(unet, "attn_processors") else None

    def layers(self, denoiser: Any) -> list[HostLayer]:
        return cross_attention_layers(denoiser)

    def block_map(self, denoiser: Any) -> dict[str, Block]:
        return block_map(denoiser)

    def layer_ids(self, layers: list[HostLayer]) -> tuple[int, ...]:
        return tuple(2 * layer.index + 1 for layer in layers)  # odd: attn2 of each transformer block

    def install(self, denoiser: Any, layers: list[HostLayer]) -> Attachment:
        return install(denoiser, layers)


UNET = UNetHost()
