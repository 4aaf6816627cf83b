"""Flux (``FluxTransformer2DModel``) as a host: its attention layers, blocks, processors and pre-hook.

Layers, in the adapter files' order (DESIGN.md §3.5): the double-stream blocks ``transformer_blocks.{i}``
(19 in FLUX.1), then the single-stream blocks ``single_transformer_blocks.{j}`` (38). XLabs' adapter serves the
double blocks only; InstantX's serves all of them. Every layer gets our processor (a layer without a branch
computes exactly diffusers' ``FluxAttnProcessor``), so the ``image_prompt`` argument never meets a processor
that would warn about it.

Where the image tokens enter:
- double block: the image stream's query after ``norm_q`` and before RoPE attends to each adapter's image
  keys/values. InstantX adds ``scale * out`` to the image stream's attention output before ``to_out``; XLabs'
  output goes to the block, which adds it to its residual stream after the feed-forward (diffusers'
  ``FluxTransformerBlock`` reads a third output of the attention for that).
- single block (InstantX): the query of the joined text+image sequence, after ``norm_q``, before RoPE; the
  output is added to the attention output of every position.

Flux runs true classifier-free guidance as a second transformer call per step (the negative prompt): the pre-hook
tells the processors which call is the negative one (:meth:`~ipadapter.prompt.conditioning.ImagePrompt.negative_call`),
so that call gets the negative image tokens. The step window reads progress as ``1 - sigma``: the pipelines pass
the transformer ``timestep / 1000``, the flow-matching sigma in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel, _get_qkv_projections

from ..prompt.blocks import Block
from ..prompt.conditioning import ImagePrompt, Step, compiling, progress_of
from .attention import BranchSlots, IPBranch, add_image_branches, compiled_regions
from .base import Attachment, Host, HostLayer, install_processors

DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"


class FluxAttnProcessor(BranchSlots):
    """diffusers' ``FluxAttnProcessor`` math plus every attached adapter's branch (one processor per layer)."""

    _attention_backend = None  # what diffusers' set_attention_backend sets on processors
    _parallel_config = None

    def __init__(self, layer: int, device: torch.device | None = None) -> None:
        super().__init__(layer)
        # The index as a tensor too, what compiled code reads: an int attribute is a constant that dynamo guards
        # on, so blocks compiled one by one (compile_repeated_blocks) would each make a graph of their own.
        # Shape (1,), not (): indexing with it is a gather, where a 0-d index would be read out as an int.
        self.register_buffer("layer_index", torch.tensor([layer], device=device), persistent=False)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> Any:
        # The explicit signature is what diffusers reads to pass `image_prompt` on.
        return super().__call__(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            image_rotary_emb,
            image_prompt,
            image_prompt_step,
        )

    def forward(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        image_prompt: ImagePrompt | None = None,
        image_prompt_step: Step | None = None,
    ) -> Any:
        batch = hidden_states.shape[0]
        query, key, value, enc_query, enc_key, enc_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, L, heads, d)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        ip_query = query.transpose(1, 2)  # (B, heads, L, d): normalised, before RoPE
        if attn.added_kv_proj_dim is not None:  # double block: text first, then image
            enc_query = attn.norm_added_q(enc_query.unflatten(-1, (-1, attn.head_dim)))
            enc_key = attn.norm_added_k(enc_key.unflatten(-1, (-1, attn.head_dim)))
            enc_value = enc_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([enc_query, query], dim=1)
            key = torch.cat([enc_key, key], dim=1)
            value = torch.cat([enc_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)  # (B, L, inner)

        active = image_prompt is not None and image_prompt_step is not None
        layer = self.layer_index if compiling() else self.layer
        inside = [(n, b) for n, b in self.named_branches() if not b.after_out] if active else []
        after = [(n, b) for n, b in self.named_branches() if b.after_out] if active else []
        if encoder_hidden_states is None:  # single block: no to_out here, the block projects
            if inside:
                text = image_prompt_step.text_tokens
                out = add_image_branches(
                    out, ip_query, image_prompt, image_prompt_step, layer, inside, batch, text
                )
            return out
        text, out = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        if inside:
            out = add_image_branches(
                out, ip_query, image_prompt, image_prompt_step, layer, inside, batch, to_out=attn.to_out[0]
            )
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        text = attn.to_add_out(text.contiguous())
        if not after:
            return out, text
        zero = torch.zeros_like(out)
        extra = add_image_branches(
            zero, ip_query, image_prompt, image_prompt_step, layer, after, batch, base=out
        )
        if extra is zero and not compiling():
            return out, text  # every branch skipped: exactly the model without adapters
        return out, text, extra


def _before_transformer(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """At every transformer call with an image prompt, hand the processors this call's :class:`Step`."""
    attention_kwargs = kwargs.get("joint_attention_kwargs") or {}
    prompt = attention_kwargs.get("image_prompt")
    if not isinstance(prompt, ImagePrompt):
        return None
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[3]
    sigma = torch.as_tensor(timestep).flatten()[0]
    negative = prompt.negative_call(sigma)
    # compiled code reads tensors, never a per-call Python value (blocks compiled one by one: made here)
    as_tensor = compiling() or compiled_regions(
        (*module.transformer_blocks, *module.single_transformer_blocks)
    )
    progress = progress_of(sigma, 1.0, as_tensor=as_tensor)  # the pipelines pass sigma in [0, 1]
    if as_tensor:
        negative = torch.as_tensor(negative, device=sigma.device)
    # the VAE latent's size (regional masks): the transformer sees it packed 2x2, one token per 2x2 latents
    height, width = prompt.output_size or (0, 0)
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    latent = (height // prompt.vae_scale, width // prompt.vae_scale)
    step = Step(progress, latent, negative=negative, text_tokens=int(text.shape[1]))
    if prompt.recorder is not None:
        prompt.recorder.count(negative)
    kwargs = {**kwargs, "joint_attention_kwargs": {**attention_kwargs, "image_prompt_step": step}}
    return args, kwargs


class FluxHost(Host):
    """FLUX.1 transformers (``FluxTransformer2DModel``)."""

    kind = "flux"
    noun = "Flux transformer"
    attention_kwargs = "joint_attention_kwargs"

    def denoiser(self, pipe: Any) -> Any | None:
        model = getattr(pipe, "transformer", None)
        model = getattr(model, "_orig_mod", model)
        return model if isinstance(model, FluxTransformer2DModel) else None

    def layers(self, denoiser: Any) -> list[HostLayer]:
        cross = int(denoiser.config.joint_attention_dim)
        out = []
        for name in denoiser.attn_processors:
            if name.startswith((f"{DOUBLE}.", f"{SINGLE}.")):
                attn = denoiser.get_submodule(name.removesuffix(".processor"))
                out.append(HostLayer(name, len(out), attn.inner_dim, cross))
        # attn_processors lists the double blocks first, as the adapter files number them
        return out

    def layers_for(self, denoiser: Any, count: int) -> list[HostLayer] | None:
        layers = self.layers(denoiser)
        double = [layer for layer in layers if layer.name.startswith(f"{DOUBLE}.")]
        return layers if count == len(layers) else double if count == len(double) else None

    def block_map(self, denoiser: Any) -> dict[str, Block]:
        out = {}
        for layer in self.layers(denoiser):
            path = layer.name.removesuffix(".attn.processor")
            part = "double" if path.startswith(f"{DOUBLE}.") else "single"
            out[layer.name] = Block(layer.index, path, part, f"{part} blocks")
        return out

    def branch(self, spec: Any, layer: HostLayer, denoiser: Any) -> IPBranch:
        if spec.layout == "xlabs-flux":
            return IPBranch(spec.cross_attention_dim, layer.hidden_size, bias=True, after_out=True)
        return IPBranch(spec.cross_attention_dim, layer.hidden_size, head_norm=True)  # instantx-flux

    def install(self, denoiser: Any, layers: list[HostLayer]) -> Attachment:
        device = next(denoiser.parameters()).device
        ours = {layer.name: FluxAttnProcessor(layer.index, device) for layer in self.layers(denoiser)}
        return install_processors(
            denoiser, lambda name, proc: ours.get(name, proc), ours, _before_transformer
        )


FLUX = FluxHost()
