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

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from ..adapters.variants import AdapterSpec
from ..errors import InputError
from .blocks import Block, LayerPlan, layer_plan
from .conditioning import BranchControl, ImagePrompt
from .embeds import Embeds, check_embeds, load_embeds
from .encoder import ImageEncoder
from .faces import FaceEmbeds, as_faces
from .images import load_image, load_mask
from .noise import noise_image
from .recipe import Control, Reference
from .tiles import enhance_features, enhance_rows, split_grid, tile_reference


class IPAdapter(Protocol):
    """What this module reads of an attached adapter (:class:`ipadapter.adapter.IPAdapter` has it)."""

    spec: AdapterSpec  # which feature it reads, and its dim
    projection: torch.nn.Module  # features -> tokens
    encoder: ImageEncoder
    source: str  # the adapter's name in messages
    name: str  # its name on the pipeline
    scale: float  # its own scale (a control without one takes it)
    layer_names: list[str]  # its layers, in official id order

    @property
    def blocks(self) -> Mapping[str, Block]: ...


@dataclass
class Item:
    """One reference as it reaches the encoder: a decoded image, loaded embeddings or faces, with its weight,
    mask, crop and a label (influence maps). A tiled reference is one item per tile."""

    source: Image.Image | Embeds | FaceEmbeds
    weight: float
    mask: Image.Image | None
    crop: str
    label: str


@dataclass
class Prepared:
    """A control with every file read and checked, ready to make tokens at each call."""

    control: Control
    items: list[Item]
    negative_image: Image.Image | None
    plan: LayerPlan
    composition: Image.Image | None = None

    @property
    def layer_scales(self) -> tuple[float, ...] | None:
        return self.plan.scales


def prepare(ip: IPAdapter, control: Control, where: str = "") -> Prepared:
    """Read and check every input of ``control`` for adapter ``ip`` (nothing on the model changes)."""
    items: list[Item] = []
    faceid = ip.spec.feature == "face"
    for i, ref in enumerate(control.images):
        label = f"{where}image[{i}]"
        mask = None if ref.mask is None else _mask(ref.mask, label)
        name = f"reference {i}"
        if faceid or ref.face is not None:
            items.append(Item(_face(ip, ref, label, control), ref.weight, mask, ref.crop, name))
        elif ref.embeds is not None:
            if ref.crop == "tiled":
                raise InputError(
                    f"{label}: crop 'tiled' cuts an image into tiles, and this reference is an embeddings file "
                    f"('{ref.embeds}'); give the image itself, or another crop"
                )
            embeds = load_embeds(ref.embeds)
            check_embeds(embeds, ip.spec.feature, ip.spec.feature_dim, ip.encoder, ip.source)
            items.append(Item(embeds, ref.weight, mask, ref.crop, name))
        else:
            image = load_image(ref.path, f"{label} reference image")
            if ref.crop != "tiled":
                items.append(Item(image, ref.weight, mask, ref.crop, name))
                continue
            tiles = tile_reference(image, mask, control.sharpening)
            for j, (tile, region) in enumerate(tiles):
                items.append(Item(tile, ref.weight, region, "center", f"{name} tile {j}"))
    _check_host_controls(ip.spec, control, items, where)
    _check_family_controls(ip, control, items, where)
    negative = None
    if control.negative_image is not None:
        negative = load_image(control.negative_image, f"{where}negative image")
    if control.negative_noise is not None:
        seed = 0 if control.noise_seed is None else int(control.noise_seed)
        negative = noise_image(
            control.negative_noise,
            control.negative_noise_strength,
            seed,
            negative,
            size=int(getattr(ip.encoder, "image_size", 224) or 224),
            blur=control.negative_noise_blur,
        )
    composition = None
    if control.composition_image is not None:
        composition = load_image(control.composition_image, f"{where}composition image")
    plan = layer_plan(
        ip.blocks,
        ip.layer_names,
        preset=control.preset,
        composition_weight=control.composition_weight,
        layer_weights=control.layer_weights,
        curve=control.curve,
        style_boost=control.style_boost,
        composition_boost=control.composition_boost,
        composition_image=composition is not None,
    )
    if plan.composition is not None:
        if plan.swaps is not None:
            raise InputError(
                f"{where}composition_image gives the composition blocks an image of their own, and preset "
                f"'{control.preset}' sends the references' layout to the negative side there; use preset "
                "style+composition (or strong-style+composition) with a composition image"
            )
        weights = plan.scales or (1.0,) * len(plan.composition)
        if not any(w > 0 for w, c in zip(weights, plan.composition, strict=True) if c):
            raise InputError(
                f"{where}composition_image acts on the composition blocks, and preset {control.preset!r} gives "
                "them no weight; use preset style+composition (or strong-style+composition), or layer weights "
                "that include the composition blocks"
            )
    return Prepared(control, items, negative, plan, composition)


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


def _check_family_controls(ip: IPAdapter, control: Control, items: list[Item], where: str) -> None:
    """Refuse, by name, a control this kind of adapter cannot use, or a pair of controls that contradict."""
    spec = ip.spec
    if control.lora_scale is not None and spec.lora_rank is None:
        raise InputError(
            f"{where}lora_scale is the strength of a FaceID adapter's LoRA, and adapter '{ip.source}' "
            f"({spec.layout}) carries none; drop lora_scale"
        )
    if control.plus_version is not None and spec.layout != "faceid-plus":
        raise InputError(
            f"{where}plus_version tells FaceID-Plus from PlusV2, and adapter '{ip.source}' is a "
            f"{spec.layout} adapter; drop plus_version"
        )
    tiled = any(ref.crop == "tiled" for ref in control.images)
    if spec.feature == "face":
        for name, used in (
            ("negative_noise", control.negative_noise is not None),
            ("enhance_tiles", control.enhance_tiles > 1),
            ("composition_image", control.composition_image is not None),
            ("crop 'tiled'", tiled),
        ):
            if used:
                raise InputError(
                    f"{where}{name} works on pictures for the image encoder, and adapter '{ip.source}' "
                    f"({spec.layout}) reads faces; drop {name.split()[0]}"
                )
    if control.unfold_batch and control.combine != "concat":
        raise InputError(
            f"{where}unfold_batch gives each generated image its own reference, and combine {control.combine!r} "
            "merges the references into one; use combine 'concat' (the default) with unfold_batch"
        )
    if control.unfold_batch and tiled:
        raise InputError(
            f"{where}unfold_batch gives each generated image one reference, and crop 'tiled' makes one reference "
            "act through several tiles at once; use another crop with unfold_batch"
        )
    if control.enhance_tiles > 1 and any(isinstance(item.source, Embeds) for item in items):
        raise InputError(
            f"{where}enhance_tiles encodes tiles of each reference image, and some references are embeddings "
            "files; give the images, or set enhance_tiles to 1"
        )


def _check_host_controls(spec: AdapterSpec, control: Control, items: list[Item], where: str) -> None:
    """Refuse, by name, a control the adapter's denoiser family cannot honour."""
    family = {"flux": "Flux", "sd3": "SD3.5"}.get(spec.host)
    if family is None:
        return
    if control.embeds_scaling.endswith("C penalty"):
        raise InputError(
            f"{where}embeds_scaling {control.embeds_scaling!r} divides each layer's width by 1280, SDXL's widest "
            f"UNet layer, which means nothing for the {family} transformer; use 'V only' or 'K+V'"
        )
    if spec.time_resampler is not None:
        for name, used in (
            ("embeds_scaling", control.embeds_scaling != "V only"),
            ("unfold_batch", control.unfold_batch),
            ("crop 'tiled'", any(ref.crop == "tiled" for ref in control.images)),
        ):
            if used:
                raise InputError(
                    f"{where}{name} needs image tokens of their own per reference and an attention of their "
                    f"own, and the {family} adapter's resampler reads every reference with the picture's "
                    f"tokens together; drop {name.split()[0]}"
                )
    if spec.time_resampler is not None and any(item.mask is not None for item in items):
        raise InputError(
            f"{where}regional masks cannot work with the {family} adapter: its resampler reads every reference's "
            "features together, so no image token belongs to one reference; drop the mask (or use Flux, SD1.5 "
            "or SDXL, where each reference has tokens of its own)"
        )
    weights = [float(item.weight) for item in items]
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


def _branch(prepared: Prepared, items: list[Item]) -> BranchControl:
    """The call's :class:`BranchControl` before its tokens are laid out: scale, layers, window, scaling."""
    control, plan = prepared.control, prepared.plan
    return BranchControl(
        scale=control.scale,
        layer_scales=plan.scales,
        window=(control.start, control.end),
        embeds_scaling=control.embeds_scaling,
        swaps=plan.swaps,
        boosts=plan.boosts,
        labels=tuple(item.label for item in items),
    )


def _lay_out(
    branch: BranchControl, pos: torch.Tensor, neg: torch.Tensor, counts: list[int], items: list[Item],
    unfold: int | None,
) -> tuple[torch.Tensor, torch.Tensor, BranchControl]:  # fmt: skip
    """Tokens of several references ``(R, N, D)`` laid out as the control says: side by side (concat), each on
    its own region (masks), or one per batch item (``unfold`` items)."""
    weights = [float(item.weight) for item in items]
    masks = [item.mask for item in items]
    if unfold is not None:  # ComfyUI's unfold_batch: a shorter list repeats its last reference
        pick = [min(i, len(items) - 1) for i in range(unfold)]
        branch.row_weights = tuple(weights[i] for i in pick)
        branch.row_masks = tuple(masks[i] for i in pick) if any(m is not None for m in masks) else None
        branch.labels = None
        return pos[pick][None], neg[pick][None].contiguous(), branch
    d = pos.shape[-1]
    pos, neg = pos.reshape(1, -1, d), neg.reshape(1, -1, d)
    # Weights are always given as tensors (ones multiply exactly), so a compiled UNet sees the same structure
    # whatever the weights are: a new weight is a new value, never a new graph.
    if any(m is not None for m in masks):
        branch.groups = tuple(counts)
        branch.masks = tuple(masks)
        branch.group_weights = tuple(weights)
    else:
        branch.value_weights = torch.cat([torch.full((c,), w) for c, w in zip(counts, weights, strict=True)])
        branch.references = tuple(counts)
    return pos, neg, branch


@torch.no_grad()
def control_tokens(
    ip: IPAdapter, prepared: Prepared, unfold: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, BranchControl]:
    """``(positive, negative, control)`` for one call: tokens ``(1, N, D)``, or with ``unfold`` (the call's
    images x frames, when the control unfolds its references) ``(1, unfold, N, D)``, one reference per item."""
    control = prepared.control
    if ip.spec.feature == "face":
        return _face_tokens(ip, prepared, unfold if control.unfold_batch else None)
    param = next(ip.projection.parameters())
    feats, stored_negative, items = _features(ip, prepared)
    feats = feats.to(device=param.device, dtype=param.dtype)  # (R, ...)
    if prepared.negative_image is not None:
        neg = ip.encoder.features([prepared.negative_image], ip.spec.feature)
    elif stored_negative is not None:  # an embeddings file's own: no encoder run, and for this call only
        neg = stored_negative.unsqueeze(0)
    else:
        neg = ip.encoder.negative_features(ip.spec.feature, how=ip.spec.negative).unsqueeze(0)
    neg_tokens = ip.project(neg.to(device=param.device, dtype=param.dtype))  # (1, N, D)
    branch = _branch(prepared, items)
    if control.combine != "concat":
        weights = [float(item.weight) for item in items]
        pos = ip.project(combine(feats, weights, control.combine).unsqueeze(0))  # (1, N, D)
        branch.labels = None
        return pos, neg_tokens, branch
    tokens = ip.project(feats)  # (R, N, D)
    count, n = tokens.shape[:2]
    negs = neg_tokens.expand(count, -1, -1)
    return _lay_out(branch, tokens, negs, [n] * count, items, unfold if control.unfold_batch else None)


def composition_tokens(ip: IPAdapter, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor, BranchControl]:
    """The composition image's tokens and control (style and composition from two images): it acts on the
    composition blocks only, at the composition weight, with the adapter's window and scaling."""
    plan = prepared.plan
    scales = plan.scales or (1.0,) * len(plan.composition)
    comp = Item(prepared.composition, 1.0, None, "center", "composition")
    alone = Prepared(
        prepared.control,
        [comp],
        prepared.negative_image,
        LayerPlan(tuple(w if c else 0.0 for w, c in zip(scales, plan.composition, strict=True))),
    )
    shown = dataclasses.replace(prepared.control, combine="concat", unfold_batch=False)
    alone.control = shown
    return control_tokens(ip, alone)


def style_plan(prepared: Prepared) -> Prepared:
    """``prepared`` with its composition blocks left to the composition image (when it has one)."""
    plan = prepared.plan
    if plan.composition is None:
        return prepared
    scales = plan.scales or (1.0,) * len(plan.composition)
    rest = tuple(0.0 if c else w for w, c in zip(scales, plan.composition, strict=True))
    return dataclasses.replace(prepared, plan=dataclasses.replace(plan, scales=rest))


def _face_tokens(
    ip: IPAdapter, prepared: Prepared, unfold: int | None
) -> tuple[torch.Tensor, torch.Tensor, BranchControl]:
    """A FaceID adapter's tokens: every reference's faces side by side (concat), or their embeddings merged
    first (the other combine modes, FaceID and portraits); each reference's weight and mask cover its faces."""
    control = prepared.control
    faces: list[FaceEmbeds] = [item.source for item in prepared.items]
    weights = [float(item.weight) for item in prepared.items]
    options = dict(s_scale=control.s_scale, plus_version=control.plus_version)
    negative = None
    if prepared.negative_image is not None:
        negative = as_faces(prepared.negative_image, **face_options(ip, control))
    branch = _branch(prepared, prepared.items)
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
        branch.labels = None
        return pos, neg, branch
    joined = FaceEmbeds(
        np.concatenate([np.asarray(torch.as_tensor(f.embeds, dtype=torch.float32)) for f in faces]),
        crops=[c for f in faces for c in f.crops] if all(f.crops for f in faces) else [],
        source=", ".join(f.source for f in faces if f.source),
    )
    pos, neg = ip.face_tokens(joined, negative, **options)  # (1, F*N, D)
    n = pos.shape[1] // len(joined)  # tokens per face
    counts = [len(f) * n for f in faces]
    if unfold is not None:  # one reference (all its faces) per batch item
        if len(set(counts)) > 1:
            raise InputError(
                "unfold_batch gives each generated image one reference, and these references hold different "
                f"numbers of faces ({[len(f) for f in faces]}); give one face per reference"
            )
        d = pos.shape[-1]
        pos, neg = pos.reshape(len(faces), -1, d), neg.reshape(len(faces), -1, d)
    return _lay_out(branch, pos, neg, counts, prepared.items, unfold)


def _features(ip: IPAdapter, prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor | None, list[Item]]:
    """Encoder features of every item (images cached by content), the negative features stored in the first
    embeddings file among them (None without one), and the items the rows belong to (the ClipVision enhancer
    may give one reference two rows: the whole image and its merged tiles)."""
    control, items = prepared.control, prepared.items
    feature = ip.spec.feature
    todo = [i for i, item in enumerate(items) if isinstance(item.source, Image.Image)]
    rows: dict[int, torch.Tensor] = {}
    batch = control.encode_batch_size
    if todo:
        images = [items[i].source for i in todo]
        encoded = ip.encoder.features(images, feature, [items[i].crop for i in todo], batch_size=batch)
        rows = {i: encoded[k] for k, i in enumerate(todo)}
    negative = None
    for i, item in enumerate(items):
        if isinstance(item.source, Embeds):
            rows[i] = item.source.features.to(device=ip.encoder.device, dtype=ip.encoder.dtype)
            if negative is None:
                negative = item.source.negative.to(device=ip.encoder.device, dtype=ip.encoder.dtype)
    if control.enhance_tiles <= 1:
        return torch.stack([rows[i] for i in range(len(items))]), negative, items
    grid = control.enhance_tiles
    out, owners = [], []
    for i, item in enumerate(items):
        tiles = ip.encoder.features(split_grid(item.source, grid), feature, item.crop, batch_size=batch)
        merged = enhance_features(rows[i], tiles, grid, feature)
        enhanced = enhance_rows(rows[i], merged, control.enhance_ratio, len(items))
        out.extend(enhanced)
        names = ["whole", "tiles"] if len(enhanced) == 2 else ["enhanced"]
        owners.extend(dataclasses.replace(item, label=f"{item.label} ({n})") for n in names)
    return torch.stack(out), negative, owners


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


def prompt_of(
    prepared: Sequence[tuple[IPAdapter, Prepared]], num_prompts: int, items: int = 1
) -> ImagePrompt:
    """The call's image prompt; ``items``: the images x frames each prompt makes (unfolded references)."""
    tokens, negative, controls, branch_of = {}, {}, {}, {}
    for ip, ready in prepared:
        sets = [(ip.name, control_tokens(ip, style_plan(ready), items))]  # (1, [R,] N, D)
        if ready.composition is not None:  # style and composition from two images: a token set of its own
            sets.append((f"{ip.name}/composition", composition_tokens(ip, ready)))
        for key, (pos, neg, control) in sets:
            if control.scale is None:
                control.scale = ip.scale
            if control.layer_scales is None:  # ones rather than None: adding weights later is no new graph
                control.layer_scales = (1.0,) * len(ip.layer_names)
            tokens[key] = pos.expand(num_prompts, *pos.shape[1:])
            negative[key] = neg.expand(num_prompts, *neg.shape[1:]).contiguous()
            controls[key] = control
            branch_of[key] = ip.name
    return ImagePrompt(tokens, negative, controls=controls, branch_of=branch_of)
