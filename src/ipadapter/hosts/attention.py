"""The decoupled cross-attention processor (Ye et al. 2023, eq. 5) and a pass-through for self-attention.

    out = to_out( Attn(Q, K_text, V_text) + sum_a scale_a * Attn(Q, K_ip_a, V_ip_a) )

with ``K_ip_a = tokens_a @ W_k_ip_a`` and ``V_ip_a = tokens_a @ W_v_ip_a``. The text path is the same sequence
of operations as diffusers' ``AttnProcessor2_0``, so a scale of exactly 0 (branch skipped) reproduces the
model without adapter bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..prompt.conditioning import ImagePrompt, Step, compiling
from ..prompt.recording import Contribution


class IPBranch(nn.Module):
    """One adapter's image key/value projections for one attention layer.

    ``bias``: the projections have biases (XLabs' Flux adapter). ``head_norm``: the image keys and values are
    RMS-normalised per head without affine weights (InstantX's Flux adapter, eps 1e-5). ``after_out``: the
    branch's output is not added to the attention output before ``to_out`` but handed to the block, which adds
    it to its residual stream (XLabs' Flux adapter, as diffusers' ``FluxTransformerBlock`` does).
    """

    def __init__(
        self,
        cross_attention_dim: int,
        hidden_size: int,
        *,
        bias: bool = False,
        head_norm: bool = False,
        after_out: bool = False,
    ) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=bias)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=bias)
        self.head_norm = head_norm
        self.after_out = after_out

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image keys and values for image tokens (B, N, D) -> ((B, N, hidden), (B, N, hidden)).

        Called as a module (not through ``to_k_ip`` directly) so that wrappers which gather weights on a
        forward call, such as FSDP, see the branch being used.
        """
        return self.to_k_ip(tokens), self.to_v_ip(tokens)


def compiled_regions(blocks: Any) -> bool:
    """Whether any of ``blocks`` (a denoiser's repeated blocks) is compiled on its own (regional compilation:
    diffusers' ``compile_repeated_blocks``, ``block.compile()`` or a ``torch.compile``-d block put back).

    The denoiser's pre-hook then runs eagerly but must hand the processors tensors, as under a whole-model
    compile: a Python value read inside a compiled block would be guarded on, and recompile per step and call.
    """
    return any(
        getattr(block, "_compiled_call_impl", None) is not None or hasattr(block, "_orig_mod")
        for block in blocks
    )


def _split_heads(t: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # (B, heads, L, d)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last dim without weights, computed in float32 (diffusers' ``RMSNorm``)."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class BranchSlots(nn.Module):
    """A processor that holds every attached adapter's branch for its layer.

    Branches are the processor's own submodules (no container module, which FSDP could not wrap), under neutral
    keys: an adapter may be named like a Module attribute ("train", "to").
    """

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer  # the host layer's index (the adapter files' order)
        self._keys: dict[str, str] = {}  # adapter name -> submodule name
        self._next = 0

    def add_branch(self, name: str, branch: nn.Module) -> None:
        self._keys[name] = key = f"adapter{self._next}"
        self._next += 1
        self.add_module(key, branch)

    def remove_branch(self, name: str) -> None:
        key = self._keys.pop(name, None)
        if key is not None:
            delattr(self, key)

    def named_branches(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, key)) for name, key in self._keys.items()]

    def slot(self, name: str) -> str:
        """The submodule name adapter ``name``'s branch has in this processor (its parameters' prefix)."""
        return self._keys[name]


class IPAttnProcessor(BranchSlots):
    """Cross-attention with decoupled image branches, one per attached adapter (kernel: SDPA)."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> torch.Tensor:
        # The explicit signature is what diffusers reads to pass `image_prompt` on; the call goes through
        # nn.Module so that forward hooks (FSDP's weight gathering) run.
        return super().__call__(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_prompt, image_prompt_step
        )

    def forward(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, context_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, L, inner)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner = key.shape[-1]
        query = _split_heads(query, batch, attn.heads)
        key = _split_heads(key, batch, attn.heads)
        value = _split_heads(value, batch, attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        out = out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)  # (B, L, inner)

        if image_prompt is not None and image_prompt_step is not None:
            out = add_image_branches(
                out,
                query,
                image_prompt,
                image_prompt_step,
                self.layer,
                self.named_branches(),
                batch,
                to_out=attn.to_out[0],
            )

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def add_image_branches(
    out: torch.Tensor,
    query: torch.Tensor,
    prompt: ImagePrompt,
    step: Step,
    layer: int,
    branches: list[tuple[str, IPBranch]],
    batch: int,
    text: int = 0,
    to_out: Any = None,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out + sum_a weight_a * Attn(query, K_ip_a, V_ip_a)`` over ``branches`` (adapter name, branch).

    ``out``: (B, L, inner), the attention output before ``to_out``; ``query``: (B, heads, L, d), the query the
    image keys meet. ``text``: how many leading query positions are text tokens, not image ones (a Flux single
    block's joint sequence): a regional mask leaves them out. ``layer``: the host layer's index (per-layer
    weights). ``to_out``: the layer's output projection (influence maps measure contributions through it; None:
    they are measured as they are). A branch whose weight is 0 or whose step window is closed is skipped
    (eager), so the output is exactly the model without it. Each adapter's branch serves every token set of it
    (:meth:`ImagePrompt.sets`), each with its own control.
    """
    heads, inner = query.shape[1], out.shape[-1]
    recorder = prompt.recorder
    base = out if base is None else base  # the text branch's output: what influence maps compare against
    for name, branch in branches:
        for key in prompt.sets(name):
            control = prompt.control(key)
            values = prompt.values(key)
            weight = control.weight(layer, step.progress, values)
            if weight is None:
                continue  # exactly the model without this adapter (at this layer / step)
            swapped = control.swapped(layer)

            def project(
                key: str = key, branch: IPBranch = branch, swapped: bool = swapped
            ) -> tuple[torch.Tensor, torch.Tensor]:
                tokens = prompt.rows(key, batch, step, swapped)  # (B, N, D)
                tokens = tokens.to(device=query.device, dtype=branch.to_k_ip.weight.dtype)
                k_ip, v_ip = branch(tokens)
                k_ip = _split_heads(k_ip, batch, heads)  # (B, heads, N, d)
                v_ip = _split_heads(v_ip, batch, heads)
                if branch.head_norm:
                    k_ip, v_ip = rms_norm(k_ip, 1e-5), rms_norm(v_ip, 1e-5)
                weights = prompt.values(key).value_weights
                if weights is not None:  # weighted references attended together: scale their values
                    v_ip = v_ip * weights.to(dtype=v_ip.dtype)[:, None]
                return k_ip.to(query.dtype), v_ip.to(query.dtype)

            k_ip, v_ip = prompt.cached((layer, key, batch, step.negative is True, swapped), project)
            rows = prompt.row_weights(key, batch, step)  # one reference per batch item: its weight
            if rows is not None:
                weight = weight * rows.to(out.dtype)
            row_mask = None
            if control.row_masks is not None:
                row_mask = prompt.row_masks(key, batch, out.shape[1] - text, step, out)
                if row_mask is not None and text:
                    row_mask = torch.cat([row_mask.new_zeros(batch, text, 1), row_mask], dim=1)
            groups = control.groups or (k_ip.shape[2],)
            start = 0
            for group, count in enumerate(groups):
                k_g, v_g = k_ip[:, :, start : start + count], v_ip[:, :, start : start + count]
                start += count
                group_weight = weight
                if control.group_weights is not None:  # the reference's own weight
                    group_weight = weight * (
                        values.group_weights[group] if compiling() else control.group_weights[group]
                    )
                k_g, v_g, after = scaled_kv(k_g, v_g, group_weight, control.embeds_scaling, inner)
                part = _attend(query, k_g, v_g, batch, inner)  # (B, L, inner)
                mask = row_mask
                if control.groups is not None:
                    mask = prompt.mask_rows(key, group, part.shape[1] - text, step, part)
                    if mask is not None and text:  # text positions are not on the image: never in a region
                        mask = torch.cat([mask.new_zeros(1, text, 1), mask], dim=1)
                if mask is not None:
                    part = part * mask
                part = _times(after, part)  # mask, then weight: diffusers' order of operations
                if recorder is not None:
                    where = Contribution(
                        key, group if control.groups is not None else None, layer, text, to_out
                    )
                    recorder.add(prompt, step, where, part, base, (query, k_g, v_g, after, mask))
                out = out + part
    return out


_PENALTY_WIDTH = 1280.0  # ComfyUI's "C penalty" divides the layer's width by SDXL's widest (1280)


def scaled_kv(
    key: torch.Tensor, value: torch.Tensor, weight: float | torch.Tensor, how: str, inner: int
) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """The image keys and values with ``weight`` applied as ``how`` says, and the factor left for the output.

    ComfyUI's embeds scaling (``C``: the layer's inner width): ``V only``: the output times w; ``K+V``: K and V
    times w; ``K+V w/ C penalty``: K and V times w * C / 1280; ``K+mean(V) w/ C penalty``: K times w' = w * C /
    1280, V's mean over the tokens times w' and its spread around the mean kept. ``weight``: a number, a 0-d
    tensor or one per batch row ``(B, 1, 1)``.
    """
    if how == "V only":
        return key, value, weight
    w = weight * (inner / _PENALTY_WIDTH) if how.endswith("C penalty") else weight
    if isinstance(w, torch.Tensor):
        w = w.to(key.dtype)
        w = w.reshape(-1, 1, 1, 1) if w.ndim == 3 else w
    if how.startswith("K+mean(V)"):
        mean = value.mean(dim=2, keepdim=True)  # over the tokens: (B, heads, 1, d)
        return key * w, (value - mean) + mean * w, 1.0
    return key * w, value * w, 1.0


def _times(weight: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight * x`` in ``x``'s dtype (a tensor weight is float32: cast it, never promote ``x``)."""
    if isinstance(weight, float | int) and weight == 1.0:
        return x
    return (weight.to(x.dtype) if isinstance(weight, torch.Tensor) else weight) * x


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch: int, inner: int
) -> torch.Tensor:
    ip_out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0)  # (B, heads, L, d)
    return ip_out.transpose(1, 2).reshape(batch, -1, inner).to(query.dtype)  # (B, L, inner)


class PassThroughProcessor:
    """Self-attention: accepts the ``image_prompt`` argument (so diffusers does not warn) and ignores it."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> torch.Tensor:
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
