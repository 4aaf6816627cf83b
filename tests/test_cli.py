"""The `ipadapter` command: end to end on tiny models, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import diffusers_pipe, fails, load_pipe, png_pixels, reference_image, run
from PIL import Image

import ipadapter.prompt.images as enc
from ipadapter.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _generate(models: dict, ref: Path, out: Path, *extra: str, adapter: str | None = None) -> list[str]:
    return [
        "generate", "--base", str(models["sd15"]), "--adapter", adapter or str(models["ckpt"]["sd15", "safetensors"]),
        "--image", str(ref), "--prompt", "a cat", "--negative-prompt", "blurry", "--scale", "0.7", "--steps", "2",
        "--seed", "0", "--width", "32", "--height", "32", "--output", str(out), *extra,
    ]  # fmt: skip


def test_without_an_adapter_or_reference_generate_and_batch_run_the_plain_base_model(
    models: dict, ref_png: Path, tmp_path: Path, capsys
) -> None:
    """One flag away: drop --adapter and --image to compare with the base model alone."""
    plain = ["generate", "--base", str(models["sd15"]), "--prompt", "a cat", "--negative-prompt", "blurry",
             "--steps", "2", "--seed", "0", "--width", "32", "--height", "32"]  # fmt: skip
    assert main([*plain, "--output", str(tmp_path / "plain.png")]) == 0
    want = run(load_pipe(models, "sd15"), output_type="pil")[0]  # diffusers alone, same settings
    assert np.array_equal(png_pixels(tmp_path / "plain.png"), np.asarray(want))
    params = json.loads(Image.open(tmp_path / "plain.png").text["parameters"])
    assert params["adapter"] is None and params["scale"] is None and "image" not in params
    assert main(_generate(models, ref_png, tmp_path / "ip.png")) == 0  # the image prompt does change it
    assert np.abs(png_pixels(tmp_path / "ip.png") - png_pixels(tmp_path / "plain.png")).max() > 2
    line = {"base": str(models["sd15"]), "prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "seed": 0,
            "width": 32, "height": 32}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["batch", str(tmp_path / "jobs.jsonl"), "--output", str(tmp_path / "out"), "--json"]) == 0
    assert np.array_equal(png_pixels(tmp_path / "out" / "00001.png"), png_pixels(tmp_path / "plain.png"))
    capsys.readouterr()
    fails(
        capsys, [*plain, "--scale", "0.5", "--output", str(tmp_path / "x.png")], "no adapter"
    )  # half a prompt


def test_generate_matches_diffusers_and_records_parameters(
    models: dict, ref_png: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cat.png"
    assert main(_generate(models, ref_png, out)) == 0
    ours = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    want = run(
        diffusers_pipe(models, "sd15", scale=0.7), ip_adapter_image=Image.open(ref_png), output_type="pil"
    )[0]
    assert np.abs(ours - np.asarray(want, dtype=np.int16)).max() <= 2
    params = json.loads(Image.open(out).text["parameters"])
    assert (
        params["seed"] == 0
        and params["scale"] == 0.7
        and params["prompt"] == "a cat"
        and params["steps"] == 2
    )
    assert params["adapter"].endswith("ip-adapter_sd15.safetensors") and params["width"] == 32


def test_several_images_and_json_report(models: dict, ref_png: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "many.png"
    assert main(_generate(models, ref_png, out, "--num-images", "2", "--scheduler", "euler", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"] == [str(tmp_path / "many-1.png"), str(tmp_path / "many-2.png")]
    a, b = (np.asarray(Image.open(p)) for p in report["outputs"])
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    assert report["parameters"]["scheduler"] == "euler"


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("--scale", "nan", "expected a finite number in [0, 5]"),
        ("--scale", "inf", "expected a finite number in [0, 5]"),
        ("--scale", "-1", "expected a finite number in [0, 5]"),
        ("--steps", "0", "expected a whole number >= 1"),
        ("--steps", "-3", "expected a whole number >= 1"),
        ("--width", "30", "a multiple of 8 (try 24)"),
        ("--height", "abc", "not a whole number"),
        ("--num-images", "0", "expected a whole number >= 1"),
        ("--seed", "-1", "expected a whole number in [0, 18446744073709551615]"),
        ("--dtype", "float8", "invalid choice"),
    ],
)
def test_bad_options(
    models: dict, ref_png: Path, tmp_path: Path, capsys, option: str, value: str, needle: str
) -> None:
    argv = _generate(models, ref_png, tmp_path / "x.png")
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    fails(capsys, argv, option, needle)
    assert not (tmp_path / "x.png").exists()


def test_bad_reference_images(models: dict, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    fails(capsys, _generate(models, tmp_path / "zero.png", tmp_path / "o.png"), "zero.png", "empty")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    fails(capsys, _generate(models, tmp_path / "junk.jpg", tmp_path / "o.png"), "junk.jpg")
    reference_image(size=(64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(enc, "MAX_IMAGE_PIXELS", 1000)
    fails(capsys, _generate(models, tmp_path / "big.png", tmp_path / "o.png"), "too large to decode safely")
    assert not (tmp_path / "o.png").exists()


def test_other_modes_are_converted(models: dict, tmp_path: Path) -> None:
    Image.new("RGBA", (40, 40), (10, 200, 30, 128)).save(tmp_path / "rgba.png")
    assert main(_generate(models, tmp_path / "rgba.png", tmp_path / "o.png")) == 0
    Image.new("I;16", (40, 40), 4000).save(tmp_path / "deep.png")
    assert main(_generate(models, tmp_path / "deep.png", tmp_path / "o2.png")) == 0


def test_bad_paths_and_models(models: dict, ref_png: Path, tmp_path: Path, capsys) -> None:
    fails(capsys, _generate(models, ref_png, tmp_path / "nope" / "o.png"), "output folder", "does not exist")
    fails(capsys, _generate(models, ref_png, tmp_path / "o.jpg"), "must end in .png")
    sdxl = str(models["ckpt"]["sdxl", "safetensors"])
    fails(capsys, _generate(models, ref_png, tmp_path / "o.png", adapter=sdxl), "64-dim tokens", "is 32")
    fails(
        capsys,
        _generate(models, ref_png, tmp_path / "o.png", "--image-encoder", str(models["big_g"])),
        "needs 24-dim pooled image_embeds",
        "gives 40-dim",
    )
    fails(
        capsys,
        _generate(models, ref_png, tmp_path / "o.png", adapter=str(tmp_path / "missing.bin")),
        "no such file",
    )
    argv = _generate(models, ref_png, tmp_path / "o.png")
    argv[argv.index("--base") + 1] = "someone/not-downloaded"
    fails(capsys, argv, "base model 'someone/not-downloaded' is not available", "HF_HUB_OFFLINE")
    fails(capsys, _generate(models, ref_png, tmp_path / "o.png", adapter="h94/IP-Adapter/models/x.bin"),
           "adapter 'h94/IP-Adapter/models/x.bin' is not available", "hf download h94/IP-Adapter models/x.bin")  # fmt: skip
    assert not (tmp_path / "o.png").exists()


def _fake_hub_cache(models: dict, root: Path) -> Path:
    """A Hugging Face cache holding the tiny models under the official names, as a download would leave it."""
    repos = {"stable-diffusion-v1-5/stable-diffusion-v1-5": {"": models["sd15"]},
             "h94/IP-Adapter": {"models/image_encoder": models["vit_h"],
                                "models/ip-adapter_sd15.safetensors": models["ckpt"]["sd15", "safetensors"]}}  # fmt: skip
    for repo, files in repos.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(COMMIT)
        for dest, src in files.items():
            target = folder / "snapshots" / COMMIT / dest
            if src.is_dir():
                shutil.copytree(src, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target)
    return root


def test_console_script_with_hub_names_from_the_cache(models: dict, ref_png: Path, tmp_path: Path) -> None:
    """The README's command shape (hub ids for base, adapter and the implied encoder), offline from the cache."""
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(_fake_hub_cache(models, tmp_path / "hub")),
        "HF_HUB_OFFLINE": "1",
    }
    exe = [sys.executable, "-m", "ipadapter.cli"]
    argv = ["generate", "--base", "stable-diffusion-v1-5/stable-diffusion-v1-5", "--adapter",
            "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", "--image", str(ref_png), "--prompt", "a polar bear",
            "--scale", "0.6", "--steps", "2", "--seed", "0", "--width", "32", "--height", "32",
            "--output", str(tmp_path / "bear.png")]  # fmt: skip
    done = subprocess.run(exe + argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "bear.png").size == (32, 32)
    (tmp_path / "empty.png").write_bytes(b"")
    argv[argv.index("--image") + 1] = str(tmp_path / "empty.png")
    done = subprocess.run(exe + argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"ipadapter: error: reference image '{tmp_path / 'empty.png'}': "
                                                "the file is empty (0 bytes); expected a PNG, JPEG or WebP image"]  # fmt: skip


def test_bad_input_is_reported_before_heavy_imports(tmp_path: Path) -> None:
    """A typo must not cost the seconds torch/diffusers take to import."""
    code = (
        "import sys\nfrom ipadapter.cli import main\n"
        f"code = main(['inpaint', '--base', 'b', '--adapter', 'a', '--image', {str(tmp_path / 'no.png')!r}, "
        "'--init', 'x.png', '--mask', 'm.png'])\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "no such file" in out.stderr
