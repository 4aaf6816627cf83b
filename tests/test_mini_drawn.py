"""Shapes drawn differently (turned, resized, other edges, unnamed colours) and the vision stage's pieces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ipadapter.mini.drawn import MARGIN, draw_example, write_drawn
from ipadapter.mini.shapes import NAMED_COLORS, classify, is_held_out
from ipadapter.mini.vision import (
    ATTRIBUTES,
    _joined,
    _labels,
    augment,
    caption_grid,
    factorised_targets,
    vision_tower,
)


def test_drawn_examples_are_deterministic_and_follow_the_split() -> None:
    a, b = draw_example(3, 5, "eval"), draw_example(3, 5, "eval")
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    for i in range(40):
        held = draw_example(0, i, "eval")
        seen = draw_example(0, i, "train", (32,))
        assert is_held_out(held.shape, held.color, held.background)
        assert not is_held_out(seen.shape, seen.color, seen.background) and seen.image.size == (32, 32)


def test_a_given_scene_is_drawn_in_the_stream_s_pose() -> None:
    """Another view of a known picture: its shape and colours, drawn in a pose the generator never uses."""
    scene = ("triangle", "red", "blue", "plain")
    views = [draw_example(4, i, "train", (32,), scene=scene) for i in range(6)]
    for view in views:
        assert (view.shape, view.color, view.background, view.texture) == scene
        assert view.caption == "a red triangle on a blue background"
        assert classify(view.image)["color"] == "red" and classify(view.image)["background"] == "blue"
    assert len({np.asarray(v.image).tobytes() for v in views}) == len(views)  # six poses, not one
    held = draw_example(0, 0, "eval")
    with pytest.raises(ValueError, match="not a train combination"):
        draw_example(0, 0, "train", scene=(held.shape, held.color, held.background, held.texture))


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


def _batch(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    examples = [draw_example(4, i, "train", (32,)) for i in range(count)]
    pixels = torch.from_numpy(np.stack([np.asarray(e.image) for e in examples])).permute(0, 3, 1, 2)
    rows = [{a: getattr(e, a) for a in ATTRIBUTES} for e in examples]
    return pixels, _labels(rows, {})


def test_augment_turns_a_batch_without_changing_what_it_shows() -> None:
    pixels, labels = _batch(6)
    changed = 0
    for seed in range(6):
        moved, kept = augment(pixels, labels, torch.Generator().manual_seed(seed), recolour=0.0)
        assert torch.equal(kept, labels)
        for before, after in zip(pixels, moved, strict=True):  # a quarter turn or mirror: same pixels, moved
            assert torch.equal(before.flatten(1).sort(dim=1).values, after.flatten(1).sort(dim=1).values)
        changed += not torch.equal(moved, pixels)
    assert changed >= 3  # the identity is one of 8 poses


def test_recoloured_pictures_keep_their_outline_and_lose_their_colour_names() -> None:
    pixels, labels = _batch(8)
    moved, kept = augment(pixels, labels, torch.Generator().manual_seed(1), recolour=1.0)
    assert (kept[:, [0, 2, 3]] == -1).all()  # no caption, colour or background to learn from
    assert torch.equal(kept[:, [1, 4]], labels[:, [1, 4]])  # shape and texture stay known

    def regions(x: torch.Tensor) -> torch.Tensor:  # (S, S): which pixels share a colour, as ids
        return torch.unique(x.flatten(1).T, dim=0, return_inverse=True)[1].view(x.shape[1:])

    for before, after in zip(pixels, moved, strict=True):
        # channels reordered and some inverted (a one-to-one map of colours): the same regions, turned
        ids, seen = regions(before), regions(after)
        poses = [p for k in range(4) for p in (torch.rot90(ids, k), torch.rot90(ids, k).flip(1))]
        pairs = [len(torch.unique(torch.stack([p.flatten(), seen.flatten()]), dim=1).T) for p in poses]
        assert int(ids.max()) + 1 in pairs and int(seen.max()) == int(ids.max())
    changed = (moved.float().mean(dim=(2, 3)) - pixels.float().mean(dim=(2, 3))).abs().amax(dim=1)
    assert (changed > 1).float().mean() > 0.5  # most pictures really change colour


def test_a_new_vision_tower_joins_the_text_tower_it_was_trained_against() -> None:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=16)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=4, projection_dim=16)  # fmt: skip
    clip = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    )
    tower = vision_tower(clip, patch=8, width=48, layers=2)
    assert (tower.config.patch_size, tower.config.hidden_size, tower.config.num_hidden_layers) == (8, 48, 2)
    assert tower.config.projection_dim == 16 and tower.config.image_size == 32
    copy = vision_tower(clip)  # no patch: the joint tower itself
    joined = _joined(clip, tower)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(2, 300, (2, 9))

    def tensor(x: object) -> torch.Tensor:  # newer transformers return an output object
        return x if isinstance(x, torch.Tensor) else x.pooler_output

    with torch.no_grad():
        assert torch.equal(
            copy(pixel_values=pixels).image_embeds, tensor(clip.get_image_features(pixel_values=pixels))
        )
        image = tensor(joined.get_image_features(pixel_values=pixels))
        assert torch.allclose(image, tower(pixel_values=pixels).image_embeds)
        texts = [tensor(m.get_text_features(input_ids=ids)) for m in (joined, clip)]
        assert torch.equal(texts[0], texts[1]) and torch.equal(joined.logit_scale, clip.logit_scale)
