"""Flux and SD3 bases: loading, families, every mode's pipeline class (and that it runs), refusals, sizes.

Tiny random-weight pipelines from ``dit_models``, saved to folders and loaded back through ``load_pipeline``.
Calls run 2 steps at 32 px with a 16-token T5 prompt.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import dit_models as dm  # noqa: E402
import pytest  # noqa: E402
import tiny_models as tm  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    FluxControlNetModel,
    FluxMultiControlNetModel,
    FluxPipeline,
    SD3ControlNetModel,
    StableDiffusion3Pipeline,
)
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ipadapter.calls import check_call, native_size, output_size, vae_factor  # noqa: E402
from ipadapter.errors import IncompatibleModelError, InputError, ModelNotAvailableError  # noqa: E402
from ipadapter.pipelines import (  # noqa: E402
    family_of,
    load_controlnet,
    load_pipeline,
    mode_pipeline,
    single_file_family,
)

FAMILIES = ("flux", "sd3")
CLASSES = {  # (family, mode, with a ControlNet) -> diffusers class
    ("flux", "t2i", False): "FluxPipeline",
    ("flux", "t2i", True): "FluxControlNetPipeline",
    ("flux", "img2img", False): "FluxImg2ImgPipeline",
    ("flux", "img2img", True): "FluxControlNetImg2ImgPipeline",
    ("flux", "inpaint", False): "FluxInpaintPipeline",
    ("flux", "inpaint", True): "FluxControlNetInpaintPipeline",
    ("sd3", "t2i", False): "StableDiffusion3Pipeline",
    ("sd3", "t2i", True): "StableDiffusion3ControlNetPipeline",
    ("sd3", "img2img", False): "StableDiffusion3Img2ImgPipeline",
    ("sd3", "inpaint", False): "StableDiffusion3InpaintPipeline",
}
SIZE = 32


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Folders: the two tiny DiT pipelines, a ControlNet for each, a Flux ControlNet twice as wide, SD1.5 + its
    ControlNet (for cross-family refusals)."""
    root = tmp_path_factory.mktemp("dit")
    out = {
        "flux": dm.build_flux(root / "flux"),
        "sd3": dm.build_sd3(root / "sd3"),
        "controlnet": {
            "flux": dm.build_flux_controlnet(root / "cn_flux"),
            "sd3": dm.build_sd3_controlnet(root / "cn_sd3"),
        },
        "wide_cn": dm.build_flux_controlnet(root / "cn_flux_wide", num_attention_heads=4),
        "sd15": tm.build_sd15(root / "sd15"),
    }
    out["controlnet"]["sd15"] = tm.build_controlnet(root / "cn_sd15", out["sd15"])
    return out


@pytest.fixture(scope="module")
def pipes(dit: dict) -> dict:
    """Each family's text-to-image pipeline, loaded once."""
    loaded = {fam: load_pipeline(dit[fam]) for fam in FAMILIES}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


def _image(size: int = SIZE, colour: tuple[int, int, int] = (200, 80, 40)) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def _mask(size: int = SIZE) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def _call(pipe, **kwargs):  # noqa: ANN001, ANN202
    args = {
        "prompt": "a red square",
        "num_inference_steps": 2,
        "max_sequence_length": 16,
        "generator": torch.Generator().manual_seed(0),
        **kwargs,
    }
    return pipe(**args).images[0]


@pytest.mark.parametrize("fam", FAMILIES)
def test_load_pipeline_gives_the_family(dit: dict, pipes: dict, fam: str) -> None:
    pipe = pipes[fam]
    assert type(pipe) is {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[fam]
    assert family_of(pipe) == fam
    assert vae_factor(pipe) == 2  # the tiny VAEs have two blocks
    sd15 = load_pipeline(dit["sd15"])
    assert family_of(sd15) == "sd15"


@pytest.mark.parametrize(("fam", "mode", "with_cn"), list(CLASSES))
def test_mode_pipeline_class_and_run(dit: dict, pipes: dict, fam: str, mode: str, with_cn: bool) -> None:
    pipe = pipes[fam]
    net = load_controlnet(dit["controlnet"][fam]) if with_cn else None
    made = mode_pipeline(pipe, mode, controlnet=net)
    assert type(made).__name__ == CLASSES[fam, mode, with_cn]
    assert made.transformer is pipe.transformer and made.vae is pipe.vae  # shared, not copied
    assert family_of(made) == fam
    extra = {"height": SIZE, "width": SIZE}
    if mode != "t2i":
        extra.update(image=_image(), strength=0.9)
    if mode == "inpaint":
        extra["mask_image"] = _mask()
    if with_cn:
        extra["control_image"] = _image(colour=(10, 200, 30))
    out = _call(made, **check_call(made, extra))
    assert out.size == (SIZE, SIZE)


def test_flux_several_controlnets(dit: dict, pipes: dict) -> None:
    nets = [load_controlnet(dit["controlnet"]["flux"]), load_controlnet(dit["controlnet"]["flux"])]
    made = mode_pipeline(pipes["flux"], "t2i", controlnet=nets)
    assert isinstance(made.controlnet, FluxMultiControlNetModel)
    out = _call(
        made,
        height=SIZE,
        width=SIZE,
        control_image=[_image(), _image(colour=(0, 0, 255))],
        controlnet_conditioning_scale=[0.5, 0.5],
    )
    assert out.size == (SIZE, SIZE)


def test_load_controlnet_picks_the_class(dit: dict) -> None:
    assert type(load_controlnet(dit["controlnet"]["flux"])) is FluxControlNetModel
    assert type(load_controlnet(dit["controlnet"]["sd3"])) is SD3ControlNetModel
    with pytest.raises(
        IncompatibleModelError, match="is a FluxTransformer2DModel; expected one of: ControlNetModel"
    ):
        load_controlnet(dit["flux"] / "transformer")


@pytest.mark.parametrize("fam", FAMILIES)
def test_video_refused(pipes: dict, fam: str) -> None:
    name = {"flux": "Flux", "sd3": "SD3"}[fam]
    with pytest.raises(
        IncompatibleModelError, match=rf"video is not available for a {name} base.*SD1.5/SDXL base"
    ):
        mode_pipeline(pipes[fam], "video")
    with pytest.raises(InputError, match="motion adapter is only used for video"):
        mode_pipeline(pipes[fam], "t2i", motion_adapter=object())


def test_controlnet_of_another_family_or_width_refused(dit: dict, pipes: dict) -> None:
    flux_cn, sd3_cn = load_controlnet(dit["controlnet"]["flux"]), load_controlnet(dit["controlnet"]["sd3"])
    with pytest.raises(
        IncompatibleModelError, match=r"Flux ControlNet of width 128 .*base is SD3, of transformer width 128"
    ):
        mode_pipeline(pipes["sd3"], "t2i", controlnet=flux_cn)
    with pytest.raises(IncompatibleModelError, match=r"SD3 ControlNet .*base is Flux"):
        mode_pipeline(pipes["flux"], "img2img", controlnet=sd3_cn)
    wider = r"ControlNet 2 does not fit the Flux base: its width is 256 \(4 heads x 64\), the base transformer's is 128 "
    with pytest.raises(IncompatibleModelError, match=wider):
        mode_pipeline(pipes["flux"], "t2i", controlnet=[flux_cn, load_controlnet(dit["wide_cn"])])
    sd15_cn = load_controlnet(dit["controlnet"]["sd15"])
    with pytest.raises(
        IncompatibleModelError, match=r"UNet ControlNet \(SD1.5/SDXL, cross-attention dim 32\).*base is Flux"
    ):
        mode_pipeline(pipes["flux"], "t2i", controlnet=sd15_cn)
    with pytest.raises(
        IncompatibleModelError, match=r"Flux ControlNet .*base is a UNet model .*cross-attention dim 32"
    ):
        mode_pipeline(load_pipeline(dit["sd15"]), "t2i", controlnet=flux_cn)


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_sd3_controlnet_only_for_t2i(dit: dict, pipes: dict, mode: str) -> None:
    net = load_controlnet(dit["controlnet"]["sd3"])
    with pytest.raises(IncompatibleModelError, match=f"no SD3 ControlNet pipeline for {mode}"):
        mode_pipeline(pipes["sd3"], mode, controlnet=net)


@pytest.mark.parametrize("fam", FAMILIES)
def test_native_size_is_the_default_call_size(pipes: dict, fam: str) -> None:
    pipe = pipes[fam]
    size = native_size(pipe)
    assert size == {"flux": 128 * 2, "sd3": 32 * 2}[fam]
    assert output_size(pipe, {}) == (size, size)
    assert _call(pipe, num_inference_steps=1).size == (size, size)


def test_dit_image_modes_default_to_the_native_size(pipes: dict) -> None:
    """Flux/SD3 img2img resizes the init image to the native size (it does not take the image's size)."""
    img2img = mode_pipeline(pipes["sd3"], "img2img")
    kwargs = {"image": _image(48), "strength": 0.9}
    assert output_size(img2img, kwargs) == (64, 64)
    assert _call(img2img, **kwargs).size == (64, 64)


def test_flux_rounds_sizes_to_its_packing(pipes: dict) -> None:
    pipe = pipes["flux"]  # factor 2, 2x2 packing: multiples of 4
    assert output_size(pipe, {"height": 30, "width": 34}) == (28, 32)
    assert _call(pipe, height=30, width=34).size == (32, 28)  # PIL: (width, height)


def test_check_call_without_a_unet(pipes: dict) -> None:
    kwargs = {"strength": 0.5, "num_frames": 4}
    assert check_call(pipes["flux"], kwargs) == kwargs
    with pytest.raises(InputError, match="strength 2"):
        check_call(pipes["sd3"], {"strength": 2})


@pytest.mark.parametrize(
    ("keys", "fam"),
    [
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae.decoder.conv_in.weight"], "flux"),
        (["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight"], "flux"),
        (["joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight"], "sd3"),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "first_stage_model.x"], "sd3"),
        (
            [
                "model.diffusion_model.input_blocks.0.0.weight",
                "conditioner.embedders.1.model.ln_final.weight",
            ],
            "sdxl",
        ),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"], "sd15"),
        # an SD3 diffusers-style transformer has transformer_blocks but no single blocks: not Flux
        (["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.add_q_proj.weight"], "sd15"),
    ],
)
def test_single_file_family(keys: list[str], fam: str) -> None:
    assert single_file_family(keys) == fam


@pytest.mark.parametrize("fam", FAMILIES)
def test_single_file_dit_goes_to_its_pipeline(dit: dict, tmp_path: Path, fam: str) -> None:
    """A DiT single file reaches its family's ``from_single_file`` (a one-tensor file: it says what is missing)."""
    key = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight"}[
        fam
    ]
    path = tmp_path / f"{fam}.safetensors"
    save_file({key: torch.zeros(3 * 128, 128)}, str(path))
    name = {"flux": "Flux", "sd3": "SD3"}[fam]
    with pytest.raises(IncompatibleModelError, match=rf"missing in the checkpoint.*full {name} single-file"):
        load_pipeline(path, base_config=str(dit[fam]))
    with pytest.raises(ModelNotAvailableError, match=rf"--base-config .*same family \({name}\)"):
        load_pipeline(path)
