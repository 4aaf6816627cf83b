"""The training data layer: sources, validation, transforms, determinism, sharding and collation."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter.errors import InputError, ModelNotAvailableError
from ipadapter.training.data import Sample, Source, expand_braces, open_source
from ipadapter.training.datasets import StreamingDataset, TrainingDataset, collate
from ipadapter.training.seeds import epoch_order
from ipadapter.training.transform import Transform

SIZES = [(40, 24), (24, 40), (32, 32), (50, 30), (17, 29), (64, 20)]  # (width, height)
R, S = 16, 16


def rgb(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def corrupt_bytes() -> bytes:
    return np.random.default_rng(99).integers(0, 256, 300, dtype=np.uint8).tobytes()


def truncated_bytes() -> bytes:
    data = png_bytes(rgb(98, (40, 40)))
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def transform() -> Transform:
    return Transform(resolution=R, clip_size=S)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """6 good images (one in a subfolder, one without caption), one corrupt and one truncated PNG."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, size in enumerate(SIZES):
        path = root / ("sub" if i == 5 else "") / f"img{i}.png"
        rgb(i, size).save(path)
        if i != 2:
            path.with_suffix(".txt").write_text(f"caption {i}\n")
    (root / "zz_corrupt.png").write_bytes(corrupt_bytes())
    (root / "zz_truncated.png").write_bytes(truncated_bytes())
    (root / "notes.md").write_text("not an image")
    return root


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Three shards of two samples each; captions as .txt or .json; one corrupt image, one sample without."""
    folder = tmp_path / "shards"
    folder.mkdir()
    n = 0
    for s in range(3):
        members = []
        for _ in range(2):
            key = f"{n:06d}"
            image = corrupt_bytes() if n == 3 else png_bytes(rgb(n, SIZES[n]))
            if n != 4:
                members.append((f"{key}.png", image))
            if n % 2:
                members.append((f"{key}.json", json.dumps({"text": f"tar {n}"}).encode()))
            else:
                members.append((f"{key}.txt", f"tar {n}".encode()))
            n += 1
        write_tar(folder / f"data-{s:03d}.tar", members)
    return folder


# ------------------------------------------------------------------------------------------- sources


def test_folder_source(folder: Path) -> None:
    source = open_source(str(folder))
    assert isinstance(source, Source) and not source.streaming and source.kind == "folder"
    keys = [s.key for s in source]
    assert keys == sorted(keys) and len(source) == 8
    assert keys[:6] == [f"img{i}.png" for i in range(5)] + ["sub/img5.png"]
    assert source[0].text == "caption 0" and source[2].text == "" and source[5].text == "caption 5"
    assert isinstance(source[0], Sample) and Path(source[0].image).is_file()


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("a caption without an image")
    with pytest.raises(InputError, match="has no images"):
        open_source(str(tmp_path / "empty"))


def test_jsonl_manifest(folder: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"image": "images/img0.png", "text": "zero"}),
        "",
        json.dumps({"image": str(folder / "sub" / "img5.png"), "text": "five"}),  # absolute
        json.dumps({"image": "images/img1.png"}),  # no text: empty caption
    ]
    manifest.write_text("\n".join(lines) + "\n")
    source = open_source(str(manifest))
    assert source.kind == "jsonl" and len(source) == 3 and not source.streaming
    assert [s.text for s in source] == ["zero", "five", ""]
    assert [s.key for s in source] == ["pairs.jsonl:1", "pairs.jsonl:3", "pairs.jsonl:4"]
    assert Path(source[1].image) == folder / "sub" / "img5.png"


def test_json_manifest_with_custom_columns(folder: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.json"
    manifest.write_text(json.dumps([{"file": "images/img3.png", "caption": "three"}]))
    source = open_source(str(manifest), image_column="file", text_column="caption")
    assert source.kind == "json" and len(source) == 1 and source[0].text == "three"
    with pytest.raises(InputError, match="entry 1: no 'image' field"):
        open_source(str(manifest))


def test_manifest_problems_name_lines(folder: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.jsonl"
    good = json.dumps({"image": "images/img0.png", "text": "ok"})
    lines = [good, good, "{not json", good, json.dumps({"text": "no image"}), good]
    lines += [json.dumps({"image": f"missing{i}.png", "text": "x"}) for i in range(5)]  # lines 7-11
    manifest.write_text("\n".join(lines))
    with pytest.raises(InputError) as err:
        open_source(str(manifest))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{manifest}: line 3: not valid JSON")
    assert "line 5: no 'image' field" in message and "line 7: image 'missing0.png' not found" in message
    assert "line 9" in message and "line 10" not in message  # five listed, the rest counted
    assert "and 2 more" in message and "(7 problems)" in message


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.jsonl", "\n\n", "is empty"),
        ("empty.json", "[]", "is empty"),
        ("dict.json", '{"image": "a.png"}', "not a list"),
        ("broken.json", "[{", "not valid JSON"),
        ("notext.jsonl", '{"image": "images/img0.png"}\n', "no entry has a 'text' field"),
    ],
)
def test_manifest_errors(folder: Path, tmp_path: Path, name: str, content: str, match: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=match):
        open_source(str(tmp_path / name))


def test_saved_hf_dataset(tmp_path: Path, transform: Transform) -> None:
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "text": Value("string")})
    images = [rgb(i, SIZES[i]) for i in range(3)] + [{"bytes": corrupt_bytes(), "path": None}]
    data = Dataset.from_dict({"image": images, "text": ["a", "b", "c", "bad"]}, features=features)
    data.save_to_disk(str(tmp_path / "ds"))
    source = open_source(str(tmp_path / "ds"))
    assert source.kind == "dataset" and not source.streaming and len(source) == 4
    assert [s.text for s in source] == ["a", "b", "c", "bad"]
    assert isinstance(source[0].image, bytes)  # decoded lazily, by the transform
    out = transform(source[1])
    assert out["original_size"].tolist() == [SIZES[1][1], SIZES[1][0]]
    assert "skipped" in transform(source[3])

    DatasetDict({"validation": data}).save_to_disk(str(tmp_path / "dd"))
    assert len(open_source(str(tmp_path / "dd"), split="validation")) == 4
    with pytest.raises(InputError, match="no split 'train'"):
        open_source(str(tmp_path / "dd"))
    with pytest.raises(InputError, match="no column 'caption'"):
        open_source(str(tmp_path / "ds"), text_column="caption")


def test_tar_shards_glob_and_braces(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = open_source(str(shards / "*.tar"))
    assert source.streaming and source.kind == "tar"
    samples = list(source)
    assert [s.key for s in samples] == [f"data-{i // 2:03d}.tar/{i:06d}" for i in range(6)]
    assert [s.text for s in samples] == [f"tar {i}" for i in range(6)]
    assert samples[4].error and "no image member" in samples[4].error
    with pytest.raises(TypeError):
        len(source)
    with pytest.raises(TypeError):
        source[0]

    monkeypatch.chdir(shards.parent)
    braces = open_source("shards/data-{000..001}.tar")
    assert [s.key for s in braces] == [s.key for s in samples[:4]]
    single = open_source(str(shards / "data-002.tar"))
    assert [s.text for s in single] == ["tar 4", "tar 5"]


def test_tar_errors(shards: Path) -> None:
    with pytest.raises(InputError, match="match no files"):
        open_source(str(shards / "other-*.tar"))
    with pytest.raises(InputError, match=r"'.*data-003\.tar' not found"):
        open_source(str(shards / "data-{000..003}.tar"))
    (shards / "fake.tar").write_bytes(corrupt_bytes())
    with pytest.raises(InputError, match="is not a tar file"):
        open_source(str(shards / "fake.tar"))


def test_expand_braces() -> None:
    assert expand_braces("d-{08..10}.tar") == ["d-08.tar", "d-09.tar", "d-10.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist; expected a folder"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "data.csv").write_text("image,text\n")
    with pytest.raises(InputError, match="unknown kind"):
        open_source(str(tmp_path / "data.csv"))
    with pytest.raises(InputError, match="hf://someone/pairs"):
        open_source("someone/pairs")
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "missing.jsonl"))


def test_hub_dataset_offline() -> None:
    with pytest.raises((ModelNotAvailableError, InputError)) as err:
        open_source("hf://someone/no-such-pairs")
    message = str(err.value)
    assert "\n" not in message and "someone/no-such-pairs" in message and "HF_HUB_OFFLINE" in message


# ----------------------------------------------------------------------------------------- transform


def test_corrupt_images_are_skipped_and_reported(folder: Path, transform: Transform) -> None:
    source = open_source(str(folder))
    examples = [transform(source[i]) for i in range(len(source))]
    skipped = [e for e in examples if "skipped" in e]
    assert [e["key"] for e in skipped] == ["zz_corrupt.png", "zz_truncated.png"]
    assert all("\n" not in e["skipped"] and "training image" in e["skipped"] for e in skipped)
    batch = collate(examples)
    assert batch["pixel_values"].shape == (6, 3, R, R) and batch["clip_pixel_values"].shape == (6, 3, S, S)
    assert batch["original_size"].shape == (6, 2) and batch["crop_top_left"].shape == (6, 2)
    assert batch["keys"][:2] == ["img0.png", "img1.png"] and batch["texts"][2] == ""
    assert [k for k, _ in batch["skipped"]] == ["zz_corrupt.png", "zz_truncated.png"]

    empty = collate(skipped)
    assert empty["texts"] == [] and len(empty["skipped"]) == 2 and "pixel_values" not in empty
    for data in (corrupt_bytes(), truncated_bytes(), b"", None):
        assert "skipped" in transform(Sample("k", data, "t"))


def test_sizes_and_pixel_range(transform: Transform) -> None:
    wide = transform(Sample("w", rgb(0, (48, 24)), "t"))  # resized to 32x16, centre crop at left 8
    assert wide["original_size"].tolist() == [24, 48] and wide["crop_top_left"].tolist() == [0, 8]
    tall = transform(Sample("t", rgb(0, (24, 48)), "t"))
    assert tall["original_size"].tolist() == [48, 24] and tall["crop_top_left"].tolist() == [8, 0]
    px = wide["pixel_values"]
    assert px.dtype == torch.float32 and px.shape == (3, R, R)
    assert px.min() >= -1 and px.max() <= 1 and px.min() < -0.5 and px.max() > 0.5
    white = transform(Sample("white", Image.new("RGB", (40, 20), "white"), ""))["pixel_values"]
    black = transform(Sample("black", Image.new("L", (20, 40), 0), ""))["pixel_values"]
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))
    expected = np.asarray(rgb(0, (48, 24)).resize((32, 16), Image.Resampling.BICUBIC).crop((8, 0, 24, 16)))
    assert torch.allclose(px, torch.from_numpy(expected / 127.5 - 1).permute(2, 0, 1).float(), atol=1e-6)
    with pytest.raises(InputError, match="multiple of 8"):
        Transform(resolution=20, clip_size=S)


def test_clip_pixels_match_the_processor(folder: Path) -> None:
    from transformers import CLIPImageProcessorPil

    transform = Transform(resolution=R, clip_size=24, random_crop=True, random_flip=True)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    for name in ("img0.png", "img1.png", "sub/img5.png"):
        out = transform(Sample(name, folder / name, ""))
        with Image.open(folder / name) as img:
            expected = processor(images=[img.convert("RGB")], return_tensors="pt").pixel_values[0]
        assert out["clip_pixel_values"].dtype == torch.float32 and out["clip_pixel_values"].shape == (
            3,
            24,
            24,
        )
        assert torch.equal(out["clip_pixel_values"], expected)


def test_random_crop_and_flip_are_reproducible(tmp_path: Path) -> None:
    (tmp_path / "wide").mkdir()
    for i in range(4):
        rgb(i, (96, 24)).save(tmp_path / "wide" / f"{i}.png")  # 64x16 after resizing: 49 crop positions
    source = open_source(str(tmp_path / "wide"))
    transform = Transform(resolution=R, clip_size=S, random_crop=True, random_flip=True)

    def run(epoch: int, seed: int = 0) -> list[dict]:
        data = TrainingDataset(source, transform, seed=seed)
        data.set_epoch(epoch)
        return [data[i] for i in range(len(data))]

    first, again, later = run(0), run(0), run(1)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(
            a["crop_top_left"], b["crop_top_left"]
        )
    crops = lambda items: [tuple(e["crop_top_left"].tolist()) for e in items]  # noqa: E731
    assert crops(first) != crops(later) and crops(first) != crops(run(0, seed=1))
    assert any(
        not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, later, strict=True)
    )
    assert all(e["crop_top_left"][0] == 0 and 0 <= e["crop_top_left"][1] <= 48 for e in first + later)

    # flips: over many epochs of the same image both orientations occur, matching the crop position
    data = TrainingDataset(source, Transform(resolution=R, clip_size=S, random_flip=True), seed=0)
    seen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        seen.add(data[0]["pixel_values"][:, 0, 0].sum().item())
    assert len(seen) == 2


def test_epoch_order() -> None:
    order = epoch_order(10, seed=3, epoch=0)
    assert sorted(order) == list(range(10)) and order == epoch_order(10, seed=3, epoch=0)
    assert order != epoch_order(10, seed=3, epoch=1) and order != epoch_order(10, seed=4, epoch=0)


# ---------------------------------------------------------------------------------- streaming dataset


def test_streaming_ranks_cover_the_stream(shards: Path) -> None:
    source = open_source(str(shards / "*.tar"))
    transform = Transform(resolution=R, clip_size=S, random_crop=True, random_flip=True)
    rank0 = list(itertools.islice(StreamingDataset(source, transform, rank=0, world_size=2), 3))
    rank1 = list(itertools.islice(StreamingDataset(source, transform, rank=1, world_size=2), 3))
    keys0, keys1 = [e["key"] for e in rank0], [e["key"] for e in rank1]
    assert not set(keys0) & set(keys1)
    assert sorted(keys0 + keys1) == [s.key for s in source]
    assert keys0 == [s.key for s in source][0::2]
    assert "skipped" in rank1[1]  # sample 3: corrupt image; sample 4 (no image) is rank 0's
    assert "no image member" in rank0[2]["skipped"]


def test_streaming_start_and_epochs(shards: Path, folder: Path) -> None:
    transform = Transform(resolution=R, clip_size=S, random_crop=True, random_flip=True)
    for source in (open_source(str(shards / "*.tar")), open_source(str(folder))):  # streaming, map-style
        n = 6 if source.streaming else len(source)
        full = list(
            itertools.islice(StreamingDataset(source, transform, seed=5, rank=1, world_size=2), n + 2)
        )
        keys = [e["key"] for e in full]
        assert keys[: n // 2] == keys[n // 2 : n]  # loops over the stream: epoch 2 repeats the order
        for start in (2, n // 2 + 1):
            resumed = list(
                itertools.islice(
                    StreamingDataset(source, transform, seed=5, rank=1, world_size=2, start=start), 2
                )
            )
            for a, b in zip(resumed, full[start : start + 2], strict=True):
                assert a["key"] == b["key"] and a.get("skipped") == b.get("skipped")
                if "pixel_values" in a:
                    assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_streaming_too_small_stream(tmp_path: Path) -> None:
    write_tar(tmp_path / "one.tar", [("a.png", png_bytes(rgb(0, (20, 20)))), ("a.txt", b"one")])
    source = open_source(str(tmp_path / "one.tar"))
    transform = Transform(resolution=R, clip_size=S)
    assert next(iter(StreamingDataset(source, transform, rank=0, world_size=2)))["text"] == "one"
    with pytest.raises(InputError, match="fewer than the 2 training processes"):
        next(iter(StreamingDataset(source, transform, rank=1, world_size=2)))


def test_manifest_reference_pictures_feed_the_image_encoder(folder: Path, tmp_path: Path) -> None:
    from transformers import CLIPImageProcessorPil

    manifest = tmp_path / "pairs.jsonl"
    rows = [
        {"image": "images/img0.png", "text": "zero", "reference": "images/img1.png"},
        {"image": "images/img2.png", "text": "two"},  # no reference: its own image, as before
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    source = open_source(str(manifest), reference_column="reference")
    assert source.has_references and Path(source[0].reference) == tmp_path / "images" / "img1.png"
    assert source[1].reference is None
    assert not open_source(str(manifest)).has_references  # the field is read only when asked for
    transform = Transform(resolution=R, clip_size=24)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})

    def clip(name: str) -> torch.Tensor:
        with Image.open(tmp_path / "images" / name) as img:
            return processor(images=[img.convert("RGB")], return_tensors="pt").pixel_values[0]

    first, second = transform(source[0]), transform(source[1])
    assert torch.equal(first["clip_pixel_values"], clip("img1.png"))  # the encoder sees the reference
    assert torch.equal(
        first["pixel_values"], transform(Sample("x", tmp_path / "images" / "img0.png", ""))["pixel_values"]
    )
    assert torch.equal(second["clip_pixel_values"], clip("img2.png"))


def test_manifest_reference_problems(folder: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.jsonl"
    rows = [
        {"image": "images/img0.png", "text": "a", "reference": "images/nothing.png"},
        {"image": "images/img0.png", "text": "b", "reference": 3},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InputError) as err:
        open_source(str(manifest), reference_column="reference")
    message = str(err.value)
    assert "line 1: reference 'images/nothing.png' not found" in message
    assert "line 2: 'reference' is not a path" in message and "\n" not in message


def test_an_unreadable_reference_skips_its_example(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(corrupt_bytes())
    sample = Sample("k", tmp_path / "images" / "img0.png", "t", reference=tmp_path / "broken.png")
    out = Transform(resolution=R, clip_size=24)(sample)
    assert out["key"] == "k" and out["skipped"].startswith("reference image")
