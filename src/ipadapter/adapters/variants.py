"""The registry of adapter variants, detected from checkpoint key signatures and shapes.

A *layout* is a family of checkpoints with the same structure (basic, plus, full-face, FaceID...). Everything
else (token count, dims, layer sizes, Resampler hyper-parameters) is derived from tensor shapes, never from a
file name. Official names are attached afterwards by matching the derived dims against DESIGN.md §3.1.

FaceID (DESIGN.md §3.6) adds layouts whose image_proj keys are shared with another layout, told apart by shapes:
a portrait's MLP makes 16 tokens per face (FaceID: 4), and portrait-unnorm's Resampler reads the 512-wide face
embedding (plus: CLIP hidden states). FaceID-Plus and PlusV2 have identical tensors: the spec says
``plus_version=None`` (unknown from keys); :func:`plus_version_hint` reads a file name, as a hint only.
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
FACE_DIM = 512  # InsightFace (buffalo_l / antelopev2) embedding width: what tells portrait-unnorm from plus
FACE_ENCODER = "InsightFace buffalo_l"
PORTRAIT_TOKENS = 16  # a FaceID portrait MLP's tokens per face (FaceID: 4)
PORTRAIT_FACES = 5  # faces the reference concatenates by default (tencent's portrait demo: n_cond=5)
PLUS_VERSIONS = ("v1", "v2")  # FaceID-Plus: v2 adds the shortcut, tokens = id + s * resampler

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
    ("faceid", 768, 512): ("ip-adapter-faceid_sd15",),
    ("faceid", 2048, 512): ("ip-adapter-faceid_sdxl",),
    ("faceid-plus", 768, 512): ("ip-adapter-faceid-plus_sd15", "ip-adapter-faceid-plusv2_sd15"),
    ("faceid-plus", 2048, 512): ("ip-adapter-faceid-plusv2_sdxl",),
    ("faceid-portrait", 768, 512): ("ip-adapter-faceid-portrait_sd15", "ip-adapter-faceid-portrait-v11_sd15"),
    ("faceid-portrait", 2048, 512): ("ip-adapter-faceid-portrait_sdxl",),
    ("faceid-portrait-unnorm", 2048, 512): ("ip-adapter-faceid-portrait_sdxl_unnorm",),
}


@dataclass(frozen=True)
class ResamplerConfig:
    """Hyper-parameters of the "plus" Resampler (Perceiver), all read from tensor shapes.

    FaceID-Plus's perceiver has no learned latents: ``num_queries`` is then the face MLP's token count."""

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

    layout: str  # a LAYOUTS name: "basic", "plus", "full-face", "faceid", "faceid-plus", ...
    names: tuple[str, ...]  # official names with this layout and these dims; () if none match
    # None: one token per encoder hidden state (full-face; 257 for ViT-H at 224 px); FaceID: tokens per face
    num_tokens: int | None
    feature: str  # what it consumes: "pooled" image_embeds, "hidden" (penultimate states) or "face"
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
    lora_rank: int | None = None  # FaceID: rank of the UNet LoRA it carries; None: no LoRA tensors
    lora_ids: tuple[int, ...] = ()  # positions in unet.attn_processors with LoRA (self-attention included)
    faces: int = 1  # portraits: faces whose tokens the reference concatenates by default
    plus_version: str | None = None  # faceid-plus: "v1" / "v2" (shortcut); None: unknown (keys cannot tell)
    mlp_dim: int | None = None  # FaceID: the face MLP's hidden width (proj.0 rows; official: 2 x 512)

    def __post_init__(self) -> None:
        if self.plus_version not in (None, *PLUS_VERSIONS):
            raise ValueError(
                f"plus_version must be one of {PLUS_VERSIONS} or None, got {self.plus_version!r}"
            )
        if self.plus_version is not None and self.layout != "faceid-plus":
            raise ValueError(f"plus_version applies to faceid-plus adapters only, not {self.layout}")
        if self.faces < 1 or (self.lora_rank is not None and self.lora_rank < 1):
            raise ValueError(f"faces ({self.faces}) and lora_rank ({self.lora_rank}) must be positive")

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def clip_feature(self) -> tuple[str, int] | None:
        """The CLIP encoder output it consumes, ``(feature, dim)``; FaceID-Plus: the face crop's hidden states.
        None when it needs no CLIP encoder (FaceID, portraits: the face embedding is all they read)."""
        if self.feature != "face":
            return self.feature, self.feature_dim
        if self.layout == "faceid-plus" and self.resampler is not None:
            return "hidden", self.resampler.embedding_dim
        return None

    @property
    def face_encoder(self) -> str | None:
        """The face recogniser whose embedding it reads (FaceID layouts), else None."""
        return FACE_ENCODER if self.feature == "face" else None

    @property
    def encoder(self) -> str | None:
        """The CLIP image encoder family this adapter was trained with, if the dims are an official one's."""
        if self.host != "unet":
            dit = DIT_ENCODERS.get((self.encoder_kind, self.feature, self.feature_dim))
            return dit[0] if dit else None
        hit = ENCODERS.get(self.clip_feature) if self.clip_feature else None
        return hit[0] if hit else None

    @property
    def encoder_subfolder(self) -> str | None:
        """Where that encoder lives in the h94/IP-Adapter repository (None for the DiT adapters)."""
        hit = ENCODERS.get(self.clip_feature) if self.host == "unet" and self.clip_feature else None
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
        out.update(
            num_layers=self.num_layers, encoder=self.encoder, base=self.base, face_encoder=self.face_encoder
        )
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
    accept: Callable[[dict[str, torch.Tensor]], bool] | None = None  # a shape test the keys cannot express


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


def _perceiver(s: dict, prefix: str = "") -> dict:
    """The Perceiver stack's sizes (``{prefix}proj_in``, ``layers``, ``proj_out``), shared by plus and FaceID."""
    dim, embedding_dim = _shape(s, f"{prefix}proj_in.weight", 2)
    output_dim, dim3 = _shape(s, f"{prefix}proj_out.weight", 2)
    pattern = re.compile(re.escape(prefix) + r"layers\.(\d+)\.0\.to_q\.weight$")
    depth = len({m.group(1) for k in s if (m := pattern.match(k))})
    if depth == 0 or dim3 != dim:
        raise CheckpointError(
            f"Resampler shapes do not chain: proj_in {[dim, embedding_dim]}, proj_out {[output_dim, dim3]}, "
            f"{depth} attention layers"
        )
    inner, _ = _shape(s, f"{prefix}layers.0.0.to_q.weight", 2)
    ff_inner, _ = _shape(s, f"{prefix}layers.0.1.1.weight", 2)
    if inner % RESAMPLER_HEAD_DIM or ff_inner % dim:
        raise CheckpointError(
            f"Resampler to_q has {inner} rows (not a multiple of the head size {RESAMPLER_HEAD_DIM}) or its "
            f"feed-forward width {ff_inner} is not a multiple of {dim}"
        )
    return dict(
        dim=dim,
        depth=depth,
        dim_head=RESAMPLER_HEAD_DIM,
        heads=inner // RESAMPLER_HEAD_DIM,
        embedding_dim=embedding_dim,
        output_dim=output_dim,
        ff_mult=ff_inner // dim,
    )


def _plus(s: dict) -> dict:
    _, queries, dim = _shape(s, "latents", 3)
    sizes = _perceiver(s)
    if sizes["dim"] != dim:
        raise CheckpointError(
            f"Resampler shapes do not chain: latents dim {dim}, proj_in rows {sizes['dim']}"
        )
    resampler = ResamplerConfig(num_queries=queries, **sizes)
    return dict(
        num_tokens=queries,
        feature="hidden",
        feature_dim=resampler.embedding_dim,
        cross_attention_dim=resampler.output_dim,
        resampler=resampler,
    )


def _portrait_unnorm(s: dict) -> dict:
    """A plus Resampler over the raw face embedding (ComfyUI_IPAdapter_plus: ``init_proj_plus``, 512 in)."""
    return _plus(s) | dict(feature="face", faces=PORTRAIT_FACES)


def _face_mlp(s: dict) -> dict:
    """FaceID (and instantx-flux): embedding (E) -> Linear(E, H), GELU, Linear(H, N*D) -> N tokens, LayerNorm(D)."""
    mlp_dim, id_dim = _shape(s, "proj.0.weight", 2)
    rows, mlp_dim2 = _shape(s, "proj.2.weight", 2)
    (cross,) = _shape(s, "norm.weight", 1)
    if mlp_dim2 != mlp_dim or rows % cross:
        raise CheckpointError(
            f"MLP projection shapes do not chain: proj.0 {[mlp_dim, id_dim]}, proj.2 {[rows, mlp_dim2]}, norm "
            f"{[cross]} (proj.2's rows must be a multiple of the norm width)"
        )
    return dict(
        num_tokens=rows // cross,
        feature="face",
        feature_dim=id_dim,
        cross_attention_dim=cross,
        mlp_dim=mlp_dim,
    )


def _portrait(s: dict) -> dict:
    return _face_mlp(s) | dict(faces=PORTRAIT_FACES)


def _faceid_plus(s: dict) -> dict:
    """FaceID-Plus(V2): the face MLP's tokens are the latents of a Perceiver over CLIP hidden states."""
    numbers = _face_mlp(s)
    sizes = _perceiver(s, "perceiver_resampler.")
    cross = numbers["cross_attention_dim"]
    if sizes["dim"] != cross or sizes["output_dim"] != cross:
        raise CheckpointError(
            f"perceiver_resampler width {sizes['dim']} / output {sizes['output_dim']} must both equal the face "
            f"tokens' width {cross} (its latents are those tokens; V2 adds them to its output)"
        )
    return numbers | dict(resampler=ResamplerConfig(num_queries=numbers["num_tokens"], **sizes))


def _tokens_per_face(s: dict) -> int | None:
    rows, norm = s.get("proj.2.weight"), s.get("norm.weight")
    if rows is None or norm is None or rows.ndim != 2 or norm.ndim != 1 or rows.shape[0] % norm.shape[0]:
        return None
    return rows.shape[0] // norm.shape[0]


def _reads_face(s: dict) -> bool:
    proj_in = s.get("proj_in.weight")
    return proj_in is not None and proj_in.ndim == 2 and proj_in.shape[1] == FACE_DIM


def _mlp_tokens(s: dict) -> dict:
    """instantx-flux: the FaceID MLP's structure (Linear, GELU, Linear to N*D, LayerNorm) over the pooled
    SigLIP output instead of a face embedding."""
    return _face_mlp(s) | dict(feature="pooled")


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


BASIC_KEYS = ("proj.weight", "proj.bias", "norm.weight")
FACE_MLP_KEYS = ("proj.0.weight", "proj.2.weight", "norm.weight")
RESAMPLER_KEYS = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight")

# Order matters: the first layout whose signatures are present (and whose ``accept`` holds) wins: the DiT
# layouts, told apart by their ip_adapter keys, first; FaceID-Plus before the face MLPs (a portrait: 16 tokens
# per face, before FaceID); portrait-unnorm (a Resampler reading the 512-d face embedding) before plus.
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "xlabs-flux",
        BASIC_KEYS,
        _basic,
        ip_signature=("0.to_k_ip.bias",),
        host="flux",
        negative="black",
    ),
    Layout(
        "instantx-flux",
        FACE_MLP_KEYS,
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
    Layout("faceid-plus", ("perceiver_resampler.proj_in.weight", "proj.0.weight"), _faceid_plus),
    Layout(
        "faceid-portrait",
        FACE_MLP_KEYS,
        _portrait,
        accept=lambda s: _tokens_per_face(s) == PORTRAIT_TOKENS,
    ),
    Layout("faceid", FACE_MLP_KEYS, _face_mlp),
    Layout("faceid-portrait-unnorm", RESAMPLER_KEYS, _portrait_unnorm, accept=_reads_face),
    Layout("plus", RESAMPLER_KEYS, _plus),
    Layout("full-face", ("proj.0.weight", "proj.2.weight", "proj.3.weight"), _full_face),
    Layout("basic", BASIC_KEYS, _basic),
)


def _layers(ckpt: Checkpoint, cross: int, host: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Read the per-layer ``{i}.to_k_ip`` / ``{i}.to_v_ip`` pairs and check them against each other.

    Other ``ip_adapter`` tensors (a FaceID file's LoRA) are not read here. On a UNet the pairs sit at odd ids:
    ``unet.attn_processors`` alternates self-attention (even, no image branch) and cross-attention (odd)."""
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
    even = [i for i in sorted(ids) if i % 2 == 0]
    if host == "unet" and even:
        raise CheckpointError(
            f"to_k_ip / to_v_ip at even ids {even[:4]}; on a UNet they belong to the cross-attention processors, "
            "the odd positions of unet.attn_processors"
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


LORA_PARTS = ("to_q", "to_k", "to_v", "to_out")


def _lora(ckpt: Checkpoint, layer_ids: tuple[int, ...], hidden: tuple[int, ...], cross: int) -> dict:
    """A FaceID file's UNet LoRA, ``{i}.{part}_lora.{down [r, in], up [out, r]}.weight`` on every attention
    processor i: its rank and ids, checked against each other and against the image layers."""
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, value in ckpt.ip_adapter.items():
        m = re.match(r"(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", key)
        if m:
            found.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = tuple(value.shape)
    if not found:
        return dict(lora_rank=None, lora_ids=())
    need = {f"{part}.{side}" for part in LORA_PARTS for side in ("down", "up")}
    ranks = set()
    for i, mats in sorted(found.items()):
        if set(mats) != need or any(len(shape) != 2 for shape in mats.values()):
            raise CheckpointError(
                f"LoRA of layer {i} has {sorted(mats)}; every layer needs 2-D down and up matrices for "
                f"{', '.join(LORA_PARTS)}"
            )
        dims = {p: (mats[f"{p}.down"][1], mats[f"{p}.up"][0]) for p in LORA_PARTS}  # part -> (in, out)
        ranks |= {mats[f"{p}.down"][0] for p in LORA_PARTS} | {mats[f"{p}.up"][1] for p in LORA_PARTS}
        outs = {dims["to_q"][1], dims["to_k"][1], dims["to_v"][1], dims["to_out"][0]}
        if dims["to_k"][0] != dims["to_v"][0] or len(outs) != 1:
            raise CheckpointError(
                f"LoRA of layer {i}: the (in, out) sizes {dims} do not fit one attention layer"
            )
    if len(ranks) != 1:
        raise CheckpointError(f"LoRA matrices have different ranks {sorted(ranks)}; expected one rank")
    missing = [i for i in layer_ids if i not in found]
    if missing:
        raise CheckpointError(f"image layers {missing[:4]} have no LoRA though other layers have one")
    for i, size in zip(layer_ids, hidden, strict=True):
        q_in, k_in = found[i]["to_q.down"][1], found[i]["to_k.down"][1]
        if (q_in, k_in) != (size, cross):
            raise CheckpointError(
                f"LoRA of cross-attention layer {i} reads {q_in} (query) and {k_in} (key) features; its to_k_ip "
                f"says hidden size {size} and cross-attention dim {cross}"
            )
    return dict(lora_rank=ranks.pop(), lora_ids=tuple(sorted(found)))


def plus_version_hint(filename: str) -> str | None:
    """What a FaceID-Plus file's *name* suggests (keys cannot tell): "plusv2" -> "v2", "plus" -> "v1", else None.

    A hint for messages and defaults only, as ComfyUI_IPAdapter_plus decides it ('plusv2' in the name); an
    explicit choice overrides it."""
    name = str(filename).replace("\\", "/").rsplit("/", 1)[-1].lower()
    if re.search(r"plus[-_ ]?v2", name):
        return "v2"
    return "v1" if "plus" in name else None


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
            if all(k in keys for k in lay.signature)
            and all(k in ip_keys for k in lay.ip_signature)
            and (lay.accept is None or lay.accept(ckpt.image_proj))
        ),
        None,
    )
    if layout is None:
        raise CheckpointError(
            f"{ckpt.source}: unknown image projection (keys {_sample(ckpt.image_proj)}); expected one of "
            "the official layouts: basic (proj, norm), plus (Resampler: latents, proj_in, layers, proj_out, "
            "norm_out), full-face (MLP proj.0/2/3), FaceID (MLP proj.0/2 + norm; Plus: + perceiver_resampler); "
            "for Flux / SD3.5: XLabs (proj, norm), InstantX (MLP proj.0/2 + norm; time-conditioned resampler)"
        )
    try:
        numbers = layout.derive(ckpt.image_proj)
        layer_ids, hidden = _layers(ckpt, numbers["cross_attention_dim"], layout.host)
        if layout.host == "unet":
            numbers |= _lora(ckpt, layer_ids, hidden, numbers["cross_attention_dim"])
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
