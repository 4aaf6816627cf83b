"""The InstantX SD3.5-Large IP-Adapter's image projection: a timestep-conditioned Perceiver resampler.

Math (one call, B = batch, S = encoder tokens, F = feature dim, H = hidden, Q = queries, D = output dim):

- ``temb = MLP(sinusoid(t))`` (cos-first sinusoid of the SD3 transformer's 0..1000 timestep; Linear-SiLU-Linear).
- ``x = proj_in(features) + temb``; the latents start as a learned ``(Q, H)`` array.
- per layer (AdaLN, as in DiT): ``shift_a, scale_a, shift_f, scale_f = Linear(SiLU(temb))``;
  the latents ``l' = LN(l) * (1 + scale_a) + shift_a`` attend (Perceiver) over ``[LN(x); l']``;
  ``l += attn``; then ``l += FF(LN(l) * (1 + scale_f) + shift_f)`` with FF = Linear-GELU-Linear, no bias.
- attention splits ``1/sqrt(d)`` as ``d^-1/4`` on q and on k (fp16 headroom) and softmaxes in fp32.
- ``tokens = LN(proj_out(l))``; the call returns ``(tokens (B, Q, D), temb (B, H))``. The SD3 blocks use
  ``temb`` again for their ``norm_ip`` AdaLayerNorm, so the projection runs on every denoising step.

Parameter names are the original InstantX ``image_proj`` keys (before diffusers renames them), so an official
state dict loads with ``strict=True``; :func:`time_resampler_config` reads every size from its tensor shapes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError

_DIM_HEAD = 64  # every converter (diffusers included) derives heads as to_q rows // 64


@dataclass(frozen=True)
class TimeResamplerConfig:
    """Sizes of a :class:`TimeResampler`. The official SD3.5-Large adapter: 1152, 1280, 2432, 4, 64, 20, 64, 320, 4."""

    embed_dim: int  # F, encoder feature width (SigLIP: 1152)
    hidden_dim: int  # H
    output_dim: int  # D, the transformer's joint-attention width
    depth: int
    dim_head: int = _DIM_HEAD
    heads: int = 20
    num_queries: int = 64  # Q, image tokens
    timestep_in_dim: int = 320  # sinusoid channels
    ff_mult: int = 4

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"TimeResamplerConfig sizes must be positive integers, got {bad}")


def _linear(name: str, rows: int, cols: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (rows, cols)} | ({f"{name}.bias": (rows,)} if bias else {})


def _norm(name: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (width,), f"{name}.bias": (width,)}


def _expected_shapes(cfg: TimeResamplerConfig) -> dict[str, tuple[int, ...]]:
    h, inner, ff = cfg.hidden_dim, cfg.heads * cfg.dim_head, cfg.hidden_dim * cfg.ff_mult
    shapes = {"latents": (1, cfg.num_queries, h)} | _linear("proj_in", h, cfg.embed_dim)
    shapes |= _linear("proj_out", cfg.output_dim, h) | _norm("norm_out", cfg.output_dim)
    shapes |= _linear("time_embedding.linear_1", h, cfg.timestep_in_dim)
    shapes |= _linear("time_embedding.linear_2", h, h)
    for i in range(cfg.depth):
        p = f"layers.{i}."
        shapes |= _norm(p + "0.norm1", h) | _norm(p + "0.norm2", h) | _linear(p + "0.to_q", inner, h, False)
        shapes |= _linear(p + "0.to_kv", 2 * inner, h, False) | _linear(p + "0.to_out", h, inner, False)
        shapes |= _norm(p + "1.0", h) | _linear(p + "1.1", ff, h, False) | _linear(p + "1.3", h, ff, False)
        shapes |= _linear(p + "2.1", 4 * h, h)  # AdaLN: shift/scale for attention, then for FF
    return shapes


def _dims(state: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    shape = tuple(state[key].shape) if key in state else None
    if shape is None or len(shape) != ndim:
        got = "missing" if shape is None else f"shape {list(shape)}"
        raise CheckpointError(f"time-resampler image_proj: {key!r} is {got}, expected a {ndim}-d tensor")
    return shape


def time_resampler_config(state: dict[str, torch.Tensor]) -> TimeResamplerConfig:
    """Sizes read from an InstantX-layout ``image_proj`` state dict (no prefix); every tensor must agree.

    hidden, embed = ``proj_in.weight``; output = ``proj_out.weight`` rows; queries = ``latents`` dim 1;
    timestep_in = ``time_embedding.linear_1.weight`` columns; heads = ``layers.0.0.to_q.weight`` rows // 64;
    ff_mult = ``layers.0.1.1.weight`` rows // hidden; depth = 1 + the highest ``layers.{i}``. Raises
    :class:`CheckpointError` naming the first missing, mis-shaped or unexpected key.
    """
    hidden, embed = _dims(state, "proj_in.weight", 2)
    inner, ff = _dims(state, "layers.0.0.to_q.weight", 2)[0], _dims(state, "layers.0.1.1.weight", 2)[0]
    for key, rows, unit in (
        ("layers.0.0.to_q.weight", inner, _DIM_HEAD),
        ("layers.0.1.1.weight", ff, hidden),
    ):
        if rows % unit:
            raise CheckpointError(
                f"time-resampler image_proj: {key!r} has {rows} rows, expected a multiple of {unit}"
                f" (dim_head 64; hidden {hidden} from 'proj_in.weight' {[hidden, embed]})"
            )
    cfg = TimeResamplerConfig(
        embed_dim=embed,
        hidden_dim=hidden,
        output_dim=_dims(state, "proj_out.weight", 2)[0],
        depth=1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))),
        heads=inner // _DIM_HEAD,
        num_queries=_dims(state, "latents", 3)[1],
        timestep_in_dim=_dims(state, "time_embedding.linear_1.weight", 2)[1],
        ff_mult=ff // hidden,
    )
    expected = _expected_shapes(cfg)
    for key, shape in expected.items():
        got = list(state[key].shape) if key in state else "missing"
        if got != list(shape):
            raise CheckpointError(
                f"time-resampler image_proj: {key!r} is {got}, expected {list(shape)} (sizes derived from"
                f" 'proj_in.weight' {[hidden, embed]}, 'layers.0.0.to_q.weight' rows {inner}; {cfg})"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"time-resampler image_proj: unexpected keys {extra[:5]} ({len(extra)} in all)")
    return cfg


class _AdaPerceiverAttention(nn.Module):
    """Latents attend over [features; latents]; the latents' LayerNorm is modulated by the timestep."""

    def __init__(self, cfg: TimeResamplerConfig) -> None:
        super().__init__()
        h, inner = cfg.hidden_dim, cfg.heads * cfg.dim_head
        self.heads, self.dim_head = cfg.heads, cfg.dim_head
        self.norm1 = nn.LayerNorm(h)  # features
        self.norm2 = nn.LayerNorm(h)  # latents
        self.to_q = nn.Linear(h, inner, bias=False)
        self.to_kv = nn.Linear(h, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, h, bias=False)

    def forward(
        self, x: torch.Tensor, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        b, q_len, _ = latents.shape
        x = self.norm1(x)  # (B, S, H)
        latents = self.norm2(latents) * (1 + scale[:, None]) + shift[:, None]  # (B, Q, H)
        q = self.to_q(latents).view(b, q_len, self.heads, self.dim_head).transpose(1, 2)  # (B, heads, Q, d)
        kv = self.to_kv(torch.cat((x, latents), dim=-2))  # (B, S+Q, 2*inner)
        k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        s = 1 / math.sqrt(math.sqrt(self.dim_head))  # d^-1/4 on each side
        weight = (q * s) @ (k * s).transpose(-2, -1)  # (B, heads, Q, S+Q)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, q_len, -1)  # (B, Q, inner)
        return self.to_out(out)  # (B, Q, H)


class _AdaFeedForward(nn.Sequential):
    """LayerNorm (modulated by the timestep) -> Linear -> GELU -> Linear, no biases in the linears."""

    def __init__(self, h: int, mult: int) -> None:
        super().__init__(
            nn.LayerNorm(h), nn.Linear(h, h * mult, bias=False), nn.GELU(), nn.Linear(h * mult, h, bias=False)
        )

    def forward(self, latents: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        norm, *mlp = self
        out = norm(latents) * (1 + scale[:, None]) + shift[:, None]  # (B, Q, H)
        for module in mlp:
            out = module(out)
        return out  # (B, Q, H)


class _Block(nn.ModuleList):
    """Checkpoint indices: 0 attention, 1 feed-forward, 2 the AdaLN projection SiLU -> Linear(H, 4H)."""

    def __init__(self, cfg: TimeResamplerConfig) -> None:
        h = cfg.hidden_dim
        super().__init__(
            [
                _AdaPerceiverAttention(cfg),
                _AdaFeedForward(h, cfg.ff_mult),
                nn.Sequential(nn.SiLU(), nn.Linear(h, 4 * h)),
            ]
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        attn, ff, ada = self
        shift_a, scale_a, shift_f, scale_f = ada(temb).chunk(4, dim=-1)  # 4 x (B, H)
        latents = attn(x, latents, shift_a, scale_a) + latents
        return ff(latents, shift_f, scale_f) + latents  # (B, Q, H)


class _TimestepMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


def timestep_sinusoid(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) fp32 ``[cos, sin]`` features (frequency shift 0, zero-padded if dim is odd)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    args = timestep[:, None].float() * torch.exp(exponent)[None, :]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    return F.pad(emb, (0, dim - 2 * half))  # (N, dim)


class TimeResampler(nn.Module):
    """Encoder hidden states (B, S, F) + timestep -> image tokens (B, Q, D) and the timestep embedding (B, H)."""

    def __init__(self, cfg: TimeResamplerConfig) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_dim
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, h) / h**0.5)
        self.proj_in = nn.Linear(cfg.embed_dim, h)
        self.proj_out = nn.Linear(h, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.time_embedding = _TimestepMLP(cfg.timestep_in_dim, h)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))

    def forward(self, features: torch.Tensor, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` (B, S, F); ``timestep`` 0-d, (1,) or (B,) on the 0..1000 scale SD3's transformer uses."""
        b = features.shape[0]
        t = timestep.reshape(-1).expand(b)  # (B,); a 0-d / 1-element timestep serves the whole batch
        temb = self.time_embedding(
            timestep_sinusoid(t, self.config.timestep_in_dim).to(features.dtype)
        )  # (B, H)
        x = self.proj_in(features) + temb[:, None]  # (B, S, H)
        latents = self.latents.expand(b, -1, -1)  # (B, Q, H)
        for block in self.layers:
            latents = block(x, latents, temb)
        return self.norm_out(self.proj_out(latents)), temb  # (B, Q, D), (B, H)
