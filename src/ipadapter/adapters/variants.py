"""The registry of adapter variants, detected from checkpoint key signatures and shapes.

A *layout* is a family of checkpoints with the same structure (basic, plus, full-face, FaceID...). Everything
else (token count, dims, layer sizes, Resampler hyper-parameters) is derived from tensor shapes, never from a
file name. Official names are attached afterwards by matching the derived dims against DESIGN.md §3.1.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import Checkpoint

RESAMPLER_HEAD_DIM = 64  # the official Resampler's dim_head; heads = to_q rows / 64

# Encoder families by the feature they produce: (feature, dim) -> encoder name and h94 repo folder.
ENCODERS = {
    ("pooled", 1024): ("ViT-H/14", "models/image_encoder"),
    ("hidden", 1280): ("ViT-H/14", "models/image_encoder"),
    ("pooled", 1280): ("ViT-bigG/14", "sdxl_models/image_encoder"),
    ("hidden", 1664): ("ViT-bigG/14", "sdxl_models/image_encoder"),
}
BASES = {768: "SD1.5", 2048: "SDXL"}
# The DiT adapters' encoders (DESIGN.md §3.5), by (encoder kind, feature, dim): name and hub id.
DIT_ENCODERS = {
    ("clip", "pooled", 768): ("CLIP ViT-L/14", "openai/clip-vit-large-patch14"),
    ("siglip", "pooled", 1152): ("SigLIP so400m/14-384", "google/siglip-so400m-patch14-384"),
    ("siglip", "hidden", 1152): ("SigLIP so400m/14-384", "google/siglip-so400m-patch14-384"),
}
HOST_BASES = {"flux": "FLUX.1", "sd3": "SD3.5"}  # what a DiT adapter's base is called

# Official names by (layout, cross-attention dim, feature dim).
OFFICIAL_NAMES = {
    ("basic", 768, 1024): ("ip-adapter_sd15", "ip-adapter_sd15_light"),
    ("basic", 2048, 1280): ("ip-adapter_sdxl",),
    ("basic", 2048, 1024): ("ip-adapter_sdxl_vit-h",),
    ("plus", 768, 1280): ("ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"),
    ("plus", 2048, 1280): ("ip-adapter-plus_sdxl_vit-h", "ip-adapter-plus-face_sdxl_vit-h"),
    ("full-face", 768, 1280): ("ip-adapter-full-face_sd15",),
    ("xlabs-flux", 4096, 768): ("XLabs-AI/flux-ip-adapter", "XLabs-AI/flux-ip-adapter-v2"),
    ("instantx-flux", 4096, 1152): ("InstantX/FLUX.1-dev-IP-Adapter",),
    ("instantx-sd3", 2432, 1152): ("InstantX/SD3.5-Large-IP-Adapter",),
}


@dataclass(frozen=True)
class ResamplerConfig:
    """Hyper-parameters of the "plus" Resampler (Perceiver), all read from tensor shapes."""

    dim: int
    depth: int
    dim_head: int
    heads: int
    num_queries: int
    embedding_dim: int
    output_dim: int
    ff_mult: int


@dataclass(frozen=True)
class AdapterSpec:
    """What a checkpoint is and what it needs, derived from its tensors alone."""

    layout: str  # "basic" | "plus" | "full-face" | "faceid" | "faceid-plus"
    names: tuple[str, ...]  # official names with this layout and these dims; () if none match
    num_tokens: int | None  # None: one token per encoder hidden state (full-face; 257 for ViT-H at 224 px)
    feature: str  # which encoder output it consumes: "pooled" image_embeds or "hidden" (penultimate states)
    feature_dim: int
    cross_attention_dim: int
    layer_ids: tuple[int, ...]  # official ids: positions in unet.attn_processors (odd = cross-attention)
    hidden_sizes: tuple[int, ...]  # per layer, the rows of to_k_ip
    resampler: ResamplerConfig | None = None
    supported: bool = True
    host: str = "unet"  # the denoiser it attaches to: "unet" (SD1.5/SDXL), "flux" or "sd3"
    encoder_kind: str = "clip"  # "clip" or "siglip"
    negative: str = "default"  # the missing negative image's features (ImageEncoder.negative_features' how)
    time_resampler: Any = None  # instantx-sd3: its TimeResamplerConfig (tokens recomputed every step)

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def encoder(self) -> str | None:
        """The image encoder family this adapter was trained with, if the dims are an official one's."""
        if self.host != "unet":
            dit = DIT_ENCODERS.get((self.encoder_kind, self.feature, self.feature_dim))
            return dit[0] if dit else None
        hit = ENCODERS.get((self.feature, self.feature_dim))
        return hit[0] if hit else None

    @property
    def encoder_subfolder(self) -> str | None:
        """Where that encoder lives in the h94/IP-Adapter repository (None for the DiT adapters)."""
        hit = ENCODERS.get((self.feature, self.feature_dim)) if self.host == "unet" else None
        return hit[1] if hit else None

    @property
    def encoder_repo(self) -> str | None:
        """The hub id of a DiT adapter's encoder (its authors' choice), if the dims are the official ones."""
        dit = DIT_ENCODERS.get((self.encoder_kind, self.feature, self.feature_dim))
        return dit[1] if dit and self.host != "unet" else None

    @property
    def base(self) -> str | None:
        if self.host != "unet":
            return HOST_BASES[self.host]
        return BASES.get(self.cross_attention_dim)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(num_layers=self.num_layers, encoder=self.encoder, base=self.base)
        if self.time_resampler is not None:
            out["time_resampler"] = asdict(self.time_resampler)
        return out


@dataclass(frozen=True)
class Layout:
    """One registry entry: how to recognise a layout and how to read its numbers."""

    name: str
    signature: tuple[str, ...]  # image_proj keys that must all be present
    derive: Callable[[dict[str, torch.Tensor]], dict]
    supported: bool = True
    ip_signature: tuple[str, ...] = ()  # ip_adapter keys that must all be present (the DiT layouts)
    host: str = "unet"
    encoder_kind: str = "clip"
    negative: str = "default"


def _shape(state: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"missing 'image_proj.{key}'")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"'image_proj.{key}' has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def _basic(s: dict) -> dict:
    rows, feature_dim = _shape(s, "proj.weight", 2)
    (cross,) = _shape(s, "norm.weight", 1)
    if rows % cross:
        raise CheckpointError(
            f"'image_proj.proj.weight' has {rows} rows, not a multiple of the norm width {cross}"
        )
    return dict(
        num_tokens=rows // cross, feature="pooled", feature_dim=feature_dim, cross_attention_dim=cross
    )


def _full_face(s: dict) -> dict:
    hidden, feature_dim = _shape(s, "proj.0.weight", 2)
    cross, hidden2 = _shape(s, "proj.2.weight", 2)
    (cross2,) = _shape(s, "proj.3.weight", 1)
    if hidden != feature_dim or hidden2 != hidden or cross2 != cross:
        raise CheckpointError(
            f"MLP projection shapes do not chain: proj.0 {[hidden, feature_dim]}, proj.2 {[cross, hidden2]}, "
            f"proj.3 {[cross2]}"
        )
    return dict(num_tokens=None, feature="hidden", feature_dim=feature_dim, cross_attention_dim=cross)


def _plus(s: dict) -> dict:
    _, queries, dim = _shape(s, "latents", 3)
    dim2, embedding_dim = _shape(s, "proj_in.weight", 2)
    output_dim, dim3 = _shape(s, "proj_out.weight", 2)
    depth = len({m.group(1) for k in s if (m := re.match(r"layers\.(\d+)\.0\.to_q\.weight$", k))})
    if depth == 0 or dim2 != dim or dim3 != dim:
        raise CheckpointError(
            f"Resampler shapes do not chain: latents dim {dim}, proj_in {[dim2, embedding_dim]}, "
            f"proj_out {[output_dim, dim3]}, {depth} attention layers"
        )
    inner, _ = _shape(s, "layers.0.0.to_q.weight", 2)
    ff_inner, _ = _shape(s, "layers.0.1.1.weight", 2)
    if inner % RESAMPLER_HEAD_DIM or ff_inner % dim:
        raise CheckpointError(
            f"Resampler to_q has {inner} rows (not a multiple of the head size {RESAMPLER_HEAD_DIM}) or its "
            f"feed-forward width {ff_inner} is not a multiple of {dim}"
        )
    resampler = ResamplerConfig(
        dim=dim,
        depth=depth,
        dim_head=RESAMPLER_HEAD_DIM,
        heads=inner // RESAMPLER_HEAD_DIM,
        num_queries=queries,
        embedding_dim=embedding_dim,
        output_dim=output_dim,
        ff_mult=ff_inner // dim,
    )
    return dict(
        num_tokens=queries,
        feature="hidden",
        feature_dim=embedding_dim,
        cross_attention_dim=output_dim,
        resampler=resampler,
    )


def _faceid(s: dict) -> dict:
    _, id_dim = _shape(s, "proj.0.weight", 2)
    (cross,) = _shape(s, "norm.weight", 1)
    rows, _ = _shape(s, "proj.2.weight", 2)
    return dict(num_tokens=rows // cross, feature="face", feature_dim=id_dim, cross_attention_dim=cross)


def _mlp_tokens(s: dict) -> dict:
    """instantx-flux: pooled (B, F) -> Linear(F, 2F), GELU, Linear(2F, N*D), LayerNorm(D)."""
    wide, feature_dim = _shape(s, "proj.0.weight", 2)
    rows, wide2 = _shape(s, "proj.2.weight", 2)
    (cross,) = _shape(s, "norm.weight", 1)
    if wide2 != wide or rows % cross:
        raise CheckpointError(
            f"MLP projection shapes do not chain: proj.0 {[wide, feature_dim]}, proj.2 {[rows, wide2]}, "
            f"norm {[cross]} (proj.2's rows must be a multiple of the norm width)"
        )
    return dict(
        num_tokens=rows // cross, feature="pooled", feature_dim=feature_dim, cross_attention_dim=cross
    )


def _time_resampler(s: dict) -> dict:
    from .time_projection import time_resampler_config  # the SD3 projection's own shape rules

    cfg = time_resampler_config(s)
    return dict(
        num_tokens=cfg.num_queries,
        feature="hidden",
        feature_dim=cfg.embed_dim,
        cross_attention_dim=cfg.output_dim,
        time_resampler=cfg,
    )


# Order matters: the first layout whose signatures are present wins (the DiT layouts, told apart by their
# ip_adapter keys, first; FaceID-Plus before FaceID before basic).
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "xlabs-flux",
        ("proj.weight", "proj.bias", "norm.weight"),
        _basic,
        ip_signature=("0.to_k_ip.bias",),
        host="flux",
        negative="black",
    ),
    Layout(
        "instantx-flux",
        ("proj.0.weight", "proj.2.weight", "norm.weight"),
        _mlp_tokens,
        ip_signature=("0.to_k_ip.weight",),
        host="flux",
        encoder_kind="siglip",
        negative="black",
    ),
    Layout(
        "instantx-sd3",
        ("latents", "proj_in.weight", "time_embedding.linear_1.weight"),
        _time_resampler,
        ip_signature=("0.norm_ip.linear.weight",),
        host="sd3",
        encoder_kind="siglip",
        negative="zeros",
    ),
    Layout("faceid-plus", ("perceiver_resampler.proj_in.weight", "proj.0.weight"), _faceid, supported=False),
    Layout("faceid", ("proj.0.weight", "proj.2.weight", "norm.weight"), _faceid, supported=False),
    Layout("plus", ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight"), _plus),
    Layout("full-face", ("proj.0.weight", "proj.2.weight", "proj.3.weight"), _full_face),
    Layout("basic", ("proj.weight", "proj.bias", "norm.weight"), _basic),
)


def _layers(ckpt: Checkpoint, cross: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Read the per-layer ``{i}.to_k_ip`` / ``{i}.to_v_ip`` pairs and check them against each other."""
    ids: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, value in ckpt.ip_adapter.items():
        m = re.match(r"(\d+)\.(to_k_ip|to_v_ip)\.weight$", key)
        if m:
            ids.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(value.shape)
    if not ids:
        raise CheckpointError(
            f"no '<i>.to_k_ip.weight' / '<i>.to_v_ip.weight' tensors in 'ip_adapter' "
            f"(found {_sample(ckpt.ip_adapter)})"
        )
    hidden = []
    for i in sorted(ids):
        pair = ids[i]
        if set(pair) != {"to_k_ip", "to_v_ip"}:
            raise CheckpointError(f"layer {i} has {sorted(pair)} but needs both to_k_ip and to_v_ip")
        k, v = pair["to_k_ip"], pair["to_v_ip"]
        if k != v or len(k) != 2 or k[1] != cross:
            raise CheckpointError(
                f"layer {i}: to_k_ip {list(k)} / to_v_ip {list(v)}; expected two equal "
                f"[hidden size, {cross}] matrices (the projection's token width is {cross})"
            )
        hidden.append(k[0])
    return tuple(sorted(ids)), tuple(hidden)


def _sample(d: dict) -> str:
    keys = sorted(d)
    return ", ".join(repr(k) for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def detect(ckpt: Checkpoint) -> AdapterSpec:
    """Recognise the variant of ``ckpt`` and derive everything needed to build and attach it."""
    keys, ip_keys = set(ckpt.image_proj), set(ckpt.ip_adapter)
    layout = next(
        (
            lay
            for lay in LAYOUTS
            if all(k in keys for k in lay.signature) and all(k in ip_keys for k in lay.ip_signature)
        ),
        None,
    )
    if layout is None:
        raise CheckpointError(
            f"{ckpt.source}: unknown image projection (keys {_sample(ckpt.image_proj)}); expected one of "
            "the official layouts: basic (proj, norm), plus (Resampler: latents, proj_in, layers, proj_out, "
            "norm_out), full-face (MLP proj.0/2/3), FaceID; for Flux / SD3.5: XLabs (proj, norm), InstantX "
            "(MLP proj.0/2 + norm; time-conditioned resampler)"
        )
    try:
        numbers = layout.derive(ckpt.image_proj)
        layer_ids, hidden = _layers(ckpt, numbers["cross_attention_dim"])
    except CheckpointError as e:
        raise CheckpointError(
            f"{ckpt.source}: {layout.name} IP-Adapter with inconsistent tensors: {e}"
        ) from None
    names = OFFICIAL_NAMES.get((layout.name, numbers["cross_attention_dim"], numbers["feature_dim"]), ())
    return AdapterSpec(
        layout=layout.name,
        names=names,
        layer_ids=layer_ids,
        hidden_sizes=hidden,
        supported=layout.supported,
        host=layout.host,
        encoder_kind=layout.encoder_kind,
        negative=layout.negative,
        **numbers,
    )


def family(unet_or_cross: Any) -> str:
    """``SD1.5 family`` / ``SDXL family`` / ... from a cross-attention dim or a model whose config has one."""
    cross = unet_or_cross
    if not isinstance(cross, int):
        cross = unet_or_cross.config.cross_attention_dim
    return {768: "SD1.5 family", 1024: "SD2 family", 2048: "SDXL family"}.get(cross, "unknown family")
