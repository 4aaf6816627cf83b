"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``) as a host, for InstantX's SD3.5 IP-Adapter.

Layers: the joint attention of every block, ``transformer_blocks.{i}.attn`` (DESIGN.md §3.5); SD3.5-Medium's
second, image-only attention (``attn2``) takes no branch. Per layer the adapter holds an AdaLN over its image
tokens (conditioned on the projection's own time embedding), image key/value projections and three RMS norms:

    ip  = SDPA(norm_q(Q_img), [norm_k(K_img); norm_ip_k(K_ip)], [V_img; V_ip])   (text tokens excluded)
    out = to_out(joint_attention_image_part + scale * ip)

where Q_img, K_img, V_img are the image stream's projections *before* the attention's own norms. The image
tokens come from a time-conditioned resampler (:class:`~ipadapter.adapters.time_projection.TimeResampler`), so
the pre-hook projects the call's encoder features at every transformer call, for the running timestep. The
pipelines batch classifier-free guidance (negatives first), as the UNet pipelines do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from torch import nn

from ..prompt.blocks import Block
from ..prompt.conditioning import ImagePrompt, Step, compiling, progress_of
from ..prompt.recording import Contribution
from .attention import BranchSlots, PassThroughProcessor, _times, compiled_regions
from .base import STATE_ATTR, Attachment, Host, HostLayer, install_processors

BLOCKS = "transformer_blocks"


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learnt weight (diffusers' ``RMSNorm`` with affine weights)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # float32 statistics
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class AdaNorm(nn.Module):
    """LayerNorm without affine weights, shifted and scaled by a projection of a time embedding:
    ``norm(x) * (1 + scale) + shift`` with ``shift, scale = linear(silu(temb)).chunk(2)``."""

    def __init__(self, temb_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, dim * 2)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb)).chunk(2, dim=1)  # (B, dim) each
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class SD3Branch(nn.Module):
    """One adapter's weights in one joint-attention layer (official key names: ``{i}.norm_ip.linear.*``,
    ``{i}.to_k_ip.weight``, ``{i}.to_v_ip.weight``, ``{i}.norm_q/norm_k/norm_ip_k.weight``)."""

    after_out = False

    def __init__(self, token_dim: int, hidden_size: int, head_dim: int, temb_dim: int) -> None:
        super().__init__()
        self.norm_ip = AdaNorm(temb_dim, token_dim)
        self.to_k_ip = nn.Linear(token_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(token_dim, hidden_size, bias=False)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        self.norm_ip_k = RMSNorm(head_dim)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image keys and values (B, N, hidden) for this step's tokens (B, N, D) and time embedding (B, T)."""
        normed = self.norm_ip(tokens, temb)
        return self.to_k_ip(normed), self.to_v_ip(normed)


class SD3AttnProcessor(BranchSlots):
    """diffusers' ``JointAttnProcessor2_0`` math plus every attached adapter's branch."""

    def __init__(self, layer: int, device: torch.device | None = None) -> None:
        super().__init__(layer)
        # what compiled code reads (see FluxAttnProcessor: one graph for blocks compiled one by one)
        self.register_buffer("layer_index", torch.tensor([layer], device=device), persistent=False)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> Any:
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, image_prompt, image_prompt_step
        )

    def forward(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> Any:
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        inner = key.shape[-1]
        head_dim = inner // attn.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, L, d)

        query, key, value = heads(query), heads(key), heads(value)
        raw = (query, key, value)  # the image stream before the attention's own norms: what the branches read
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            enc_q = heads(attn.add_q_proj(encoder_hidden_states))
            enc_k = heads(attn.add_k_proj(encoder_hidden_states))
            enc_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                enc_q = attn.norm_added_q(enc_q)
            if attn.norm_added_k is not None:
                enc_k = attn.norm_added_k(enc_k)
            query, key, value = (
                torch.cat([a, b], dim=2) for a, b in ((query, enc_q), (key, enc_k), (value, enc_v))
            )
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        text = None
        if encoder_hidden_states is not None:
            out, text = out[:, :length], out[:, length:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
        if image_prompt is not None and image_prompt_step is not None:
            out = self._add_branches(out, raw, image_prompt, image_prompt_step, batch, heads, attn.to_out[0])
        out = attn.to_out[1](attn.to_out[0](out))
        return out if text is None else (out, text)

    def _add_branches(
        self,
        out: torch.Tensor,
        raw: tuple,
        prompt: ImagePrompt,
        step: Step,
        batch: int,
        heads: Any,
        to_out: Any = None,
    ) -> torch.Tensor:
        q_img, k_img, v_img = raw
        base = out
        layer = self.layer_index if compiling() else self.layer
        for name, branch in self.named_branches():
            values = prompt.values(name) if name in prompt.tokens else None
            weight = None if values is None else prompt.control(name).weight(layer, step.progress, values)
            if weight is None or step.tokens is None or name not in step.tokens:
                continue  # exactly the model without this adapter (at this layer / step)
            tokens, temb = step.tokens[name]  # (B, N, D), (B, T): this step's
            k_ip, v_ip = branch(tokens.to(q_img.dtype), temb.to(q_img.dtype))
            keys = torch.cat([branch.norm_k(k_img), branch.norm_ip_k(heads(k_ip))], dim=2)
            vals = torch.cat([v_img, heads(v_ip)], dim=2)
            ip = F.scaled_dot_product_attention(
                branch.norm_q(q_img), keys, vals, dropout_p=0.0, is_causal=False
            )
            ip = ip.transpose(1, 2).reshape(batch, -1, out.shape[-1]).to(q_img.dtype)  # (B, L, inner)
            part = _times(weight, ip)
            if prompt.recorder is not None:
                where = Contribution(name, None, layer, 0, to_out)
                prompt.recorder.add(prompt, step, where, part, base)
            out = out + part
        return out


def _before_transformer(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """At every transformer call with an image prompt: progress, and each adapter's tokens for this step."""
    attention_kwargs = kwargs.get("joint_attention_kwargs") or {}
    prompt = attention_kwargs.get("image_prompt")
    if not isinstance(prompt, ImagePrompt):
        return None
    sample = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
    timestep = torch.as_tensor(timestep, device=sample.device)
    t = timestep.flatten()[0]
    # compiled code reads tensors, never a per-call Python value (blocks compiled one by one: made here)
    as_tensor = compiling() or compiled_regions(module.transformer_blocks)
    progress = progress_of(t, prompt.train_timesteps, as_tensor=as_tensor)
    state: Attachment | None = getattr(module, STATE_ATTR, None)
    batch = sample.shape[0]
    tokens = {}
    for name, handle in (state.adapters if state is not None else {}).items():
        rows = prompt.rows(name, batch)  # (B, S, F) encoder features
        if rows is None:
            continue
        param = next(handle.projection.parameters())
        times = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
        tokens[name] = handle.projection(rows.to(param.dtype), times.to(param.dtype))
    step = Step(progress, tuple(sample.shape[-2:]), tokens=tokens)
    if prompt.recorder is not None:
        prompt.recorder.count(None)
    kwargs = {**kwargs, "joint_attention_kwargs": {**attention_kwargs, "image_prompt_step": step}}
    return args, kwargs


class SD3Host(Host):
    """Stable Diffusion 3 / 3.5 transformers (``SD3Transformer2DModel``)."""

    kind = "sd3"
    noun = "SD3 transformer"
    attention_kwargs = "joint_attention_kwargs"

    def denoiser(self, pipe: Any) -> Any | None:
        model = getattr(pipe, "transformer", None)
        model = getattr(model, "_orig_mod", model)
        return model if isinstance(model, SD3Transformer2DModel) else None

    def layers(self, denoiser: Any) -> list[HostLayer]:
        out = []
        for name in denoiser.attn_processors:
            parts = name.split(".")  # transformer_blocks.{i}.attn.processor
            if len(parts) == 4 and parts[0] == BLOCKS and parts[2] == "attn":
                attn = denoiser.get_submodule(name.removesuffix(".processor"))
                inner = attn.to_q.out_features
                out.append(HostLayer(name, len(out), inner, inner))
        return out

    def block_map(self, denoiser: Any) -> dict[str, Block]:
        return {
            layer.name: Block(
                layer.index, layer.name.removesuffix(".attn.processor"), "joint", "joint blocks"
            )
            for layer in self.layers(denoiser)
        }

    def branch(self, spec: Any, layer: HostLayer, denoiser: Any) -> nn.Module:
        head_dim = int(denoiser.config.attention_head_dim)
        return SD3Branch(
            spec.cross_attention_dim, layer.hidden_size, head_dim, spec.time_resampler.hidden_dim
        )

    def install(self, denoiser: Any, layers: list[HostLayer]) -> Attachment:
        device = next(denoiser.parameters()).device
        ours = {layer.name: SD3AttnProcessor(layer.index, device) for layer in self.layers(denoiser)}
        return install_processors(
            denoiser,
            lambda name, proc: ours.get(name) or PassThroughProcessor(proc),
            ours,
            _before_transformer,
        )


SD3 = SD3Host()
