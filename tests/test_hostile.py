"""Hostile inputs to the generation front ends and the Python API, kept as a corpus (issue 17).

Every case here once crashed, allocated until the machine died, answered "internal error" or gave silent
garbage. Each must stay a one-line refusal (exit 2 on the command line), decided before any model loads where
the input alone shows the problem. Files, images and atomic writes: test_hostile_files.py; the server:
test_hostile_server.py; training: test_hostile_training.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ckpt, fails, load_pipe
from PIL import Image
from safetensors.torch import load_file, save_file

from ipadapter import CheckpointError, InputError, attach
from ipadapter.batch import read_manifest
from ipadapter.cli import main
from ipadapter.jobs.engine import Engine
from ipadapter.jobs.options import Limits, job_from_options, local_files

NOWHERE = "/nonexistent/base-model"  # a base that cannot load: a refusal must come before any model


def _argv(ref: Path, out: Path, *extra: str, base: str = NOWHERE) -> list[str]:
    return ["generate", "--base", base, "--adapter", "mini", "--image", str(ref), "--steps", "2",
            "--output", str(out), *extra]  # fmt: skip


# -- resource limits: refused in one line before any model loads ---------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (
            ["--width", "100000", "--height", "100000"],
            ["100000x100000 = 10,000,000,000 pixels", "--max-pixels"],
        ),
        (["--num-images", "1000"], ["--num-images is 1000", "at most 64", "--max-images"]),
        (["--steps", "1001"], ["--steps is 1001", "at most 500", "--max-steps"]),
        (["--seed", "18446744073709551616"], ["--seed is 18446744073709551616"]),
        (["--seed", "-1"], ["--seed is -1"]),  # batch and the server refuse it too: the front ends agree
        (["--scale", "1e30"], ["--scale is 1e+30", "in [0, 5]"]),
    ],
)
def test_limits_and_bounds_are_checked_before_any_model_loads(
    ref_png: Path, tmp_path: Path, capsys, extra: list[str], needles: list[str]
) -> None:
    fails(capsys, _argv(ref_png, tmp_path / "x.png", *extra), *needles)


def test_a_limit_is_raised_by_its_flag(ref_png: Path, tmp_path: Path, capsys) -> None:
    argv = _argv(ref_png, tmp_path / "x.png", "--num-images", "100", "--max-images", "100")
    fails(capsys, argv, "not available")  # past the limit check: now the missing base model is the problem


def test_a_huge_manifest_line_fails_alone_when_the_manifest_is_read(ref_png: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    good = {"base": "mini", "adapter": "mini", "image": str(ref_png)}
    lines = [{**good, "num_images": 10_000_000}, good, {**good, "width": 65536, "height": 65536}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    huge, fine, wide = read_manifest(manifest, tmp_path / "out")
    assert "'num_images' is 10000000" in huge.error and huge.files == []  # no ten million names planned
    assert fine.error is None and "65536x65536 = 4,294,967,296 pixels" in wide.error
    manifest.write_text(json.dumps({**good, "num_images": 100}) + "\n")
    assert "at most 64" in read_manifest(manifest, tmp_path / "out")[0].error
    raised = read_manifest(manifest, tmp_path / "out", Limits(max_images=100))
    assert raised[0].error is None and len(raised[0].files) == 100


def test_many_images_run_in_chunks_and_give_the_images_of_one_call(models: dict, ref_png: Path) -> None:
    """Memory stays bounded: at most ``batch_size`` images per pipeline call, the same images as one call (up
    to one level of rounding where batched and single kernels differ); image i is the image of seed + i."""
    locate, resolve = local_files()
    options = {"base": str(models["sd15"]), "adapter": ckpt(models), "image": str(ref_png), "steps": 2,
               "width": 32, "height": 32, "seed": 3, "num_images": 5, "scheduler": "euler-a"}  # fmt: skip
    job = job_from_options(options, locate=locate, resolve_file=resolve)
    calls: list[int] = []
    engine = Engine("cpu", batch_size=2)
    pipe = engine.pipeline(job)[0]
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    chunked = engine.run(job)
    whole = Engine("cpu", batch_size=8).run(job)
    assert max(calls) == 4  # 2 images x (negative, positive): never the whole job at once
    assert chunked.params["seeds"] == [3, 4, 5, 6, 7]
    for a, b in zip(chunked.images, whole.images, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    alone = Engine("cpu").run(job_from_options({**options, "num_images": 1, "seed": 6}, locate=locate))
    assert np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(whole.images[3], dtype=int)).max() <= 1


# -- bad values that once gave "internal error" -------------------------------------------------------------


def test_a_tiny_init_image_is_refused_before_any_model(ref_png: Path, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (1, 1), "red").save(tmp_path / "dot.png")
    argv = ["img2img", *_argv(ref_png, tmp_path / "x.png")[1:], "--init", str(tmp_path / "dot.png")]
    fails(capsys, argv, "init image is 1x1", "at least 8x8")


def test_a_tiny_mask_is_resized_like_any_other(models: dict, ref_png: Path, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (32, 32), "grey").save(tmp_path / "init.png")
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    argv = ["inpaint", *_argv(ref_png, tmp_path / "x.png", base=str(models["sd15"]))[1:],
            "--adapter", ckpt(models), "--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "dot.png")]  # fmt: skip
    assert main(argv) == 0 and Image.open(tmp_path / "x.png").size == (32, 32)
    assert "resized" in capsys.readouterr().err


def test_more_steps_than_the_scheduler_has_is_one_line(
    models: dict, ref_png: Path, tmp_path: Path, capsys
) -> None:
    argv = _argv(
        ref_png, tmp_path / "x.png", "--steps", "1001", "--max-steps", "5000", base=str(models["sd15"])
    )
    argv[argv.index("mini")] = ckpt(models)
    fails(capsys, argv, "1001 steps", "1000 training timesteps")


def test_an_output_that_is_a_folder_or_not_writable_is_refused_first(
    ref_png: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    fails(capsys, _argv(ref_png, tmp_path), "is a folder")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: pretend it may not
    fails(capsys, _argv(ref_png, tmp_path / "x.png"), "not writable")


# -- adapter files that would give silent garbage -----------------------------------------------------------


def _broken(models: dict, tmp_path: Path, change) -> str:  # noqa: ANN001
    state = load_file(ckpt(models))
    change(state)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    return str(path)


def test_non_finite_weights_are_refused_by_inspect_and_attach(models: dict, tmp_path: Path, capsys) -> None:
    path = _broken(
        models, tmp_path, lambda s: s["ip_adapter.1.to_k_ip.weight"].view(-1).__setitem__(0, np.nan)
    )
    fails(capsys, ["inspect", path], "non-finite weights", "ip_adapter.1.to_k_ip.weight")
    pipe = load_pipe(models, "sd15")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(CheckpointError, match="non-finite"):
        attach(pipe, path)
    assert dict(pipe.unet.attn_processors) == before  # nothing half-applied


def test_a_missing_projection_key_is_reported_by_inspect(models: dict, tmp_path: Path, capsys) -> None:
    path = _broken(models, tmp_path, lambda s: s.pop("image_proj.norm.bias"))
    err = fails(capsys, ["inspect", path], "image_proj is missing norm.bias")
    assert "cannot be used" in err
    with pytest.raises(CheckpointError, match="missing norm.bias"):
        attach(load_pipe(models, "sd15"), path)


# -- the Python API: one rule each --------------------------------------------------------------------------


def test_detaching_what_is_not_attached_is_always_an_error(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    first, second = attach(pipe, ckpt(models), name="a"), attach(pipe, ckpt(models), name="b")
    first.detach()
    with pytest.raises(InputError, match="no adapter named 'a' is attached"):
        first.detach()  # another adapter remains
    second.detach()
    with pytest.raises(InputError, match="no adapter named 'b' is attached"):
        second.detach()  # none remains: the same rule
    from ipadapter import detach

    detach(pipe)  # detaching all of none: nothing to do


@pytest.mark.parametrize("value", ["0.5", True, float("nan"), -1, 6.0])
def test_a_scale_that_is_not_a_number_in_range_is_refused(models: dict, value: object) -> None:
    ip = attach(load_pipe(models, "sd15"), ckpt(models))
    with pytest.raises(InputError, match="scale is"):
        ip.scale = value
    assert ip.scale == 1.0


def test_a_tensor_reference_or_no_pipeline_is_one_clear_error(models: dict) -> None:
    with pytest.raises(InputError, match="expected a diffusers Stable Diffusion.*Flux pipeline, got None"):
        attach(None, ckpt(models))
    ip = attach(load_pipe(models, "sd15"), ckpt(models))
    with pytest.raises(InputError, match="reference 0 is a Tensor.*to_pil_image"):
        ip(torch.rand(3, 32, 32), num_inference_steps=1)


def test_the_front_ends_agree_on_a_negative_seed(tmp_path: Path) -> None:
    locate, resolve = local_files()
    with pytest.raises(InputError, match="'seed' is -1"):
        job_from_options({"base": "b", "seed": -1}, locate=locate, resolve_file=resolve)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"base": "b", "seed": -1}) + "\n")
    assert "'seed' is -1" in read_manifest(manifest, tmp_path / "out")[0].error
