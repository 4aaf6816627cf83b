"""The miniature family's build, end to end at toy budgets: every stage runs, resumes, and loads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ipadapter import attach
from ipadapter.mini.build import STAGES, BuildConfig, build


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mini")
    config = BuildConfig(out=str(out), train_images=32, eval_images=8, clip_steps=2, clip_batch=8, vae_steps=2,
                         vae_batch=4, unet_steps=2, unet_batch=4, adapter_steps=2, adapter_batch=4, threads=1,
                         log=lambda _: None)  # fmt: skip
    return build(config)


def test_every_stage_is_recorded_and_a_rerun_skips_them(toy_build: Path) -> None:
    record = json.loads((toy_build / "build_record.json").read_text())
    assert list(record["stages"]) == list(STAGES)
    assert record["stages"]["clip"]["loss"] and record["stages"]["vae"]["scaling_factor"] > 0
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
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()
        ip.detach()
    sizes = sum(p.stat().st_size for p in (*(toy_build / "pipeline").rglob("*.safetensors"),
                                           *(toy_build / "models").rglob("*.safetensors")))  # fmt: skip
    assert sizes < 30 * 2**20  # the shipped family must stay under 30 MB
