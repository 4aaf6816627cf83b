"""img2img, inpaint, ControlNet and video (AnimateDiff) with an image prompt: equality with diffusers'
IP-Adapter, per-frame references, exact no-ops, ControlNet isolation and refusals."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models as tm
import torch
from diffusers import AnimateDiffPipeline, StableDiffusionInpaintPipeline
from helpers import ckpt, diffusers_pipe, load_pipe, reference_image, run
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ipadapter import IncompatibleModelError, InputError, attach, attached
from ipadapter.pipelines import load_controlnet, load_motion_adapter, load_pipeline, mode_pipeline

TOL = 2 / 255  # the bound; in practice the difference is ~1e-6
VARIANT = {"sd15": "sd15", "sdxl": "plus_sdxl_vit-h"}  # one adapter per base family


def init_image() -> Image.Image:
    return reference_image(7, (32, 32))


def control_image() -> Image.Image:
    return reference_image(9, (32, 32))


def mask_image() -> Image.Image:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    return mask


# case -> (mode, uses a ControlNet, extra pipeline arguments). 4 steps: with 2, img2img at strength 0.7 (and
# SDXL inpaint) runs only the last, nearly noise-free step, where any image prompt has little visible effect.
STEPS = {"num_inference_steps": 4}
CASES: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "img2img": ("img2img", False, {"image": init_image(), "strength": 0.7, **STEPS}),
    "inpaint": ("inpaint", False, {"image": init_image(), "mask_image": mask_image(), **STEPS}),
    "controlnet-t2i": ("t2i", True, {"image": control_image(), **STEPS}),
    "controlnet-img2img": ("img2img", True, {"image": init_image(), "control_image": control_image(),
                                             "strength": 0.7, **STEPS}),
    "controlnet-inpaint": ("inpaint", True, {"image": init_image(), "mask_image": mask_image(),
                                             "control_image": control_image(), **STEPS}),
}  # fmt: skip


def snapshot(pipe: Any) -> tuple:
    """What a refused call must leave as it was: the components, the UNet's processors, the adapters."""
    return (
        {name: id(module) for name, module in pipe.components.items()},
        dict(pipe.unet.attn_processors),
        attached(pipe),
    )


def video_pipe(pipe: Any, models: dict, motion: Path | None = None) -> Any:
    video = mode_pipeline(pipe, "video", motion_adapter=load_motion_adapter(motion or models["motion"]))
    video.set_progress_bar_config(disable=True)
    return video


def silence_motion_modules(video: Any) -> int:
    """Zero every motion module's output projection: each becomes the identity, so frames are independent."""
    count = 0
    with torch.no_grad():
        for name, module in video.unet.named_modules():
            if re.search(r"motion_modules\.\d+\.proj_out$", name):
                module.weight.zero_()
                module.bias.zero_()
                count += 1
    return count


def count_calls(*modules: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    for module in modules:
        module.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


# ---------------------------------------------------------------------------------------------------------
# Same pixels as diffusers' IP-Adapter


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_modes_match_diffusers_ip_adapter(models: dict, base: str, case: str) -> None:
    mode, uses_net, extra = CASES[case]
    variant, ref = VARIANT[base], reference_image()
    net = load_controlnet(models["controlnet"][base]) if uses_net else None
    theirs = mode_pipeline(diffusers_pipe(models, variant, scale=0.7), mode, controlnet=net)
    expected = run(theirs, ip_adapter_image=ref, **extra)
    ours = mode_pipeline(load_pipe(models, base), mode, controlnet=net)
    plain = run(ours, **extra)
    ip = attach(ours, ckpt(models, variant), scale=0.7)
    got = run(ip, ref, **extra)
    assert got.shape == expected.shape == (1, 32, 32, 3)
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - plain).max() > 0.05  # the image prompt really does something


@pytest.mark.parametrize("variant", list(tm.VARIANTS))
def test_every_variant_matches_diffusers_in_controlnet_inpainting(models: dict, variant: str) -> None:
    """The most composite image mode (inpainting + ControlNet) with each adapter variant."""
    mode, _, extra = CASES["controlnet-inpaint"]
    base = tm.VARIANTS[variant][1]
    net = load_controlnet(models["controlnet"][base])
    theirs = mode_pipeline(diffusers_pipe(models, variant, scale=0.7), mode, controlnet=net)
    expected = run(theirs, ip_adapter_image=reference_image(), **extra)
    ip = attach(
        mode_pipeline(load_pipe(models, base), mode, controlnet=net), ckpt(models, variant), scale=0.7
    )
    assert np.abs(run(ip, reference_image(), **extra) - expected).max() <= TOL


def test_multi_controlnet_matches_diffusers(models: dict, tmp_path: Path) -> None:
    nets = [
        load_controlnet(models["controlnet"]["sd15"]),
        load_controlnet(tm.build_controlnet(tmp_path / "cn2", models["sd15"], seed=1)),
    ]
    ref = reference_image()
    extra = {"image": [control_image(), init_image()], "controlnet_conditioning_scale": [0.5, 1.0]}
    theirs = mode_pipeline(diffusers_pipe(models, "sd15"), "t2i", controlnet=nets)
    expected = run(theirs, ip_adapter_image=ref, **extra)
    ours = mode_pipeline(load_pipe(models, "sd15"), "t2i", controlnet=nets)
    plain = run(ours, **extra)
    ip = attach(ours, ckpt(models, "sd15"), scale=0.7)
    got = run(ip, ref, **extra)
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - plain).max() > 0.05
    # both ControlNets take part: another weighting gives another image
    assert np.abs(run(ip, ref, **{**extra, "controlnet_conditioning_scale": [1.0, 0.0]}) - got).max() > 0.01


def test_nine_channel_inpainting_base_matches_diffusers(models: dict) -> None:
    ref, extra = reference_image(), {"image": init_image(), "mask_image": mask_image()}
    theirs = StableDiffusionInpaintPipeline.from_pretrained(
        models["sd15_inpaint"],
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(models["vit_h"]),
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
    )
    theirs.set_progress_bar_config(disable=True)
    path = Path(ckpt(models, "sd15"))
    theirs.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.7)
    expected = run(theirs, ip_adapter_image=ref, **extra)
    ours = mode_pipeline(load_pipeline(models["sd15_inpaint"]), "inpaint")
    ours.set_progress_bar_config(disable=True)
    assert ours.unet.config.in_channels == 9
    plain = run(ours, **extra)
    ip = attach(ours, path, scale=0.7)
    got = run(ip, ref, **extra)
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - plain).max() > 0.05


def test_video_matches_diffusers_and_scale_zero_is_plain(models: dict) -> None:
    ref = reference_image()
    theirs = AnimateDiffPipeline.from_pipe(
        diffusers_pipe(models, "sd15", scale=0.7), motion_adapter=load_motion_adapter(models["motion"])
    )
    theirs.set_progress_bar_config(disable=True)
    expected = run(theirs, ip_adapter_image=ref, num_frames=4)
    video = video_pipe(load_pipe(models, "sd15"), models)
    before = dict(video.unet.attn_processors)
    plain = run(video, num_frames=4)
    ip = attach(video, ckpt(models, "sd15"), scale=0.7)
    got = run(ip, ref, num_frames=4)
    assert got.shape == expected.shape == (1, 4, 32, 32, 3)
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(got - plain).max() > 0.05
    ip.scale = 0.0
    assert np.array_equal(run(ip, ref, num_frames=4), plain)
    ip.detach()
    assert video.unet.attn_processors == before and attached(video) == {}
    assert np.array_equal(run(video, num_frames=4), plain)


# ---------------------------------------------------------------------------------------------------------
# One reference per frame


def test_per_frame_references_reach_their_frames(models: dict) -> None:
    ref = reference_image()
    refs = [ref, *(reference_image(seed) for seed in (11, 12, 13))]
    video = video_pipe(load_pipe(models, "sd15"), models)
    ip = attach(video, ckpt(models, "sd15"), scale=0.7)
    single = run(ip, ref, num_frames=4)
    assert np.abs(run(ip, [ref] * 4, num_frames=4) - single).max() <= 1e-4
    assert np.abs(run(ip, refs, num_frames=4) - single).max() > 0.05

    unet = video.unet
    with pytest.raises(InputError, match="3 reference images for 1 prompt"):
        ip(refs[:3], prompt="a cat", num_frames=4, num_inference_steps=2, height=32, width=32)
    assert unet is video.unet and attached(video) == {"default": ip}

    # With the motion modules made identities, frames are independent: frame i of the video with one
    # reference per frame is frame i of the video made with reference i alone (same seed, same latents).
    assert silence_motion_modules(video) > 0
    per_frame = run(ip, refs, num_frames=4)
    alone = [run(ip, r, num_frames=4) for r in refs]
    assert np.abs(alone[0][0, 0] - alone[1][0, 0]).max() > 0.05  # the references do differ in effect
    for i in range(4):
        assert np.abs(per_frame[0, i] - alone[i][0, i]).max() <= 1e-4, f"frame {i}"


# ---------------------------------------------------------------------------------------------------------
# Scale 0 and detach: exactly the plain mode pipelines


@pytest.mark.parametrize("variant", list(tm.VARIANTS))
def test_scale_zero_and_detach_give_plain_modes_exactly(models: dict, variant: str) -> None:
    base = tm.VARIANTS[variant][1]
    pipe = load_pipe(models, base)
    net = load_controlnet(models["controlnet"][base])
    cases = {case: CASES[case] for case in ("img2img", "inpaint", "controlnet-t2i")}
    pipes = {case: mode_pipeline(pipe, mode, controlnet=net if uses_net else None)
             for case, (mode, uses_net, _) in cases.items()}  # fmt: skip
    before = dict(pipe.unet.attn_processors)
    plain = {case: run(pipes[case], **extra) for case, (_, _, extra) in cases.items()}
    ip = attach(pipes["img2img"], ckpt(models, variant), scale=0.0)
    ref = reference_image()
    for case, (_, _, extra) in cases.items():
        assert np.array_equal(run(ip, ref, pipeline=pipes[case], **extra), plain[case]), case
    ip.scale = 0.7
    extra = cases["controlnet-t2i"][2]
    assert (
        np.abs(run(ip, ref, pipeline=pipes["controlnet-t2i"], **extra) - plain["controlnet-t2i"]).max() > 0.05
    )
    ip.detach()
    assert pipe.unet.attn_processors == before and attached(pipe) == {}
    for case, (_, _, extra) in cases.items():
        assert np.array_equal(run(pipes[case], **extra), plain[case]), case


# ---------------------------------------------------------------------------------------------------------
# ControlNet never sees the image tokens


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_controlnet_is_untouched_by_the_image_prompt(models: dict, base: str) -> None:
    net = load_controlnet(models["controlnet"][base])
    pipe = mode_pipeline(load_pipe(models, base), "t2i", controlnet=net)
    net_processors = dict(net.attn_processors)
    assert all(type(p).__module__.startswith("diffusers.") for p in net_processors.values())

    outputs: list[list[torch.Tensor]] = []
    seen_kwargs: list[dict] = []

    def keep_output(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        down, mid = out
        outputs.append([*down, mid])
        seen_kwargs.append(dict(kwargs.get("cross_attention_kwargs") or {}))

    net.register_forward_hook(keep_output, with_kwargs=True)
    extra = CASES["controlnet-t2i"][2]
    plain = run(pipe, **extra)
    first_plain, outputs[:] = outputs[0], []
    ip = attach(pipe, ckpt(models, VARIANT[base]), scale=0.7)
    assert dict(net.attn_processors) == net_processors  # attach touches the UNet only
    adapted = run(ip, reference_image(), **extra)
    assert np.abs(adapted - plain).max() > 0.05  # the adapter was active in the UNet
    first_adapted = outputs[0]
    # first denoising step: same latents, so identical residuals prove no image tokens reach the ControlNet
    assert len(first_adapted) == len(first_plain) > 1
    assert all(torch.equal(a, b) for a, b in zip(first_adapted, first_plain, strict=True))
    assert not any("image_prompt" in kw for kw in seen_kwargs)


# ---------------------------------------------------------------------------------------------------------
# Refusals, each leaving the pipeline as it was


def test_sd15_controlnet_on_sdxl_is_refused(models: dict) -> None:
    pipe = load_pipe(models, "sdxl")
    before = snapshot(pipe)
    net = load_controlnet(models["controlnet"]["sd15"])
    with pytest.raises(IncompatibleModelError, match=r"ControlNet .*cross-attention dim\D+32\D+64"):
        mode_pipeline(pipe, "t2i", controlnet=net)
    with pytest.raises(IncompatibleModelError, match=r"ControlNet 2 .*cross-attention dim\D+32\D+64"):
        mode_pipeline(pipe, "img2img", controlnet=[load_controlnet(models["controlnet"]["sdxl"]), net])
    assert snapshot(pipe) == before


def test_motion_adapter_for_another_unet_is_refused(models: dict, tmp_path: Path) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"))
    before = snapshot(pipe)
    other = tm.build_motion_adapter(tmp_path / "m", blocks=(32, 64, 64))
    with pytest.raises(IncompatibleModelError, match=r"motion blocks \(32, 64, 64\).*\(32, 64\)"):
        video_pipe(pipe, models, other)
    with pytest.raises(InputError, match="video needs a motion adapter"):
        mode_pipeline(pipe, "video")
    with pytest.raises(InputError, match="motion adapter is only used for video"):
        mode_pipeline(pipe, "img2img", motion_adapter=load_motion_adapter(models["motion"]))
    with pytest.raises(InputError, match="unknown mode 'sketch'"):
        mode_pipeline(pipe, "sketch")
    assert snapshot(pipe) == before and ip.attached


@pytest.mark.parametrize("mode", ["t2i", "img2img", "video"])
def test_nine_channel_base_is_only_for_inpainting(models: dict, mode: str) -> None:
    pipe = load_pipeline(models["sd15_inpaint"])
    before = snapshot(pipe)
    motion = load_motion_adapter(models["motion"]) if mode == "video" else None
    with pytest.raises(
        IncompatibleModelError, match=rf"inpainting model .*9 input channels.*cannot run {mode}"
    ):
        mode_pipeline(pipe, mode, motion_adapter=motion)
    assert snapshot(pipe) == before


def test_bad_call_arguments_are_refused_before_the_pipeline_runs(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    img2img = mode_pipeline(pipe, "img2img")
    ip = attach(img2img, ckpt(models, "sd15"), scale=0.7)
    video = video_pipe(load_pipe(models, "sd15"), models)
    vip = attach(video, ckpt(models, "sd15"), scale=0.7)
    calls = count_calls(pipe.unet, pipe.vae, video.unet, video.vae, ip.encoder.model, vip.encoder.model)
    before, video_before = snapshot(img2img), snapshot(video)
    for strength in (0, 1.5, True, float("nan")):
        with pytest.raises(InputError, match=rf"strength {strength} is outside \(0, 1\]"):
            run(ip, reference_image(), image=init_image(), strength=strength)
    for frames in (0, True):
        with pytest.raises(InputError, match=f"num_frames {frames} is not usable"):
            run(vip, reference_image(), num_frames=frames)
    with pytest.raises(InputError, match="does not share the UNet"):
        run(ip, reference_image(), pipeline=video, num_frames=2)
    assert calls == []
    assert snapshot(img2img) == before and snapshot(video) == video_before
    run(ip, reference_image(), image=init_image(), strength=np.float32(0.5))  # numpy numbers are numbers
    assert calls


def test_sdxl_video_smoke(models: dict) -> None:
    video = video_pipe(load_pipe(models, "sdxl"), models)
    assert type(video).__name__ == "AnimateDiffSDXLPipeline"
    plain = run(video, num_frames=2)
    ip = attach(video, ckpt(models, "plus_sdxl_vit-h"), scale=0.7)
    frames = run(ip, reference_image(), num_frames=2)
    assert frames.shape == (1, 2, 32, 32, 3) and np.isfinite(frames).all()
    assert np.abs(frames - plain).max() > 0.05
