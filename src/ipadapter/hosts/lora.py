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

h94 also ships each FaceID LoRA as a separate file for A1111 / ComfyUI (``ip-adapter-faceid_sd15_lora.safetensors``
...): the same matrices under kohya names (``lora_unet_<module path with _>.lora_down/lora_up.weight``, optional
``.alpha``). :func:`read_lora_state` reads those, diffusers / peft names and ours, resolved against the real
module names of the UNet at hand.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
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


def adapter_processors(unet: Any) -> list[str]:
    """The attention processors an adapter file numbers (its ids are positions here): ``unet.attn_processors``
    without AnimateDiff's motion modules, so a motion UNet numbers them as the 2D UNet it was made from."""
    return [name for name in unet.attn_processors if "motion_modules" not in name]


def lora_modules(unet: Any, layer_ids: tuple[int, ...]) -> dict[tuple[int, str], nn.Module]:
    """The projection modules the LoRA of ``layer_ids`` (positions in ``unet.attn_processors``, the official
    ids) acts on: ``(id, part) -> module``. Raises IndexError for an id the UNet does not have."""
    names = adapter_processors(unet)
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


# A LoRA file's key = <module><suffix>: the suffix says the naming and the side (down: in -> rank, up: rank -> out)
LORA_SUFFIXES = (
    (".lora_down.weight", "down"),  # kohya / A1111 / ComfyUI: lora_unet_<path with _>.lora_down.weight
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),  # peft, diffusers' save_lora_weights: unet.<path>.lora_A.weight
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),  # diffusers' LoRACompatibleLinear: <path>.lora.down.weight
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),  # ours / tencent ({i}.to_q_lora), diffusers' attention processors
    ("_lora.up.weight", "up"),  # (unet.<attention path>.processor.to_q_lora)
)
UNET_PREFIXES = ("lora_unet_", "unet.", "base_model.model.")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")  # lora_te_, lora_te1_, lora_te2_, text_encoder(_2).


def _module_map(procs: list[str]) -> dict[str, tuple[int, str]]:
    """Every name a LoRA file may give one attention projection, with ``.`` as ``_`` -> (processor id, part).

    Per attention ``a`` of ``procs`` (``unet.attn_processors``; id = its position): ``a.to_q`` ... ``a.to_out.0``
    (the modules), ``a.to_out`` (converters that dropped the ``.0``) and ``a.processor.to_q`` ... (diffusers' old
    attention-processor LoRA)."""
    names = {}
    for layer_id, proc in enumerate(procs):
        attn = proc.removesuffix(".processor")
        for part in PARTS:
            for name in (f"{attn}.{part}", f"{attn}.processor.{part}"):
                names[name.replace(".", "_")] = (layer_id, part)
        names[f"{attn}.to_out.0".replace(".", "_")] = (layer_id, "to_out")
    return names


def _module_path(procs: list[str], layer_id: int, part: str) -> str:
    attn = procs[layer_id].removesuffix(".processor")
    return f"{attn}.{'to_out.0' if part == 'to_out' else part}"


def _from_sgm(name: str, per_block: Any) -> str:
    """Kohya's SDXL names follow the original (SGM) UNet: ``input_blocks_4_1_...`` -> ``down_blocks_1_attentions_0_...``.
    The numbering counts every resnet and sampler, so it needs the UNet's ``layers_per_block`` (an int)."""
    if not isinstance(per_block, int):
        return name
    if m := re.match(r"middle_block_1_(.+)$", name):
        return f"mid_block_attentions_0_{m.group(1)}"
    if m := re.match(r"input_blocks_(\d+)_1_(.+)$", name):
        block, layer = divmod(int(m.group(1)) - 1, per_block + 1)
        return f"down_blocks_{block}_attentions_{layer}_{m.group(2)}" if 0 <= layer < per_block else name
    if m := re.match(r"output_blocks_(\d+)_1_(.+)$", name):
        block, layer = divmod(int(m.group(1)), per_block + 1)
        return f"up_blocks_{block}_attentions_{layer}_{m.group(2)}"
    return name


def _resolve(
    module: str, names: dict[str, tuple[int, str]], count: int, per_block: Any
) -> tuple[int, str] | None:
    """The (processor id, part) a LoRA key's module part names (``count`` processors), or None."""
    if m := re.fullmatch(r"(\d+)\.(to_q|to_k|to_v|to_out)", module):  # ours: {i}.to_q (from {i}.to_q_lora)
        return (int(m.group(1)), m.group(2)) if int(m.group(1)) < count else None
    for prefix in UNET_PREFIXES:
        module = module.removeprefix(prefix)
    flat = module.replace(".", "_")
    return names.get(flat) or names.get(_from_sgm(flat, per_block))


def _split(key: str) -> tuple[str, str] | None:
    """``key`` -> (module, side in down / up / alpha), or None when it is no LoRA tensor name."""
    if key.endswith(".alpha"):
        return key.removesuffix(".alpha"), "alpha"
    for suffix, side in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), side
    return None


def read_lora_state(
    state: dict[str, torch.Tensor], unet: Any, *, source: str = "the LoRA file", alpha: float | None = None
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """A LoRA file's tensors as ``(attention processor id, part) -> (down [r, in], up [out, r], scale)``.

    Names (module paths resolved against ``unet``'s own modules; ids are positions in ``unet.attn_processors``):
    kohya / A1111 ``lora_unet_<path with _>.lora_down|lora_up.weight`` (diffusers or SGM ``input_blocks_*``
    block names), peft / diffusers ``[unet.]<path>.lora_A|lora_B.weight`` and ``<path>.lora.down|up.weight``,
    diffusers' attention processors ``[unet.]<attention>.processor.to_q_lora.down.weight``, and ours
    ``{i}.to_q_lora.down.weight``. ``part`` is one of to_q, to_k, to_v, to_out (the module ``to_out.0``).

    ``scale`` = alpha / rank, alpha from the module's ``.alpha`` tensor, else ``alpha`` (a file-wide value, e.g.
    from diffusers' metadata), else the scale is 1 (the official FaceID LoRA has no alpha).

    Text-encoder tensors (``lora_te*``, ``text_encoder*``) are ignored. Raises :class:`CheckpointError` in one
    line for: no UNet attention LoRA at all, tensors for any other module, a down without its up (or the reverse),
    two tensors for one slot, a non-scalar alpha, or matrices whose shapes do not fit the module.
    """
    procs = adapter_processors(unet)
    names, per_block = _module_map(procs), getattr(unet.config, "layers_per_block", None)
    found: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    foreign, text = [], 0
    for key, tensor in state.items():
        split = _split(key)
        if key.startswith(TEXT_ENCODER_PREFIXES) and split is not None:
            text += 1
            continue
        slot = _resolve(split[0], names, len(procs), per_block) if split is not None else None
        if slot is None:
            foreign.append(key)
            continue
        side = split[1]
        if side in found.setdefault(slot, {}):
            raise CheckpointError(
                f"{source}: two LoRA tensors for {_module_path(procs, *slot)} ({side}): "
                f"'{found[slot][side][0]}' and '{key}'; keep one naming"
            )
        found[slot][side] = (key, tensor)
    if not found and not foreign:
        only = f" (only a text-encoder LoRA: {text} tensors)" if text else ""
        raise CheckpointError(
            f"no UNet attention LoRA in {source}{only}; a FaceID LoRA acts on the UNet's attention projections"
        )
    if foreign:
        lora_like = [k for k in foreign if _split(k) is not None]
        if not found and not lora_like:
            raise CheckpointError(
                f"{source}: not a LoRA file (keys such as {foreign[0]!r}; expected *.lora_down/lora_up.weight, "
                "*.lora_A/lora_B.weight or *_lora.down/up.weight)"
            )
        raise CheckpointError(
            f"{source}: {len(foreign)} tensors are not a LoRA of this UNet's attention projections (to_q, to_k, "
            f"to_v, to_out.0), e.g. {foreign[0]!r}; a FaceID LoRA has only those (is it a LoRA for another model?)"
        )
    modules = lora_modules(unet, tuple(sorted({layer_id for layer_id, _ in found})))
    return {
        slot: _checked(_module_path(procs, *slot), modules[slot], sides, source, alpha)
        for slot, sides in sorted(found.items())
    }


def _checked(
    path: str, module: nn.Module, sides: dict[str, tuple[str, torch.Tensor]], source: str, alpha: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module's (down, up, scale), its shapes checked against the module (``path`` names it)."""
    if "down" not in sides or "up" not in sides:
        lack = sorted({"down", "up"} - set(sides))[0]
        raise CheckpointError(
            f"{source}: the LoRA of {path} has {' and '.join(sorted(sides))} but no {lack} matrix; the file is "
            "incomplete"
        )
    down, up = sides["down"][1], sides["up"][1]
    n_in, n_out = module.in_features, module.out_features
    if down.ndim != 2 or up.ndim != 2 or down.shape[1] != n_in or up.shape != (n_out, down.shape[0]):
        raise CheckpointError(
            f"{source}: the LoRA of {path} has down {list(down.shape)} and up {list(up.shape)}, but the module maps "
            f"{n_in} -> {n_out} features (down [r, {n_in}], up [{n_out}, r]); the LoRA is for another base model"
        )
    if "alpha" in sides:
        value = sides["alpha"][1]
        if value.numel() != 1 or not torch.isfinite(value).all():
            raise CheckpointError(
                f"{source}: {sides['alpha'][0]} is {list(value.shape)}, not one finite alpha"
            )
        alpha = float(value.reshape(()))
    return down, up, 1.0 if alpha is None else alpha / down.shape[0]


def metadata_alpha(metadata: dict[str, str], source: str) -> float | None:
    """The file-wide LoRA alpha diffusers writes into a ``.safetensors`` header (``lora_adapter_metadata``:
    ``unet.lora_alpha``; peft's scale is alpha / r), or None. Per-module alphas (``alpha_pattern``), rsLoRA
    and DoRA change the math itself and are refused in one line."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source}: its lora_adapter_metadata is not a JSON object; the header is damaged"
        )
    config = {k.removeprefix("unet."): v for k, v in config.items() if "." not in k or k.startswith("unet.")}
    if config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise CheckpointError(
            f"{source}: a LoRA with per-module alphas, rsLoRA or DoRA (its metadata says so) is not supported; "
            "use a plain LoRA (one alpha, or an .alpha tensor per module)"
        )
    value = config.get("lora_alpha")
    return None if value is None else float(value)
