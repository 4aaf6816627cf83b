"""FaceID projections (DESIGN.md §3.6): an InsightFace face embedding (and, for Plus, CLIP features of the face
crop) -> image tokens. Parameter names are the official ``image_proj`` keys, so h94/IP-Adapter-FaceID state
dicts load with ``strict=True``.

Shapes: E = face embedding width (512), H = the MLP's hidden width (official: 2E), N = tokens per face,
D = cross-attention dim, S / F = CLIP sequence length / hidden width, faces = face embeddings per sample.

- FaceID, Portrait (:class:`FaceIDProjection`; InstantX's Flux adapter has the same MLP over a SigLIP embedding): per face ``t = LN(reshape(W2 GELU(W1 e + b1) + b2, (N, D)))``;
  a portrait concatenates its faces' tokens: (B, faces, E) -> (B, faces*N, D). Reference: tencent-ailab/IP-Adapter
  ``ip_adapter/ip_adapter_faceid.py`` (``MLPProjModel``) and ``ip_adapter_faceid_separate.py`` (``get_image_embeds``
  folds (b, n, E) into b*n rows and back into (b, n*N, D)).
- FaceID-Plus(V2) (:class:`FaceIDPlusProjection`): ``x = t`` above (B, N, D); ``out = Perceiver(latents=x,
  features=proj_in(clip_hidden))``; V2 (``shortcut``): ``out = x + s_scale * out``. Reference: tencent
  ``ProjPlusModel`` / ``FacePerceiverResampler``; diffusers ``IPAdapterFaceIDPlusImageProjection``.

The Perceiver itself and portrait-unnorm's Resampler are built in :mod:`.projection` (where the shared Perceiver
blocks live) and handed in; this module only arranges them, so the two modules do not import each other.
"""

from __future__ import annotations

import torch
from torch import nn


def split_faces(id_embeds: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, E) or (B, faces, E) -> ((B*faces, E), B): every face becomes its own row."""
    if id_embeds.ndim == 2:
        return id_embeds, id_embeds.shape[0]
    if id_embeds.ndim != 3:
        raise ValueError(
            f"face embeddings must be (batch, dim) or (batch, faces, dim), got {list(id_embeds.shape)}"
        )
    b, faces, dim = id_embeds.shape
    return id_embeds.reshape(b * faces, dim), b


def join_faces(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*faces, N, D) -> (B, faces*N, D): each sample's faces' tokens side by side, face by face."""
    return tokens.reshape(batch, -1, tokens.shape[-1])


class FaceIDProjection(nn.Module):
    """FaceID / portrait: face embeddings (B, E) or (B, faces, E) -> (B, faces*N, D) through an MLP."""

    def __init__(self, id_dim: int, mlp_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Sequential(
            nn.Linear(id_dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, cross_attention_dim * num_tokens)
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def face_tokens(self, faces: torch.Tensor) -> torch.Tensor:
        """(R, E) -> (R, N, D): one face per row."""
        x = self.proj(faces).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(x)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        faces, batch = split_faces(id_embeds)  # (B*faces, E)
        return join_faces(self.face_tokens(faces), batch)  # (B, faces*N, D)


class FaceIDPlusProjection(FaceIDProjection):
    """FaceID-Plus(V2): the face MLP's tokens are the latents of a Perceiver over the face crop's CLIP features.

    ``perceiver``: a module with ``forward(latents (B, N, D), features (B, S, F)) -> (B, N, D)`` whose parameters
    are the official ``perceiver_resampler.*`` (proj_in, layers, proj_out, norm_out)."""

    def __init__(
        self, id_dim: int, mlp_dim: int, cross_attention_dim: int, num_tokens: int, perceiver: nn.Module
    ) -> None:
        super().__init__(id_dim, mlp_dim, cross_attention_dim, num_tokens)
        self.perceiver_resampler = perceiver

    def forward(
        self,
        id_embeds: torch.Tensor,
        clip_hidden: torch.Tensor,
        shortcut: bool = False,
        s_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """id_embeds (B, E), clip_hidden (B, S, F) -> (B, N, D).

        ``shortcut`` (PlusV2) is structure, a Python bool; ``s_scale`` may be a tensor (0-d or broadcastable to
        (B, N, D)), so a new value never recompiles a compiled graph."""
        x = self.face_tokens(id_embeds)  # (B, N, D)
        out = self.perceiver_resampler(x, clip_hidden)  # (B, N, D)
        if shortcut:
            out = x + s_scale * out
        return out
