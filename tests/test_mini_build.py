"""The miniature family's build, end to end at toy budgets: every stage runs, resumes, and loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ipadapter import attach
from ipadapter.mini.build import STAGES, BuildConfig, build


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mini")
    config = BuildConfig(out=str(out), train_images=32, eval_images=8, drawn_images=4, clip_steps=2, clip_batch=8,
                         vision_steps=2, vision_batch=8, vision_drawn=8, vision_unnamed=8, vae_steps=2, vae_batch=4,
                         unet_steps=2, unet_batch=4, unet_noise_offset=0.1, adapter_steps=2, adapter_batch=4,
                         adapter_plus_lr=3e-3, threads=1, log=lambda _: None)  # fmt: skip
    return build(config)


def test_every_stage_is_recorded_and_a_rerun_skips_them(toy_build: Path) -> None:
    record = json.loads((toy_build / "build_record.json").read_text())
    assert list(record["stages"]) == list(STAGES)
    assert record["stages"]["clip"]["loss"] and record["stages"]["vae"]["scaling_factor"] > 0
    zero_shot = record["stages"]["vision"]["zero_shot"]  # measured on both held-out sets
    assert set(zero_shot) == {"eval", "drawn"} and zero_shot["drawn"]["n"] == 4
    train = toy_build / "data" / "train"  # the adapters were trained with swapped-background references
    entries = [json.loads(line) for line in (train / "adapter_captions.jsonl").read_text().splitlines()]
    assert any("reference" in e for e in entries) and all(
        (train / e.get("reference", e["image"])).is_file() for e in entries
    )
    # the adapters were trained on the noise the UNet learned on, each at its own learning rate
    runs = {n: json.loads((toy_build / "runs" / n / "train_config.json").read_text())
            for n in ("ip-adapter_mini", "ip-adapter-plus_mini")}  # fmt: skip
    assert all(run["noise_offset"] == 0.1 for run in runs.values())
    assert runs["ip-adapter_mini"]["lr"] == 1e-3 and runs["ip-adapter-plus_mini"]["lr"] == 3e-3
    said: list[str] = []
    build(BuildConfig(out=str(toy_build), log=said.append))
    assert all("already done" in line for line in said) and len(said) == len(STAGES)


def test_the_built_pipeline_and_adapters_load_and_generate(toy_build: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(toy_build / "pipeline", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name in ("ip-adapter_mini", "ip-adapter-plus_mini"):
        # the encoder is found from the h94-style layout beside the adapter
        ip = attach(pipe, toy_build / "models" / f"{name}.safetensors", scale=0.5)
        reference = toy_build / "data" / "eval" / "000000.png"
        image = ip(reference, prompt="a red circle", num_inference_steps=2, output_type="np").images[0]
        assert image.shape == (BuildConfig.size, BuildConfig.size, 3) and np.isfinite(image).all()
        ip.detach()
    sizes = sum(p.stat().st_size for p in (*(toy_build / "pipeline").rglob("*.safetensors"),
                                           *(toy_build / "models").rglob("*.safetensors")))  # fmt: skip
    assert sizes < 30 * 2**20  # the shipped family must stay under 30 MB


def test_evaluation_scores_every_mode(toy_build: Path) -> None:
    from ipadapter.mini.evaluate import MODES, Scorer, evaluate, markdown, references

    pipe = StableDiffusionPipeline.from_pretrained(toy_build / "pipeline", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ip = attach(pipe, toy_build / "models" / "ip-adapter_mini.safetensors")
    refs = references(toy_build / "data" / "eval", 3)
    results = evaluate(ip, Scorer(toy_build / "clip"), refs, steps=2, batch=2)
    assert list(results) == list(MODES)
    for r in results.values():
        assert r["n"] == 3 and -1 <= r["clip_i"] <= 1 and -1 <= r["clip_t"] <= 1
        assert all(0 <= r[k] <= 1 for k in ("color", "shape", "background"))
    assert "| image+text |" in markdown(results)


def test_eval_command_writes_a_report(toy_build: Path, tmp_path: Path, capsys) -> None:
    from ipadapter.cli import main

    report = tmp_path / "report.json"
    argv = ["eval", "--base", str(toy_build / "pipeline"), "--adapter",
            str(toy_build / "models" / "ip-adapter-plus_mini.safetensors"), "--count", "2", "--steps", "2",
            "--output", str(report), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "| image+text |" in capsys.readouterr().out  # the scorer and references come from the build
    assert set(json.loads(report.read_text())) == {"text", "image", "image+text"}
    assert main([*argv[:-4], "--output", str(tmp_path / "r.txt")]) == 2


def test_mini_names_resolve_to_the_shipped_folder(
    toy_build: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import ipadapter.mini.shipped as shipped
    from ipadapter.cli import main

    argv = ["generate", "--base", "mini", "--adapter", "mini", "--image", str(toy_build / "data/eval/000000.png"),
            "--steps", "2", "--output", "x.png", "--device", "cpu"]  # fmt: skip
    monkeypatch.setattr(shipped.base_folder, "__defaults__", (toy_build / "absent",))
    assert main(argv) == 2
    assert "miniature base model is not in this installation" in capsys.readouterr().err
    monkeypatch.setattr(shipped.base_folder, "__defaults__", (toy_build,))
    monkeypatch.setattr(shipped.adapter_file, "__defaults__", (toy_build,))
    monkeypatch.chdir(toy_build)
    assert main(argv) == 0 and (toy_build / "x.png").is_file()


def test_build_entry_point_resumes_and_checks_overrides(toy_build: Path, capsys) -> None:
    from ipadapter.mini.build import main

    assert main(["--out", str(toy_build), "--set", "unet_steps=3"]) == toy_build
    assert capsys.readouterr().out.count("already done") == len(STAGES)
    for bad in (["--set", "nonsense=1"], ["--set", "size=abc"], ["--stages", "clip,paint"]):
        with pytest.raises(SystemExit):
            main(["--out", str(toy_build), *bad])


def test_install_copies_only_the_shipped_pieces(toy_build: Path, tmp_path: Path) -> None:
    from ipadapter.mini.build import install
    from ipadapter.mini.shipped import adapter_file, base_folder

    dest = install(toy_build, tmp_path / "model")
    assert sorted(p.name for p in dest.iterdir()) == ["build_record.json", "clip", "models", "pipeline"]
    assert base_folder(dest).name == "pipeline" and adapter_file("mini-plus", dest).is_file()
    (dest / "pipeline" / "stale.txt").write_text("from an earlier install")
    install(toy_build, dest)  # replaces the folder as a whole
    assert not (dest / "pipeline" / "stale.txt").exists()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(ValueError, match="has not finished"):
        install(unfinished, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_adapter_examples_swap_backgrounds_and_empty_captions(tmp_path: Path) -> None:
    """Some references show the object on another background while the caption names the target's own."""
    from ipadapter.mini.build import _adapter_manifest
    from ipadapter.mini.shapes import classify, is_held_out, write_dataset

    folder = write_dataset(tmp_path / "train", 60, seed=3, size=32, split="train")
    config = BuildConfig(out=str(tmp_path), adapter_swap=0.4, adapter_empty=0.5)
    rows = {
        json.loads(line)["image"]: json.loads(line)
        for line in (folder / "metadata.jsonl").read_text().splitlines()
    }
    entries = [json.loads(line) for line in _adapter_manifest(config, folder).read_text().splitlines()]
    swapped = [e for e in entries if "reference" in e]
    plain = [e for e in entries if "reference" not in e]
    assert 0.2 * len(entries) < len(swapped) < 0.6 * len(entries)
    assert 0.15 * len(plain) < sum(e["text"] == "" for e in plain) < 0.85 * len(plain)
    for entry in swapped:
        row, seen = rows[entry["image"]], classify(Image.open(folder / entry["reference"]))
        assert (seen["shape"], seen["color"]) == (row["shape"], row["color"])  # the same object...
        assert seen["background"] not in (row["background"], row["color"])  # ...on another background
        assert not is_held_out(row["shape"], row["color"], seen["background"])  # never a held-out pairing
        assert entry["text"].startswith("on a") and entry["text"].endswith(f"{row['background']} background")
    viewed = _adapter_manifest(BuildConfig(out=str(tmp_path), adapter_swap=0.4, adapter_drawn=0.5), folder)
    views = [json.loads(line) for line in viewed.read_text().splitlines()]
    views = [e for e in views if e.get("reference", "").startswith("views/")]
    assert 6 <= len(views) <= 30  # about half of the ~36 examples not swapped
    for entry in views:  # the same scene drawn anew: same colours, another picture
        row, seen = rows[entry["image"]], classify(Image.open(folder / entry["reference"]))
        assert (seen["color"], seen["background"]) == (row["color"], row["background"])
        view, target = Image.open(folder / entry["reference"]), Image.open(folder / entry["image"])
        assert view.size == target.size and view.tobytes() != target.tobytes()
    unswapped = _adapter_manifest(BuildConfig(out=str(tmp_path), adapter_swap=0.0, adapter_empty=0.0), folder)
    assert not any("reference" in line or '"text": ""' in line for line in unswapped.read_text().splitlines())


def test_unet_cross_attention_sits_on_the_levels_the_config_names(tmp_path: Path, capsys) -> None:
    from ipadapter.mini.build import main, new_unet

    config = BuildConfig(
        out="x", vae_channels=(16, 32), unet_channels=(32, 64, 128), unet_attention=(0, 1, 0)
    )
    unet = new_unet(config)
    assert unet.config.sample_size == 16  # one fewer VAE downsampling: 16 x 16 latents at 32 px
    assert [type(b).__name__ for b in unet.down_blocks] == [
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    for flags in ((1,), (0, 0), (1, 2)):  # wrong length, no cross-attention at all, not a 0/1 flag
        with pytest.raises(ValueError, match="one 0 or 1 per UNet level"):
            BuildConfig(out="x", unet_attention=flags)
    for bad in ({"adapter_plus_lr": -1.0}, {"lr": 0.0}, {"unet_noise_offset": float("nan")}):
        with pytest.raises(ValueError, match="expected a"):
            BuildConfig(out="x", **bad)
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit):
        main(["--out", str(fresh), "--set", "unet_attention=(0, 0)"])
    assert "at least one 1" in capsys.readouterr().err and not fresh.exists()  # refused before any stage ran
    with pytest.raises(SystemExit):
        main(["--out", str(fresh), "--set", "adapter_plus_lr=-1"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse's usage, then one error line; no traceback
    assert last.startswith(
        "python -m ipadapter.mini.build: error: adapter_plus_lr=-1: expected a learning rate"
    )
    assert "Traceback" not in err and not fresh.exists()
