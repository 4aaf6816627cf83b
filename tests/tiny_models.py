"""Tiny random-weight models built from configs, saved to folders and loaded back through real loaders.

Dims are chosen so that every mismatch the library must catch is representable:
- SD1.5-style: cross-attention dim 32, 7 cross-attention layers (hidden 32/64), text hidden 32.
- SDXL-style: cross-attention dim 64 (text encoders of 16 and 48), 4 cross-attention layers (hidden 64).
- "ViT-H-like" encoder: pooled 24, hidden 32, 17 positions; "bigG-like": pooled 40, hidden 48.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    MotionAdapter,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ipadapter.adapters.checkpoint import Checkpoint, save_checkpoint
from ipadapter.adapters.projection import build_projection
from ipadapter.adapters.variants import AdapterSpec, ResamplerConfig
from ipadapter.mini.tokenizer import build_tokenizer

SD15_CROSS, SDXL_CROSS = 32, 64
VIT_H = {"pooled": 24, "hidden": 32}
BIG_G = {"pooled": 40, "hidden": 48}


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    return build_tokenizer(folder)


def _text_config(hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_sd15(folder: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """A tiny SD1.5-style pipeline saved in diffusers layout at ``folder`` (9 input channels: inpainting)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=SD15_CROSS,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=make_tokenizer(folder / "_tok"),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL-style pipeline (two text encoders, text_time conditioning) saved at ``folder``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=SDXL_CROSS,
        norm_num_groups=32,
    )
    tok = make_tokenizer(folder / "_tok")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        # Text encoders of different widths, like SDXL's CLIP-L (768) and OpenCLIP-bigG (1280): diffusers'
        # single-file loader tells them apart by width. 16 + 48 = the UNet's cross-attention dim.
        text_encoder=CLIPTextModel(_text_config(16)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(48)),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=_scheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


def build_controlnet(folder: Path, base: Path, seed: int = 0) -> Path:
    """A tiny ControlNet for the pipeline at ``base``, with random (not zero) output convolutions."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # zero-initialised outputs would make any ControlNet a no-op
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.1)
    net.save_pretrained(folder)
    return folder


def build_motion_adapter(folder: Path, blocks: tuple[int, ...] = (32, 64), seed: int = 0) -> Path:
    """A tiny AnimateDiff motion adapter (fits the tiny UNets: blocks 32/64, one layer each)."""
    torch.manual_seed(seed)
    MotionAdapter(
        block_out_channels=blocks,
        motion_layers_per_block=1,
        motion_norm_num_groups=32,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    ).save_pretrained(folder)
    return folder


def build_encoder(folder: Path, dims: dict[str, int], seed: int = 0) -> Path:
    """A tiny CLIPVisionModelWithProjection (32 px, patch 8 -> 17 positions) saved at ``folder``."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=dims["hidden"],
        projection_dim=dims["pooled"],
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


# Tiny analogues of the official variants: (layout, base, encoder dims)
VARIANTS = {
    "sd15": ("basic", "sd15", VIT_H),
    "plus_sd15": ("plus", "sd15", VIT_H),
    "full-face_sd15": ("full-face", "sd15", VIT_H),
    "sdxl": ("basic", "sdxl", BIG_G),
    "sdxl_vit-h": ("basic", "sdxl", VIT_H),
    "plus_sdxl_vit-h": ("plus", "sdxl", VIT_H),
}


def layer_sizes(base: str) -> tuple[int, ...]:
    """Hidden sizes of the tiny UNets' cross-attention layers, in attn_processors order."""
    # sd15: down0 32, down1 64, up0 64 64, up1 32 32, mid 64.  sdxl: down1 64, up0 64 64, mid 64.
    return (32, 64, 64, 64, 32, 32, 64) if base == "sd15" else (64, 64, 64, 64)


def make_checkpoint(
    variant: str, seed: int = 0, dtype: torch.dtype = torch.float16, hidden: tuple[int, ...] | None = None
) -> Checkpoint:
    """Random weights in the official checkpoint layout for a tiny analogue of ``variant``.

    ``hidden``: the cross-attention layers' hidden sizes of another UNet (default: the tiny one of the base)."""
    layout, base, enc = VARIANTS[variant]
    cross = SD15_CROSS if base == "sd15" else SDXL_CROSS
    feature = "pooled" if layout == "basic" else "hidden"
    resampler = None
    if layout == "plus":
        resampler = ResamplerConfig(
            dim=32,
            depth=4,
            dim_head=64,
            heads=1,
            num_queries=8,
            embedding_dim=enc["hidden"],
            output_dim=cross,
            ff_mult=4,
        )
    hidden = hidden or layer_sizes(base)
    spec = AdapterSpec(
        layout=layout,
        names=(),
        num_tokens=4 if layout == "basic" else None,
        feature=feature,
        feature_dim=enc[feature],
        cross_attention_dim=cross,
        layer_ids=tuple(range(1, 2 * len(hidden), 2)),
        hidden_sizes=hidden,
        resampler=resampler,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the projection's own init (biases, latents) must be seeded too
        torch.manual_seed(seed)
        proj = build_projection(spec)
    image_proj = {k: _random_like(v, gen) for k, v in proj.state_dict().items()}
    ip_adapter = {}
    for layer_id, size in zip(spec.layer_ids, hidden, strict=True):
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{layer_id}.{name}.weight"] = torch.randn(size, cross, generator=gen) * cross**-0.5
    return Checkpoint(
        {k: v.to(dtype) for k, v in image_proj.items()},
        {k: v.to(dtype) for k, v in ip_adapter.items()},
        source=f"tiny {variant}",
    )


def _random_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    fan_in = t.shape[-1] if t.ndim > 1 else 1
    noise = torch.randn(t.shape, generator=gen)
    if t.ndim == 1:  # LayerNorm weight/bias or a bias: stay near the usual values but not equal to them
        return t + 0.1 * noise
    return noise * fan_in**-0.5


def save_variant(folder: Path, variant: str, fmt: str, seed: int = 0) -> Path:
    """Save a tiny ``variant`` checkpoint as ``folder/<variant>.<fmt>`` (bin: nested, safetensors: flat)."""
    folder.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(make_checkpoint(variant, seed), folder / f"ip-adapter_{variant}.{fmt}")
