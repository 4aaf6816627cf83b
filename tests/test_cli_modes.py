"""`ipadapter img2img / inpaint / video` and `--controlnet`: same pixels as diffusers, files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
from helpers import diffusers_pipe, fails, png_pixels, reference_image, run
from PIL import Image

from ipadapter.cli import main
from ipadapter.media import read_video
from ipadapter.pipelines import load_controlnet, mode_pipeline
from ipadapter.prompt.images import load_mask


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    out = {"ref": folder / "ref.png", "init": folder / "init.png", "mask": folder / "mask.png"}
    reference_image().save(out["ref"])
    reference_image(7, (40, 32)).save(out["init"])
    mask = Image.new("L", (20, 16), 0)  # half the init's size: the CLI resizes it and says so
    mask.paste(255, (4, 4, 14, 12))
    mask.save(out["mask"])
    out["colour_mask"] = folder / "colour.png"
    Image.new("RGB", (40, 32), (255, 0, 0)).save(out["colour_mask"])
    frames = folder / "frames"
    frames.mkdir()
    for i in range(3):
        reference_image(10 + i).save(frames / f"{i:02d}.png")
    out["frames"] = frames
    return out


def _argv(command: str, models: dict, files: dict, out: Path, *extra: str, base: str = "sd15") -> list[str]:
    variant = "sd15" if base == "sd15" else "plus_sdxl_vit-h"
    return [
        command, "--base", str(models[base]), "--adapter", str(models["ckpt"][variant, "safetensors"]),
        "--image", str(files["ref"]), "--prompt", "a cat", "--negative-prompt", "blurry", "--scale", "0.7",
        "--steps", "2", "--seed", "0", "--output", str(out), *extra,
    ]  # fmt: skip


def _reference(models: dict, mode: str, base: str = "sd15", controlnet=None, **call) -> np.ndarray:  # noqa: ANN001
    variant = "sd15" if base == "sd15" else "plus_sdxl_vit-h"
    pipe = mode_pipeline(diffusers_pipe(models, variant, scale=0.7), mode, controlnet=controlnet)
    image = run(pipe, ip_adapter_image=reference_image(), output_type="pil", **call)[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_img2img_matches_diffusers(models: dict, files: dict, tmp_path: Path, base: str) -> None:
    out = tmp_path / "out.png"
    assert (
        main(
            _argv("img2img", models, files, out, "--init", str(files["init"]), "--strength", "0.6", base=base)
        )
        == 0
    )
    want = _reference(models, "img2img", base, image=Image.open(files["init"]).convert("RGB"), strength=0.6)
    ours = png_pixels(out)
    assert ours.shape == (32, 40, 3)  # the init image's size
    assert np.abs(ours - want).max() <= 2
    params = json.loads(Image.open(out).text["parameters"])
    assert params["mode"] == "img2img" and params["strength"] == 0.6 and params["init"] == str(files["init"])


def test_inpaint_resizes_a_smaller_mask_and_says_so(
    models: dict, files: dict, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out.png"
    argv = _argv("inpaint", models, files, out, "--init", str(files["init"]), "--mask", str(files["mask"]))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "mask" in err and "20x16" in err and "40x32" in err and "resized" in err
    init = Image.open(files["init"]).convert("RGB")
    mask, _ = load_mask(files["mask"], init.size)
    want = _reference(models, "inpaint", image=init, mask_image=mask, width=40, height=32, strength=1.0)
    ours = png_pixels(out)
    assert np.abs(ours - want).max() <= 2
    # the kept (black) part stays close to the init image, the repainted part does not
    init_px = np.asarray(init, dtype=np.int16)
    keep = np.asarray(mask) == 0
    assert np.abs(ours - init_px)[keep].mean() < np.abs(ours - init_px)[~keep].mean()


def test_two_controlnets_with_scales_match_diffusers(models: dict, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    net = str(models["controlnet"]["sd15"])
    control = str(files["init"])
    argv = _argv("generate", models, files, out, "--width", "32", "--height", "32", "--controlnet", net,
                 "--control-image", control, "--controlnet", net, "--control-image", str(files["ref"]),
                 "--control-scale", "0.5", "--control-scale", "1.0")  # fmt: skip
    assert main(argv) == 0
    nets = [load_controlnet(net), load_controlnet(net)]
    images = [Image.open(control).convert("RGB"), Image.open(files["ref"]).convert("RGB")]
    want = _reference(models, "t2i", controlnet=nets, image=images, controlnet_conditioning_scale=[0.5, 1.0])
    assert np.abs(png_pixels(out) - want).max() <= 2
    params = json.loads(Image.open(out).text["parameters"])
    assert params["controlnet"] == [net, net] and params["control_scale"] == [0.5, 1.0]


@pytest.mark.parametrize("suffix", ["gif", "mp4"])
def test_video_files_have_every_frame(models: dict, files: dict, tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"clip.{suffix}"
    argv = _argv("video", models, files, out, "--motion-adapter", str(models["motion"]), "--frames", "3",
                 "--fps", "6", "--width", "32", "--height", "40", "--vae-slicing")  # fmt: skip
    assert main(argv) == 0
    frames = read_video(out)
    assert len(frames) == 3 and frames[0].shape == (40, 32, 3)
    assert not np.array_equal(frames[0], frames[2])
    if suffix == "gif":
        with Image.open(out) as gif:
            assert abs(gif.info["duration"] - 1000 / 6) <= 10  # GIF stores centiseconds
            assert json.loads(gif.info["comment"])["frames"] == 3


def test_video_takes_a_folder_of_per_frame_references(models: dict, files: dict, tmp_path: Path) -> None:
    one, per_frame = tmp_path / "one.gif", tmp_path / "per.gif"
    common = ["--motion-adapter", str(models["motion"]), "--frames", "3", "--width", "32", "--height", "32"]
    assert main(_argv("video", models, files, one, *common)) == 0
    argv = _argv("video", models, files, per_frame, *common)
    argv[argv.index(str(files["ref"]))] = str(files["frames"])
    assert main(argv + ["--json"]) == 0
    a, b = read_video(one), read_video(per_frame)
    assert len(b) == 3 and any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_video_with_a_controlnet(models: dict, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "clip.gif"
    argv = _argv("video", models, files, out, "--motion-adapter", str(models["motion"]), "--frames", "2",
                 "--width", "32", "--height", "32", "--controlnet", str(models["controlnet"]["sd15"]),
                 "--control-image", str(files["init"]))  # fmt: skip
    assert main(argv) == 0 and len(read_video(out)) == 2
    # a folder holds one control image per frame (3 frames here): one ControlNet, one entry
    argv[argv.index("--frames") + 1] = "3"
    argv[argv.index(str(files["init"]))] = str(files["frames"])
    assert main(argv) == 0 and len(read_video(out)) == 3


def test_bad_mode_inputs_are_one_line_errors(models: dict, files: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    init = ["--init", str(files["init"])]
    net = ["--controlnet", str(models["controlnet"]["sd15"])]
    video = ["--motion-adapter", str(models["motion"]), "--frames", "2", "--width", "32", "--height", "32"]
    cases = [
        (_argv("img2img", models, files, out, *init, "--strength", "0"), "--strength is 0.0; expected a number in (0, 1]"),
        (_argv("img2img", models, files, out, *init, "--strength", "1.5"), "expected a number in (0, 1]"),
        (_argv("img2img", models, files, out), "--init"),
        (_argv("inpaint", models, files, out, *init, "--mask", str(files["colour_mask"])), "has colour"),
        (_argv("video", models, files, tmp_path / "v.gif", *video[:2], "--frames", "0"), "--frames is 0; expected a whole number >= 1"),
        (_argv("video", models, files, tmp_path / "v.png", *video), "must end in .gif or .mp4"),
        (_argv("video", models, files, tmp_path / "v.gif", *video, "--cpu-offload", "--device", "cpu"),
         "needs a CUDA device"),
        (_argv("video", models, files, tmp_path / "v.gif", *video, "--image", str(files["frames"])),
         "4 reference images for 2 frames"),
        (_argv("generate", models, files, out, *net), "1 --controlnet but 0 --control-image"),
        (_argv("generate", models, files, out, *net, "--control-image", str(files["init"]),
               "--control-scale", "1", "--control-scale", "2", "--control-scale", "3"), "3 --control-scale"),
        (_argv("generate", models, files, out, *net, "--control-image", str(files["frames"])), "is a folder"),
        (_argv("generate", models, files, out, "--controlnet", str(models["controlnet"]["sd15"]),
               "--control-image", str(files["init"]), base="sdxl"), "cross-attention dim is 32, the base UNet's is 64"),
        (_argv("generate", models, files, out, *net, "--control-image", str(files["init"]), "--base",
               str(models["sd15_inpaint"])), "inpainting model"),
    ]  # fmt: skip
    for argv, needle in cases:
        fails(capsys, argv, needle)


def test_motion_adapter_for_another_unet_is_refused(
    models: dict, files: dict, tmp_path: Path, capsys
) -> None:
    wrong = tm.build_motion_adapter(tmp_path / "motion3", blocks=(32, 64, 64))
    argv = _argv("video", models, files, tmp_path / "v.gif", "--motion-adapter", str(wrong), "--frames", "2")
    err = fails(capsys, argv, "motion blocks (32, 64, 64)", "(32, 64)")
    assert "use a motion adapter made for this base" in err


def test_real_family_mismatches_are_named() -> None:
    from types import SimpleNamespace as NS

    from ipadapter import IncompatibleModelError
    from ipadapter.pipelines import check_controlnet, check_motion_adapter

    sd15 = NS(config=NS(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                        addition_embed_type=None))  # fmt: skip
    sdxl = NS(config=NS(cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
                        addition_embed_type="text_time"))  # fmt: skip
    with pytest.raises(IncompatibleModelError, match=r"for the SD1.5 family, the base is SDXL family"):
        check_controlnet(sd15, sdxl)
    motion_v15 = NS(config=NS(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2))
    with pytest.raises(IncompatibleModelError, match=r"made for the SD1.5 family.*\(SDXL family\)"):
        check_motion_adapter(motion_v15, sdxl)
    check_motion_adapter(motion_v15, sd15)  # the right pairing passes


def test_python_api_fits_masks_and_caps_frames(models: dict) -> None:
    import warnings

    from helpers import load_pipe

    from ipadapter import InputError, attach
    from ipadapter.pipelines import load_motion_adapter

    pipe = mode_pipeline(load_pipe(models, "sd15"), "inpaint")
    ip = attach(pipe, models["ckpt"]["sd15", "safetensors"])
    init, small = reference_image(1, (40, 32)), Image.new("L", (20, 16), 255)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ip(
            reference_image(),
            prompt="",
            image=init,
            mask_image=small,
            num_inference_steps=1,
            width=40,
            height=32,
        )
    assert any("resized the mask" in str(w.message) for w in caught)
    with pytest.raises(InputError, match="has colour"):
        ip(reference_image(), prompt="", image=init, mask_image=Image.new("RGB", (40, 32), (0, 255, 0)))
    video = mode_pipeline(
        load_pipe(models, "sd15"), "video", motion_adapter=load_motion_adapter(models["motion"])
    )
    ipv = attach(video, models["ckpt"]["sd15", "safetensors"])
    with pytest.raises(InputError, match="at most 32 per clip"):
        ipv(reference_image(), prompt="", num_frames=40)


def test_video_pipeline_from_an_attached_pipeline(models: dict) -> None:
    from helpers import load_pipe

    from ipadapter import attach
    from ipadapter.pipelines import load_motion_adapter

    pipe = load_pipe(models, "sd15")
    before, plain = dict(pipe.unet.attn_processors), run(pipe)
    ip = attach(pipe, models["ckpt"]["sd15", "safetensors"], scale=0.7)
    with_adapter = run(ip, reference_image())
    video = mode_pipeline(pipe, "video", motion_adapter=load_motion_adapter(models["motion"]))
    assert not any("to_k_ip" in key for key in video.unet.state_dict())  # adapter weights stay behind
    assert np.array_equal(run(ip, reference_image()), with_adapter)  # the image pipeline still has it
    ip.detach()
    assert pipe.unet.attn_processors == before and np.array_equal(run(pipe), plain)
