"""One adapter's references for a call -> its image tokens and :class:`BranchControl`.

A :class:`~ipadapter.prompt.recipe.Control` lists references (images or embeddings files), each with a weight, an
optional regional mask and a crop mode, and says how to combine them:

    concat        every reference's tokens in one attention (diffusers' list of images); a weight w
                  multiplies that reference's image values. With masks, each reference is attended on its
                  own and its output is multiplied by its mask (diffusers' ip_adapter_masks) and by w.
    average       sum_i w_i f_i / sum_i w_i                    on encoder features f, before the projection
    norm-average  the same on unit-norm features (per token), rescaled to the weighted mean norm: a
                  reference with large features cannot dominate
    add           sum_i w_i f_i
    subtract      w_0 f_0 - mean_{i>0} w_i f_i                  (first reference minus the rest)

The negative (unconditional) tokens are the adapter's default ones, or the projected features of
``negative_image``; with concat they repeat once per reference, as diffusers lays them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..adapters.variants import AdapterSpec
from ..errors import InputError
from .blocks import Block, layer_scales
from .conditioning import BranchControl
from .embeds import Embeds, check_embeds, load_embeds
from .encoder import ImageEncoder
from .faces import FaceEmbeds, as_faces
from .images import load_image, load_mask
from .recipe import Control, Reference


class IPAdapter(Protocol):
    """What this module reads of an attached adapter (:class:`ipadapter.adapter.IPAdapter` has it)."""

    spec: AdapterSpec  # which feature it reads, and its dim
    projection: torch.nn.Module  # features -> tokens
    encoder: ImageEncoder
    source: str  # the adapter's name in messages
    layer_names: list[str]  # its layers, in official id order

    @property
    def blocks(self) -> Mapping[str, Block]: ...


@dataclass
class Prepared:
    """A control with every file read and checked, ready to make tokens at each call."""

    control: Control
    images: list[Image.Image | Embeds]  # per reference: decoded RGB image or loaded embeddings
    masks: list[Image.Image | None]
    negative_image: Image.Image | None
    layer_scales: tuple[float, ...] | None


def prepare(ip: IPAdapter, control: Control, where: str = "") -> Prepared:
    """Read and check every input of ``control`` for adapter ``ip`` (nothing on the model changes)."""
    images: list[Image.Image | Embeds | FaceEmbeds] = []
    masks: list[Image.Image | None] = []
    faceid = ip.spec.feature == "face"
    for i, ref in enumerate(control.images):
        label = f"{where}image[{i}]"
        if faceid or ref.face is not None:
            images.append(_face(ip, ref, label, control))
        elif ref.embeds is not None:
            embeds = load_embeds(ref.embeds)
            check_embeds(embeds, ip.spec.feature, ip.spec.feature_dim, ip.encoder, ip.source)
            images.append(embeds)
        else:
            images.append(load_image(ref.path, f"{label} reference image"))
        masks.append(None if ref.mask is None else _mask(ref.mask, label))
    _check_host_controls(ip.spec, control, masks, where)
    if control.lora_scale is not None and ip.spec.lora_rank is None:
        raise InputError(
            f"{where}lora_scale is the strength of a FaceID adapter's LoRA, and adapter '{ip.source}' "
            f"({ip.spec.layout}) carries none; drop lora_scale"
        )
    if control.plus_version is not None and ip.spec.layout != "faceid-plus":
        raise InputError(
            f"{where}plus_version tells FaceID-Plus from PlusV2, and adapter '{ip.source}' is a "
            f"{ip.spec.layout} adapter; drop plus_version"
        )
    negative = None
    if control.negative_image is not None:
        negative = load_image(control.negative_image, f"{where}negative image")
    scales = layer_scales(
        ip.blocks,
        ip.layer_names,
        preset=control.preset,
        composition_weight=control.composition_weight,
        layer_weights=control.layer_weights,
        curve=control.curve,
    )
    return Prepared(control, images, masks, negative, scales)


def _face(ip: IPAdapter, ref: Reference, label: str, control: Control) -> FaceEmbeds:
    """A FaceID reference's faces: from ``face`` (embeddings, a file, a face image) or, as a convenience, from
    an ordinary reference image (its largest face)."""
    if ip.spec.feature != "face":
        raise InputError(
            f"{label}: a face reference needs a FaceID adapter, and adapter '{ip.source}' is a {ip.spec.layout} "
            "adapter, which reads images; give it a reference image"
        )
    if ref.embeds is not None:
        raise InputError(
            f"{label}: '{ref.embeds}' holds image embeddings, but a FaceID adapter reads faces; give face "
            "embeddings (face_embeds / face) or a face image"
        )
    value = ref.face if ref.face is not None else load_image(ref.path, f"{label} face image")
    return as_faces(value, **face_options(ip, control))


def face_options(ip: IPAdapter, control: Control) -> dict[str, Any]:
    """How faces are read for ``ip``: raw embeddings for portrait-unnorm; which face; where InsightFace is."""
    pick: str | int = control.face_index if control.face_index is not None else "largest"
    if isinstance(pick, str) and pick.strip().isdigit():
        pick = int(pick)
    normed = ip.spec.layout != "faceid-portrait-unnorm"
    return {"normed": normed, "pick": pick, "root": control.face_model_root}


def _check_host_controls(spec: AdapterSpec, control: Control, masks: list, where: str) -> None:
    """Refuse, by name, a control the adapter's denoiser family cannot honour."""
    family = {"flux": "Flux", "sd3": "SD3.5"}.get(spec.host)
    if family is None:
        return
    if spec.time_resampler is not None and any(m is not None for m in masks):
        raise InputError(
            f"{where}regional masks cannot work with the {family} adapter: its resampler reads every reference's "
            "features together, so no image token belongs to one reference; drop the mask (or use Flux, SD1.5 "
            "or SDXL, where each reference has tokens of its own)"
        )
    weights = [float(ref.weight) for ref in control.images]
    if spec.time_resampler is not None and control.combine == "concat" and any(w != 1.0 for w in weights):
        raise InputError(
            f"{where}reference weights {weights} with combine 'concat' are not supported by the {family} "
            "adapter: its resampler reads every reference's features together; use combine 'average' (or "
            "'norm-average'), where the weights apply to the features"
        )


def _mask(mask: Any, label: str) -> Image.Image:
    grey, _ = load_mask(mask)
    if not (np.asarray(grey) >= 128).any():
        raise InputError(
            f"{label} mask is empty (all black after thresholding at 50 %): that reference would have no "
            "effect; paint the region it should drive in white"
        )
    return grey


@torch.no_grad()
def control_tokens(ip: IPAdapter, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor, BranchControl]:
    """``(positive, negative, control)`` for one call; tokens are ``(1, N, D)``."""
    control = prepared.control
    if ip.spec.feature == "face":
        return _face_tokens(ip, prepared)
    param = next(ip.projection.parameters())
    feats, stored_negative = _features(ip, control.images, prepared.images)
    feats = feats.to(device=param.device, dtype=param.dtype)  # (R, ...)
    weights = [float(ref.weight) for ref in control.images]
    if prepared.negative_image is not None:
        neg = ip.encoder.features([prepared.negative_image], ip.spec.feature)
    elif stored_negative is not None:  # an embeddings file's own: no encoder run, and for this call only
        neg = stored_negative.unsqueeze(0)
    else:
        neg = ip.encoder.negative_features(ip.spec.feature, how=ip.spec.negative).unsqueeze(0)
    neg_tokens = ip.project(neg.to(device=param.device, dtype=param.dtype))  # (1, N, D)
    window = (control.start, control.end)
    branch = BranchControl(scale=control.scale, layer_scales=prepared.layer_scales, window=window)
    if control.combine != "concat":
        pos = ip.project(combine(feats, weights, control.combine).unsqueeze(0))  # (1, N, D)
        return pos, neg_tokens, branch
    tokens = ip.project(feats)  # (R, N, D)
    count, n, d = tokens.shape
    pos, neg = tokens.reshape(1, count * n, d), neg_tokens.repeat(1, count, 1)
    # Weights are always given as tensors (ones multiply exactly), so a compiled UNet sees the same structure
    # whatever the weights are: a new weight is a new value, never a new graph.
    if any(m is not None for m in prepared.masks):
        branch.groups = (n,) * count
        branch.masks = tuple(prepared.masks)
        branch.group_weights = tuple(weights)
    else:
        branch.value_weights = torch.tensor(weights).repeat_interleave(n)  # (R * N,)
    return pos, neg, branch


def _face_tokens(ip: IPAdapter, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor, BranchControl]:
    """A FaceID adapter's tokens: every reference's faces side by side (concat), or their embeddings merged
    first (the other combine modes, FaceID and portraits); each reference's weight and mask cover its faces."""
    control = prepared.control
    faces: list[FaceEmbeds] = list(prepared.images)
    weights = [float(ref.weight) for ref in control.images]
    options = dict(s_scale=control.s_scale, plus_version=control.plus_version)
    negative = None
    if prepared.negative_image is not None:
        negative = as_faces(prepared.negative_image, **face_options(ip, control))
    window = (control.start, control.end)
    branch = BranchControl(scale=control.scale, layer_scales=prepared.layer_scales, window=window)
    if control.combine != "concat":
        if ip.spec.layout == "faceid-plus":
            raise InputError(
                f"combine '{control.combine}' merges face embeddings, which a FaceID-Plus adapter reads together "
                "with each face's CLIP features; use combine 'concat'"
            )
        rows = torch.cat([torch.as_tensor(f.embeds, dtype=torch.float32) for f in faces])  # (F, 512)
        per_face = [w for f, w in zip(faces, weights, strict=True) for _ in range(len(f))]
        merged = combine(rows, per_face, control.combine)[None]  # (1, 512)
        pos, neg = ip.face_tokens(FaceEmbeds(merged.numpy(), source="merged faces"), negative, **options)
        return pos, neg, branch
    joined = FaceEmbeds(
        np.concatenate([np.asarray(torch.as_tensor(f.embeds, dtype=torch.float32)) for f in faces]),
        crops=[c for f in faces for c in f.crops] if all(f.crops for f in faces) else [],
        source=", ".join(f.source for f in faces if f.source),
    )
    pos, neg = ip.face_tokens(joined, negative, **options)  # (1, F*N, D)
    n = pos.shape[1] // len(joined)  # tokens per face
    counts = [len(f) * n for f in faces]
    if any(m is not None for m in prepared.masks):
        branch.groups = tuple(counts)
        branch.masks = tuple(prepared.masks)
        branch.group_weights = tuple(weights)
    else:
        branch.value_weights = torch.cat([torch.full((c,), w) for c, w in zip(counts, weights, strict=True)])
    return pos, neg, branch


def _features(
    ip: IPAdapter, refs: list[Reference], loaded: list[Image.Image | Embeds]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder features of every reference (images cached by content), and the negative features stored in
    the first embeddings file among them (None without one)."""
    feature = ip.spec.feature
    todo = [i for i, item in enumerate(loaded) if isinstance(item, Image.Image)]
    rows: dict[int, torch.Tensor] = {}
    if todo:
        encoded = ip.encoder.features([loaded[i] for i in todo], feature, [refs[i].crop for i in todo])
        rows = {i: encoded[k] for k, i in enumerate(todo)}
    negative = None
    for i, item in enumerate(loaded):
        if isinstance(item, Embeds):
            rows[i] = item.features.to(device=ip.encoder.device, dtype=ip.encoder.dtype)
            if negative is None:
                negative = item.negative.to(device=ip.encoder.device, dtype=ip.encoder.dtype)
    return torch.stack([rows[i] for i in range(len(loaded))]), negative


def combine(feats: torch.Tensor, weights: list[float], mode: str) -> torch.Tensor:
    """Merge ``(R, ...)`` encoder features into one ``(...)`` by ``mode`` (see the module docstring)."""
    w = torch.tensor(weights, dtype=feats.dtype, device=feats.device).view(-1, *([1] * (feats.ndim - 1)))
    if mode == "average":
        return (w * feats).sum(0) / w.sum()
    if mode == "norm-average":
        norms = feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # per token
        direction = (w * feats / norms).sum(0) / w.sum()
        target = (w * norms).sum(0) / w.sum()
        return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * target
    if mode == "add":
        return (w * feats).sum(0)
    if mode == "subtract":
        return w[0] * feats[0] - (w[1:] * feats[1:]).mean(0)
    raise InputError(f"combine '{mode}' is not one of concat, average, norm-average, add, subtract")
