"""The paper's comparison in miniature: text only vs image prompt vs image prompt + text, on held-out shapes.

For each held-out reference (known shape, colour, background) three generations are scored:

    text         the reference's caption, no image prompt
    image        the image prompt with an empty text
    image+text   the image prompt with a text naming another background ("text compatible" claim)

Scores: CLIP-I (cosine of CLIP image embeddings, generation vs reference), CLIP-T (generation vs the text the
mode is about: the reference caption, or the new background's text), and attribute accuracies read by the
shapes checker: object colour and shape against the reference, background against the reference (text,
image) or against the text (image+text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .loop import read_rows
from .shapes import BACKGROUNDS, classify

MODES = ("text", "image", "image+text")


@dataclass
class Reference:
    image: Image.Image
    caption: str
    shape: str
    color: str
    background: str


def references(folder: str | Path, count: int) -> list[Reference]:
    """The first ``count`` examples of a shapes folder (its ``metadata.jsonl``)."""
    folder = Path(folder)
    rows = read_rows(folder)
    return [
        Reference(
            Image.open(folder / r["image"]).convert("RGB"), r["text"], r["shape"], r["color"], r["background"]
        )
        for r in rows[:count]
    ]


class Scorer:
    """CLIP embeddings for CLIP-I / CLIP-T (any CLIPModel folder: the mini CLIP or a real one)."""

    def __init__(self, folder: str | Path) -> None:
        # heavy (transformers): loaded when a Scorer is made; importing this module stays torch-only
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(folder).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        size = self.model.config.vision_config.image_size
        self.processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        return _unit(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return _unit(self.model.get_text_features(input_ids=ids.input_ids))


def _unit(x: Any) -> torch.Tensor:
    """Unit-length embeddings (newer transformers may return an output object)."""
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return torch.nn.functional.normalize(x.float(), dim=-1)


def other_background(ref: Reference) -> str:
    """A background for the image+text mode: not the reference's, not the object's colour."""
    choices = [b for b in BACKGROUNDS if b not in (ref.background, ref.color)]
    return choices[sum(map(ord, ref.caption)) % len(choices)]  # deterministic per reference


def evaluate(
    ip: Any,
    scorer: Scorer,
    refs: list[Reference],
    *,
    steps: int = 20,
    guidance: float = 5.0,
    scale: float = 0.6,
    seed: int = 0,
    batch: int = 8,
    size: int | None = None,
) -> dict[str, dict[str, float]]:
    """Scores per mode (means over ``refs``); ``ip`` is an attached adapter handle."""
    ip.scale = scale
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    ref_embeds = scorer.images([r.image for r in refs])
    for start in range(0, len(refs), batch):
        part = refs[start : start + batch]
        wanted_bg = [other_background(r) for r in part]
        prompts = {
            "text": [r.caption for r in part],
            "image": ["" for _ in part],
            "image+text": [f"on a {bg} background" for bg in wanted_bg],
        }
        for mode in MODES:
            common = {
                "prompt": prompts[mode],
                "num_inference_steps": steps,
                "guidance_scale": guidance,
                "generator": [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(part))],
            }
            if size:
                common.update(height=size, width=size)
            if mode == "text":
                images = ip.pipe(**common).images  # no image prompt: the model as it is
            else:
                images = ip([r.image for r in part], **common).images
            gen_embeds = scorer.images(images)
            about = [r.caption for r in part] if mode != "image+text" else prompts[mode]
            text_embeds = scorer.texts(about)
            for i, (ref, image) in enumerate(zip(part, images, strict=True)):
                seen = classify(image)
                target_bg = wanted_bg[i] if mode == "image+text" else ref.background
                rows[mode].append(
                    {
                        "clip_i": float(gen_embeds[i] @ ref_embeds[start + i]),
                        "clip_t": float(gen_embeds[i] @ text_embeds[i]),
                        "color": float(seen["color"] == ref.color),
                        "shape": float(seen["shape"] == ref.shape),
                        "background": float(seen["background"] == target_bg),
                    }
                )
    return {
        mode: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} | {"n": len(rs)}
        for mode, rs in rows.items()
    }


def markdown(results: dict[str, dict[str, float]]) -> str:
    """The results as the README's table."""
    lines = ["| mode | CLIP-I | CLIP-T | colour | shape | background | n |", "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['clip_i']:.3f} | {r['clip_t']:.3f} | {r['color']:.0%} | {r['shape']:.0%} | "
            f"{r['background']:.0%} | {int(r['n'])} |"
        )
    lines.append("")
    lines.append(
        "colour/shape: the object matches the reference; background: matches the reference (text, image) "
        "or the text (image+text)."
    )
    return "\n".join(lines)
