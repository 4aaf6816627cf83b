"""The shipped miniature family: loads offline by name, generates, and its image prompt carries the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter import attach
from ipadapter.mini.build import STAGES, BuildConfig
from ipadapter.mini.demo import DEMO_SCENES, scene
from ipadapter.mini.shapes import BACKGROUNDS, classify
from ipadapter.mini.shipped import MODEL_DIR
from ipadapter.pipelines import load_pipeline, native_size

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def mini_pipe():
    pipe = load_pipeline("mini")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_family_is_complete_small_and_recorded() -> None:
    record = json.loads((MODEL_DIR / "build_record.json").read_text())
    # every stage ran (the vision stage, added later, after the UNet: they are independent), with the settings
    # the build's defaults give
    assert sorted(record["stages"]) == sorted(STAGES)
    config = BuildConfig(out="x")
    settings = {k: v for k, v in vars(config).items() if k not in ("out", "log")}
    assert {k: record["config"][k] for k in settings} == json.loads(json.dumps(settings))  # tuples as lists
    assert record["stages"]["vision"]["steps"] == config.vision_steps > 0
    assert sum(s["seconds"] for s in record["stages"].values()) <= 90 * 60  # the rebuild budget
    assert record["stages"]["unet"]["loss"][-1] < record["stages"]["unet"]["loss"][0]
    weights = list(MODEL_DIR.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) <= 30 * 2**20
    assert not list(MODEL_DIR.rglob("*.bin")) and not list(MODEL_DIR.rglob("*.pt"))


def test_the_shipped_image_encoder_reads_shape_on_held_out_pairings(tmp_path: Path) -> None:
    """Zero-shot against every caption, the encoder names the shape of most held-out references (chance 1/6)."""
    from transformers import CLIPVisionModelWithProjection

    from ipadapter.mini.shapes import write_dataset
    from ipadapter.mini.vision import caption_grid, text_table, zero_shot

    folder = write_dataset(tmp_path / "eval", 60, seed=7, size=32, split="eval")
    grid = caption_grid()
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        MODEL_DIR / "models" / "image_encoder", dtype=torch.float32
    )
    assert encoder.config.patch_size == 8  # the vision stage's tower, not the joint one
    scores = zero_shot(encoder, text_table(MODEL_DIR / "clip", grid), grid, folder)
    assert scores["shape"] >= 0.8 and scores["color"] >= 0.9 and scores["background"] >= 0.9, scores


@pytest.mark.parametrize("adapter", ["mini", "mini-plus"])
def test_image_prompt_alone_carries_the_reference(mini_pipe, adapter: str) -> None:
    """With an empty text, the generated object has the reference's colour (held-out pairings included)."""
    size = native_size(mini_pipe)
    refs = [scene(s, c, b, t, size) for s, c, b, t, _ in DEMO_SCENES]
    ip = attach(mini_pipe, adapter, scale=0.6)  # the image encoder is found beside the adapter
    try:
        seeds = (0, 1)
        hits = 0
        for seed in seeds:
            gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(len(refs))]
            images = ip(refs, prompt=[""] * len(refs), num_inference_steps=20, generator=gens).images
            hits += sum(classify(im)["color"] == s[1] for im, s in zip(images, DEMO_SCENES, strict=True))
        assert hits >= 0.75 * len(refs) * len(seeds)
        assert images[0].size == (size, size)
    finally:
        ip.detach()


def test_without_adapter_the_caption_not_the_seed_picks_the_background(mini_pipe) -> None:
    """Each seed draws every background the captions ask for (a base that reads its colour from the starting
    noise draws one background per seed, whatever the caption says)."""
    prompts = [f"a red circle on a {b} background" for b in BACKGROUNDS]
    hits = 0
    for seed in (0, 1):
        gens = [torch.Generator().manual_seed(seed) for _ in prompts]
        images = mini_pipe(prompts, num_inference_steps=20, generator=gens).images
        hits += sum(classify(im)["background"] == b for im, b in zip(images, BACKGROUNDS, strict=True))
    assert hits >= 0.8 * 2 * len(BACKGROUNDS), hits


def test_demo_writes_its_contact_sheet_into_the_current_folder(tmp_path: Path) -> None:
    """The README's first command, as a user runs it: offline, no options, the sheet lands in the cwd."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "ipadapter", "demo", "--steps", "10"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote demo.png" in done.stdout
    sheet = Image.open(tmp_path / "demo.png")
    assert sheet.width > 4 * 128 and sheet.height > len(DEMO_SCENES) * 128
    # the four columns hold four different pictures (not one image repeated)
    cells = [np.asarray(sheet.crop((6 + j * 134, 18, 6 + j * 134 + 128, 18 + 128))) for j in range(4)]
    assert all(np.abs(cells[j].astype(int) - cells[0]).mean() > 1 for j in range(1, 4))
    done = subprocess.run([sys.executable, "-m", "ipadapter", "demo", "--output", "sheet.jpg"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "must be a .png" in done.stderr


def test_eval_on_a_small_sample_reports_numbers_in_range(tmp_path: Path, capsys) -> None:
    from ipadapter.cli import main

    report = tmp_path / "report.json"
    argv = ["eval", "--base", "mini", "--adapter", "mini", "--scale", "0.8", "--count", "12", "--steps", "15",
            "--output", str(report), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "| image+text |" in capsys.readouterr().out
    results = json.loads(report.read_text())
    for r in results.values():
        assert r["n"] == 12 and -1 <= r["clip_i"] <= 1 and -1 <= r["clip_t"] <= 1
        assert all(0 <= r[k] <= 1 for k in ("color", "shape", "background"))
    # the picture alone brings the object's colour; a text naming another background still sets it
    assert results["image"]["color"] >= 0.7
    assert results["image+text"]["background"] >= 0.5


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_other_modes_take_the_mini_names(tmp_path: Path, mode: str) -> None:
    from ipadapter.cli import main

    init = EXAMPLES / "green-square.png"
    extra = ["--init", str(init), "--strength", "0.8"]
    if mode == "inpaint":
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        mask.save(tmp_path / "mask.png")
        extra += ["--mask", str(tmp_path / "mask.png")]
    out = tmp_path / "out.png"
    argv = [mode, "--base", "mini", "--adapter", "mini", "--image", str(EXAMPLES / "red-circle.png"),
            "--steps", "10", "--output", str(out), "--device", "cpu", *extra]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(out).size == (64, 64)
