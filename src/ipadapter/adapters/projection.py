"""Feature -> image-token models. Parameter names follow the official checkpoints, so their
``image_proj`` state dicts load as they are.

Shapes: F = encoder feature dim, D = cross-attention dim, N = tokens, S = encoder sequence length.
The FaceID arrangements are in :mod:`.faceid`; the Perceiver parts they use are built here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .faceid import FaceIDPlusProjection, FaceIDProjection, join_faces, split_faces
from .time_projection import TimeResampler
from .variants import AdapterSpec, ResamplerConfig


class ImageProjModel(nn.Module):
    """basic / light / sdxl: pooled embedding (B, F) -> (B, N, D) via one linear layer and a LayerNorm."""

    def __init__(self, feature_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(feature_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)  # (B, N, D)


class MLPProjModel(nn.Module):
    """full-face: hidden states (B, S, F) -> (B, S, D), one token per encoder position."""

    def __init__(self, feature_dim: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(feature_dim, feature_dim),
            nn.GELU(),
            nn.Linear(feature_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds)


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents] (Flamingo's Perceiver Resampler, as IP-Adapter-Plus uses it)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, heads, n, d)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)  # (B, S, dim)
        latents = self.norm2(latents)  # (B, Q, dim)
        b, q_len, _ = latents.shape
        q = self._heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        # The reference splits 1/sqrt(d) as d^-1/4 on each side for fp16 stability, and softmaxes in fp32.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)  # (B, heads, Q, S+Q)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, q_len, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class Resampler(nn.Module):
    """plus / plus-face: hidden states (B, S, F) -> (B, Q, D) through ``depth`` Perceiver blocks."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim**0.5)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), _feed_forward(cfg.dim, cfg.ff_mult)]
            )
            for _ in range(cfg.depth)
        )

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(image_embeds.size(0), 1, 1)  # (B, Q, dim)
        x = self.proj_in(image_embeds)  # (B, S, dim)
        return self.norm_out(self.proj_out(_perceive(self.layers, x, latents)))  # (B, Q, D)


def _perceive(layers: nn.ModuleList, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The Perceiver blocks: latents (B, Q, dim) attend to [x; latents], then a feed-forward; both residual."""
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


class FacePerceiver(nn.Module):
    """FaceID-Plus's ``perceiver_resampler``: the Resampler's blocks with given latents (the face tokens) instead
    of learned ones: latents (B, N, dim), CLIP hidden states (B, S, F) -> (B, N, D). tencent FacePerceiverResampler."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), _feed_forward(cfg.dim, cfg.ff_mult)]
            )
            for _ in range(cfg.depth)
        )

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)  # (B, S, dim)
        return self.norm_out(self.proj_out(_perceive(self.layers, x, latents)))  # (B, N, D)


class FaceIDPortraitUnnormProjection(Resampler):
    """faceid-portrait-unnorm: the plus Resampler reading each raw (not L2-normalised) face embedding as a
    one-position sequence: (B, E) or (B, faces, E) -> (B, faces*Q, D), faces' tokens side by side.

    Reference: ComfyUI_IPAdapter_plus (``IPAdapter.init_proj_plus`` with embedding_dim 512 for files named
    ``*unnorm*``; the face's ``embedding``, not ``normed_embedding``, shaped (faces, 1, 512))."""

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        faces, batch = split_faces(image_embeds)  # (B*faces, E)
        return join_faces(super().forward(faces.unsqueeze(1)), batch)  # (B*faces, 1, E) -> (B, faces*Q, D)


def build_projection(spec: AdapterSpec) -> nn.Module:
    """An untrained projection model with the structure ``spec`` describes."""
    if spec.layout in ("basic", "xlabs-flux"):
        return ImageProjModel(spec.feature_dim, spec.cross_attention_dim, spec.num_tokens or 0)
    if spec.layout == "instantx-sd3" and spec.time_resampler is not None:
        return TimeResampler(spec.time_resampler)
    if spec.layout == "full-face":
        return MLPProjModel(spec.feature_dim, spec.cross_attention_dim)
    if spec.layout == "plus" and spec.resampler is not None:
        return Resampler(spec.resampler)
    if (
        spec.layout in ("faceid", "faceid-portrait", "instantx-flux")
        and spec.mlp_dim is not None
        and spec.num_tokens
    ):
        return FaceIDProjection(spec.feature_dim, spec.mlp_dim, spec.cross_attention_dim, spec.num_tokens)
    if spec.layout == "faceid-plus" and spec.mlp_dim is not None and spec.resampler is not None:
        perceiver = FacePerceiver(spec.resampler)
        return FaceIDPlusProjection(
            spec.feature_dim, spec.mlp_dim, spec.cross_attention_dim, spec.resampler.num_queries, perceiver
        )
    if spec.layout == "faceid-portrait-unnorm" and spec.resampler is not None:
        return FaceIDPortraitUnnormProjection(spec.resampler)
    raise ValueError(f"no projection model for layout {spec.layout!r}")
