"""Tiny random-weight DiT pipelines (Flux, SD3) built from configs, saved to folders, loaded back by real loaders.

Dims follow the real models' structure at toy size; every converter derives heads as ``to_q.out_features // 64``,
so attention heads are 64 wide here too (DESIGN.md §3.5).
- Flux (dev-like: guidance embedding): 2 heads x 64 = inner 128, 2 double + 2 single blocks, RoPE axes 16/24/24,
  text: CLIP hidden 32 (pooled 32) + T5 d_model 32. VAE: 4 latent channels, factor 2; packed 2x2 -> 16 channels.
  Native size: ``default_sample_size`` (128, fixed by FluxPipeline) x 2 = 256 px.
- SD3 (3.5-like: RMS q/k norm): 2 heads x 64 = inner 128, 2 joint blocks, patch 2, sample size 32 latents,
  text: two CLIP (hidden 16, projection 32 each: pooled 64) + T5 d_model 32. VAE: 16 latent channels, factor 2.
  Native size: sample size 32 x 2 = 64 px.
Both run 2 steps at 32 px in a fraction of a second on one CPU core (pass a small ``max_sequence_length``).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tiny_models import _text_config  # the CLIP text encoders are the SD ones' size
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ipadapter.mini.tokenizer import build_tokenizer

HEAD_DIM = 64  # the converters assume 64-wide heads
TEXT_DIM = 32  # T5 d_model = the transformers' joint_attention_dim

FLUX = {
    "patch_size": 1,
    "in_channels": 16,  # 4 latent channels x 2x2 packing
    "num_layers": 2,  # double blocks (XLabs: one IP pair per double block)
    "num_single_layers": 2,  # InstantX: IP in all 4 blocks
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": 32,  # CLIP text hidden (its pooled output)
    "guidance_embeds": True,  # like FLUX.1-dev, which the IP-Adapters serve
    "axes_dims_rope": (16, 24, 24),  # sums to the head dim
}
FLUX_LATENT_CHANNELS = 4

SD3 = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": HEAD_DIM,
    "num_attention_heads": 2,
    "joint_attention_dim": TEXT_DIM,
    "caption_projection_dim": 2 * HEAD_DIM,  # = inner dim
    "pooled_projection_dim": 64,  # the two CLIP projections, 32 + 32
    "qk_norm": "rms_norm",  # like SD3.5 (the InstantX SD3.5 adapter's norm_q / norm_k)
}


def make_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """An offline T5 tokenizer: Unigram over the printable ASCII characters (alone and word-initial)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok = T5TokenizerFast(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    tok.save_pretrained(folder)
    return tok


def _t5(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _vae(latent_channels: int) -> AutoencoderKL:
    """Two blocks: factor 2. The Flux/SD3 VAE config fields (shift, scale, no quant convs), as diffusers' tests."""
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def build_flux(folder: Path, seed: int = 0) -> Path:
    """A tiny FluxPipeline (see the module docstring) saved in diffusers layout at ``folder``."""
    torch.manual_seed(seed)
    t5_tok = make_t5_tokenizer(folder / "_t5tok")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(FLUX_LATENT_CHANNELS),
        text_encoder=CLIPTextModel(_text_config(32, 32)),
        tokenizer=build_tokenizer(folder / "_tok"),
        text_encoder_2=_t5(len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=FluxTransformer2DModel(**FLUX),
    )
    pipe.save_pretrained(folder)
    return folder


def build_sd3(folder: Path, seed: int = 0) -> Path:
    """A tiny StableDiffusion3Pipeline (see the module docstring) saved in diffusers layout at ``folder``."""
    torch.manual_seed(seed)
    clip_tok = build_tokenizer(folder / "_tok")
    t5_tok = make_t5_tokenizer(folder / "_t5tok")
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(SD3["in_channels"]),
        # CLIP-L / bigG analogues: hidden 16 each (16 + 16 = the T5 width they are padded to), pooled 32 + 32
        text_encoder=CLIPTextModelWithProjection(_text_config(16, 32)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(16, 32)),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5(len(t5_tok)),
        tokenizer_3=t5_tok,
        transformer=SD3Transformer2DModel(**SD3),
    )
    pipe.save_pretrained(folder)
    return folder


def _randomise_zero_init(modules: list[torch.nn.Module]) -> None:
    """ControlNets start as no-ops (zero-initialised outputs); random weights make their effect visible."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.normal_(0, 0.05)


def build_flux_controlnet(folder: Path, seed: int = 0, **overrides) -> Path:
    """A FluxControlNetModel for the tiny Flux: its dims, 2 double + 1 single block (``overrides`` change any)."""
    torch.manual_seed(seed)
    config = {k: v for k, v in FLUX.items()}
    config.update(num_layers=2, num_single_layers=1, axes_dims_rope=list(FLUX["axes_dims_rope"]))
    config.update(overrides)
    net = FluxControlNetModel(**config)
    _randomise_zero_init([*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder])
    net.save_pretrained(folder)
    return folder


def build_sd3_controlnet(folder: Path, seed: int = 0, **overrides) -> Path:
    """An SD3ControlNetModel for the tiny SD3: its dims, 1 joint block (applied every 2nd transformer block)."""
    torch.manual_seed(seed)
    config = {**SD3, "num_layers": 1, **overrides}
    net = SD3ControlNetModel(**config)
    _randomise_zero_init([*net.controlnet_blocks, net.pos_embed_input])
    net.save_pretrained(folder)
    return folder
