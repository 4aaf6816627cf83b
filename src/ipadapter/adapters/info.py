"""What an adapter file is, as data and as text (``ipadapter inspect``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .checks import problems
from .variants import detect


def adapter_info(path: str | Path) -> dict[str, Any]:
    """Facts about the adapter file ``path``: its format, the detected variant (:meth:`AdapterSpec.to_dict`),
    its tensors (count, parameters, dtypes) and ``problems``: why it cannot be used although its layout was
    recognised (empty when it is fine). Raises CheckpointError for a file that is not an adapter."""
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


def describe(info: dict[str, Any]) -> str:
    """:func:`adapter_info`'s facts as aligned lines of text."""
    tokens = info["num_tokens"] or "one per encoder hidden state"
    pooled = "pooled output" if info.get("encoder_kind") == "siglip" else "pooled image_embeds"
    feature = pooled if info["feature"] == "pooled" else f"{info['feature']} states"
    sizes = sorted(set(info["hidden_sizes"]))
    lines = [
        f"file:        {info['file']} ({info['format']}, {info['tensors']} tensors, "
        f"{info['parameters']:,} parameters, {'/'.join(info['dtypes'])})",
        f"layout:      {info['layout']}" + ("" if info["supported"] else " (not supported by this version)"),
        f"variant:     {' or '.join(info['names']) or 'no official variant has these dims (custom)'}",
        f"base:        {info['base'] or 'unknown'} (cross-attention dim {info['cross_attention_dim']})",
        f"encoder:     {info['encoder'] or 'unknown'} ({feature}, {info['feature_dim']} dims)",
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
    for problem in info.get("problems", []):
        lines.append(f"PROBLEM:     {problem}")
    return "\n".join(lines)
