"""What the recipe trains: the adapter layout for a UNet and image encoder, its first weights, the module the
optimizer sees (adapter inside the frozen UNet), and the trained weights read back as an adapter file.

Trained: the image projection and every layer's ``to_k_ip`` / ``to_v_ip`` (initialised as copies of that
layer's ``to_k`` / ``to_v``); for the FaceID variants also the UNet LoRA on every attention processor's
``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` (as tencent's FaceID training: ``down`` normal with std 1/rank,
``up`` zero, so training starts from the base UNet exactly); everything else is frozen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters.checkpoint import Checkpoint, ip_key, load_checkpoint
from ..adapters.projection import build_projection
from ..adapters.variants import AdapterSpec, ResamplerConfig, detect
from ..errors import IncompatibleModelError
from ..hosts.lora import lora_key, lora_modules
from ..hosts.unet import cross_attention_layers
from ..prompt.conditioning import ImagePrompt
from ..prompt.faces import EMBED_DIM
from ..sources import resolve_adapter


def default_training_encoder(pipe: Any, variant: str) -> str:
    """The official encoder a variant is trained with: ViT-H for SD1.5 and SDXL plus, bigG for SDXL basic."""
    sdxl = pipe.unet.config.cross_attention_dim == 2048
    sub = "sdxl_models/image_encoder" if sdxl and variant == "basic" else "models/image_encoder"
    return f"h94/IP-Adapter/{sub}"


def new_spec(
    variant: str, unet: nn.Module, encoder: nn.Module | None, num_tokens: int, lora_rank: int = 0
) -> AdapterSpec:
    """The adapter layout the recipe trains for this UNet and image encoder (official hyper-parameters).

    FaceID (``faceid``, ``faceid-plus``): the face MLP 512 -> 1024 -> tokens; Plus adds the perceiver over the
    face crop's CLIP hidden states (width = cross-attention dim, depth 4, heads of 64); ``lora_rank`` > 0 adds
    the LoRA on every attention processor of the UNet. ``encoder``: None for faceid (it reads no image)."""
    if variant in ("faceid", "faceid-plus"):
        return _faceid_spec(variant, unet, encoder, num_tokens, lora_rank)
    layers = cross_attention_layers(unet)
    cross = layers[0].cross_attention_dim
    config = encoder.config
    resampler = None
    if variant == "basic":
        feature, feature_dim = "pooled", int(config.projection_dim)
    else:
        feature, feature_dim = "hidden", int(config.hidden_size)
        # SD1.5 plus: dim = cross dim (768), 12 heads; SDXL plus: dim 1280, 20 heads; heads of 64 dims.
        dim = 1280 if cross == 2048 else cross
        resampler = ResamplerConfig(
            dim=dim,
            depth=4,
            dim_head=64,
            heads=max(1, dim // 64),
            num_queries=num_tokens,
            embedding_dim=feature_dim,
            output_dim=cross,
            ff_mult=4,
        )
    return AdapterSpec(
        layout=variant,
        names=(),
        num_tokens=num_tokens,
        feature=feature,
        feature_dim=feature_dim,
        cross_attention_dim=cross,
        layer_ids=tuple(2 * layer.index + 1 for layer in layers),
        hidden_sizes=tuple(layer.hidden_size for layer in layers),
        resampler=resampler,
    )


def _faceid_spec(
    variant: str, unet: nn.Module, encoder: nn.Module | None, num_tokens: int, lora_rank: int
) -> AdapterSpec:
    layers = cross_attention_layers(unet)
    cross = layers[0].cross_attention_dim
    resampler = None
    if variant == "faceid-plus":
        # the official perceiver: width = the tokens' width (its latents are the face tokens), heads of 64
        hidden = int(encoder.config.hidden_size)
        heads = max(1, cross // 64)
        resampler = ResamplerConfig(cross, 4, 64, heads, num_tokens, hidden, cross, 4)
    return AdapterSpec(
        layout=variant,
        names=(),
        num_tokens=num_tokens,
        feature="face",
        feature_dim=EMBED_DIM,
        cross_attention_dim=cross,
        layer_ids=tuple(2 * layer.index + 1 for layer in layers),
        hidden_sizes=tuple(layer.hidden_size for layer in layers),
        resampler=resampler,
        lora_rank=lora_rank or None,
        lora_ids=tuple(range(len(unet.attn_processors))) if lora_rank else (),
        mlp_dim=2 * EMBED_DIM,  # official: 1024
    )


def initial_checkpoint(spec: AdapterSpec, unet: nn.Module, seed: int) -> Any:
    """A fresh projection and ``to_k_ip``/``to_v_ip`` copied from each layer's ``to_k``/``to_v``; with a LoRA
    (FaceID), ``down`` ~ N(0, 1/rank) and ``up`` = 0 on every projection of ``spec.lora_ids``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = build_projection(spec)
        ip_adapter = {}
        rank = spec.lora_rank or 0
        for (layer_id, part), module in (lora_modules(unet, spec.lora_ids) if rank else {}).items():
            ip_adapter[lora_key(layer_id, part, "down")] = torch.randn(rank, module.in_features) / rank
            ip_adapter[lora_key(layer_id, part, "up")] = torch.zeros(module.out_features, rank)
    for layer, layer_id in zip(cross_attention_layers(unet), spec.layer_ids, strict=True):
        attn = unet.get_submodule(layer.name.removesuffix(".processor"))
        ip_adapter[ip_key(layer_id, "to_k_ip")] = attn.to_k.weight.detach().float().clone()
        ip_adapter[ip_key(layer_id, "to_v_ip")] = attn.to_v.weight.detach().float().clone()
    image_proj = {k: v.detach().float().clone() for k, v in projection.state_dict().items()}
    return Checkpoint(image_proj, ip_adapter, source="initialisation")


def start_checkpoint(spec: AdapterSpec, unet: nn.Module, seed: int, init_adapter: str | None) -> Any:
    """The weights training starts from: ``init_adapter`` (fine-tuning; it must have ``spec``'s layout, tokens
    and feature size) or, without it, :func:`initial_checkpoint`."""
    if not init_adapter:
        return initial_checkpoint(spec, unet, seed)
    init = load_checkpoint(resolve_adapter(init_adapter))
    init_spec = detect(init)
    if (init_spec.layout, init_spec.feature_dim, init_spec.num_tokens) != (
        spec.layout,
        spec.feature_dim,
        spec.num_tokens,
    ):
        raise IncompatibleModelError(
            f"--init-adapter '{init_adapter}' is a {init_spec.layout} adapter with {init_spec.num_tokens} "
            f"tokens from {init_spec.feature_dim}-dim features; this run trains a {spec.layout} adapter with "
            f"{spec.num_tokens} tokens from {spec.feature_dim}-dim features"
        )
    if init_spec.lora_rank != spec.lora_rank:
        have, want = (f"rank {r} LoRA" if r else "no LoRA" for r in (init_spec.lora_rank, spec.lora_rank))
        raise IncompatibleModelError(
            f"--init-adapter '{init_adapter}' carries {have}; this run trains {want}: pass --lora-rank "
            f"{init_spec.lora_rank or 0}"
        )
    return init


def freeze(
    pipe: Any, handle: Any, encoder: nn.Module | None, device: torch.device, dtype: torch.dtype
) -> list[nn.Parameter]:
    """Freeze every model and place it on ``device`` (in ``dtype``; the VAE stays float32), then make the
    adapter's weights (a FaceID LoRA's too) trainable in float32 there; returns them. ``encoder``: None when
    the adapter reads no image features (faceid)."""
    encoders = [encoder] if encoder is not None else []
    for module in (pipe.unet, pipe.vae, *encoders, *text_encoders(pipe)):
        module.requires_grad_(False)
        module.eval()
    params = handle.parameters()
    for module in (pipe.unet, *text_encoders(pipe), *encoders):
        place(module, device, dtype)
    place(pipe.vae, device, torch.float32)  # the SDXL VAE overflows in float16
    if handle.lora is not None:
        handle.lora.to(device)  # with its strength buffer
    for p in params:
        p.data = p.data.to(device=device, dtype=torch.float32)
        p.requires_grad_(True)
    handle.projection.train()
    return params


class AdapterTrainModule(nn.Module):
    """The trainable adapter and the frozen UNet it lives in: ``forward`` predicts the noise (or v).

    ``lora``: a FaceID adapter's LoRA set (its hooks act inside the UNet); registered here so that DDP, FSDP
    and DeepSpeed see its parameters as the module's. ``shortcut``: FaceID-PlusV2's (tokens = face tokens +
    perceiver output)."""

    def __init__(
        self,
        unet: nn.Module,
        projection: nn.Module,
        name: str,
        lora: nn.Module | None = None,
        shortcut: bool = False,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.projection = projection
        self.name = name
        self.lora = lora
        self.shortcut = shortcut

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        features: torch.Tensor | None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        face: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``features``: image features (faceid-plus: the face crop's; faceid: None); ``face`` (B, 512): the
        FaceID variants' face embeddings."""
        # DeepSpeed runs the whole module (adapter included) in fp16/bf16; elsewhere the adapter is float32
        dtype = next(self.projection.parameters()).dtype
        if face is None:
            tokens = self.projection(features.to(dtype))  # (B, N, D)
        elif features is None:
            tokens = self.projection(face.to(dtype))  # faceid: (B, N, D)
        else:  # faceid-plus
            tokens = self.projection(face.to(dtype), features.to(dtype), self.shortcut)
        prompt = ImagePrompt({self.name: tokens}, {self.name: tokens}, guidance=False)
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs={"image_prompt": prompt},
        ).sample


def trainable_state(handle: Any, gathered: dict[str, torch.Tensor] | None = None) -> Any:
    """The adapter's current weights as an official-layout :class:`Checkpoint` (float32, CPU).

    ``gathered``: a full state dict of the :class:`AdapterTrainModule` (FSDP gathers one from the shards);
    without it the weights are read from the live modules, which hold them whole (single process, DDP,
    DeepSpeed ZeRO 1/2).
    """
    if gathered is None:
        live = handle.state_dict()
        image_proj, ip_adapter = live.image_proj, live.ip_adapter
    else:
        image_proj = {
            k.removeprefix("projection."): v for k, v in gathered.items() if k.startswith("projection.")
        }
        ip_adapter = {key: gathered[f"unet.{name}"] for key, name in handle.unet_names().items()}
        for name in handle.lora.loras if handle.lora is not None else ():  # "{id}/{part}"
            layer_id, part = name.split("/")
            for side in ("down", "up"):
                ip_adapter[lora_key(int(layer_id), part, side)] = gathered[f"lora.loras.{name}.{side}.weight"]

    def copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    return Checkpoint(copy(image_proj), copy(ip_adapter), source="training")


def text_encoders(pipe: Any) -> list[nn.Module]:
    """The pipeline's text encoders (one for SD1.5, two for SDXL)."""
    return [
        m
        for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
        if m is not None
    ]


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen model; cast only when needed (diffusers warns about every cast)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)
