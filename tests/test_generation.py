"""The engine behind the command line, batch and the server: models loaded once, bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import reference_image

import ipadapter.pipelines as pipelines
from ipadapter.cli import main
from ipadapter.jobs.engine import Engine
from ipadapter.jobs.job import Job
from ipadapter.prompt.recipe import AdapterRecipe, Recipe, Reference


def job(models: dict, base: str, seed: int = 0) -> Job:
    variant = "sd15" if base == "sd15" else "plus_sdxl_vit-h"
    entry = AdapterRecipe(path=str(models["ckpt"][variant, "safetensors"]), scale=0.7,
                          images=[Reference(reference_image())])  # fmt: skip
    return Job(base=str(models[base]), recipe=Recipe([entry]), prompt="a cat", steps=2, width=32, height=32,
               seed=seed)  # fmt: skip


def test_models_load_once_and_at_most_max_bases_stay(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real = pipelines.load_pipeline

    def counting(base: Any, **kw: Any) -> Any:
        loads.append(str(base))
        return real(base, **kw)

    monkeypatch.setattr(pipelines, "load_pipeline", counting)
    engine = Engine("cpu", max_bases=1)
    first = np.asarray(engine.run(job(models, "sd15")).images[0])
    again = engine.run(job(models, "sd15"))  # same base: nothing loads, the adapter stays attached
    assert loads == [str(models["sd15"])] and np.array_equal(np.asarray(again.images[0]), first)
    engine.run(job(models, "sdxl"))  # another base: the first is dropped (max_bases=1)
    assert engine.loaded()["bases"] == [str(models["sdxl"])] and len(engine.loaded()["adapters"]) == 1
    back = engine.run(job(models, "sd15"))  # loaded again, same pixels
    assert loads == [str(models["sd15"]), str(models["sdxl"]), str(models["sd15"])]
    assert np.array_equal(np.asarray(back.images[0]), first)
    assert back.params["seed"] == 0 and back.params["scale"] == 0.7


def test_a_seed_is_picked_and_reported_when_none_is_given(models: dict) -> None:
    engine = Engine("cpu")
    result = engine.run(job(models, "sd15", seed=None))
    replay = engine.run(job(models, "sd15", seed=result.seed))
    assert result.params["seed"] == result.seed
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(replay.images[0]))


def test_the_same_job_gives_the_same_pixels_whatever_ran_before(models: dict, tmp_path: Path) -> None:
    """Caches (features, negatives, K/V) hold values any job would compute: batch and order change nothing."""
    a, b, neg = reference_image(), reference_image(seed=3, size=(40, 40)), reference_image(seed=8)
    basic, plus = (str(models["ckpt"][v, "safetensors"]) for v in ("sd15", "plus_sd15"))
    b.save(tmp_path / "b.png")
    assert main(["embed", "--adapter", basic, "--image", str(tmp_path / "b.png"),
                 "--output", str(tmp_path / "b.safetensors"), "--device", "cpu"]) == 0  # fmt: skip

    def make(*entries: AdapterRecipe, **kw: Any) -> Job:
        settings = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 2, "width": 32, "height": 32,
                    "seed": 0, **kw}  # fmt: skip
        return Job(base=str(models["sd15"]), recipe=Recipe(list(entries)), **settings)

    target = make(AdapterRecipe(path=basic, scale=0.6, combine="average", negative_image=neg,
                                images=[Reference(a), Reference(b, weight=0.5)]), num_images=2)  # fmt: skip
    fresh = [np.asarray(image) for image in Engine("cpu").run(target).images]
    engine = Engine("cpu")
    before = [
        make(AdapterRecipe(path=basic, images=[Reference(b)])),  # each reference encoded alone first
        make(AdapterRecipe(path=basic, images=[Reference(neg)]), seed=5),
        make(AdapterRecipe(path=basic, images=[Reference(embeds=str(tmp_path / "b.safetensors"))])),
        make(AdapterRecipe(path=plus, scale=0.3, images=[Reference(a), Reference(b)])),  # another adapter
        make(AdapterRecipe(path=basic, images=[Reference(b), Reference(a)], combine="concat"),
             AdapterRecipe(path=plus, images=[Reference(neg)]), num_images=3),  # a two-adapter recipe
    ]  # fmt: skip
    for job_before in before:
        engine.run(job_before)
    again = engine.run(target).images
    assert len(again) == 2
    for x, y in zip(fresh, again, strict=True):
        assert np.array_equal(x, np.asarray(y))


def test_a_job_without_recipe_runs_the_plain_base_model_even_with_adapters_attached(models: dict) -> None:
    plain = Job(base=str(models["sd15"]), prompt="a cat", steps=2, width=32, height=32, seed=0)
    fresh = np.asarray(Engine("cpu").run(plain).images[0])
    engine = Engine("cpu")
    engine.run(job(models, "sd15"))  # attaches an adapter to the engine's UNet, and it stays attached
    assert engine.loaded()["adapters"]
    result = engine.run(plain)
    assert np.array_equal(np.asarray(result.images[0]), fresh)
    assert result.params["adapter"] is None and result.params["variant"] is None
