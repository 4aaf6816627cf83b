"""The mini CLIP's vision tower, retrained against a frozen text tower so that image features carry shape.

The jointly trained mini CLIP reads colour and background from a picture but shape hardly at all (zero-shot
27 % on held-out pairings, chance 17 %). Its text tower does tell shapes apart (captions differing only in the
shape word have cosine 0.76 on average), and the UNet is conditioned on that tower, so it stays frozen and only
a vision tower (and its projection) is trained, in the build's ``vision`` stage:

* a new tower (``vision_patch`` 8, ``vision_width`` 128, ``vision_layers`` 4; from scratch), not the joint one:
  with 8 px patches a step costs less than with the joint tower's 4 px ones, and shape is learned much
  faster per second (a shape head at 3000 steps, one thread: 82 % on held-out pairings against 37 % for a
  retrained joint tower);
* a factorised teacher (:func:`factorised_targets`): one vector per shape, colour and background, fitted on
  the training captions' frozen embeddings, whose sum exists for every combination, held-out pairings
  included; the image embedding is pulled to that sum (cosine). Classifying against the training captions'
  embeddings directly (``teacher=None``) teaches "a purple picture is never a circle" and does worse on
  held-out pairings;
* an auxiliary attribute loss: linear heads read shape, colour, background and texture from the pooled output
  and from the mean of the penultimate hidden states (the plus adapters' feature). The heads are thrown away:
  the saved model is a plain ``CLIPVisionModelWithProjection``;
* augmented pictures: besides the build's training images, as many drawn turned, resized, moved and with
  other edges on the same training pairings (:mod:`.drawn`); every batch turned by quarter turns and mirrored,
  and half of it recoloured (:func:`augment`): channels reordered and inverted, so colour stops telling shape
  (a shape seen only in red in training is still read in purple).

:func:`zero_shot` measures the result: each picture's caption is the argmax over every caption the generator
can write (held-out pairings included), and shape, colour and background are read off that caption. Measured
on the shipped build (12000 steps, batch 128, 1166 s on this project's 2-core machine): shape 89.7 % on the
held-out set (269 of 300; 27 % for the joint tower), 83 % on drawn held-out references (from 22 %); colour and
background 97-100 %. Shape keeps rising with steps (held-out / drawn: 35 / 31 % at 2000, 68 / 55 % at 4000,
83 / 71 % at 8000, 89 / 78 % at 10000); runs of the same settings differ by a point or two (CPU float rounding;
the weights are not bitwise equal).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .drawn import draw_example
from .loop import CLIP_MEAN, CLIP_STD, loss_curve, read_rows, say, train_loop, uniform
from .shapes import BACKGROUNDS, COLORS, SHAPES, TEXTURES, caption_for

ATTRIBUTES = {"shape": SHAPES, "color": COLORS, "background": BACKGROUNDS, "texture": TEXTURES}
ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])  # channel orders


def caption_grid() -> list[tuple[str, str, str, str]]:
    """Every (shape, colour, background, texture) the generator can caption, held-out pairings included."""
    return [(s, c, b, t) for s in SHAPES for c in COLORS for b in BACKGROUNDS for t in TEXTURES if c != b]


@torch.no_grad()
def text_table(clip_folder: str | Path, combos: list[tuple[str, str, str, str]]) -> torch.Tensor:
    """Unit-length projected text embeddings (N, D) of the captions of ``combos``, by a CLIPModel's text tower."""
    # heavy (transformers): only callers that embed texts pay for it
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(clip_folder).eval()
    tok = CLIPTokenizer.from_pretrained(clip_folder)
    ids = tok([caption_for(*c) for c in combos], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids  # fmt: skip
    rows = []
    for i in range(0, len(ids), 256):
        out = model.get_text_features(input_ids=ids[i : i + 256])
        rows.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return F.normalize(torch.cat(rows).float(), dim=-1)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the CLIP-normalised float input (what the encoder's processor makes at size S)."""
    return (pixels.float() / 255.0 - CLIP_MEAN) / CLIP_STD


def _uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2)


def _labels(rows: list[dict[str, Any]], index: dict[tuple[str, ...], int]) -> torch.Tensor:
    """(N, 5): caption row in the table, then the shape, colour, background and texture classes (-1: none)."""
    return torch.tensor(
        [
            [index.get((r["shape"], r["color"], r["background"], r["texture"]), -1)]
            + [ATTRIBUTES[a].index(r[a]) if r[a] in ATTRIBUTES[a] else -1 for a in ATTRIBUTES]
            for r in rows
        ]
    )


def drawn_pool(
    count: int, seed: int, size: int, unnamed: bool = False
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``count`` drawn pictures on training pairings at ``size`` px (uint8) and their attributes."""
    examples = [draw_example(seed, i, "train", (size,), unnamed) for i in range(count)]
    rows = [{a: getattr(e, a) for a in ATTRIBUTES} for e in examples]
    return _uint8([e.image for e in examples]), rows


def augment(
    pixels: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, recolour: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch turned and recoloured: what shape looks like without its pose or its colours.

    The whole batch is turned by a random quarter turn and mirrored half the time (no shape's name changes).
    A share ``recolour`` of the pictures gets its channels put in a random order and each channel inverted
    with probability 1/2: every colour moves, object and background alike, while the picture's edges stay. Their
    colour and background classes become -1 (unknown), so they teach shape and texture only; a named colour's
    pairing with a shape thus stops telling the shape. ``pixels``: uint8 (B, 3, S, S); ``labels``: (B, 5).
    """
    turns = int(torch.randint(0, 4, (1,), generator=gen))
    pixels = torch.rot90(pixels, turns, (2, 3))
    if bool(torch.rand(1, generator=gen) < 0.5):
        pixels = pixels.flip(3)
    if recolour <= 0:
        return pixels, labels
    picked = torch.rand(len(pixels), generator=gen) < recolour
    order = ORDERS[torch.randint(0, len(ORDERS), (len(pixels),), generator=gen)]
    inverted = torch.rand(len(pixels), 3, generator=gen) < 0.5
    moved = torch.gather(pixels, 1, order[:, :, None, None].expand_as(pixels))
    moved = torch.where(inverted[:, :, None, None], 255 - moved, moved)
    labels = labels.clone()
    labels[picked, 0] = -1  # no caption either
    labels[picked, 2:4] = -1
    return torch.where(picked[:, None, None, None], moved, pixels), labels


def factorised_targets(
    table: torch.Tensor, combos: list[tuple[str, ...]], steps: int = 1500, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One vector per shape, colour and background whose sums best classify ``table``'s captions.

    ``table`` (K, D) holds the frozen embeddings of the training captions ``combos``. Returns ``vectors``
    (classes, D), in :data:`ATTRIBUTES` order without texture, and a ``bias`` (D,): the embedding of a picture
    of (s, c, b) is ``vectors[s] + vectors[c] + vectors[b] + bias``. A sum of attribute vectors exists for every
    combination, seen or held out. Fitted on the training captions of the shipped text tower only, these sums
    pick the right caption among all captions (held-out pairings included) for 97 % of the held-out
    combinations by shape and colour and 100 % by background (a least-squares additive fit: 89 % / 100 % /
    99 %): an upper bound on what a vision tower that reads the attributes perfectly would score zero-shot.
    """
    names = list(ATTRIBUTES)[:3]
    sizes = [len(ATTRIBUTES[a]) for a in names]
    offsets = np.cumsum([0, *sizes[:-1]])
    ids = torch.tensor([[int(o) + ATTRIBUTES[a].index(c[k]) for k, (a, o) in enumerate(zip(names, offsets, strict=True))]
                        for c in combos])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.nn.Parameter(0.1 * torch.randn(sum(sizes), table.shape[1], generator=gen))
    bias, log_scale = torch.nn.Parameter(torch.zeros(table.shape[1])), torch.nn.Parameter(torch.tensor(3.0))
    optimizer = torch.optim.Adam([vectors, bias, log_scale], lr=0.02)
    for _ in range(steps):
        embeds = F.normalize(vectors[ids].sum(dim=1) + bias, dim=-1)  # (K, D)
        loss = F.cross_entropy(log_scale.exp() * embeds @ table.T, torch.arange(len(combos)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return vectors.detach(), bias.detach()


class _Heads(torch.nn.Module):
    """Attribute heads on the pooled output and on the mean penultimate hidden state (training only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        classes = sum(len(v) for v in ATTRIBUTES.values())
        self.pooled = torch.nn.Linear(width, classes)
        self.hidden = torch.nn.Linear(width, classes)

    def loss(self, pooled: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total = pooled.new_zeros(())
        for logits in (self.pooled(pooled), self.hidden(hidden[:, 1:].mean(dim=1))):  # (B, classes)
            for k, part in enumerate(logits.split([len(v) for v in ATTRIBUTES.values()], dim=1)):
                known = labels[:, 1 + k] >= 0  # unnamed colours have no colour or background class
                if known.any():
                    total = total + F.cross_entropy(part[known], labels[known, 1 + k])
        return total / (2 * len(ATTRIBUTES))


def train_vision(
    vision: Any,
    table: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    aux: float,
    seed: int,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_weight: float = 4.0,
    recolour: float = 0.0,
    log: Any = None,
) -> tuple[list[float], torch.nn.Module]:
    """Train ``vision`` (a CLIPVisionModelWithProjection) in place; returns the loss per step and the heads.

    ``table``: (K, D) frozen unit text embeddings, the classes; ``pixels``: uint8 (N, 3, S, S); ``labels``:
    (N, 5) from :func:`_labels`. Loss: cross-entropy of the scaled cosines against the table (a learned
    temperature started at e^3), or with ``teacher`` (from :func:`factorised_targets`) ``teacher_weight`` times
    one minus the cosine to the picture's factorised target (named pictures only); plus ``aux`` times the mean
    attribute-head loss. Every batch goes through :func:`augment` (``recolour``: the share recoloured).
    """
    heads = _Heads(vision.config.hidden_size)
    log_scale = torch.nn.Parameter(torch.tensor(3.0))
    params = [*vision.parameters(), *heads.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    turns = torch.Generator().manual_seed(seed + 1)  # augmentation draws, apart from the batches'
    offsets = torch.tensor([0, len(SHAPES), len(SHAPES) + len(COLORS)])
    vision.train()

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        batch_pixels, batch_labels = augment(pixels[idx], labels[idx], turns, recolour)
        out = vision(pixel_values=normalise(batch_pixels), output_hidden_states=True)
        embeds = F.normalize(out.image_embeds, dim=-1)  # (B, D)
        if teacher is None:
            logits = log_scale.clamp(max=math.log(100.0)).exp() * embeds @ table.T  # (B, K)
            loss = F.cross_entropy(logits, batch_labels[:, 0], ignore_index=-1)
        else:
            vectors, bias = teacher
            named = (batch_labels[:, 1:4] >= 0).all(dim=1)  # unnamed colours have no target embedding
            wanted = vectors[(batch_labels[:, 1:4] + offsets).clamp(min=0)].sum(dim=1) + bias
            cosine = (embeds * F.normalize(wanted, dim=-1)).sum(dim=1)  # (B,)
            loss = teacher_weight * ((1 - cosine) * named).sum() / named.sum().clamp(min=1)
        if aux > 0:
            pooled = vision.vision_model.post_layernorm(out.last_hidden_state[:, 0])
            loss = loss + aux * heads.loss(pooled, out.hidden_states[-2], batch_labels)
        return loss

    history = train_loop(steps, optimizer, gen, uniform(len(pixels), batch), loss_fn, log, "vision")
    vision.eval()
    return history, heads


@torch.no_grad()
def zero_shot(vision: Any, table: torch.Tensor, combos: list[tuple[str, ...]], folder: str | Path) -> dict:
    """Zero-shot shape / colour / background accuracy of ``vision`` on a shapes folder (its metadata.jsonl).

    Pictures go through the encoder's own preprocessing (resize the shortest side, centre crop), so a folder of
    64 or 128 px references is read as the adapter would read it. ``table`` holds the embeddings of ``combos``.
    """
    # heavy (transformers): only callers that measure pay for it
    from transformers import CLIPImageProcessorPil

    folder = Path(folder)
    rows = read_rows(folder)
    size = int(vision.config.image_size)
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    hits = dict.fromkeys(("shape", "color", "background"), 0)
    for start in range(0, len(rows), 256):
        part = rows[start : start + 256]
        pixels = processor(images=[Image.open(folder / r["image"]).convert("RGB") for r in part],
                           return_tensors="pt").pixel_values  # fmt: skip
        embeds = F.normalize(vision(pixel_values=pixels.to(vision.dtype)).image_embeds.float(), dim=-1)
        best = (embeds @ table.T).argmax(dim=1).tolist()
        for r, b in zip(part, best, strict=True):
            for k, attribute in enumerate(hits):
                hits[attribute] += combos[b][k] == r[attribute]
    return {a: round(h / max(1, len(rows)), 4) for a, h in hits.items()} | {"n": len(rows)}


def vision_tower(clip: Any, patch: int = 0, width: int = 0, layers: int = 0) -> Any:
    """A CLIPVisionModelWithProjection: a copy of ``clip``'s tower and projection, or a new one.

    With ``patch`` > 0 the tower is new (random weights, seeded by the caller): that patch side, ``width``
    and ``layers`` (0: ``clip``'s), 4 heads, the same image size and projection width, so its image embeddings
    still live in the text tower's space.
    """
    # heavy (transformers): only its callers pay for it
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = clip.config.vision_config
    if patch > 0:
        width = width or config.hidden_size
        config = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                                  num_hidden_layers=layers or config.num_hidden_layers, num_attention_heads=4,
                                  image_size=config.image_size, patch_size=patch,
                                  projection_dim=clip.config.projection_dim)  # fmt: skip
        return CLIPVisionModelWithProjection(config)
    vision = CLIPVisionModelWithProjection(config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision


def _joined(clip: Any, vision: Any) -> Any:
    """A CLIPModel holding ``clip``'s text tower (and temperature) and ``vision``'s tower and projection."""
    # heavy (transformers): only the stage pays for it
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=clip.config.text_config.to_dict(), vision_config=vision.config.to_dict(),
                        projection_dim=clip.config.projection_dim)  # fmt: skip
    joined = CLIPModel(config)
    for part in ("text_model", "text_projection", "vision_model", "visual_projection"):
        source = clip if part.startswith("text") else vision
        getattr(joined, part).load_state_dict(getattr(source, part).state_dict())
    joined.logit_scale.data.copy_(clip.logit_scale.data)
    return joined


def stage_vision(c: Any, out: Path) -> dict[str, Any]:
    """The build's vision stage: retrain the vision tower of ``out/clip`` against its frozen text tower.

    The frozen text tower is the jointly trained CLIP's, kept in ``clip_joint/`` (copied there from ``clip/`` on
    the first run, so a rerun starts from the same weights), or the CLIPModel folder ``c.vision_text``'s when
    given (the one a UNet was trained on). The vision tower is new (``c.vision_patch`` > 0) or starts from that
    CLIP's. ``clip/`` is rewritten as that text tower + the new vision tower, so the pipeline stage's image
    encoder and the scorer both get it.
    Recorded: losses, and zero-shot accuracy on ``data/eval`` and ``data/drawn``.
    """
    # heavy (transformers): only the stage pays for it
    from transformers import CLIPModel, CLIPTokenizer

    from .shapes import combinations

    source = Path(c.vision_text) if c.vision_text else out / "clip_joint"
    if not c.vision_text and not source.is_dir():
        shutil.copytree(out / "clip", source)
    clip = CLIPModel.from_pretrained(source)
    combos, grid = combinations("train"), caption_grid()
    full = text_table(source, grid)  # every caption; the training ones are the teacher's classes
    table = full[[grid.index(combo) for combo in combos]]
    teacher = factorised_targets(table, combos, seed=c.seed)
    rows = read_rows(out / "data" / "train")
    pixels = _uint8([Image.open(out / "data" / "train" / r["image"]) for r in rows])
    for count, unnamed, seed in ((c.vision_drawn, False, c.seed + 10), (c.vision_unnamed, True, c.seed + 11)):
        if count:
            more, extra = drawn_pool(count, seed, c.size, unnamed)
            pixels, rows = torch.cat([pixels, more]), rows + extra
    labels = _labels(rows, {combo: i for i, combo in enumerate(combos)})
    torch.manual_seed(c.seed)
    vision = vision_tower(clip, c.vision_patch, c.vision_width, c.vision_layers)
    history, _ = train_vision(vision, table, pixels, labels, steps=c.vision_steps, batch=c.vision_batch,
                              lr=c.vision_lr, aux=c.vision_aux, seed=c.seed + 3, teacher=teacher,
                              recolour=c.vision_recolour, log=c.log)  # fmt: skip
    _joined(clip, vision).save_pretrained(out / "clip")
    CLIPTokenizer.from_pretrained(source).save_pretrained(out / "clip")
    scores = {name: zero_shot(vision, full, grid, out / "data" / name)
              for name in ("eval", "drawn") if (out / "data" / name / "metadata.jsonl").is_file()}  # fmt: skip
    say(c, f"  vision zero-shot: {json.dumps(scores)}")
    return {"steps": c.vision_steps, "images": len(pixels), "loss": loss_curve(history), "zero_shot": scores,
            "text_tower": str(source)}  # fmt: skip
