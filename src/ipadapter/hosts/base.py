"""The host contract: where an adapter's image tokens enter a denoiser, whatever its architecture.

A host knows one kind of denoiser (the SD1.5 / SDXL UNet today; Flux and SD3 transformers next): which
attention layers take an image branch (:class:`HostLayer`, in the order an adapter file numbers them), the
transformer block of each (for per-block weights), how to install our processors and hook the denoiser, and
how to put everything back exactly. :mod:`ipadapter.adapter` attaches through this contract only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from ..prompt.blocks import Block


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
    noun: str  # how messages name the denoiser: "UNet", "transformer"
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

    @abstractmethod
    def attachment(self, denoiser: Any) -> Attachment | None:
        """What is installed on ``denoiser`` (None: nothing)."""

    @abstractmethod
    def install(self, denoiser: Any, layers: list[HostLayer]) -> Attachment:
        """Replace the processors and hook the denoiser; returns what changed."""

    @abstractmethod
    def uninstall(self, denoiser: Any) -> None:
        """Put back exactly what :meth:`install` changed."""
