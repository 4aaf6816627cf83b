"""The Flux and SD3 hosts against diffusers' own IP-Adapter loading, on tiny random models (DESIGN.md §3.5).

XLabs Flux and InstantX SD3.5 are compared with diffusers' ``load_ip_adapter`` image for image, in every mode;
InstantX Flux, which no library implements, is checked against its published math written out here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from helpers import reference_image  # noqa: E402
from PIL import Image  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter.adapters.info import adapter_info  # noqa: E402
from ipadapter.errors import IncompatibleModelError  # noqa: E402
from ipadapter.pipelines import load_controlnet, load_pipeline, mode_pipeline  # noqa: E402
from ipadapter.prompt.recipe import Control, Reference  # noqa: E402

TOLERANCE = 2 / 255
CALL = dict(prompt="a red cube", height=32, width=32, num_inference_steps=3, max_sequence_length=16)


def _seed() -> torch.Generator:
    """A generator for a call, the global RNG seeded too: the ControlNet pipelines encode the control image with
    ``latent_dist.sample()`` and no generator."""
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


def _ref() -> Image.Image:
    return reference_image()


def _inputs(mode: str, dit: dict, family: str) -> dict:
    """The mode's own pipeline arguments (init image, mask, control image)."""
    init = Image.fromarray((np.random.default_rng(5).random((32, 32, 3)) * 255).astype("uint8"))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    if mode == "img2img":
        return {"image": init, "strength": 0.8}
    if mode == "inpaint":
        return {"image": init, "mask_image": mask, "strength": 0.9}
    if mode == "controlnet":
        return {"control_image": init, "controlnet_conditioning_scale": 0.7}
    return {}


def _reference_pipe(family: str, dit: dict, adapters: list, mode: str) -> object:
    """diffusers' own pipeline with its IP-Adapter loading (the reference)."""
    folder = dit[family]
    if family == "flux":
        pipe = FluxPipeline.from_pretrained(folder)
        pipe.load_ip_adapter(
            [str(p.parent) for p in adapters],
            weight_name=[p.name for p in adapters],
            image_encoder_pretrained_model_name_or_path=str(dit["clip"]),
            image_encoder_dtype=torch.float32,
        )
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
        pipe.load_ip_adapter(
            str(adapters[0].parent),
            weight_name=adapters[0].name,
            image_encoder_folder=str(dit["siglip"]),
            low_cpu_mem_usage=False,
        )
    return _mode(pipe, mode, dit, family)


def _mode(pipe: object, mode: str, dit: dict, family: str) -> object:
    net = load_controlnet(dit[f"{family}_cn"]) if mode == "controlnet" else None
    return mode_pipeline(pipe, "t2i" if mode == "controlnet" else mode, controlnet=net)


def _images(result: object) -> np.ndarray:
    return np.asarray(result.images, dtype=np.float32)


# --------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------


def test_inspect_names_the_three_dit_layouts(dit: dict) -> None:
    xlabs, flux, sd3 = (adapter_info(dit[k]) for k in ("xlabs", "instantx_flux", "instantx_sd3"))
    assert (xlabs["layout"], xlabs["host"], xlabs["base"]) == ("xlabs-flux", "flux", "FLUX.1")
    assert (xlabs["num_tokens"], xlabs["feature"], xlabs["layer_ids"]) == (4, "pooled", (0, 1))
    assert (flux["layout"], flux["host"], flux["encoder_kind"]) == ("instantx-flux", "flux", "siglip")
    assert (flux["num_tokens"], flux["num_layers"]) == (8, 4)
    assert (sd3["layout"], sd3["host"], sd3["feature"]) == ("instantx-sd3", "sd3", "hidden")
    assert sd3["time_resampler"]["num_queries"] == 8 and sd3["problems"] == []


# --------------------------------------------------------------------------------------------------------
# Equality with diffusers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["t2i", "img2img", "inpaint", "controlnet"])
def test_xlabs_flux_equals_diffusers(dit: dict, mode: str) -> None:
    reference = _reference_pipe("flux", dit, [dit["xlabs"]], mode)
    reference.set_ip_adapter_scale(0.7)
    pipe = load_pipeline(dit["flux"])
    ip = ipadapter.attach(pipe, dit["xlabs"], dit["clip"], scale=0.7)
    ours = _mode(pipe, mode, dit, "flux")
    kw = {**CALL, **_inputs(mode, dit, "flux"), "output_type": "np"}
    # true CFG with a negative prompt: diffusers encodes a black image as the negative image prompt
    for extra in ({}, {"negative_prompt": "blurry", "true_cfg_scale": 3.0}):
        want = _images(reference(**kw, **extra, ip_adapter_image=_ref(), generator=_seed()))
        got = _images(ip(_ref(), pipeline=ours, **kw, **extra, generator=_seed()))
        plain = _images(ours(**kw, **extra, generator=_seed()))
        assert np.abs(want - got).max() <= TOLERANCE, (mode, extra)
        assert np.abs(plain - got).max() > 3 * TOLERANCE  # the image prompt did something


@pytest.mark.parametrize("mode", ["t2i", "img2img", "inpaint", "controlnet"])
def test_instantx_sd3_equals_diffusers(dit: dict, mode: str) -> None:
    reference = _reference_pipe("sd3", dit, [dit["instantx_sd3"]], mode)
    reference.set_ip_adapter_scale(0.6)
    pipe = load_pipeline(dit["sd3"])
    ip = ipadapter.attach(pipe, dit["instantx_sd3"], dit["siglip"], scale=0.6)
    ours = _mode(pipe, mode, dit, "sd3")
    kw = {**CALL, **_inputs(mode, dit, "sd3"), "output_type": "np", "guidance_scale": 4.0}
    want = _images(reference(**kw, ip_adapter_image=_ref(), generator=_seed()))
    got = _images(ip(_ref(), pipeline=ours, **kw, generator=_seed()))
    plain = _images(ours(**kw, generator=_seed()))
    assert np.abs(want - got).max() <= TOLERANCE, mode
    assert np.abs(plain - got).max() > 3 * TOLERANCE


def test_two_xlabs_adapters_equal_diffusers_list_form(dit: dict) -> None:
    reference = _reference_pipe("flux", dit, [dit["xlabs"], dit["xlabs2"]], "t2i")
    reference.set_ip_adapter_scale([0.6, 0.9])
    second = Image.fromarray((np.random.default_rng(9).random((40, 48, 3)) * 255).astype("uint8"))
    pipe = load_pipeline(dit["flux"])
    a = ipadapter.attach(pipe, dit["xlabs"], dit["clip"], name="a")
    b = ipadapter.attach(pipe, dit["xlabs2"], dit["clip"], name="b")
    kw = {**CALL, "output_type": "np"}
    want = _images(reference(**kw, ip_adapter_image=[_ref(), second], generator=_seed()))
    entries = [
        (a, Control(images=[Reference(path=_ref())], scale=0.6)),
        (b, Control(images=[Reference(path=second)], scale=0.9)),
    ]
    got = _images(ipadapter.run(pipe, entries, **kw, generator=_seed()))
    assert np.abs(want - got).max() <= TOLERANCE


# --------------------------------------------------------------------------------------------------------
# InstantX Flux: its published math, written out on one block
# --------------------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def test_instantx_flux_double_and_single_block_follow_the_published_math(dit: dict) -> None:
    pipe = load_pipeline(dit["flux"])
    model = pipe.transformer
    ip = ipadapter.attach(pipe, dit["instantx_flux"], dit["siglip"], scale=0.8)
    ckpt = torch.load(dit["instantx_flux"], weights_only=True)
    tokens = ip.tokens(_ref())[0]  # (1, 8, 32)
    prompt = ip.image_prompt(_ref())
    from ipadapter.prompt.conditioning import Step

    step = Step(0.5, (0, 0), negative=False)
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 16, 128, generator=gen)  # 16 image positions, inner 128
    text = torch.randn(1, 5, 128, generator=gen)
    for index, path in ((0, "transformer_blocks.0.attn"), (2, "single_transformer_blocks.0.attn")):
        attn = model.get_submodule(path)
        processor = attn.processor
        with torch.no_grad():
            if index == 0:
                got, _ = processor(attn, image, text, image_prompt=prompt, image_prompt_step=step)
                plain, _ = processor(attn, image, text)
                hidden = image
            else:
                joined = torch.cat([text, image], dim=1)
                got = processor(attn, joined, image_prompt=prompt, image_prompt_step=step)
                plain = processor(attn, joined)
                hidden = joined
            # q: the layer's own normalised query (before RoPE); K/V: tokens -> to_k_ip / to_v_ip -> RMS per head
            heads = attn.heads
            q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (heads, -1))).transpose(1, 2)
            k = _rms(
                (tokens @ ckpt["ip_adapter"][f"{index}.to_k_ip.weight"].T)
                .unflatten(-1, (heads, -1))
                .transpose(1, 2)
            )
            v = _rms(
                (tokens @ ckpt["ip_adapter"][f"{index}.to_v_ip.weight"].T)
                .unflatten(-1, (heads, -1))
                .transpose(1, 2)
            )
            ip_out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            # added before to_out (a linear map: the difference is to_out's weight times 0.8 * ip_out); single
            # blocks have no to_out of their own: the difference is 0.8 * ip_out itself
            expected = F.linear(0.8 * ip_out, attn.to_out[0].weight) if index == 0 else 0.8 * ip_out
            assert torch.allclose(got - plain, expected, atol=1e-5), path


@pytest.mark.parametrize(
    ("adapter", "encoder", "family"),
    [("xlabs", "clip", "flux"), ("instantx_flux", "siglip", "flux"), ("instantx_sd3", "siglip", "sd3")],
)
def test_scale_zero_is_the_model_and_detach_restores_it(
    dit: dict, adapter: str, encoder: str, family: str
) -> None:
    pipe = load_pipeline(dit[family])
    kw = {**CALL, "output_type": "np"}
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    processors = dict(pipe.transformer.attn_processors)
    base = _images(pipe(**kw, generator=_seed()))
    ip = ipadapter.attach(pipe, dit[adapter], dit[encoder], scale=0.0)
    zero = _images(ip(_ref(), **kw, generator=_seed()))
    assert np.array_equal(zero, base)  # scale 0: bit-identical to no adapter
    ip.set_scale(0.9)
    moved = _images(ip(_ref(), **kw, generator=_seed()))
    assert np.abs(moved - base).max() > 3 * TOLERANCE
    ip.detach()
    assert dict(pipe.transformer.attn_processors) == processors
    after = pipe.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert np.array_equal(_images(pipe(**kw, generator=_seed())), base)


def test_xlabs_and_instantx_together_on_one_flux(dit: dict) -> None:
    pipe = load_pipeline(dit["flux"])
    kw = {**CALL, "output_type": "np"}
    a = ipadapter.attach(pipe, dit["xlabs"], dit["clip"], name="xlabs", scale=0.7)
    b = ipadapter.attach(pipe, dit["instantx_flux"], dit["siglip"], name="instantx", scale=2.0)
    both = _images(ipadapter.run(pipe, [(a, Control(images=[Reference(path=_ref())])), (b, Control(images=[Reference(path=_ref())]))], **kw, generator=_seed()))  # fmt: skip
    only_a = _images(a(_ref(), **kw, generator=_seed()))
    b.detach()
    alone = _images(a(_ref(), **kw, generator=_seed()))
    assert np.array_equal(only_a, alone)  # the InstantX adapter idles when its tokens are not in the call
    assert np.abs(both - alone).max() > 3 * TOLERANCE
    a.detach()


# --------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------


def test_adapter_of_another_family_is_refused_in_one_line(dit: dict, models: dict) -> None:
    flux = load_pipeline(dit["flux"])
    with pytest.raises(IncompatibleModelError, match=r"xlabs-flux adapter made for Flux.*UNet") as err:
        ipadapter.attach(load_pipeline(models["sd15"]), dit["xlabs"], dit["clip"])
    assert "\n" not in str(err.value)
    with pytest.raises(IncompatibleModelError, match=r"made for SD3.5.*Flux transformer"):
        ipadapter.attach(flux, dit["instantx_sd3"], dit["siglip"])
    with pytest.raises(IncompatibleModelError, match=r"made for an SD UNet.*Flux transformer"):
        ipadapter.attach(flux, models["ckpt"]["sd15", "safetensors"], models["vit_h"])
    with pytest.raises(IncompatibleModelError, match=r"needs 32-dim pooled.*gives 24-dim"):
        ipadapter.attach(flux, dit["instantx_flux"], dit["clip"])
    assert ipadapter.attached(flux) == {}


# --------------------------------------------------------------------------------------------------------
# Controls on the DiT hosts
# --------------------------------------------------------------------------------------------------------


def test_flux_per_block_weights_and_negative_image_equal_diffusers(dit: dict) -> None:
    """Per-block weights are diffusers' per-block scale list; a negative image is its negative_ip_adapter_image."""
    reference = _reference_pipe("flux", dit, [dit["xlabs"]], "t2i")
    reference.set_ip_adapter_scale([0.9, 0.0])
    negative = Image.fromarray((np.random.default_rng(11).random((32, 32, 3)) * 255).astype("uint8"))
    pipe = load_pipeline(dit["flux"])
    ip = ipadapter.attach(pipe, dit["xlabs"], dit["clip"])
    kw = {**CALL, "output_type": "np", "negative_prompt": "blurry", "true_cfg_scale": 3.0}
    want = _images(
        reference(**kw, ip_adapter_image=_ref(), negative_ip_adapter_image=negative, generator=_seed())
    )
    control = Control(
        images=[Reference(path=_ref())],
        scale=0.9,
        layer_weights={"t0": 1.0, "t1": 0.0},
        negative_image=negative,
    )
    got = _images(ipadapter.run(pipe, [(ip, control)], **kw, generator=_seed()))
    assert np.abs(want - got).max() <= TOLERANCE


def test_flux_step_window_and_embeddings_file(dit: dict, tmp_path) -> None:  # noqa: ANN001
    pipe = load_pipeline(dit["flux"])
    kw = {**CALL, "output_type": "np"}
    base = _images(pipe(**kw, generator=_seed()))
    ip = ipadapter.attach(pipe, dit["instantx_flux"], dit["siglip"], scale=0.9)
    full = _images(ip(_ref(), **kw, generator=_seed()))
    whole = _images(
        ipadapter.run(pipe, [(ip, Control(images=[Reference(path=_ref())]))], **kw, generator=_seed())
    )
    assert np.array_equal(full, whole)
    # progress = 1 - sigma: three steps sit at progress 0, 1/3 and 2/3; a window after them all never acts
    late = Control(images=[Reference(path=_ref())], start=0.9, end=1.0)
    assert np.array_equal(_images(ipadapter.run(pipe, [(ip, late)], **kw, generator=_seed())), base)
    early = Control(images=[Reference(path=_ref())], start=0.0, end=0.5)
    first = _images(ipadapter.run(pipe, [(ip, early)], **kw, generator=_seed()))
    assert not np.array_equal(first, base) and not np.array_equal(first, full)
    # an embeddings file made from the reference gives the reference's picture, without the encoder
    from ipadapter.embedding import embed_reference

    saved = embed_reference(
        dit["instantx_flux"], _ref(), tmp_path / "ref.safetensors", image_encoder=dit["siglip"], device="cpu"
    )
    from_file = Control(images=[Reference(embeds=saved.output)])
    assert (
        np.abs(_images(ipadapter.run(pipe, [(ip, from_file)], **kw, generator=_seed())) - full).max() <= 1e-5
    )


def test_controls_a_dit_cannot_honour_are_refused_by_name(dit: dict) -> None:
    from ipadapter.errors import InputError

    flux, sd3 = load_pipeline(dit["flux"]), load_pipeline(dit["sd3"])
    ip = ipadapter.attach(flux, dit["xlabs"], dit["clip"])
    with pytest.raises(
        InputError, match="preset 'style' is defined for SD1.5 / SDXL UNet blocks.*t0-t1 double"
    ):
        ipadapter.run(flux, [(ip, Control(images=[Reference(path=_ref())], preset="style"))], **CALL)
    with pytest.raises(InputError, match="curve 'weak-input' weakens UNet parts"):
        ipadapter.run(flux, [(ip, Control(images=[Reference(path=_ref())], curve="weak-input"))], **CALL)
    sd = ipadapter.attach(sd3, dit["instantx_sd3"], dit["siglip"])
    mask = Image.new("L", (32, 32), 255)
    with pytest.raises(InputError, match="regional masks cannot work with the SD3.5 adapter: its resampler"):
        ipadapter.run(sd3, [(sd, Control(images=[Reference(path=_ref(), mask=mask)]))], **CALL)
    two = [Reference(path=_ref(), weight=1.0), Reference(path=_ref(), weight=0.5)]
    with pytest.raises(InputError, match="reference weights .* not supported by the SD3.5 adapter.*average"):
        ipadapter.run(sd3, [(sd, Control(images=two))], **CALL)
    out = ipadapter.run(sd3, [(sd, Control(images=two, combine="average"))], **CALL, output_type="np")
    assert np.isfinite(_images(out)).all()


def test_flux_regional_masks_act_inside_their_region_only(dit: dict) -> None:
    """A masked reference's contribution, per image token, is the unmasked one times the mask on the token grid;
    outside the region, and on a single block's text tokens, it is zero."""
    from ipadapter.prompt.conditioning import Step

    pipe = load_pipeline(dit["flux"])
    ip = ipadapter.attach(pipe, dit["instantx_flux"], dit["siglip"], scale=0.8)
    left = Image.new("L", (32, 32), 0)
    left.paste(255, (0, 0, 16, 32))
    masked = ip.image_prompt(Control(images=[Reference(path=_ref(), mask=left)]), output_size=(32, 32))
    whole = ip.image_prompt(Control(images=[Reference(path=_ref())]), output_size=(32, 32))
    step = Step(0.5, (16, 16), negative=False, text_tokens=5)  # a 32 px image: 16 x 16 latents, 8 x 8 tokens
    gen = torch.Generator().manual_seed(4)
    image, text = torch.randn(1, 64, 128, generator=gen), torch.randn(1, 5, 128, generator=gen)
    grid = masked.mask_rows(ip.name, 0, 64, step, image)[0, :, 0].reshape(8, 8)
    assert grid[:, :3].min() > 0.9 and grid[:, 5:].abs().max() < 0.1  # the left half of the token grid
    model = pipe.transformer
    with torch.no_grad():
        attn = model.get_submodule("transformer_blocks.0.attn")
        plain = attn.processor(attn, image, text)[0]
        inside = attn.processor(attn, image, text, image_prompt=masked, image_prompt_step=step)[0] - plain
        full = attn.processor(attn, image, text, image_prompt=whole, image_prompt_step=step)[0] - plain
        # double block: the branch is added before to_out, a linear map: masking commutes with it per token
        assert torch.allclose(inside, full * grid.reshape(1, 64, 1), atol=1e-5)
        attn = model.get_submodule("single_transformer_blocks.0.attn")
        joined = torch.cat([text, image], dim=1)
        plain = attn.processor(attn, joined)
        inside = attn.processor(attn, joined, image_prompt=masked, image_prompt_step=step) - plain
        full = attn.processor(attn, joined, image_prompt=whole, image_prompt_step=step) - plain
        assert inside[:, :5].abs().max() == 0  # text tokens: not on the image, never in a region
        assert torch.allclose(inside[:, 5:], full[:, 5:] * grid.reshape(1, 64, 1), atol=1e-5)
        assert full[:, :5].abs().max() > 0  # without a mask the text tokens do get the image prompt
    # through the pipeline, for both Flux layouts (XLabs' branch joins the block after its feed-forward)
    kw = {**CALL, "output_type": "np"}
    xlabs = ipadapter.attach(pipe, dit["xlabs"], dit["clip"], name="xlabs", scale=0.8)
    for adapter in (ip, xlabs):
        regional = _images(ipadapter.run(pipe, [(adapter, Control(images=[Reference(path=_ref(), mask=left)]))], **kw, generator=_seed()))  # fmt: skip
        everywhere = _images(ipadapter.run(pipe, [(adapter, Control(images=[Reference(path=_ref())]))], **kw, generator=_seed()))  # fmt: skip
        assert np.isfinite(regional).all() and not np.array_equal(regional, everywhere)
