"""Checkpoints in every official FaceID layout (DESIGN.md §3.6): tiny random ones for the tiny UNets of
tiny_models, and official-size ones of meta tensors (shapes only) for the real SD1.5 / SDXL UNets.

Per layout (E = 512 face embedding, D = the UNet's cross-attention dim):
- faceid: MLP ``proj.0 [2E, E]``, ``proj.2 [4D, 2E]``, ``norm [D]``; LoRA on every attention processor;
  ``to_k_ip`` / ``to_v_ip`` on the odd (cross-attention) ones.
- faceid-plus (plus and plusv2: identical tensors): the same MLP + ``perceiver_resampler.*`` (width D, depth 4,
  4 queries = the MLP's tokens; proj_in reads the CLIP hidden width); LoRA as faceid.
- faceid-portrait: the MLP with 16 tokens per face (``proj.2 [16D, 2E]``); no LoRA.
- faceid-portrait-unnorm: a plus Resampler (``latents``, ``proj_in [dim, E]``, ...) with 16 queries; no LoRA.
Every attention processor's LoRA sizes come from the modules of a real UNet (``attn_processors`` order).
Depth 4, 4 FaceID-Plus tokens and a 2E-wide MLP: diffusers' converter assumes them whatever the file holds.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import tiny_models as tm
import torch
from diffusers import UNet2DConditionModel

from ipadapter.adapters.checkpoint import Checkpoint, save_checkpoint
from ipadapter.adapters.projection import build_projection
from ipadapter.adapters.variants import AdapterSpec, ResamplerConfig

FACE = 512
LORA_RANK = 4  # official: 128
PARTS = ("to_q", "to_k", "to_v", "to_out")

# official file stem (after "ip-adapter-") -> (layout, base)
FACEID_VARIANTS = {
    "faceid_sd15": ("faceid", "sd15"),
    "faceid_sdxl": ("faceid", "sdxl"),
    "faceid-plus_sd15": ("faceid-plus", "sd15"),
    "faceid-plusv2_sd15": ("faceid-plus", "sd15"),
    "faceid-plusv2_sdxl": ("faceid-plus", "sdxl"),
    "faceid-portrait_sd15": ("faceid-portrait", "sd15"),
    "faceid-portrait-v11_sd15": ("faceid-portrait", "sd15"),
    "faceid-portrait_sdxl": ("faceid-portrait", "sdxl"),
    "faceid-portrait_sdxl_unnorm": ("faceid-portrait-unnorm", "sdxl"),
}
WITH_LORA = ("faceid", "faceid-plus")

SD15_CONFIG = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_CONFIG = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)


def attention_dims(unet: UNet2DConditionModel) -> list[dict[str, tuple[int, int]]]:
    """Per attention processor, in ``unet.attn_processors`` order: each projection's (in, out) features."""
    dims = []
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        mods = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}
        dims.append({part: (m.in_features, m.out_features) for part, m in mods.items()})
    return dims


@functools.cache
def tiny_unet_dims(base: str) -> tuple:
    """The tiny UNet of tiny_models (built through its real builder) as :func:`attention_dims`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = (tm.build_sd15 if base == "sd15" else tm.build_sdxl)(Path(tmp) / base)
        return tuple(attention_dims(UNet2DConditionModel.from_pretrained(folder, subfolder="unet")))


@functools.cache
def official_unet_dims(base: str) -> tuple:
    """The real SD1.5 / SDXL UNet's attention sizes (built on the meta device: no memory)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_CONFIG if base == "sd15" else SDXL_CONFIG))
    return tuple(attention_dims(unet))


def faceid_spec(layout: str, cross: int, clip_hidden: int, official: bool = False) -> AdapterSpec:
    """The projection's structure (no layers): official sizes, or tiny ones (resampler width 32, 1 head)."""
    tokens = 16 if layout.startswith("faceid-portrait") else 4
    resampler = None
    if layout == "faceid-plus":
        dim = cross
        resampler = ResamplerConfig(dim, 4, 64, max(dim // 64, 1), tokens, clip_hidden, cross, 4)
    elif layout == "faceid-portrait-unnorm":
        dim = 1280 if official else 32
        resampler = ResamplerConfig(dim, 4, 64, max(dim // 64, 1), tokens, FACE, cross, 4)
    return AdapterSpec(
        layout=layout,
        names=(),
        num_tokens=tokens,
        feature="face",
        feature_dim=FACE,
        cross_attention_dim=cross,
        layer_ids=(1,),
        hidden_sizes=(cross,),
        resampler=resampler,
        mlp_dim=2 * FACE,
    )


def faceid_checkpoint(
    layout: str,
    dims: tuple | list,
    cross: int,
    *,
    clip_hidden: int = tm.VIT_H["hidden"],
    rank: int = LORA_RANK,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    official: bool = False,
) -> Checkpoint:
    """A checkpoint in the official ``layout`` for a UNet with attention sizes ``dims`` (:func:`attention_dims`).
    ``official``: meta tensors at the official sizes (shapes only)."""
    gen = torch.Generator().manual_seed(seed)

    def make(*shape: int) -> torch.Tensor:
        if official:
            return torch.empty(shape, device="meta", dtype=dtype)
        return (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(dtype)

    spec = faceid_spec(layout, cross, clip_hidden, official)
    with torch.random.fork_rng(), torch.device("meta" if official else "cpu"):
        torch.manual_seed(seed)  # the projection's own init (LayerNorms, biases) underlies the noise below
        state = build_projection(spec).state_dict()
    if official:
        image_proj = {k: torch.empty(v.shape, device="meta", dtype=dtype) for k, v in state.items()}
    else:
        image_proj = {k: tm._random_like(v, gen).to(dtype) for k, v in state.items()}
    ip_adapter = {}
    for i, d in enumerate(dims):
        if layout in WITH_LORA:
            for part in PARTS:
                n_in, n_out = d[part]
                ip_adapter[f"{i}.{part}_lora.down.weight"] = make(rank, n_in)
                ip_adapter[f"{i}.{part}_lora.up.weight"] = make(n_out, rank)
        if i % 2:  # cross-attention: the image branch
            hidden = d["to_q"][1]
            ip_adapter[f"{i}.to_k_ip.weight"] = make(hidden, cross)
            ip_adapter[f"{i}.to_v_ip.weight"] = make(hidden, cross)
    return Checkpoint(image_proj, ip_adapter, source=f"{'official' if official else 'tiny'} {layout}")


def official_faceid(variant: str) -> Checkpoint:
    """The official file ``ip-adapter-{variant}``'s tensor shapes (meta), e.g. ``faceid-plusv2_sdxl``."""
    layout, base = FACEID_VARIANTS[variant]
    cross = 768 if base == "sd15" else 2048
    return faceid_checkpoint(
        layout, official_unet_dims(base), cross, clip_hidden=1280, rank=128, official=True
    )


def save_faceid(
    folder: Path,
    layout: str,
    base: str,
    fmt: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Save a tiny random ``layout`` checkpoint for the tiny ``base`` UNet as ``folder/<name>.<fmt>``
    (bin: nested, safetensors: flat). Default name: ``ip-adapter-<layout>_<base>``."""
    cross = tm.SD15_CROSS if base == "sd15" else tm.SDXL_CROSS
    ckpt = faceid_checkpoint(layout, tiny_unet_dims(base), cross, seed=seed, dtype=dtype)
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(ckpt, folder / f"{name or f'ip-adapter-{layout}_{base}'}.{fmt}")
