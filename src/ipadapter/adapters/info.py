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


def describe(info: dict[str, Any]) -> str:
    """:func:`adapter_info`'s facts as aligned lines of text."""
    tokens = info["num_tokens"] or "one per encoder hidden state"
    feature = "pooled image_embeds" if info["feature"] == "pooled" else f"{info['feature']} states"
    sizes = sorted(set(info["hidden_sizes"]))
    lines = [
        f"file:        {info['file']} ({info['format']}, {info['tensors']} tensors, "
        f"{info['parameters']:,} parameters, {'/'.join(info['dtypes'])})",
        f"layout:      {info['layout']}" + ("" if info["supported"] else " (not supported by this version)"),
        f"variant:     {' or '.join(info['names']) or 'no official variant has these dims (custom)'}",
        f"base:        {info['base'] or 'unknown'} (cross-attention dim {info['cross_attention_dim']})",
        f"encoder:     {info['encoder'] or 'unknown'} ({feature}, {info['feature_dim']} dims)",
        f"tokens:      {tokens}",
        f"layers:      {info['num_layers']} cross-attention layers (ids {info['layer_ids'][0]}.."
        f"{info['layer_ids'][-1]}), hidden sizes {sizes}",
    ]
    if info.get("resampler"):
        r = info["resampler"]
        lines.append(
            f"resampler:   dim {r['dim']}, depth {r['depth']}, heads {r['heads']} x {r['dim_head']}, "
            f"{r['num_queries']} queries, in {r['embedding_dim']}, out {r['output_dim']}, ff x{r['ff_mult']}"
        )
    for problem in info.get("problems", []):
        lines.append(f"PROBLEM:     {problem}")
    return "\n".join(lines)
