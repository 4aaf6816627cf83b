"""Shapes drawn differently (turned, resized, other edges, unnamed colours) and the vision stage's pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ipadapter.mini.drawn import MARGIN, draw_example, write_drawn
from ipadapter.mini.shapes import NAMED_COLORS, is_held_out
from ipadapter.mini.vision import ATTRIBUTES, _labels, caption_grid, factorised_targets


def test_drawn_examples_are_deterministic_and_follow_the_split() -> None:
    a, b = draw_example(3, 5, "eval"), draw_example(3, 5, "eval")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    for i in range(40):
        held = draw_example(0, i, "eval")
        seen = draw_example(0, i, "train", (32,))
        assert is_held_out(held.shape, held.color, held.background)
        assert not is_held_out(seen.shape, seen.color, seen.background) and seen.image.size == (32, 32)


def test_drawn_figures_keep_a_plain_border() -> None:
    for i in range(40):
        example = draw_example(1, i, "eval")
        left, top, right, bottom = example.box
        side = example.image.width
        slack = MARGIN * side - 1  # the turned figure stays MARGIN from every edge (rounding aside)
        assert min(left, top) >= slack and max(right, bottom) <= side - slack


def test_unnamed_colours_are_far_from_every_named_colour() -> None:
    named = np.array(list(NAMED_COLORS.values()), dtype=np.float64)
    for i in range(20):
        example = draw_example(2, i, "train", (32,), unnamed=True)
        assert example.color == example.background == ""
        pixels = np.asarray(example.image, dtype=np.float64).reshape(-1, 3)
        centre = np.asarray(example.image, dtype=np.float64)[16, 16]  # object or background, never named
        assert np.sqrt(((named - centre) ** 2).sum(1)).min() > 40 and pixels.std() > 0


def test_write_drawn_is_a_shapes_folder(tmp_path: Path) -> None:
    folder = write_drawn(tmp_path / "drawn", 6, seed=0)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((folder / r["image"]).is_file() for r in rows)
    assert all(r["split"] == "eval" and r["drawn"] for r in rows)


def test_labels_mark_unnamed_colours_as_unknown() -> None:
    rows = [
        {"shape": "star", "color": "red", "background": "white", "texture": "plain"},
        {"shape": "ring", "color": "", "background": "", "texture": "dotted"},
    ]
    labels = _labels(rows, {("star", "red", "white", "plain"): 7})
    assert labels[0].tolist() == [7, ATTRIBUTES["shape"].index("star"), 0, 0, 0]
    assert labels[1, 0] == labels[1, 2] == labels[1, 3] == -1
    assert labels[1, 1] == ATTRIBUTES["shape"].index("ring")


def test_factorised_targets_classify_their_captions() -> None:
    combos = [c for c in caption_grid() if c[3] == "plain"][:60]
    gen = torch.Generator().manual_seed(0)
    parts = {(a, v): torch.randn(32, generator=gen) for a, vs in ATTRIBUTES.items() for v in vs}
    table = torch.nn.functional.normalize(
        torch.stack(
            [sum(parts[a, v] for a, v in zip(list(ATTRIBUTES)[:3], c[:3], strict=True)) for c in combos]
        ),
        dim=-1,
    )
    vectors, bias = factorised_targets(table, combos)
    assert vectors.shape == (6 + 8 + 6, 32) and bias.shape == (32,)
    offsets = {"shape": 0, "color": 6, "background": 14}
    ids = torch.tensor(
        [[offsets[a] + ATTRIBUTES[a].index(c[k]) for k, a in enumerate(offsets)] for c in combos]
    )
    embeds = vectors[ids].sum(dim=1) + bias
    assert ((embeds @ table.T).argmax(dim=1) == torch.arange(len(combos))).float().mean() > 0.9
