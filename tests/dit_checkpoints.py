"""Tiny random checkpoints in the three DiT adapter layouts (DESIGN.md §3.5), for the tiny models of dit_models.

- XLabs Flux: XLabs' own flat key names (``ip_adapter_proj_model.*``, ``double_blocks.{i}.processor...``),
  biases on the layer projections, one pair per double block; CLIP pooled features.
- InstantX Flux: the nested ``.bin`` layout of its ``ip-adapter.bin`` (``image_proj``: MLP proj.0/proj.2 + norm;
  ``ip_adapter``: ``{i}.to_k_ip`` / ``{i}.to_v_ip`` without bias, for every double and single block); SigLIP
  pooled features.
- InstantX SD3.5: the time-conditioned resampler (its original key names) and per joint block ``norm_ip``,
  ``to_k_ip``, ``to_v_ip``, ``norm_q``, ``norm_k``, ``norm_ip_k``; SigLIP hidden states. Depth 4: diffusers'
  converter builds that many resampler layers whatever the file holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

SIGLIP = {"hidden": 32, "image_size": 32, "patch_size": 8}  # 16 positions, 32-dim pooled and hidden
CLIP_POOLED = 24  # tiny_models.VIT_H's pooled width: the CLIP encoder XLabs' layout reads


def _random(gen: torch.Generator, scale: float = 0.4) -> callable:
    return lambda *shape: torch.randn(*shape, generator=gen) * scale


def build_siglip(folder: Path, seed: int = 1) -> Path:
    """A tiny SigLIP vision tower with its preprocessor config, saved at ``folder``."""
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=SIGLIP["hidden"],
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=SIGLIP["image_size"],
        patch_size=SIGLIP["patch_size"],
    )
    SiglipVisionModel(config).eval().save_pretrained(folder)
    size = SIGLIP["image_size"]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder


def xlabs_flux(path: Path, *, blocks: int = 2, text_dim: int = 32, inner: int = 128, tokens: int = 4, seed: int = 3) -> Path:  # fmt: skip
    r = _random(torch.Generator().manual_seed(seed))
    state = {
        "ip_adapter_proj_model.proj.weight": r(tokens * text_dim, CLIP_POOLED),
        "ip_adapter_proj_model.proj.bias": r(tokens * text_dim),
        "ip_adapter_proj_model.norm.weight": 1 + r(text_dim),
        "ip_adapter_proj_model.norm.bias": r(text_dim),
    }
    for i in range(blocks):
        for kv in "kv":
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = r(
                inner, text_dim
            )
            state[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.bias"] = r(inner)
    save_file(state, str(path))
    return path


def instantx_flux(path: Path, *, layers: int = 4, text_dim: int = 32, inner: int = 128, tokens: int = 8, seed: int = 4) -> Path:  # fmt: skip
    r = _random(torch.Generator().manual_seed(seed))
    f = SIGLIP["hidden"]
    image_proj = {
        "proj.0.weight": r(2 * f, f),
        "proj.0.bias": r(2 * f),
        "proj.2.weight": r(tokens * text_dim, 2 * f),
        "proj.2.bias": r(tokens * text_dim),
        "norm.weight": 1 + r(text_dim),
        "norm.bias": r(text_dim),
    }
    ip_adapter = {f"{i}.to_{kv}_ip.weight": r(inner, text_dim) for i in range(layers) for kv in "kv"}
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, str(path))
    return path


def instantx_sd3(path: Path, *, layers: int = 2, inner: int = 128, hidden: int = 64, queries: int = 8, seed: int = 5) -> Path:  # fmt: skip
    r = _random(torch.Generator().manual_seed(seed))
    f, t_in = SIGLIP["hidden"], 32
    image_proj = {
        "latents": r(1, queries, hidden),
        "proj_in.weight": r(hidden, f),
        "proj_in.bias": r(hidden),
        "proj_out.weight": r(inner, hidden),
        "proj_out.bias": r(inner),
        "norm_out.weight": 1 + r(inner),
        "norm_out.bias": r(inner),
        "time_embedding.linear_1.weight": r(hidden, t_in),
        "time_embedding.linear_1.bias": r(hidden),
        "time_embedding.linear_2.weight": r(hidden, hidden),
        "time_embedding.linear_2.bias": r(hidden),
    }
    for i in range(4):
        p = f"layers.{i}"
        image_proj.update({
            f"{p}.0.norm1.weight": 1 + r(hidden), f"{p}.0.norm1.bias": r(hidden),
            f"{p}.0.norm2.weight": 1 + r(hidden), f"{p}.0.norm2.bias": r(hidden),
            f"{p}.0.to_q.weight": r(hidden, hidden), f"{p}.0.to_kv.weight": r(2 * hidden, hidden),
            f"{p}.0.to_out.weight": r(hidden, hidden),
            f"{p}.1.0.weight": 1 + r(hidden), f"{p}.1.0.bias": r(hidden),
            f"{p}.1.1.weight": r(4 * hidden, hidden), f"{p}.1.3.weight": r(hidden, 4 * hidden),
            f"{p}.2.1.weight": r(4 * hidden, hidden), f"{p}.2.1.bias": r(4 * hidden),
        })  # fmt: skip
    ip_adapter = {}
    for i in range(layers):
        ip_adapter.update({
            f"{i}.norm_ip.linear.weight": r(2 * inner, hidden), f"{i}.norm_ip.linear.bias": r(2 * inner),
            f"{i}.to_k_ip.weight": r(inner, inner), f"{i}.to_v_ip.weight": r(inner, inner),
            f"{i}.norm_q.weight": 1 + r(64), f"{i}.norm_k.weight": 1 + r(64), f"{i}.norm_ip_k.weight": 1 + r(64),
        })  # fmt: skip
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
    save_file(flat, str(path))
    return path
