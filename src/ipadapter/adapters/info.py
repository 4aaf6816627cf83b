"""What an adapter file is, as data and as text (``ipadapter inspect``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .checks import problems
from .variants import detect, plus_version_hint


def adapter_info(path: str | Path) -> dict[str, Any]:
    """Facts about the adapter file ``path``: its format, the detected variant (:meth:`AdapterSpec.to_dict`),
    its tensors (count, parameters, dtypes) and ``problems``: why it cannot be used although its layout was
    recognised (empty when it is fine). FaceID-Plus files also get ``plus_version_hint``: what the file *name*
    suggests ("v1" / "v2"), next to the keys' verdict ``plus_version`` (None: keys cannot tell Plus from PlusV2).
    Raises CheckpointError for a file that is not an adapter."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    spec = detect(ckpt)
    tensors = list(ckpt.image_proj.values()) + list(ckpt.ip_adapter.values())
    return {
        "file": str(path),
        "format": "safetensors" if path.suffix == ".safetensors" else "pickle (weights only)",
        **spec.to_dict(),
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        "problems": problems(ckpt, spec),
        "plus_version_hint": plus_version_hint(path.name) if spec.layout == "faceid-plus" else None,
    }


def dit_blocks(layout: str, layers: int) -> str:
    """Which transformer blocks a DiT adapter's layers are, by the names per-block weights use (t0, t1, ...)."""
    last = layers - 1
    if layout == "xlabs-flux":
        return f"t0-t{last} = the double-stream blocks transformer_blocks.0-{last} (FLUX.1: 19)"
    if layout == "instantx-flux":
        return (
            f"t0-t{last} = every block: the double-stream transformer_blocks first, then the single-stream "
            "single_transformer_blocks (FLUX.1: t0-t18 double, t19-t56 single)"
        )
    return f"t0-t{last} = the joint blocks transformer_blocks.0-{last} (SD3.5-Large: 38)"


def _encoder_line(info: dict[str, Any], feature: str) -> str:
    if info["feature"] != "face":
        return f"encoder:     {info['encoder'] or 'unknown'} ({feature}, {info['feature_dim']} dims)"
    raw = info["layout"] == "faceid-portrait-unnorm"  # reads `embedding`, the others `normed_embedding`
    kind = "raw (not L2-normalised) face embedding" if raw else "face embedding"
    line = f"encoder:     {info.get('face_encoder')} {kind} ({info['feature_dim']} dims)"
    if info["layout"] == "faceid-plus" and info.get("resampler"):
        clip = info["encoder"] or "a CLIP vision model"
        line += f" + {clip} hidden states of the face crop ({info['resampler']['embedding_dim']} dims)"
    return line


def _faceid_lines(info: dict[str, Any]) -> list[str]:
    """The FaceID facts: its UNet LoRA, and what can and cannot tell FaceID-Plus from PlusV2."""
    lines = []
    if info.get("lora_rank"):
        ids = info["lora_ids"]
        lines.append(
            f"lora:        rank {info['lora_rank']} on {len(ids)} attention layers (ids {ids[0]}..{ids[-1]})"
        )
    if info["layout"] == "faceid-plus":
        verdict = {"v1": "Plus", "v2": "PlusV2"}
        hint = info.get("plus_version_hint")
        said = f"the file name suggests {verdict[hint]}" if hint else "the file name does not say which"
        lines.append(
            f"plus:        its keys cannot tell FaceID-Plus from PlusV2 (identical tensors); {said}; "
            "an explicit option overrides it"
        )
    return lines


def describe(info: dict[str, Any]) -> str:
    """:func:`adapter_info`'s facts as aligned lines of text."""
    tokens = info["num_tokens"] or "one per encoder hidden state"
    if info.get("faces", 1) > 1:
        tokens = f"{tokens} per face, faces' tokens concatenated (default {info['faces']} faces)"
    pooled = "pooled output" if info.get("encoder_kind") == "siglip" else "pooled image_embeds"
    feature = pooled if info["feature"] == "pooled" else f"{info['feature']} states"
    sizes = sorted(set(info["hidden_sizes"]))
    lines = [
        f"file:        {info['file']} ({info['format']}, {info['tensors']} tensors, "
        f"{info['parameters']:,} parameters, {'/'.join(info['dtypes'])})",
        f"layout:      {info['layout']}" + ("" if info["supported"] else " (not supported by this version)"),
        f"variant:     {' or '.join(info['names']) or 'no official variant has these dims (custom)'}",
        f"base:        {info['base'] or 'unknown'} (cross-attention dim {info['cross_attention_dim']})",
        _encoder_line(info, feature),
        f"tokens:      {tokens}",
        f"layers:      {info['num_layers']} {'cross-' if info.get('host', 'unet') == 'unet' else ''}attention layers "
        f"(ids {info['layer_ids'][0]}.."
        f"{info['layer_ids'][-1]}), hidden sizes {sizes}",
    ]
    if info.get("resampler"):
        r = info["resampler"]
        lines.append(
            f"resampler:   dim {r['dim']}, depth {r['depth']}, heads {r['heads']} x {r['dim_head']}, "
            f"{r['num_queries']} queries, in {r['embedding_dim']}, out {r['output_dim']}, ff x{r['ff_mult']}"
        )
    if info.get("host", "unet") != "unet":
        lines.append(f"blocks:      {dit_blocks(info['layout'], info['num_layers'])}")
    lines += _faceid_lines(info)
    for problem in info.get("problems", []):
        lines.append(f"PROBLEM:     {problem}")
    return "\n".join(lines)
