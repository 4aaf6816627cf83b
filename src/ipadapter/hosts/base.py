"""The host contract: where an adapter's image tokens enter a denoiser, whatever its architecture.

A host knows one kind of denoiser (the SD1.5 / SDXL UNet today; Flux and SD3 transformers next): which
attention layers take an image branch (:class:`HostLayer`, in the order an adapter file numbers them), the
transformer block of each (for per-block weights), how to install our processors and hook the denoiser, and
how to put everything back exactly. :mod:`ipadapter.adapter` attaches through this contract only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..prompt.blocks import Block
from .attention import IPBranch


@dataclass
class HostLayer:
    """One attention layer that takes an image branch."""

    name: str  # the processor's name in the denoiser's attn_processors
    index: int  # position among the host's layers (the adapter file's order)
    hidden_size: int  # the layer's query width: what the image values project to
    cross_attention_dim: int  # the width of the tokens it attends to: the image tokens' width


@dataclass
class Attachment:
    """What attaching changed on one denoiser, so that detaching can put it back exactly."""

    originals: dict[str, Any]  # processor name -> the processor it had
    processors: dict[str, Any]  # layer name -> our processor (which holds every adapter's branch)
    hook: Any  # the forward pre-hook's handle
    adapters: dict[str, Any] = field(default_factory=dict)  # name -> the adapter's handle


class Host(ABC):
    """One kind of denoiser. ``attention_kwargs``: the pipeline argument whose dict reaches the processors
    (diffusers: ``cross_attention_kwargs`` for UNets, ``joint_attention_kwargs`` for the transformers)."""

    kind: str
    noun: str  # how messages name the denoiser: "UNet", "Flux transformer"
    layer_noun: str = "attention layers"  # how messages name its layers
    attention_kwargs: str

    @abstractmethod
    def denoiser(self, pipe: Any) -> Any | None:
        """``pipe``'s denoiser of this kind (from under torch.compile's wrapper), or None."""

    @abstractmethod
    def layers(self, denoiser: Any) -> list[HostLayer]:
        """The layers that take an image branch, in the adapter files' order."""

    @abstractmethod
    def block_map(self, denoiser: Any) -> dict[str, Block]:
        """The transformer block of every layer (by layer name)."""

    def layer_ids(self, layers: list[HostLayer]) -> tuple[int, ...]:
        """The ids an adapter file gives ``layers`` (the DiT adapters number them 0, 1, ...)."""
        return tuple(layer.index for layer in layers)

    def layers_for(self, denoiser: Any, count: int) -> list[HostLayer] | None:
        """The layers an adapter with ``count`` layers serves (None: no layout of this host has that many).
        By default every layer; a host whose adapters come in several layouts picks among them."""
        layers = self.layers(denoiser)
        return layers if len(layers) == count else None

    def branch(self, spec: Any, layer: HostLayer, denoiser: Any) -> Any:
        """An empty per-layer branch for adapter ``spec`` (an AdapterSpec) at ``layer``; its tensor names are
        the official ``ip_adapter`` key names after the layer id."""
        return IPBranch(spec.cross_attention_dim, layer.hidden_size)

    def attachment(self, denoiser: Any) -> Attachment | None:
        """What is installed on ``denoiser`` (None: nothing)."""
        return getattr(denoiser, STATE_ATTR, None)

    @abstractmethod
    def install(self, denoiser: Any, layers: list[HostLayer]) -> Attachment:
        """Replace the processors and hook the denoiser; returns what changed."""

    def uninstall(self, denoiser: Any) -> None:
        """Put back exactly what :meth:`install` changed."""
        uninstall_processors(denoiser)


# ---------------------------------------------------------------------------------------------------------
# Installing processors on a diffusers model (``attn_processors`` / ``set_attn_processor``), for every host
# ---------------------------------------------------------------------------------------------------------

STATE_ATTR = "_ipadapter_attachment"  # the denoiser attribute holding what attaching changed


def install_processors(
    model: Any, replace: Callable[[str, Any], Any], ours: dict[str, Any], hook: Callable[..., Any]
) -> Attachment:
    """Give every processor of ``model`` its replacement ``replace(name, original)``, register ``hook`` as a
    forward pre-hook (with kwargs), and remember the originals. ``ours``: layer name -> the processor that
    holds the adapters' branches there."""
    originals = dict(model.attn_processors)
    model.set_attn_processor({name: replace(name, proc) for name, proc in originals.items()})
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    state = Attachment(originals, ours, handle)
    setattr(model, STATE_ATTR, state)
    return state


def uninstall_processors(model: Any) -> None:
    """Put back the processors :func:`install_processors` replaced and remove the hook (exactly the originals)."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return
    model.set_attn_processor(dict(state.originals))
    state.hook.remove()
    delattr(model, STATE_ATTR)


@contextmanager
def original_processors(model: Any) -> Iterator[None]:
    """Inside the block ``model`` runs its original processors (e.g. while another pipeline copies its
    weights); ours come back afterwards."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        yield
        return
    installed = dict(model.attn_processors)
    model.set_attn_processor(dict(state.originals))
    try:
        yield
    finally:
        model.set_attn_processor(installed)
