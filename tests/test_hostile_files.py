"""Hostile and odd files: a corpus of inputs that must be refused in one line (or read the way a viewer shows
them), and writes that are whole or not at all.

Each CORPUS table below is a regression corpus: a later change must keep refusing (or reading) every entry the
way it says. Add an entry when a new kind of bad file turns up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import fails, reference_image
from PIL import Image
from safetensors.torch import save_file

import ipadapter.adapters.checkpoint as checkpoint_module
import ipadapter.prompt.embeds as embeds_module
from ipadapter import (
    CheckpointError,
    InputError,
    load_checkpoint,
    load_image,
    load_mask,
    media,
    save_checkpoint,
)
from ipadapter.batch import run_batch
from ipadapter.files import atomic_path, temp_path, temp_target
from ipadapter.jobs.options import job_from_options, local_files
from ipadapter.prompt.recipe import Recipe

# ---------------------------------------------------------------------------------------------------------
# Checkpoints: what a file that is not one really is
# ---------------------------------------------------------------------------------------------------------

_TORCH_ZIP = b"PK\x03\x04"


def _safetensors_bytes(tmp: Path) -> bytes:
    save_file({"image_proj.proj.weight": torch.zeros(2, 2)}, str(tmp / "s.safetensors"))
    return (tmp / "s.safetensors").read_bytes()


def _torch_zip_bytes(tmp: Path) -> bytes:
    torch.save({"image_proj": {}, "ip_adapter": {}}, str(tmp / "t.bin"))
    return (tmp / "t.bin").read_bytes()


# name -> (contents, needles of the one-line refusal)
CHECKPOINT_CORPUS: dict[str, tuple[Callable[[Path], bytes], tuple[str, ...]]] = {
    "x.bin": (
        lambda tmp: b"hello world, this is not a checkpoint\n",
        (
            "is not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts with 'hello wo...')",
            "expected an IP-Adapter .bin or .safetensors file",
        ),
    ),
    "lfs.bin": (
        lambda tmp: b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 44642768\n",
        ("is not a PyTorch checkpoint", "Git LFS pointer", "git lfs pull"),
    ),
    "page.pth": (
        lambda tmp: b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n",
        ("is not a PyTorch checkpoint", "web page", "download it again"),
    ),
    "config.bin": (lambda tmp: b'{"image_proj": "weights"}', ("is not a PyTorch checkpoint", "JSON text")),
    "renamed.bin": (_safetensors_bytes, ("is not a PyTorch checkpoint", "rename it to .safetensors")),
    "one.bin": (lambda tmp: b"\x01", ("is not a PyTorch checkpoint", "it starts with '\\x01'")),
    "zip.safetensors": (_torch_zip_bytes, ("is not a .safetensors file", "rename it to .bin")),
    "lfs.safetensors": (
        lambda tmp: b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 44642768\n",
        ("is not a .safetensors file", "Git LFS pointer"),
    ),
    "cut-zip.bin": (lambda tmp: _TORCH_ZIP + b"x" * 60, ("not a readable PyTorch checkpoint",)),
    "cut-legacy.bin": (
        lambda tmp: b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        ("not a readable PyTorch checkpoint",),
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CORPUS))
def test_checkpoint_corpus_is_refused_saying_what_the_file_is(tmp_path: Path, name: str, capsys) -> None:
    make, needles = CHECKPOINT_CORPUS[name]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path))
    assert "run code" not in text  # not a pickle that needs code: say what it is
    for needle in needles:
        assert needle in text, text
    fails(capsys, ["convert", str(path), str(tmp_path / "out.safetensors")], *needles)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_folder_named_like_a_checkpoint_is_a_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "adapter.bin").mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path / "adapter.bin")
    fails(capsys, ["convert", str(tmp_path / "adapter.bin"), str(tmp_path / "a.safetensors")], "is a folder")


# ---------------------------------------------------------------------------------------------------------
# Images: orientation, float images, folders
# ---------------------------------------------------------------------------------------------------------


def _sideways(path: Path, orientation: int) -> Image.Image:
    """A 64x32 picture as a phone stores it (pixels unrotated) with EXIF orientation ``orientation``;
    a blue corner marks the stored top left."""
    img = Image.new("RGB", (64, 32), (200, 30, 30))
    img.paste((20, 20, 220), (0, 0, 12, 12))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return img


@pytest.mark.parametrize("name,orientation", [("phone.jpg", 6), ("phone.png", 8), ("phone.jpg", 8)])
def test_exif_orientation_is_applied_like_diffusers(tmp_path: Path, name: str, orientation: int) -> None:
    from diffusers.utils import load_image as diffusers_load_image

    path = tmp_path / name
    _sideways(path, orientation)
    theirs = diffusers_load_image(str(path))
    assert theirs.size == (32, 64)
    for source in (path, path.read_bytes(), Image.open(path)):  # a file, encoded bytes, an opened PIL image
        ours = load_image(source)
        assert ours.size == (32, 64)
        assert np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
    corner = (31, 0) if orientation == 6 else (0, 63)  # where the stored top left ends up
    assert np.asarray(load_image(path))[corner[1], corner[0]].tolist()[2] > 150


def test_a_sideways_mask_and_init_image_come_out_upright(tmp_path: Path) -> None:
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 32, 32))  # the stored left half: after orientation 6, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    mask.save(tmp_path / "mask.png", exif=exif.tobytes())
    grey, note = load_mask(tmp_path / "mask.png", size=(32, 64))
    assert note is None and grey.size == (32, 64)
    arr = np.asarray(grey)
    assert arr[:32].min() == 255 and arr[32:].max() == 0
    _sideways(tmp_path / "init.jpg", 6)
    reference_image().save(tmp_path / "ref.png")
    locate, resolve_file = local_files()
    job = job_from_options(
        {"base": "b", "adapter": "a.safetensors", "image": str(tmp_path / "ref.png"), "mode": "img2img",
         "init": str(tmp_path / "init.jpg")},
        locate=locate, resolve_file=resolve_file,
    )  # fmt: skip
    assert job.init.size == (32, 64)


def test_float_images_in_0_to_1_are_not_black(tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(ramp).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    out = np.asarray(load_image(tmp_path / "float.tif"))
    assert out.shape == (4, 4, 3) and out[..., 0].tolist() == (ramp * 255).round().astype(int).tolist()
    wide = np.full((2, 2), 100.0, dtype=np.float32)  # a float image in 0..255 stays as it was read
    assert load_image(Image.fromarray(wide)).getpixel((0, 0)) == (100, 100, 100)
    nan = np.array([[np.nan, 0.5]], dtype=np.float32)
    assert np.asarray(load_image(Image.fromarray(nan)))[0, :, 0].tolist() == [0, 128]


# name -> (how to make it, needle of the one-line refusal)
IMAGE_CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "folder.png": (lambda p: p.mkdir(), "is a folder; expected an image file"),
    "empty.png": (lambda p: p.write_bytes(b""), "the file is empty (0 bytes)"),
    "text.png": (lambda p: p.write_text("not an image"), "not a readable image"),
    "lfs.jpg": (
        lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\n"),
        "not a readable image",
    ),
}


@pytest.mark.parametrize("name", list(IMAGE_CORPUS))
def test_image_corpus_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    make, needle = IMAGE_CORPUS[name]
    make(tmp_path / name)
    for read in (load_image, lambda p: load_mask(p)):
        with pytest.raises(InputError) as err:
            read(tmp_path / name)
        assert needle in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Recipes: a byte order mark, absurd nesting
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bom.json", "bom.toml"])
def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path: Path, name: str) -> None:
    reference_image().save(tmp_path / "ref.png")
    if name.endswith(".json"):
        text = json.dumps({"adapter": [{"path": "a.safetensors", "image": "ref.png", "scale": 0.5}]})
    else:
        text = '[[adapter]]\npath = "a.safetensors"\nimage = "ref.png"\nscale = 0.5\n'
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    recipe = Recipe.load(tmp_path / name)
    assert recipe.adapters[0].scale == 0.5 and recipe.adapters[0].path.endswith("a.safetensors")


DEEP = 100_000
RECIPE_CORPUS: dict[str, str] = {
    "deep.json": "[" * DEEP + "]" * DEEP,
    "deep-object.json": '{"a":' * DEEP + "1" + "}" * DEEP,
    "deep-in-adapter.json": '{"adapter": [{"path": "a", "image": ' + "[" * DEEP + "]" * DEEP + "}]}",
    "deep.toml": "adapter = " + "[" * DEEP + "]" * DEEP + "\n",
    "deep-table.toml": "a = " + "{b = " * DEEP + "1" + "}" * DEEP + "\n",
}


@pytest.mark.parametrize("name", list(RECIPE_CORPUS))
def test_absurdly_nested_recipes_are_refused_in_one_line(tmp_path: Path, name: str, capsys) -> None:
    (tmp_path / name).write_text(RECIPE_CORPUS[name])
    with pytest.raises(InputError) as err:
        Recipe.load(tmp_path / name)
    assert "nests lists or tables too deeply" in str(err.value) and "\n" not in str(err.value)
    argv = ["generate", "--base", "b", "--recipe", str(tmp_path / name), "--output", str(tmp_path / "o.png")]
    fails(capsys, argv, "nests lists or tables too deeply")


# ---------------------------------------------------------------------------------------------------------
# Writes: whole or not at all, normal permissions
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[int]:
    old = os.umask(0o022)
    try:
        yield 0o644
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _tiny_checkpoint() -> checkpoint_module.Checkpoint:
    return checkpoint_module.Checkpoint(
        {"proj.weight": torch.ones(8, 4)},
        {"1.to_k_ip.weight": torch.ones(4, 2), "1.to_v_ip.weight": torch.ones(4, 2)},
    )


def _only(folder: Path, *names: str) -> None:
    """``folder`` holds exactly ``names``: no temporary file was left."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_saved_checkpoints_get_normal_permissions(tmp_path: Path, umask_022: int, suffix: str) -> None:
    path = save_checkpoint(_tiny_checkpoint(), tmp_path / f"a{suffix}")
    assert _mode(path) == umask_022  # safetensors alone writes 0600
    os.umask(0o077)
    save_checkpoint(_tiny_checkpoint(), tmp_path / f"b{suffix}")
    assert _mode(tmp_path / f"b{suffix}") == 0o600
    _only(tmp_path, f"a{suffix}", f"b{suffix}")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_failed_checkpoint_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    old = save_checkpoint(_tiny_checkpoint(), tmp_path / f"a{suffix}").read_bytes()

    def dies_halfway(obj: Any, filename: Any, *args: Any, **kwargs: Any) -> None:
        Path(filename).write_bytes(old[: len(old) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", dies_halfway)
    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_tiny_checkpoint(), tmp_path / f"a{suffix}")
    assert (tmp_path / f"a{suffix}").read_bytes() == old
    _only(tmp_path, f"a{suffix}")


KILL_CONVERT = """
import os, signal, sys
from pathlib import Path
import ipadapter.adapters.checkpoint as c

def killed_halfway(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

c.save_file = killed_halfway
from ipadapter.cli import main
main(["convert", sys.argv[1], sys.argv[2], "--force"])
"""


def test_convert_force_killed_mid_write_keeps_the_old_file(tmp_path: Path, models: dict) -> None:
    dst = tmp_path / "adapter.safetensors"
    dst.write_bytes(b"the old adapter")
    src = str(models["ckpt"]["sd15", "bin"])
    done = subprocess.run(
        [sys.executable, "-c", KILL_CONVERT, src, str(dst)], capture_output=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert dst.read_bytes() == b"the old adapter"
    leftovers = [p.name for p in tmp_path.iterdir() if p != dst]
    assert all(temp_target(name) == dst.name for name in leftovers)  # only a temporary name, never the final


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_convert_onto_a_folder_is_refused_before_reading(tmp_path: Path, capsys, force: list[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out.bin").mkdir()
    missing = str(tmp_path / "never-read.bin")  # reading it would say "no such file"
    for target in (str(tmp_path / "out"), str(tmp_path / "out") + "/", str(tmp_path / "out.bin")):
        err = fails(capsys, ["convert", missing, target, *force], "is a folder", ".safetensors or .bin")
        assert "no such file" not in err
    err = fails(capsys, ["convert", missing, str(tmp_path / "new") + "/", *force], "ends in a path separator")
    fails(capsys, ["convert", missing, str(tmp_path / "x.txt"), *force], "must end in .safetensors or .bin")
    fails(capsys, ["convert", missing, str(tmp_path / "nope" / "x.bin"), *force], "does not exist")


class _FakeEncoder:
    image_size = 32

    def probe(self) -> torch.Tensor:
        return torch.arange(64, dtype=torch.float32)


def _save_embeds(path: Path) -> Path:
    return embeds_module.save_embeds(
        path, torch.ones(4), torch.zeros(4), feature="pooled", encoder=_FakeEncoder(), encoder_name="e",
        crop="center", variant="sd15", image_sha1="0" * 40,
    )  # fmt: skip


def test_embeds_are_written_whole_with_normal_permissions(
    tmp_path: Path, umask_022: int, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = _save_embeds(tmp_path / "e.safetensors")
    assert _mode(path) == umask_022 and embeds_module.load_embeds(path).features.tolist() == [1.0] * 4
    old = path.read_bytes()

    def dies_halfway(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(old[:10])
        raise OSError("No space left on device")

    monkeypatch.setattr(embeds_module, "save_file", dies_halfway)
    with pytest.raises(OSError):
        _save_embeds(path)
    assert path.read_bytes() == old
    _only(tmp_path, "e.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        _save_embeds(tmp_path / "dir.safetensors")
    argv = ["embed", "--adapter", "a", "--image", "i.png", "--output", str(tmp_path / "dir.safetensors")]
    fails(capsys, [*argv, "--force"], "is a folder")


def test_results_are_written_whole_with_normal_permissions(
    tmp_path: Path, umask_022: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [reference_image(i, size=(16, 16)) for i in range(2)]
    written = media.save_images(images, tmp_path / "r.png", {"seed": 1})
    assert [p.name for p in written] == ["r-1.png", "r-2.png"] and all(_mode(p) == umask_022 for p in written)
    assert json.loads(Image.open(written[1]).text["parameters"]) == {"seed": 1, "index": 1}
    for name in ("v.gif", "v.mp4"):
        path = media.save_video(
            [np.full((16, 16, 3), v, np.uint8) for v in (0, 120, 240)], tmp_path / name, 4, {}
        )
        assert _mode(path) == umask_022 and len(media.read_video(path)) == 3
    old = written[0].read_bytes()

    def dies_halfway(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    with pytest.raises(OSError):
        media.save_images(images, tmp_path / "r.png", {})
    assert written[0].read_bytes() == old
    _only(tmp_path, "r-1.png", "r-2.png", "v.gif", "v.mp4")


def test_atomic_path_cleans_up_and_passes_its_own_temporary_names_through(
    tmp_path: Path, umask_022: int
) -> None:
    final = tmp_path / "f.txt"
    with pytest.raises(RuntimeError), atomic_path(final) as temp:
        assert temp == temp_path(final) and temp.parent == tmp_path and temp.suffix == ".txt"
        temp.write_text("half")
        raise RuntimeError("writer failed")
    _only(tmp_path)
    with atomic_path(final) as temp, atomic_path(temp) as inner:
        assert inner == temp  # a caller that renames itself (batch) gets its name back
        inner.write_text("whole")
    assert final.read_text() == "whole" and _mode(final) == umask_022
    _only(tmp_path, "f.txt")
    assert temp_target(temp_path(final, pid=12).name) == "f.txt"
    assert temp_target(".notes.partial-1.txt") is None and temp_target("f.txt") is None


def test_demo_and_eval_reports_are_written_whole(tmp_path: Path, umask_022: int, monkeypatch, capsys) -> None:
    import ipadapter.cli.mini as cli_mini
    import ipadapter.mini.demo as demo
    import ipadapter.mini.evaluate as evaluate
    import ipadapter.mini.shipped as shipped
    from ipadapter.cli import main

    ref = reference_image(size=(16, 16))
    monkeypatch.setattr(cli_mini, "_attached", lambda args: (None, 16))
    monkeypatch.setattr(demo, "run_demo", lambda ip, **kw: [demo.DemoRow(ref, "c", "t", [ref] * 3)])
    assert main(["demo", "--output", str(tmp_path / "demo.png")]) == 0
    assert _mode(tmp_path / "demo.png") == umask_022 and Image.open(tmp_path / "demo.png").size[0] > 16
    monkeypatch.setattr(shipped, "eval_folders", lambda *a: ("scorer", str(tmp_path)))
    monkeypatch.setattr(evaluate, "Scorer", lambda s: None)
    monkeypatch.setattr(evaluate, "references", lambda folder, count: [])
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: {"clip_i": 1.0})
    monkeypatch.setattr(evaluate, "markdown", lambda results: "| clip_i |")
    for name in ("eval.md", "eval.json"):
        assert main(["eval", "--base", "b", "--adapter", "a", "--output", str(tmp_path / name)]) == 0
        assert _mode(tmp_path / name) == umask_022
    assert (tmp_path / "eval.md").read_text() == "| clip_i |\n"
    assert json.loads((tmp_path / "eval.json").read_text()) == {"clip_i": 1.0}
    _only(tmp_path, "demo.png", "eval.md", "eval.json")
    capsys.readouterr()
    fails(
        capsys,
        ["eval", "--base", "b", "--adapter", "a", "--output", str(tmp_path / "no" / "e.md")],
        "does not exist",
    )


# ---------------------------------------------------------------------------------------------------------
# batch removes only its own leftovers
# ---------------------------------------------------------------------------------------------------------


def test_batch_removes_only_its_own_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference_image().save(tmp_path / "ref.png")
    job = {"base": "b", "adapter": "a.safetensors", "image": "ref.png"}
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        json.dumps({**job, "output": "cat.png"}) + "\n" + json.dumps({**job, "output": "sub/dog.png"})
    )
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "photos").mkdir()
    for done in ("cat.png", "sub/dog.png"):  # both jobs are done: nothing runs, no model loads
        reference_image().save(out / done)
    ours = [out / ".ipadapter-partial-99.cat.png", out / "sub" / ".ipadapter-partial-7.dog.png"]
    theirs = [
        out / ".notes.partial-1.txt",  # the user's own file with a name like the old temporary names
        out / ".cat.partial-99.png",
        out / ".ipadapter-partial-99.other.png",  # a name no line of this manifest plans
        out / "photos" / ".holiday.partial-2.jpg",  # an unrelated subfolder
        out / "photos" / ".ipadapter-partial-3.cat.png",
    ]
    for path in ours + theirs:
        path.write_bytes(b"leftover")

    def no_models(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("every job is done: none may run")

    from ipadapter.jobs.engine import Engine

    monkeypatch.setattr(Engine, "run", no_models)
    report = run_batch(manifest, out, quiet=True)
    assert report["counts"] == {"done": 0, "skipped": 2, "failed": 0}
    assert [p for p in theirs if not p.exists()] == []  # the user's files all stay
    assert [p for p in ours if p.exists()] == []
    from ipadapter.batch import _output_name

    with pytest.raises(InputError, match="looks like a temporary file of this command"):
        _output_name(".ipadapter-partial-1.cat.png", 1, False, out)
    assert _output_name(".notes.partial-1.png", 1, False, out).name == ".notes.partial-1.png"
