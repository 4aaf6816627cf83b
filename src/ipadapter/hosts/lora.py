"""The LoRA a FaceID adapter carries, on the UNet's attention projections (DESIGN.md §3.6).

FaceID checkpoints hold, for every attention processor ``i`` of ``unet.attn_processors`` (self-attention
included), low-rank updates of its four projections: ``{i}.to_{q,k,v,out}_lora.{down,up}.weight``. The
reference (tencent's ``LoRAAttnProcessor``) computes ``W x + scale * up(down(x))`` with no alpha rescaling.

They are applied with forward hooks on the projection modules (``attn.to_q``, ``attn.to_k``, ``attn.to_v``,
``attn.to_out[0]``), not by replacing modules or merging weights:
- detaching removes the hooks, and the UNet is exactly what it was (no weights were touched);
- a user's own LoRA (peft wraps ``to_q`` in a layer whose ``base_layer`` is the original) keeps working, loaded
  before or after: the hook adds to whatever the hooked module computes;
- the strength is a Python float (eager: 0 skips the update exactly) and a 0-d tensor that a compiled UNet reads,
  so a new strength never recompiles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..prompt.conditioning import compiling

PARTS = ("to_q", "to_k", "to_v", "to_out")


def lora_key(layer_id: int, part: str, side: str) -> str:
    """The ``ip_adapter`` key of one LoRA matrix: ``"{layer_id}.{part}_lora.{down|up}.weight"``."""
    return f"{layer_id}.{part}_lora.{side}.weight"


class LoRA(nn.Module):
    """One projection's low-rank update: ``up(down(x))`` (down: in -> rank, up: rank -> out, no bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


def lora_modules(unet: Any, layer_ids: tuple[int, ...]) -> dict[tuple[int, str], nn.Module]:
    """The projection modules the LoRA of ``layer_ids`` (positions in ``unet.attn_processors``, the official
    ids) acts on: ``(id, part) -> module``. Raises IndexError for an id the UNet does not have."""
    names = list(unet.attn_processors)
    out = {}
    for layer_id in layer_ids:
        attn = unet.get_submodule(names[layer_id].removesuffix(".processor"))
        for part, module in zip(PARTS, (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]), strict=True):
            out[layer_id, part] = module
    return out


class LoRASet(nn.Module):
    """Every LoRA of one adapter, and the hooks that apply them with one strength."""

    def __init__(self, loras: dict[str, LoRA], strength: float = 1.0) -> None:
        super().__init__()
        self.loras = nn.ModuleDict({k.replace(".", "/"): v for k, v in loras.items()})  # "{id}/{part}"
        self.register_buffer("strength_t", torch.tensor(float(strength)), persistent=False)
        self.strength = float(strength)
        self._handles: list[Any] = []

    def set_strength(self, value: float) -> None:
        self.strength = float(value)
        self.strength_t.fill_(self.strength)  # in place: a compiled UNet reads the new value, no new graph

    def lora(self, layer_id: int, part: str) -> LoRA:
        return self.loras[f"{layer_id}/{part}"]

    def official(self) -> dict[str, torch.Tensor]:
        """The weights under their ``ip_adapter`` key names (``{id}.{part}_lora.{down|up}.weight``)."""
        out = {}
        for key, lora in self.loras.items():
            layer_id, part = key.split("/")
            out[lora_key(int(layer_id), part, "down")] = lora.down.weight
            out[lora_key(int(layer_id), part, "up")] = lora.up.weight
        return out

    def install(self, modules: dict[tuple[int, str], nn.Module]) -> None:
        """Hook each ``(layer id, part)`` module with its LoRA."""
        for (layer_id, part), module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(self.lora(layer_id, part))))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, lora: LoRA) -> Any:
        def add(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if compiling():
                return output + self.strength_t.to(output.dtype) * lora(args[0])
            if self.strength == 0:
                return None  # exactly the projection without the LoRA
            return output + self.strength * lora(args[0])

        return add
