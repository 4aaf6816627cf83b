"""Fine control of the image prompt (issue 6): several references, several adapters, negative images, layer
weights, step windows, regional masks — equality with diffusers where it has the feature, invariants elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.image_processor import IPAdapterMaskProcessor
from helpers import (
    CALL,
    ckpt,
    diffusers_pipe,
    encoder_folder,
    half_mask,
    load_pipe,
    mode_setup,
    reference_image,
    run,
)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ipadapter import ImagePrompt, InputError, attach, attached
from ipadapter.adapter import apply
from ipadapter.adapter import run as run_adapters
from ipadapter.pipelines import mode_pipeline
from ipadapter.prompt.conditioning import BranchControl
from ipadapter.prompt.recipe import AdapterRecipe, Control, Recipe, Reference

TOL = 2 / 255


def call(target: Any, *args: Any, seed: int = 0, **kwargs: Any) -> np.ndarray:
    return run(target, *args, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Several references for one adapter


@pytest.mark.parametrize("variant", ["sd15", "plus_sd15"])
def test_concat_matches_diffusers_list_of_images(models: dict, variant: str) -> None:
    a, b = reference_image(), reference_image(seed=4)
    expected = call(diffusers_pipe(models, variant, scale=0.7), ip_adapter_image=[[a, b]])
    ip = attach(load_pipe(models, "sd15"), ckpt(models, variant), scale=0.7)
    got = call(ip, Control(images=[a, b], combine="concat"))
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - call(ip, a)).max() > 0.01  # the second reference counts


def test_one_image_and_identical_images_equal_the_single_image_run(models: dict) -> None:
    ref = reference_image()
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "plus_sd15"), scale=0.7)
    single = call(ip, ref)
    assert np.array_equal(call(ip, Control(images=[ref])), single)
    for mode in ("average", "norm-average"):
        got = call(ip, Control(images=[ref, ref], combine=mode))
        assert np.abs(got - single).max() < 1e-5, mode
    assert np.array_equal(call(ip, Control(images=[ref], combine="add")), single)


def test_weights_move_the_result_between_references(models: dict) -> None:
    a, b = reference_image(), reference_image(seed=4)
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"), scale=1.0)
    only_a, only_b = call(ip, a), call(ip, b)
    for mode in ("average", "norm-average"):
        mostly_a = call(
            ip, Control(images=[Reference(a, weight=1.0), Reference(b, weight=0.0)], combine=mode)
        )
        assert np.abs(mostly_a - only_a).max() < 1e-5, mode
        mix = call(ip, Control(images=[a, b], combine=mode))
        assert np.abs(mix - only_a).max() > 0.01 and np.abs(mix - only_b).max() > 0.01
    # concat: a weight of 0 removes that reference's values from the shared attention
    weighted = call(ip, Control(images=[Reference(a), Reference(b, weight=0.5)]))
    assert np.abs(weighted - call(ip, Control(images=[a, b]))).max() > 1e-3
    assert np.abs(call(ip, Control(images=[a, b], combine="subtract")) - only_a).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Several adapters at once


def test_two_adapters_match_diffusers_multi_adapter(models: dict) -> None:
    a, b = reference_image(), reference_image(seed=4)
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_folder(models, "sd15"))
    theirs = tm_pipe_with_encoder(models, encoder)
    folder = Path(ckpt(models, "sd15")).parent
    names = [Path(ckpt(models, v)).name for v in ("sd15", "plus_sd15")]
    theirs.load_ip_adapter(str(folder), subfolder="", weight_name=names, image_encoder_folder=None)
    theirs.set_ip_adapter_scale([0.7, 0.4])
    expected = call(theirs, ip_adapter_image=[a, b])

    pipe = load_pipe(models, "sd15")
    basic = attach(pipe, ckpt(models, "sd15"), scale=0.7, name="basic")
    plus = attach(pipe, ckpt(models, "plus_sd15"), scale=0.4, name="plus")
    assert basic.encoder is plus.encoder  # one encoder in memory, one cache
    got = call(
        lambda **kw: run_adapters(pipe, [(basic, Control(images=[a])), (plus, Control(images=[b]))], **kw)
    )
    assert np.abs(got - expected).max() <= TOL


def tm_pipe_with_encoder(models: dict, encoder: Any) -> Any:
    from helpers import pipeline_class

    pipe = pipeline_class("sd15").from_pretrained(
        models["sd15"], image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_recipe_attaches_all_or_nothing(models: dict, tmp_path: Path) -> None:
    pipe = load_pipe(models, "sd15")
    before = dict(pipe.unet.attn_processors)
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    good = AdapterRecipe(path=str(ckpt(models, "sd15")), images=[Reference(ref)])
    wrong_base = AdapterRecipe(path=str(ckpt(models, "sdxl")), images=[Reference(ref)])
    with pytest.raises(Exception, match="cross-attention dim"):
        apply(pipe, Recipe([good, wrong_base]))
    assert attached(pipe) == {} and pipe.unet.attn_processors == before
    runner = apply(pipe, Recipe([good, AdapterRecipe(path=str(ckpt(models, "plus_sd15")), scale=0.5,
                                                     images=[Reference(ref)])]))  # fmt: skip
    assert [ip.scale for ip in runner.adapters] == [1.0, 0.5]
    out = call(lambda **kw: runner(**kw))
    runner.detach()
    assert attached(pipe) == {} and pipe.unet.attn_processors == before
    assert np.abs(out - call(pipe)).max() > 0.01


# ---------------------------------------------------------------------------------------------------------
# Negative image prompt


def test_negative_image_tokens_replace_the_unconditional_ones(models: dict) -> None:
    ref, neg = reference_image(), reference_image(seed=8)
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "plus_sd15"), scale=0.7)
    pos, _ = ip.tokens(ref)
    neg_tokens, _ = ip.tokens(neg)
    # a prompt built by hand carries its own controls (none: full strength)
    by_hand = ImagePrompt({"default": pos}, {"default": neg_tokens}, controls={"default": BranchControl(0.7)})
    by_hand = call(pipe, cross_attention_kwargs={"image_prompt": by_hand})
    got = call(ip, Control(images=[ref], negative_image=neg))
    assert np.array_equal(got, by_hand)
    assert np.abs(got - call(ip, ref)).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Per-block weights


@pytest.mark.parametrize(
    ("weights", "theirs"),
    [
        ({"t4": 1.0}, {"up": {"block_0": [0.0, 1.0]}}),
        ({"t1": 1.0, "t2": 0.5}, {"down": {"block_1": 1.0}, "mid": 0.5}),
    ],
)
def test_layer_weights_match_diffusers_per_block_scales(models: dict, weights: dict, theirs: dict) -> None:
    ref = reference_image()
    reference = diffusers_pipe(models, "sd15")
    reference.set_ip_adapter_scale(theirs)
    expected = call(reference, ip_adapter_image=ref)
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"), scale=1.0)
    got = call(ip, Control(images=[ref], layer_weights=weights))
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - call(ip, ref)).max() > 1e-3


def test_a_block_the_unet_lacks_is_refused_with_the_range(models: dict) -> None:
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"))
    with pytest.raises(InputError, match="t0"):
        call(ip, Control(images=[reference_image()], layer_weights={"t9": 1.0}))


# ---------------------------------------------------------------------------------------------------------
# Step window


def test_step_window(models: dict) -> None:
    ref = reference_image()
    pipe = load_pipe(models, "sd15")
    plain = call(pipe, num_inference_steps=4)
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.8)
    full = call(ip, ref, num_inference_steps=4)
    assert np.array_equal(call(ip, Control(images=[ref], start=0.0, end=1.0), num_inference_steps=4), full)
    # DDIM, 4 steps of 1000 (steps_offset 1): t = 751, 501, 251, 1 -> progress 0.249, 0.499, 0.749, 0.999
    early = call(ip, Control(images=[ref], start=0.0, end=0.5), num_inference_steps=4)
    late = call(ip, Control(images=[ref], start=0.5, end=1.0), num_inference_steps=4)
    for part in (early, late):
        assert np.abs(part - full).max() > 1e-3 and np.abs(part - plain).max() > 1e-3
    # a window no step falls in is the plain model, exactly
    assert np.array_equal(call(ip, Control(images=[ref], start=0.0, end=0.2), num_inference_steps=4), plain)
    # nothing outlives the call
    assert np.array_equal(call(ip, ref, num_inference_steps=4), full)


def test_step_window_under_img2img_strength(models: dict) -> None:
    """Progress is measured on the whole noise schedule, not on the steps a call runs: img2img at strength
    0.5 with 4 steps runs only t = 251 and 1 (p = 0.749, 0.999)."""
    ref, init = reference_image(), reference_image(7, (32, 32))
    pipe = mode_pipeline(load_pipe(models, "sd15"), "img2img")
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": init, "strength": 0.5, "num_inference_steps": 4}
    plain = call(pipe, **extra)
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.8)
    assert np.array_equal(call(ip, Control(images=[ref], end=0.7), **extra), plain)
    assert np.array_equal(call(ip, Control(images=[ref], start=0.7), **extra), call(ip, ref, **extra))


# ---------------------------------------------------------------------------------------------------------
# Regional masks


@pytest.mark.parametrize("variant", ["sd15", "plus_sd15"])
def test_masks_match_diffusers_ip_adapter_masks(models: dict, variant: str) -> None:
    a, b = reference_image(), reference_image(seed=4)
    left, right = half_mask("left"), half_mask("right")
    masks = IPAdapterMaskProcessor().preprocess([left, right], height=32, width=32)
    masks = masks.reshape(1, 2, 32, 32)
    expected = call(diffusers_pipe(models, variant, scale=0.7), ip_adapter_image=[[a, b]],
                    cross_attention_kwargs={"ip_adapter_masks": [masks]})  # fmt: skip
    ip = attach(load_pipe(models, "sd15"), ckpt(models, variant), scale=0.7)
    got = call(ip, Control(images=[Reference(a, mask=left), Reference(b, mask=right)]))
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - call(ip, Control(images=[a, b]))).max() > 1e-3


def test_masks_work_on_non_square_outputs(models: dict) -> None:
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"), scale=0.7)
    control = Control(images=[Reference(reference_image(), mask=half_mask("left", 48))])
    assert call(ip, control, height=32, width=48).shape == (1, 32, 48, 3)


def test_a_ready_mask_tensor_equals_its_image_and_a_tensor_of_another_size_is_refused(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.7)
    ref = reference_image()
    prompt = ip.image_prompt(Control(images=[Reference(ref, mask=half_mask("left"))]))
    by_image = call(pipe, cross_attention_kwargs={"image_prompt": prompt})
    left = torch.zeros(32, 32)
    left[:, :16] = 1.0
    prompt.controls["default"].masks = (left,)  # a ready (H, W) mask at the output size
    assert np.array_equal(call(pipe, cross_attention_kwargs={"image_prompt": prompt.prepare()}), by_image)
    prompt.controls["default"].masks = (torch.ones(16, 16),)
    with pytest.raises(InputError, match=r"regional mask tensor is \(16, 16\), the output is \(32, 32\)"):
        call(pipe, cross_attention_kwargs={"image_prompt": prompt.prepare()})


def test_an_empty_mask_is_refused(models: dict) -> None:
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"))
    with pytest.raises(InputError, match="empty"):
        call(ip, Control(images=[Reference(reference_image(), mask=Image.new("L", (32, 32), 0))]))


# ---------------------------------------------------------------------------------------------------------
# Every control in every mode


def everything(a: Image.Image, b: Image.Image) -> Control:
    return Control(images=[Reference(a, mask=half_mask("left")), Reference(b, weight=0.5, mask=half_mask("right"))],
                   start=0.1, end=0.9, layer_weights={"t0": 1.0, "t2": 0.5}, curve="ease-in",
                   negative_image=reference_image(seed=9), scale=0.7)  # fmt: skip


@pytest.mark.parametrize(
    ("base", "mode"),
    [(b, m) for b in ("sd15", "sdxl") for m in ("t2i", "img2img", "inpaint", "controlnet", "video")],
)
def test_every_control_works_in_every_mode(models: dict, base: str, mode: str) -> None:
    pipe, extra = mode_setup(models, base, mode)
    plain = call(pipe, **extra)
    ip = attach(pipe, ckpt(models, "sd15" if base == "sd15" else "plus_sdxl_vit-h"))
    control = everything(reference_image(), reference_image(seed=4))
    if base == "sdxl":  # its tiny UNet has 4 transformer blocks
        control.layer_weights = {"t0": 1.0, "t3": 0.5}
    got = call(ip, control, **extra)
    assert got.shape == plain.shape and np.isfinite(got).all()
    assert np.abs(got - plain).max() > 1e-3
    assert np.array_equal(call(pipe, **extra), plain)  # nothing the controlled call set outlives it
    assert np.array_equal(call(ip, Control(images=[reference_image()], scale=0.0), **extra), plain)


# ---------------------------------------------------------------------------------------------------------
# Cache


def test_a_repeated_reference_costs_no_encoder_run(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "plus_sd15"))
    runs: list[int] = []
    ip.encoder.model.register_forward_pre_hook(lambda *a: runs.append(1))
    ref = reference_image(seed=21)
    call(ip, Control(images=[ref]))
    first = len(runs)
    call(ip, Control(images=[ref, ref], combine="average"))
    call(ip, Control(images=[Reference(ref, crop="center")], negative_image=None))
    assert len(runs) == first
    call(ip, Control(images=[Reference(ref, crop="pad")]))  # another preparation is another input
    assert len(runs) == first + 1


def test_crop_modes_see_different_parts_of_a_wide_reference(models: dict) -> None:
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"))
    wide = reference_image(seed=3, size=(96, 32))
    feats = {c: ip.encoder.features([wide], "pooled", c) for c in ("center", "pad", "stretch")}
    assert all(
        not torch.equal(feats[a], feats[b])
        for a, b in (("center", "pad"), ("pad", "stretch"), ("center", "stretch"))
    )
    square = reference_image(seed=3, size=(32, 32))
    assert torch.equal(
        ip.encoder.features([square], "pooled", "pad"), ip.encoder.features([square], "pooled", "center")
    )


def test_prompt_count_and_controls_go_together(models: dict) -> None:
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"), scale=0.7)
    ref = reference_image()
    two = ip(Control(images=[ref]), **{**CALL, "prompt": ["a cat", "a dog"], "negative_prompt": ["", ""]},
             generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).images  # fmt: skip
    one = call(ip, Control(images=[ref]), prompt="a cat", negative_prompt="")
    assert np.abs(two[0] - one[0]).max() < 1e-4


def test_an_image_prompt_with_controls_for_a_call_of_one_s_own(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.7)
    control = Control(images=[Reference(reference_image(), mask=half_mask("left"))], end=0.9)
    own = call(pipe, cross_attention_kwargs={"image_prompt": ip.image_prompt(control)})
    assert np.array_equal(own, call(ip, control))
