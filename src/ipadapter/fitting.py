"""What attaching an adapter file needs from a pipeline, checked before anything on it changes.

The host's layers the adapter serves, its image encoder (shared between adapters of one denoiser when they
name the same one), the LoRA a FaceID adapter carries, and the scale: each is read and checked here, so that
:func:`ipadapter.adapter.attach` can refuse an adapter in one line and leave the pipeline as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from .adapters.checkpoint import Checkpoint, load_checkpoint
from .adapters.variants import AdapterSpec, family
from .errors import CheckpointError, IncompatibleModelError
from .hosts.base import Host, HostLayer
from .hosts.lora import (
    LoRA,
    LoRASet,
    adapter_processors,
    lora_key,
    lora_modules,
    metadata_alpha,
    read_lora_state,
)
from .prompt.controls import CONTROLS
from .prompt.encoder import ImageEncoder
from .sources import default_encoder, load_image_encoder, resolve_adapter, split_hub_path


def check_scale(scale: float, name: str = "scale") -> float:
    """A usable adapter scale: a number in the declared range (:data:`~ipadapter.prompt.controls.CONTROLS`);
    strings and booleans are refused (``"0.5"`` or ``True`` is a mistake, not a scale)."""
    return CONTROLS["scale"].check(scale, spell=lambda _: name)


def host_layers(spec: AdapterSpec, host: Host, model: Any, source: str) -> list[HostLayer]:
    """The denoiser layers ``spec`` serves, or a one-line refusal naming both sides' numbers."""
    if spec.host != host.kind:
        made = {"unet": f"an SD UNet ({spec.base or 'unknown'} family)", "flux": "Flux", "sd3": "SD3.5"}
        raise IncompatibleModelError(
            f"adapter '{source}' is a {spec.layout} adapter made for {made.get(spec.host, spec.host)}, but the "
            f"pipeline's denoiser is a {host.noun}; use a base of the adapter's family (or an adapter made for "
            "this base)"
        )
    everything = host.layers(model)
    if not everything:
        raise IncompatibleModelError(
            f"the pipeline's {host.noun} has no {host.layer_noun}; IP-Adapter needs them"
        )
    cross = everything[0].cross_attention_dim
    if spec.cross_attention_dim != cross and spec.host != "sd3":  # SD3's tokens are as wide as each layer
        raise IncompatibleModelError(
            f"adapter '{source}' makes {spec.cross_attention_dim}-dim tokens ({spec.base or 'unknown'} family) "
            f"but the base {host.noun}'s cross-attention dim is {cross}"
            + (f" ({family(cross)})" if host.kind == "unet" else "")
            + "; use an adapter made for this base"
        )
    layers = host.layers_for(model, spec.num_layers)
    if layers is None or spec.layer_ids != host.layer_ids(layers):
        want = host.layer_ids(everything)
        raise IncompatibleModelError(
            f"adapter '{source}' has weights for {spec.num_layers} attention layers (ids "
            f"{spec.layer_ids[0]}..{spec.layer_ids[-1]}) but the base {host.noun} has {len(everything)} "
            f"{host.layer_noun} (ids {want[0]}..{want[-1]}); use an adapter made for this base"
        )
    for layer, layer_id, hidden in zip(layers, spec.layer_ids, spec.hidden_sizes, strict=True):
        if layer.hidden_size != hidden:
            raise IncompatibleModelError(
                f"adapter '{source}' layer {layer_id} has hidden size {hidden} but the {host.noun}'s "
                f"{layer.name.removesuffix('.processor')} has {layer.hidden_size}; use an adapter made for this base"
            )
    return layers


def check_encoder(spec: AdapterSpec, encoder: ImageEncoder, source: str) -> None:
    """Refuse an image encoder whose features are not the ones adapter ``source`` reads."""
    if spec.clip_feature is None:
        return  # FaceID and portraits read the face embedding only
    feature, dim = spec.clip_feature
    have = encoder.feature_dim(feature)
    if have != dim:
        what = "pooled image_embeds" if feature == "pooled" else "hidden states"
        want = f" ({spec.encoder})" if spec.encoder else ""
        raise IncompatibleModelError(
            f"adapter '{source}' needs {dim}-dim {what}{want} but the image encoder gives "
            f"{have}-dim ones; pass the encoder it was trained with via --image-encoder / image_encoder="
        )


def check_supported(spec: AdapterSpec, source: str) -> None:
    if not spec.supported:
        raise IncompatibleModelError(
            f"adapter '{source}' is a {spec.layout} adapter, which needs an InsightFace face embedding; "
            "this version does not support FaceID adapters. Use a basic, plus or full-face adapter"
        )


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str, source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{source}: {what} tensors do not fit their layer ({str(e).splitlines()[0]})"
        ) from None


def open_adapter(adapter: str | Path) -> tuple[Checkpoint, str]:
    """Read adapter ``adapter`` (file, hub path or name) and the name messages use for it.

    A hub path keeps its name (its encoder is found in the same repository); a name such as "mini" becomes the
    file it stands for, so that the encoder is looked for beside that file.
    """
    source = str(adapter)
    resolved = resolve_adapter(adapter)
    ckpt = load_checkpoint(resolved)
    if source != str(resolved) and split_hub_path(source) is None:
        source = str(resolved)
    return ckpt, source


def pick_encoder(
    given: str | Path | ImageEncoder | nn.Module | None,
    spec: AdapterSpec,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    shared: dict[Any, ImageEncoder],
) -> tuple[ImageEncoder | None, Any]:
    """The adapter's encoder and a key naming it; adapters of one UNet with the same key share one encoder
    (one copy in memory, one feature cache: a reference used by both is encoded once). None for an adapter
    that reads no image features (FaceID, portraits: the face embedding comes from elsewhere)."""
    if spec.clip_feature is None and given is None:
        return None, None
    if isinstance(given, ImageEncoder):
        return given, ("object", id(given))
    if isinstance(given, nn.Module):
        key = ("module", id(given))
        return shared.get(key) or ImageEncoder(given), key
    where = given if given is not None else default_encoder(source, spec)
    key = ("source", str(where), str(device), dtype)
    if key in shared:
        return shared[key], key
    return ImageEncoder(load_image_encoder(where, dtype=dtype, device=device)), key


def read_lora_file(
    path: str | Path, model: Any, modules: dict[tuple[int, str], nn.Module]
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """A separate LoRA file (``.safetensors`` only) for the projection ``modules`` of ``model``:
    ``(id, part) -> (down, up, scale)`` (:func:`~ipadapter.hosts.lora.read_lora_state`), covering exactly
    ``modules``. One-line :class:`CheckpointError` for another file type, a missing or unreadable file, a file
    that is no LoRA of this UNet's attention layers, or one that leaves some of ``modules`` out."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(
            f"{path}: a LoRA file must be .safetensors (got '{path.suffix or '(none)'}'); h94 ships the FaceID "
            "LoRAs as *_lora.safetensors"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file; pass the path of a *_lora.safetensors file")
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({first}); it may be truncated: download it again"
        ) from None
    found = read_lora_state(state, model, source=str(path), alpha=metadata_alpha(metadata, str(path)))
    missing, extra = sorted(set(modules) - set(found)), sorted(set(found) - set(modules))
    if missing or extra:
        first = missing[0] if missing else extra[0]
        what = f"lacks {len(missing)} of them" if missing else "has LoRA for more"
        what += f", e.g. layer {first[0]} {first[1]}"
        raise CheckpointError(
            f"{path}: the adapter's LoRA acts on {len(modules)} attention projections (id, part) and this file "
            f"{what}; use the LoRA file made for this adapter"
        )
    return found


def build_lora(
    spec: AdapterSpec,
    model: Any,
    ckpt: Checkpoint,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    strength: float,
    lora_file: str | Path | None = None,
) -> LoRASet | None:
    """A FaceID adapter's LoRA, built and loaded (nothing hooked yet), or None when it carries none.

    ``lora_file``: the same LoRA as a separate ``.safetensors`` file (h94's ``*_lora.safetensors`` for A1111 /
    ComfyUI: kohya names; diffusers / peft and the official names work too). When the checkpoint carries its own
    LoRA and a file is given, **the file wins**: its weights are used, the checkpoint's are ignored. A file for an
    adapter without LoRA (portraits, non-FaceID) is refused. A file's alpha (``.alpha`` tensors, or diffusers'
    metadata) is folded into ``up`` here (``up * alpha / rank``): the hooks stay ``up(down(x))`` and the
    exported official weights (:meth:`LoRASet.official`, which has no alpha) compute the same update.
    """
    if spec.lora_rank is None:
        if lora_file is not None:
            raise IncompatibleModelError(
                f"adapter '{source}' is a {spec.layout} adapter, which has no LoRA; the LoRA file '{lora_file}' is "
                "for FaceID / FaceID-Plus adapters: leave it out"
            )
        return None
    try:
        modules = lora_modules(model, spec.lora_ids)
    except IndexError:
        raise IncompatibleModelError(
            f"adapter '{source}' has LoRA weights for attention layer {max(spec.lora_ids)} but the base UNet has "
            f"{len(adapter_processors(model))} attention layers; use an adapter made for this base"
        ) from None
    if lora_file is None:
        ip = ckpt.ip_adapter
        weights = {k: (ip[lora_key(*k, "down")], ip[lora_key(*k, "up")], 1.0) for k in modules}
    else:
        weights = read_lora_file(lora_file, model, modules)
    where = source if lora_file is None else str(lora_file)
    loras = {}
    for (layer_id, part), module in modules.items():
        down, up, scale = weights[layer_id, part]
        if scale != 1.0:
            up = up.float() * scale  # alpha / rank, folded in fp32 (see above)
        lora = LoRA(module.in_features, module.out_features, down.shape[0])
        load_weights(lora, {"down.weight": down, "up.weight": up}, f"LoRA {layer_id}.{part}", where)
        loras[f"{layer_id}.{part}"] = lora.to(device=device, dtype=dtype)
    return LoRASet(loras, strength).to(device)
