"""The miniature family's procedural data: determinism, captions, layout, held-out splits, files, checker."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipadapter.mini.shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT,
    HELD_OUT_BACKGROUND,
    HELD_OUT_COLOR,
    MARGIN,
    MAX_SIDE,
    MIN_SIDE,
    NAMED_COLORS,
    SHAPES,
    TEXTURES,
    Example,
    caption_for,
    classify,
    combinations,
    is_held_out,
    make_example,
    nearest_color,
    texture_color,
    write_dataset,
)
from ipadapter.training.data import open_source


def examples(count: int, seed: int = 0, size: int = 64, split: str = "train") -> list[Example]:
    return [make_example(seed, i, size, split) for i in range(count)]


@pytest.fixture(scope="module")
def mixed() -> list[Example]:
    """300 examples at 64 px: 150 from each split."""
    return examples(150, seed=1) + examples(150, seed=1, split="eval")


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_identical_examples() -> None:
    a, b = make_example(7, 3), make_example(7, 3)
    assert a.image.tobytes() == b.image.tobytes()
    assert (a.caption, a.shape, a.color, a.background, a.texture, a.box) == (
        b.caption,
        b.shape,
        b.color,
        b.background,
        b.texture,
        b.box,
    )
    assert a.image.mode == "RGB" and a.image.size == (64, 64)
    assert make_example(7, 3, size=32).image.size == (32, 32)


def test_different_index_seed_or_split_give_different_images() -> None:
    base = make_example(7, 3).image.tobytes()
    assert make_example(7, 4).image.tobytes() != base
    assert make_example(8, 3).image.tobytes() != base
    assert make_example(7, 3, split="eval").image.tobytes() != base
    assert len({e.image.tobytes() for e in examples(50)}) == 50


def test_global_rng_is_not_used() -> None:
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    make_example(0, 0)
    assert np.random.random() == before


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        make_example(0, 0, split="test")
    with pytest.raises(ValueError, match="non-negative"):
        make_example(-1, 0)
    with pytest.raises(ValueError, match="size"):
        make_example(0, 0, size=8)


# ----------------------------------------------------------------------------------------------- content


def test_captions_name_the_fields(mixed: list[Example]) -> None:
    for e in mixed:
        assert e.caption == caption_for(e.shape, e.color, e.background, e.texture)
        words = e.caption.split()
        assert words[0] == ("an" if e.color[0] in "aeiou" else "a")
        assert words[1:3] == [e.color, e.shape] and words[-2:] == [e.background, "background"]
        assert (e.texture in words) == (e.texture != "plain") and "plain" not in words
    assert caption_for("circle", "red", "blue", "striped") == "a red circle on a striped blue background"
    assert caption_for("circle", "red", "blue", "plain") == "a red circle on a blue background"
    assert caption_for("star", "orange", "white", "dotted") == "an orange star on a dotted white background"


def test_all_attributes_occur(mixed: list[Example]) -> None:
    assert {e.shape for e in mixed} == set(SHAPES)
    assert {e.color for e in mixed} == set(COLORS)
    assert {e.background for e in mixed} == set(BACKGROUNDS)
    assert {e.texture for e in mixed} == set(TEXTURES)


def test_colours_are_distinguishable() -> None:
    rgb = {name: np.array(value, dtype=float) for name, value in NAMED_COLORS.items()}
    assert len(NAMED_COLORS) >= 8 and len(SHAPES) >= 6 and len(BACKGROUNDS) >= 6 and len(TEXTURES) >= 4
    assert set(BACKGROUNDS) <= set(NAMED_COLORS) and set(COLORS) == set(NAMED_COLORS)
    for a, b in itertools.combinations(rgb, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) > 85, (a, b)
    for background in BACKGROUNDS:  # a texture's shade still reads as its background colour
        assert nearest_color(texture_color(background)) == background
    for split in ("train", "eval"):
        assert all(color != background for _, color, background, _ in combinations(split))


def test_object_never_on_its_own_colour(mixed: list[Example]) -> None:
    assert all(e.color != e.background for e in mixed)


@pytest.mark.parametrize("size", [32, 64, 100])
def test_box_is_inside_and_sized(size: int) -> None:
    margin = math.ceil(MARGIN * size)
    for e in examples(100, seed=2, size=size):
        left, top, right, bottom = e.box
        assert all(isinstance(v, int) for v in e.box)
        assert right - left == bottom - top  # every shape fills a square box
        assert MIN_SIDE * size <= right - left <= MAX_SIDE * size
        assert margin <= left and margin <= top and right <= size - margin and bottom <= size - margin
        # outside the box (beyond the resampling halo) the image is background only
        pixels = np.asarray(e.image).astype(int)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[max(top - 3, 0) : bottom + 3, max(left - 3, 0) : right + 3] = False
        far = np.abs(pixels[outside] - np.array(NAMED_COLORS[e.color])).sum(axis=1)
        assert far.min() > 20, e.caption


# ------------------------------------------------------------------------------------------------ splits


def test_held_out_rule() -> None:
    assert HELD_OUT == {"color": HELD_OUT_COLOR, "background": HELD_OUT_BACKGROUND}
    for pairs, names in ((HELD_OUT_COLOR, COLORS), (HELD_OUT_BACKGROUND, BACKGROUNDS)):
        assert sorted(shape for shape, _ in pairs) == sorted(SHAPES)  # one per shape
        held = [name for _, name in pairs]
        assert len(set(held)) == len(held) and set(held) <= set(names)  # each for one shape only
    train, evaluation = set(combinations("train")), set(combinations("eval"))
    assert not train & evaluation
    every = {(s, c, b, t) for s in SHAPES for c in COLORS for b in BACKGROUNDS for t in TEXTURES if c != b}
    assert train | evaluation == every
    assert not any(is_held_out(s, c, b) for s, c, b, _ in train)
    assert all(is_held_out(s, c, b) for s, c, b, _ in evaluation)
    # training still sees every shape, colour and background, just not in the held-out pairings
    assert {s for s, *_ in train} == set(SHAPES)
    assert {c for _, c, _, _ in train} == set(COLORS)
    assert {b for _, _, b, _ in train} == set(BACKGROUNDS)


def test_splits_draw_only_their_combinations() -> None:
    train = examples(400, seed=3)
    assert not any(is_held_out(e.shape, e.color, e.background) for e in train)
    held = examples(200, seed=3, split="eval")
    assert all(is_held_out(e.shape, e.color, e.background) for e in held)
    assert {(e.shape, e.color) for e in held} & HELD_OUT_COLOR
    assert {(e.shape, e.background) for e in held} & HELD_OUT_BACKGROUND


# ------------------------------------------------------------------------------------------------- files


def test_write_dataset(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "shapes", 12, seed=5, size=32)
    assert folder == tmp_path / "shapes"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(12)]
    assert sorted(p.name for p in folder.glob("*.txt")) == [f"{i:06d}.txt" for i in range(12)]
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 12
    for i, record in enumerate(records):
        e = make_example(5, i, 32)
        assert record["image"] == f"{i:06d}.png" and record["text"] == e.caption
        assert (record["shape"], record["color"], record["background"], record["texture"]) == (
            e.shape,
            e.color,
            e.background,
            e.texture,
        )
        assert tuple(record["box"]) == e.box
        assert (folder / f"{i:06d}.txt").read_text().strip() == e.caption
        with Image.open(folder / record["image"]) as image:
            assert image.tobytes() == e.image.tobytes()  # PNG is lossless

    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(folder, 3)
    write_dataset(folder, 3, seed=6, split="eval", overwrite=True)  # replaces the earlier dataset whole
    assert len(list(folder.glob("*.png"))) == 3 and len(list(folder.glob("*.txt"))) == 3
    (folder / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write"):
        write_dataset(folder, 3, overwrite=True)
    assert (folder / "notes.md").exists()


def test_trainer_reads_the_folder_and_the_manifest(tmp_path: Path) -> None:
    folder = write_dataset(tmp_path / "shapes", 8, seed=9)
    expected = [make_example(9, i).caption for i in range(8)]
    source = open_source(str(folder))
    assert source.kind == "folder" and len(source) == 8
    samples = [source[i] for i in range(8)]
    assert [s.key for s in samples] == [f"{i:06d}.png" for i in range(8)]
    assert [s.text for s in samples] == expected and all(s.error is None for s in samples)
    manifest = open_source(str(folder / "metadata.jsonl"))
    assert len(manifest) == 8 and [manifest[i].text for i in range(8)] == expected


# ----------------------------------------------------------------------------------------------- checker


def test_classifier_accuracy(mixed: list[Example]) -> None:
    found = [classify(e.image) for e in mixed]
    accuracy = {
        key: np.mean([f[key] == getattr(e, key) for f, e in zip(found, mixed, strict=True)])
        for key in ("color", "background", "shape")
    }
    assert accuracy["color"] >= 0.98 and accuracy["background"] >= 0.98, accuracy
    assert accuracy["shape"] >= 0.90, accuracy
    for f, e in zip(found, mixed, strict=True):  # the box it finds is the object's
        assert max(abs(a - b) for a, b in zip(f["box"], e.box, strict=True)) <= 2, (f, e)


def test_classifier_other_sizes_and_empty_images() -> None:
    for size in (32, 160):
        for e in examples(12, seed=4, size=size):
            found = classify(e.image)
            assert (found["color"], found["background"]) == (e.color, e.background)
    blank = classify(Image.new("RGB", (64, 64), NAMED_COLORS["blue"]))
    assert blank["background"] == "blue" and blank["color"] is None and blank["shape"] is None
