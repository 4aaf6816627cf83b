"""The engine behind the command line, batch and the server: models loaded once, bounded memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import reference_image

import ipadapter.pipelines as pipelines
from ipadapter.generation import Engine, Job
from ipadapter.recipe import AdapterRecipe, Recipe, Reference


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
