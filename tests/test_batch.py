"""`ipadapter batch`: a JSON-lines manifest run with models loaded once; resumable; failures per line; accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import free_port, png_pixels, reference_image
from PIL import Image

import ipadapter.adapter as adapter_module
from ipadapter import media, pipelines
from ipadapter.batch import run_batch
from ipadapter.cli import main
from ipadapter.jobs.engine import Engine


def _common(models: dict) -> dict[str, Any]:
    return {"base": str(models["sd15"]), "steps": 2, "width": 32, "height": 32}


def _manifest(path: Path, lines: list[Any]) -> Path:
    """Write a manifest: dicts become JSON lines, strings are written as they are."""
    path.write_text("\n".join(v if isinstance(v, str) else json.dumps(v) for v in lines) + "\n")
    return path


def _params(path: Path) -> dict[str, Any]:
    return json.loads(Image.open(path).text["parameters"])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest folder with its images, as a user would lay it out (names relative to the manifest)."""
    root = tmp_path_factory.mktemp("work")
    reference_image(0).save(root / "ref.png")
    (root / "refs").mkdir()
    reference_image(1, size=(40, 40)).save(root / "refs" / "b.png")
    reference_image(2, size=(32, 32)).save(root / "init.png")
    return root


@pytest.fixture(scope="module")
def mixed(models: dict, work: Path) -> tuple[Path, dict[str, Any]]:
    """Four jobs (t2i, img2img, a recipe, t2i with two images) with a comment and a blank line, run once."""
    adapter = str(models["ckpt"]["sd15", "safetensors"])
    recipe = {"adapter": [{"path": adapter, "scale": 0.5, "image": ["ref.png", {"path": "refs/b.png", "weight": 0.5}]}]}  # fmt: skip
    manifest = _manifest(work / "jobs.jsonl", [
        "# t2i, img2img, a recipe, two images",
        {**_common(models), "adapter": adapter, "image": "ref.png", "prompt": "a cat", "negative_prompt": "blurry",
         "scale": 0.7, "seed": 0},
        "",
        {**_common(models), "mode": "img2img", "adapter": adapter, "image": "refs/b.png", "init": "init.png",
         "strength": 0.6, "seed": 1, "output": "i2i/river.png"},
        {**_common(models), "recipe": recipe, "prompt": "a dog", "seed": 2, "output": "recipe.png"},
        {**_common(models), "adapter": adapter, "image": ["ref.png:0.3", "refs/b.png"], "num_images": 2, "seed": 3,
         "output": "two.png"},
    ])  # fmt: skip
    out = work / "out"
    loads = {"base": 0, "attach": 0}

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            loads[name] += 1
            return real(*args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipelines, "load_pipeline", counted("base", pipelines.load_pipeline))
        mp.setattr(adapter_module, "attach", counted("attach", adapter_module.attach))
        report = run_batch(manifest, out, quiet=True)
    return out, {**report, "loads": loads}


def test_mixed_manifest_writes_every_result_with_its_settings(mixed: tuple[Path, dict], work: Path) -> None:
    out, report = mixed
    names = ["00002.png", "i2i/river.png", "recipe.png", "two-1.png", "two-2.png"]
    assert report["jobs"] == 4 and report["skipped"] == [] and report["failed"] == []
    assert report["done"] == [str(out / n) for n in names]
    assert report["counts"] == {"done": 4, "skipped": 0, "failed": 0}
    assert report["loads"] == {"base": 1, "attach": 1}  # one base, one adapter on its UNet, for every job
    assert not (out / "failures.jsonl").exists()
    for name in names:
        assert Image.open(out / name).size == (32, 32)
    t2i, i2i, rec = (_params(out / n) for n in names[:3])
    assert (t2i["line"], t2i["manifest"], t2i["image"], t2i["seed"]) == (2, "jobs.jsonl", "ref.png", 0)
    assert (i2i["line"], i2i["mode"], i2i["init"], i2i["strength"], i2i["image"]) == (4, "img2img", "init.png", 0.6, "refs/b.png")  # fmt: skip
    assert rec["line"] == 5 and rec["prompt"] == "a dog" and rec["scale"] == 0.5
    assert rec["recipe"]["adapter"][0]["image"] == ["ref.png", {"path": "refs/b.png", "weight": 0.5}]
    assert _params(out / "two-2.png")["image"] == ["ref.png:0.3", "refs/b.png"]
    assert not np.array_equal(png_pixels(out / "two-1.png"), png_pixels(out / "two-2.png"))
    assert not list(out.rglob(".*"))  # no temporary files left


def test_batch_job_gives_the_pixels_of_generate(mixed: tuple[Path, dict], models: dict, work: Path,
                                                 tmp_path: Path) -> None:  # fmt: skip
    out, _ = mixed
    single = tmp_path / "cat.png"
    argv = ["generate", "--base", str(models["sd15"]), "--adapter", str(models["ckpt"]["sd15", "safetensors"]),
            "--image", str(work / "ref.png"), "--prompt", "a cat", "--negative-prompt", "blurry", "--scale", "0.7",
            "--steps", "2", "--seed", "0", "--width", "32", "--height", "32", "--output", str(single)]  # fmt: skip
    assert main(argv) == 0
    assert np.array_equal(png_pixels(out / "00002.png"), png_pixels(single))
    ours, theirs = _params(out / "00002.png"), _params(single)
    same = (
        "seed",
        "scale",
        "prompt",
        "negative_prompt",
        "steps",
        "width",
        "variant",
        "image_sha1",
        "scheduler",
    )
    for key in same:
        assert ours[key] == theirs[key], key


def test_resume_redoes_only_what_is_missing(mixed: tuple[Path, dict], work: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # fmt: skip
    first, report = mixed
    out = tmp_path / "out"
    shutil.copytree(first, out)
    (out / "i2i" / "river.png").unlink()
    (out / ".ipadapter-partial-99.recipe.png").write_bytes(b"half a file")  # left by a killed run
    again = run_batch(work / "jobs.jsonl", out)
    assert again["done"] == [str(out / "i2i" / "river.png")]
    assert sorted(again["skipped"]) == sorted(
        str(out / n) for n in ("00002.png", "recipe.png", "two-1.png", "two-2.png")
    )
    assert np.array_equal(png_pixels(out / "i2i" / "river.png"), png_pixels(first / "i2i" / "river.png"))
    assert not (out / ".ipadapter-partial-99.recipe.png").exists()
    printed = capsys.readouterr().out.splitlines()
    assert f"line 2: skipped, {out / '00002.png'} exists" in printed
    assert any(line.startswith(f"line 4: wrote {out / 'i2i' / 'river.png'}") for line in printed)
    assert printed[-1].startswith("batch: 4 jobs: 1 done, 3 skipped, 0 failed in ")

    def no_models(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing is left to do: no job may run")

    monkeypatch.setattr(Engine, "run", no_models)
    assert run_batch(work / "jobs.jsonl", out, quiet=True)["counts"] == {"done": 0, "skipped": 4, "failed": 0}


def test_bad_lines_are_reported_and_the_others_run(models: dict, work: Path, tmp_path: Path, capsys) -> None:
    adapter = str(models["ckpt"]["sd15", "safetensors"])
    good = {**_common(models), "adapter": adapter, "image": "ref.png", "seed": 0}
    manifest = _manifest(work / "bad.jsonl", [
        '{"base": "x", "adapter": ',  # 1: cut short
        {**good, "promt": "a cat"},  # 2: a typo
        {**good, "image": "nope.png"},  # 3: a missing image
        {**good, "output": "good.png"},  # 4
        "[1, 2]",  # 5: not an object
        {**good, "output": "good.png"},  # 6: the same output as line 4
        {**good, "adapter": str(models["ckpt"]["sdxl", "safetensors"])},  # 7: an adapter for another base
        {**good, "output": "x.jpg"},  # 8
        {**good, "steps": 0},  # 9
    ])  # fmt: skip
    out = tmp_path / "out"
    main(["batch", str(manifest), "--output", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["done"] == [str(out / "good.png")] and report["jobs"] == 9
    errors = {f["line"]: f["error"] for f in report["failed"]}
    assert sorted(errors) == [1, 2, 3, 5, 6, 7, 8, 9]
    expected = {1: "not valid JSON", 2: "unknown key(s) promt (did you mean prompt?)", 3: "nope.png': no such file", 5: "expected an object",
                6: "also written by line 4", 7: "64-dim tokens", 8: "must end in .png", 9: "'steps' is 0"}  # fmt: skip
    for line, needle in expected.items():
        assert needle in errors[line], (line, errors[line])
        assert "\n" not in errors[line]
    written = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert written == report["failed"]
    assert _params(out / "good.png")["line"] == 4


def test_outputs_outside_the_folder_are_refused(models: dict, work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere")
    job = {**_common(models), "adapter": str(models["ckpt"]["sd15", "safetensors"]), "image": "ref.png"}
    names = ["../x.png", str(tmp_path / "x.png"), "a/../../x.png", "link/x.png"]
    manifest = _manifest(work / "escape.jsonl", [{**job, "output": name} for name in names])
    report = run_batch(manifest, out, quiet=True)
    assert [f["line"] for f in report["failed"]] == [1, 2, 3, 4] and report["done"] == []
    assert all("is outside the output folder" in f["error"] for f in report["failed"])
    assert not list(tmp_path.rglob("x.png"))


def test_a_failed_write_leaves_no_file_that_counts_as_done(models: dict, work: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    job = {
        **_common(models),
        "adapter": str(models["ckpt"]["sd15", "safetensors"]),
        "image": "ref.png",
        "seed": 0,
    }
    manifest = _manifest(work / "one.jsonl", [job])
    out = tmp_path / "out"
    save = media.save_images

    def dies_halfway(images: Any, output: Path, params: dict) -> list[Path]:
        output.write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")

    monkeypatch.setattr(media, "save_images", dies_halfway)
    report = run_batch(manifest, out, quiet=True)
    assert report["failed"] == [{"line": 1, "error": "OSError: No space left on device"}]
    assert list(out.iterdir()) == [out / "failures.jsonl"]
    monkeypatch.setattr(media, "save_images", save)
    report = run_batch(manifest, out, quiet=True)
    assert report["done"] == [str(out / "00001.png")] and not (out / "failures.jsonl").exists()


@pytest.mark.heavy  # launches processes
@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch tested on Linux")
def test_two_processes_share_the_jobs(models: dict, work: Path, tmp_path: Path) -> None:
    """accelerate 1.15 starts several CPU processes only with its torch-elastic launcher (`--multi_gpu`): its
    `--cpu --num_processes 2` runs ONE process unless MPI is set up. No CUDA here: each process is on the CPU."""
    job = {**_common(models), "adapter": str(models["ckpt"]["sd15", "safetensors"]), "image": "ref.png"}
    manifest = _manifest(work / "shared.jsonl", [{**job, "seed": seed} for seed in range(4)])
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "ipadapter", "batch", str(manifest), "--output", str(out), "--json"]  # fmt: skip
    done = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{") :])  # one report, from the main process
    names = [f"{line:05d}.png" for line in range(1, 5)]
    assert report["done"] == [str(out / n) for n in names] and report["failed"] == []
    assert sorted(p.name for p in out.iterdir()) == names
    assert [(p["process"], p["done"], p["device"]) for p in report["processes"]] == [
        (0, 2, "cpu"),
        (1, 2, "cpu"),
    ]
    assert [_params(out / n)["seed"] for n in names] == [0, 1, 2, 3]


def test_video_line_writes_a_gif_with_its_settings(models: dict, work: Path, tmp_path: Path) -> None:
    job = {**_common(models), "mode": "video", "adapter": str(models["ckpt"]["sd15", "safetensors"]),
           "motion_adapter": str(models["motion"]), "image": "ref.png", "frames": 2, "fps": 4, "seed": 0}  # fmt: skip
    manifest = _manifest(work / "video.jsonl", [job, {**job, "output": "clip.png"}])
    report = run_batch(manifest, tmp_path, quiet=True)
    assert report["done"] == [str(tmp_path / "00001.gif")]
    assert report["failed"] == [
        {"line": 2, "error": "'output' 'clip.png' must end in .gif or .mp4 (a video)"}
    ]
    assert len(media.read_video(tmp_path / "00001.gif")) == 2
    with Image.open(tmp_path / "00001.gif") as gif:
        params = json.loads(gif.info["comment"])
    assert (params["line"], params["fps"], params["frames"], params["image"]) == (1, 4.0, 2, "ref.png")
