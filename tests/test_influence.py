"""Influence maps (issue 20): where each adapter / reference acted, recorded inside the denoiser.

The maps must show what ran: masks, step windows, weights and the style/composition split are applied before
recording, and recording changes nothing in the picture.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import CALL, ckpt, half_mask, load_pipe, mode_setup, reference_image, run  # noqa: E402
from PIL import Image  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter import InputError, attach  # noqa: E402
from ipadapter.pipelines import load_pipeline  # noqa: E402
from ipadapter.prompt.recipe import Control, Reference  # noqa: E402
from ipadapter.prompt.recording import InfluenceRecorder  # noqa: E402


@pytest.fixture
def ip(models: dict) -> Any:
    handle = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"), scale=0.8)
    yield handle
    handle.detach()


def _record(target: Any, control: Control, **kwargs: Any) -> tuple[np.ndarray, Any]:
    recorder = InfluenceRecorder()
    images = run(target, control, influence=recorder, **kwargs)
    return images, recorder.maps()


def _share_left(heat: np.ndarray) -> float:
    half = heat.shape[-1] // 2
    return float(heat[..., :half].sum() / heat.sum())


def test_a_masked_reference_acts_inside_its_mask(ip: Any) -> None:
    images, maps = _record(ip, Control(images=[Reference(reference_image(), mask=half_mask("left"))]))
    assert maps.norms.shape == (1, 1, 7, 32, 32) and maps.norms.dtype == np.float32
    assert _share_left(maps.total()[0, 0]) > 0.9
    _, right = _record(ip, Control(images=[Reference(reference_image(), mask=half_mask("right"))]))
    assert _share_left(right.total()[0, 0]) < 0.1
    assert np.array_equal(
        images, run(ip, Control(images=[Reference(reference_image(), mask=half_mask("left"))]))
    )


def test_recording_changes_nothing_and_labels_blocks(ip: Any, models: dict) -> None:
    control = Control(images=[reference_image(), reference_image(seed=4)], scale=0.6)
    images, maps = _record(ip, control, num_images_per_prompt=2)
    assert np.array_equal(images, run(ip, control, num_images_per_prompt=2))
    assert maps.norms.shape[:3] == (2, 2, 7)
    stem = Path(ckpt(models, "sd15")).stem  # panels are named by the adapter's file
    assert maps.panels == [f"{stem} · reference 0", f"{stem} · reference 1"]
    assert maps.blocks[0] == "t0 down_blocks.0.attentions.0" and maps.blocks[2].startswith("t2 mid_block")
    assert (maps.ratios > 0).any() and np.isfinite(maps.ratios).all()


def test_weights_scale_and_windows_are_applied_before_recording(ip: Any) -> None:
    a, b = reference_image(), reference_image(seed=4)
    _, maps = _record(ip, Control(images=[a, Reference(b, weight=0.0)]))
    total = maps.total()[0]
    assert total[1].max() < 1e-6 * total[0].max()  # a reference of weight 0 did nothing
    _, off = _record(ip, Control(images=[a], scale=0.0))
    assert not off.norms.any()
    _, full = _record(ip, Control(images=[a]), num_inference_steps=4)
    _, half = _record(ip, Control(images=[a], start=0.0, end=0.5), num_inference_steps=4)
    ratio = half.total().sum() / full.total().sum()
    assert 0.2 < ratio < 0.8  # only the steps inside the window count (the others are zeros)
    _, weak = _record(ip, Control(images=[a], layer_weights={"t0": 1.0}))
    assert weak.norms[0, 0, 0].any() and not weak.norms[0, 0, 1:].any()  # only block t0 ran


def test_tiles_act_on_their_own_regions(ip: Any, models: dict) -> None:
    wide = reference_image(seed=5, size=(200, 48))
    _, maps = _record(ip, Control(images=[Reference(wide, crop="tiled")]))
    stem = Path(ckpt(models, "sd15")).stem
    assert maps.panels == [f"{stem} · reference 0 tile {i}" for i in range(4)]
    total = maps.total()[0]
    assert _share_left(total[0]) > 0.8 and _share_left(total[3]) < 0.2


def test_two_adapters_get_panels_of_their_own(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    a = attach(pipe, ckpt(models, "sd15"), name="a")
    b = attach(pipe, ckpt(models, "plus_sd15"), name="b")
    try:
        recorder = InfluenceRecorder()
        out = ipadapter.adapter.run(
            pipe,
            [
                (a, Control(images=[reference_image()])),
                (b, Control(images=[reference_image(seed=2)], scale=0.5)),
            ],
            influence=recorder,
            **{**CALL, "generator": torch.Generator("cpu").manual_seed(0)},
        )
        maps = recorder.maps()
        names = [Path(ckpt(models, v)).stem for v in ("sd15", "plus_sd15")]
        assert maps.panels == names and out.images.shape[0] == 1
        assert maps.total()[0, 0].sum() > 0 and maps.total()[0, 1].sum() > 0
    finally:
        a.detach()
        b.detach()


def test_video_frames_are_averaged_into_one_map(models: dict) -> None:
    pipe, extra = mode_setup(models, "sd15", "video")
    ip = attach(pipe, ckpt(models, "sd15"))
    recorder = InfluenceRecorder()
    run(
        ip,
        Control(images=[Reference(reference_image(), mask=half_mask("right"))]),
        influence=recorder,
        **extra,
    )
    maps = recorder.maps()
    assert maps.norms.shape[:2] == (1, 1)
    assert _share_left(maps.total()[0, 0]) < 0.1


def test_a_compiled_denoiser_is_refused(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"))
    pipe.unet = torch.compile(pipe.unet)  # wrapping compiles nothing yet
    with pytest.raises(InputError, match="influence maps record inside the denoiser"):
        run(ip, Control(images=[reference_image()]), influence=InfluenceRecorder())


def test_nothing_recorded_is_an_error() -> None:
    with pytest.raises(InputError, match="nothing was recorded"):
        InfluenceRecorder().maps()


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_dit_hosts_record_too(dit: dict, family: str) -> None:
    pipe = load_pipeline(dit[family])
    pipe.set_progress_bar_config(disable=True)
    adapter, encoder = (
        (dit["xlabs"], dit["clip"]) if family == "flux" else (dit["instantx_sd3"], dit["siglip"])
    )
    ip = attach(pipe, adapter, encoder, scale=0.8)
    recorder = InfluenceRecorder()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    ref = Reference(reference_image(), mask=mask) if family == "flux" else reference_image()
    call = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    images = ip(Control(images=[ref]), influence=recorder, generator=torch.Generator().manual_seed(0), **call)
    plain = ip(Control(images=[ref]), generator=torch.Generator().manual_seed(0), **call)
    assert np.array_equal(np.asarray(images.images[0]), np.asarray(plain.images[0]))
    maps = recorder.maps()
    assert maps.norms.shape[:2] == (1, 1) and maps.total().sum() > 0
    if family == "flux":
        assert _share_left(maps.total()[0, 0]) > 0.9
