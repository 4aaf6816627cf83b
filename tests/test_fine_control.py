"""Issue 20's fine control, engine side: embeds scaling and the precise presets against ComfyUI's formulas written
out here, style and composition from two images, unfolded references, noise negatives, tiled references, the
ClipVision enhancer and the encoder's batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from helpers import ckpt, load_pipe, reference_image, run, sixteen_block_pipe

from ipadapter import InputError, attach
from ipadapter.adapter import run as run_adapters
from ipadapter.hosts.attention import IPAttnProcessor, IPBranch
from ipadapter.hosts.unet import block_map, cross_attention_layers
from ipadapter.prompt.blocks import layer_plan
from ipadapter.prompt.conditioning import BranchControl, ImagePrompt, Step
from ipadapter.prompt.controls import EMBEDS_SCALINGS
from ipadapter.prompt.noise import noise_image
from ipadapter.prompt.recipe import Control, Reference
from ipadapter.prompt.recording import InfluenceRecorder
from ipadapter.prompt.tiles import tile_reference

TOL = 2 / 255

# ---------------------------------------------------------------------------------------------------------
# One attention layer: ours against ComfyUI's ipadapter_attention, written out


def _layer(
    inner: int = 64, cross: int = 24, tokens_dim: int = 16, heads: int = 4
) -> tuple[Attention, IPBranch]:
    torch.manual_seed(0)
    attn = Attention(query_dim=inner, cross_attention_dim=cross, heads=heads, dim_head=inner // heads)
    branch = IPBranch(tokens_dim, inner)
    processor = IPAttnProcessor(0)
    processor.add_branch("a", branch)
    attn.set_processor(processor)
    return attn.eval(), branch


def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's optimized_attention: (B, L, inner) in, heads split, SDPA, heads merged."""
    b, d = q.shape[0], q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * d)


def _comfy(
    attn: Attention,
    branch: IPBranch,
    hidden: torch.Tensor,
    text: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    weight: float,
    embeds_scaling: str,
    swap: bool = False,
) -> torch.Tensor:
    """ComfyUI_IPAdapter_plus's CrossAttentionPatch.ipadapter_attention, batch = [uncond, cond] rows."""
    heads = attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(text), attn.to_v(text)
    out = _heads_attention(q, k, v, heads)
    if swap:  # "style transfer precise" / "composition precise" at their swapped blocks
        uncond = cond
        cond = cond * 0
    ip_k = torch.cat([branch.to_k_ip(uncond), branch.to_k_ip(cond)])
    ip_v = torch.cat([branch.to_v_ip(uncond), branch.to_v_ip(cond)])
    if embeds_scaling == "K+mean(V) w/ C penalty":
        w = weight * (float(ip_k.shape[2]) / 1280.0)
        ip_k = ip_k * w
        ip_v_mean = torch.mean(ip_v, dim=1, keepdim=True)
        ip_v = (ip_v - ip_v_mean) + ip_v_mean * w
        out_ip = _heads_attention(q, ip_k, ip_v, heads)
    elif embeds_scaling == "K+V w/ C penalty":
        w = weight * (float(ip_k.shape[2]) / 1280.0)
        out_ip = _heads_attention(q, ip_k * w, ip_v * w, heads)
    elif embeds_scaling == "K+V":
        out_ip = _heads_attention(q, ip_k * weight, ip_v * weight, heads)
    else:
        out_ip = _heads_attention(q, ip_k, ip_v, heads) * weight
    return attn.to_out[1](attn.to_out[0](out + out_ip))


def _ours(
    attn: Attention, hidden: torch.Tensor, text: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, **control: Any
) -> torch.Tensor:  # fmt: skip
    prompt = ImagePrompt({"a": cond}, {"a": uncond}, guidance=True, controls={"a": BranchControl(**control)})
    step = Step(0.5, (4, 4))
    return attn(hidden, encoder_hidden_states=text, image_prompt=prompt, image_prompt_step=step)


@pytest.mark.parametrize("how", EMBEDS_SCALINGS)
@pytest.mark.parametrize("weight", [0.6, 1.7])
def test_embeds_scaling_equals_comfyui(how: str, weight: float) -> None:
    attn, branch = _layer()
    gen = torch.Generator().manual_seed(1)
    hidden, text = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 5, 24, generator=gen)
    cond, uncond = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 4, 16, generator=gen)
    with torch.no_grad():
        expected = _comfy(attn, branch, hidden, text, cond, uncond, weight, how)
        got = _ours(attn, hidden, text, cond, uncond, scale=weight, embeds_scaling=how)
        plain = _ours(attn, hidden, text, cond, uncond, scale=weight)
    assert torch.allclose(got, expected, atol=1e-5), how
    if how != "V only":  # each way of scaling is a different picture
        assert (got - plain).abs().max() > 1e-3


def test_embeds_scaling_at_scale_zero_is_the_model_without_adapter() -> None:
    attn, _ = _layer()
    gen = torch.Generator().manual_seed(2)
    hidden, text = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 5, 24, generator=gen)
    cond, uncond = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 4, 16, generator=gen)
    with torch.no_grad():
        plain = _ours(attn, hidden, text, cond, uncond, scale=0.0)
        for how in EMBEDS_SCALINGS:
            assert torch.equal(_ours(attn, hidden, text, cond, uncond, scale=0.0, embeds_scaling=how), plain)


@pytest.mark.parametrize("how", ["V only", "K+V"])
def test_a_swapped_layer_sends_the_reference_to_the_negative_half(how: str) -> None:
    attn, branch = _layer()
    gen = torch.Generator().manual_seed(3)
    hidden, text = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 5, 24, generator=gen)
    cond, uncond = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 4, 16, generator=gen)
    with torch.no_grad():
        expected = _comfy(attn, branch, hidden, text, cond, uncond, 0.8, how, swap=True)
        got = _ours(attn, hidden, text, cond, uncond, scale=0.8, embeds_scaling=how, swaps=(True,))
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The precise presets' block weights, against ComfyUI's tables written out


def _unet(sdxl: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if sdxl:  # 11 transformer blocks in SDXL's order
        config = dict(
            block_out_channels=(32, 32, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 2),
        )
    else:  # SD1.5's 16
        config = dict(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
    return UNet2DConditionModel(
        norm_num_groups=32, cross_attention_dim=32, attention_head_dim=8, sample_size=8, layers_per_block=2, **config
    )  # fmt: skip


def _comfy_weights(weight_type: str, sdxl: bool, weight: float, boost: float | None) -> tuple[dict, set]:
    """ComfyUI's ipadapter_execute weight dicts for the precise types, and the blocks its attention swaps."""
    if weight_type == "style transfer precise":
        weight_composition = boost if boost is not None else weight
        if sdxl:
            table = {3: weight_composition, 6: weight}
        else:
            table = {0: weight, 1: weight, 2: weight, 3: weight, 4: weight_composition * 0.25, 5: weight_composition,
                     9: weight, 10: weight, 11: weight, 12: weight, 13: weight, 14: weight, 15: weight}  # fmt: skip
        swapped = {3} if sdxl else {4, 5}
    else:
        weight_composition = weight
        weight = boost if boost is not None else weight
        if sdxl:
            table = {0: weight * .1, 1: weight * .1, 2: weight * .1, 3: weight_composition, 4: weight * .1,
                     5: weight * .1, 6: weight, 7: weight * .1, 8: weight * .1, 9: weight * .1, 10: weight * .1}  # fmt: skip
        else:
            table = {0: weight, 1: weight, 2: weight, 3: weight, 4: weight_composition * 0.25, 5: weight_composition,
                     6: weight * .1, 7: weight * .1, 8: weight * .1, 9: weight, 10: weight, 11: weight, 12: weight,
                     13: weight, 14: weight, 15: weight}  # fmt: skip
        swapped = set(range(11 if sdxl else 16)) - ({3} if sdxl else {4, 5})
    return table, swapped


@pytest.mark.parametrize("sdxl", [False, True])
@pytest.mark.parametrize("preset", ["style-precise", "composition-precise"])
@pytest.mark.parametrize("boost", [None, 1.6])
def test_precise_presets_equal_comfyui(sdxl: bool, preset: str, boost: float | None) -> None:
    unet = _unet(sdxl)
    blocks = block_map(unet)
    names = [layer.name for layer in cross_attention_layers(unet)]
    key = "style_boost" if preset == "style-precise" else "composition_boost"
    plan = layer_plan(blocks, names, preset=preset, **{key: boost})
    comfy_type = "style transfer precise" if preset == "style-precise" else "composition precise"
    scale = 0.8
    table, swapped = _comfy_weights(comfy_type, sdxl, scale, boost)
    control = BranchControl(scale=scale, layer_scales=plan.scales, swaps=plan.swaps, boosts=plan.boosts)
    values = control.tensors(torch.device("cpu"))
    for i, name in enumerate(names):
        t = blocks[name].index
        expected = table.get(t, 0.0)
        assert control.layer_scale(i) == pytest.approx(expected), (name, t)
        compiled = values.scale * values.layers[i]  # what a compiled UNet multiplies by
        assert float(compiled) == pytest.approx(expected, abs=1e-6)
        assert plan.swaps[i] == (t in swapped), (name, t)


def test_boosts_need_their_preset_and_a_composition_image_needs_composition_blocks() -> None:
    unet = _unet(sdxl=True)
    names = [layer.name for layer in cross_attention_layers(unet)]
    with pytest.raises(InputError, match="style_boost is the boost of preset 'style-precise'"):
        layer_plan(block_map(unet), names, preset="style", style_boost=1.0)
    plan = layer_plan(block_map(unet), names, composition_image=True)  # default: style+composition
    assert plan.composition == tuple(block_map(unet)[n].index == 3 for n in names)


# ---------------------------------------------------------------------------------------------------------
# On a pipeline whose UNet has SD1.5's 16 transformer blocks


@pytest.fixture(scope="module")
def sd15_16(models: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    pipe, path = sixteen_block_pipe(models, tmp_path_factory.mktemp("sd15_16"))
    return pipe, str(path)


def test_style_and_composition_from_two_images(models: dict, sd15_16: tuple) -> None:
    """The composition image drives t4/t5 at the composition weight, the style image the style blocks: the same
    as two copies of the adapter, one per image, with those blocks' weights."""
    pipe, path = sd15_16
    style, layout = reference_image(), reference_image(seed=9)
    ip = attach(pipe, path, models["vit_h"], name="one")
    try:
        recorder = InfluenceRecorder()
        control = Control(images=[style], composition_image=layout, composition_weight=0.7, scale=0.9)
        got = run(ip, control, influence=recorder)
        maps = recorder.maps()  # the composition image's panel acts in the composition blocks only
        assert maps.panels == ["ip-adapter_16", "ip-adapter_16 · composition"]
        per_block = maps.norms[0].sum(axis=(2, 3))  # (panels, blocks)
        assert set(np.flatnonzero(per_block[1])) == {4, 5} and per_block[0, 4:6].sum() == 0
        alone = run(
            ip, Control(images=[style], preset="style+composition", composition_weight=0.7, scale=0.9)
        )
    finally:
        ip.detach()
    first = attach(pipe, path, models["vit_h"], name="style")
    second = attach(pipe, path, models["vit_h"], name="layout")
    try:
        style_blocks = {f"t{t}": 1.0 for t in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
        expected = run_adapters(
            pipe,
            [
                (first, Control(images=[style], layer_weights=style_blocks, scale=0.9)),
                (second, Control(images=[layout], layer_weights={"t4": 0.25 * 0.7, "t5": 0.7}, scale=0.9)),
            ],
            **_call(),
        ).images
    finally:
        first.detach()
        second.detach()
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - alone).max() > 1e-3  # the composition blocks saw the other image


def test_precise_presets_run_and_differ_from_their_plain_presets(models: dict, sd15_16: tuple) -> None:
    pipe, path = sd15_16
    ip = attach(pipe, path, models["vit_h"])
    try:
        ref = reference_image()
        style = run(ip, Control(images=[ref], preset="style+composition", composition_weight=1.0))
        precise = run(ip, Control(images=[ref], preset="style-precise"))
        boosted = run(ip, Control(images=[ref], preset="style-precise", style_boost=2.0))
        composition = run(ip, Control(images=[ref], preset="composition-precise", composition_boost=0.5))
        assert np.abs(precise - style).max() > 1e-3  # the layout blocks push away instead of towards
        assert np.abs(boosted - precise).max() > 1e-3
        assert np.abs(composition - precise).max() > 1e-3
        with pytest.raises(InputError, match="composition_image .* preset 'style-precise'"):
            run(ip, Control(images=[ref], preset="style-precise", composition_image=ref))
    finally:
        ip.detach()


def _call(**extra: Any) -> dict[str, Any]:
    from helpers import CALL

    return {**CALL, "generator": torch.Generator("cpu").manual_seed(0), **extra}


# ---------------------------------------------------------------------------------------------------------
# Unfolded references, noise negatives, tiles, the enhancer, the encoder's batch size (the tiny 7-block UNet)


@pytest.fixture
def ip(models: dict) -> Any:
    handle = attach(load_pipe(models, "sd15"), ckpt(models, "sd15"), scale=0.8)
    yield handle
    handle.detach()


def _each(ip: Any, control: Control, count: int) -> np.ndarray:
    """``count`` images of one call, image i with its own generator seeded i (as the job engine seeds them)."""
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(count)]
    return ip(control, **{**_call(num_images_per_prompt=count), "generator": gens}).images


def test_unfold_gives_each_image_its_reference_and_repeats_the_last(ip: Any) -> None:
    a, b = reference_image(), reference_image(seed=4)
    got = _each(ip, Control(images=[a, Reference(b, weight=0.5)], unfold_batch=True), 3)
    alone_a = run(ip, Control(images=[a]), seed=0)[0]
    alone_b = [run(ip, Control(images=[Reference(b, weight=0.5)]), seed=s)[0] for s in (1, 2)]
    assert np.abs(got[0] - alone_a).max() <= TOL
    assert np.abs(got[1] - alone_b[0]).max() <= TOL and np.abs(got[2] - alone_b[1]).max() <= TOL
    together = _each(ip, Control(images=[a, b]), 3)
    assert np.abs(together[0] - got[0]).max() > 0.01  # without unfolding, both act on every image
    with pytest.raises(InputError, match="unfold_batch .* combine 'concat'"):
        run(ip, Control(images=[a, b], unfold_batch=True, combine="average"))


def test_unfolded_masks_follow_their_references(ip: Any) -> None:
    from helpers import half_mask

    a, b = reference_image(), reference_image(seed=4)
    refs = [Reference(a, mask=half_mask("left")), Reference(b, mask=half_mask("right"))]
    got = _each(ip, Control(images=refs, unfold_batch=True), 2)
    alone = run(ip, Control(images=[refs[1]]), seed=1)[0]
    assert np.abs(got[1] - alone).max() <= TOL


def test_noise_negative_is_the_noise_image_as_negative_and_follows_its_seed(ip: Any) -> None:
    ref = reference_image()
    size = ip.encoder.image_size
    for kind in ("fade", "dissolve", "gaussian", "shuffle"):
        control = Control(images=[ref], negative_noise=kind, negative_noise_strength=0.6, noise_seed=7)
        expected = run(ip, Control(images=[ref], negative_image=noise_image(kind, 0.6, 7, size=size)))
        assert np.array_equal(run(ip, control), expected), kind
    default = run(ip, Control(images=[ref]))
    other = run(ip, Control(images=[ref], negative_noise="fade", noise_seed=8))
    assert np.abs(other - default).max() > 1e-3
    assert np.abs(other - run(ip, Control(images=[ref], negative_noise="fade", noise_seed=7))).max() > 0
    over = Control(images=[ref], negative_image=reference_image(seed=3), negative_noise="fade", noise_seed=7)
    noisy = noise_image("fade", 1.0, 7, reference_image(seed=3), size=size)
    assert np.array_equal(run(ip, over), run(ip, Control(images=[ref], negative_image=noisy)))


def test_tiled_reference_is_its_tiles_each_on_its_region(ip: Any) -> None:
    wide = reference_image(seed=5, size=(200, 48))
    tiles = tile_reference(wide, None, 0.3)
    assert len(tiles) == 4  # 200x48 -> 1066x256: four tiles along the long side
    got = run(ip, Control(images=[Reference(wide, crop="tiled")], sharpening=0.3))
    explicit = run(ip, Control(images=[Reference(tile, mask=mask) for tile, mask in tiles]))
    assert np.array_equal(got, explicit)
    assert np.abs(got - run(ip, Control(images=[wide]))).max() > 0.01
    with pytest.raises(InputError, match="unfold_batch .* crop 'tiled'"):
        run(ip, Control(images=[Reference(wide, crop="tiled")], unfold_batch=True))


def test_encode_batch_size_equals_one_at_a_time(ip: Any) -> None:
    refs = [reference_image(seed=s) for s in range(5)]
    one = ip.encoder.features(refs, "pooled")
    for size in (2, 5):
        batched = ip.encoder.features(refs, "pooled", batch_size=size)
        assert torch.allclose(batched, one, atol=1e-5)
    picture = run(ip, Control(images=refs, encode_batch_size=2))
    assert np.abs(picture - run(ip, Control(images=refs))).max() <= TOL


def test_enhancer_on_hidden_states_and_its_limits(models: dict, ip: Any) -> None:
    plus = attach(load_pipe(models, "sd15"), ckpt(models, "plus_sd15"), scale=0.8)
    try:
        ref = reference_image(size=(64, 64))
        base = run(plus, Control(images=[ref]))
        enhanced = run(plus, Control(images=[ref], enhance_tiles=2, enhance_ratio=0.5))
        assert np.abs(enhanced - base).max() > 1e-3
        assert np.array_equal(enhanced, run(plus, Control(images=[ref], enhance_tiles=2, enhance_ratio=0.5)))
    finally:
        plus.detach()
    with pytest.raises(InputError, match="square feature size"):  # the basic adapter's pooled 24 values
        run(ip, Control(images=[reference_image()], enhance_tiles=2))


def test_controls_a_family_cannot_use_are_refused_by_name(models: dict, ip: Any, tmp_path: Path) -> None:
    from ipadapter.embedding import embed_reference

    emb = embed_reference(ckpt(models, "sd15"), reference_image(), tmp_path / "e.safetensors").output
    with pytest.raises(InputError, match="crop 'tiled' cuts an image into tiles"):
        run(ip, Control(images=[Reference(embeds=emb, crop="tiled")]))
    with pytest.raises(InputError, match="enhance_tiles encodes tiles"):
        run(ip, Control(images=[Reference(embeds=emb)], enhance_tiles=2))


def test_dit_hosts_take_what_their_math_allows(dit: dict) -> None:
    from ipadapter.pipelines import load_pipeline

    call = dict(prompt="a red cube", height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    flux = load_pipeline(dit["flux"])
    flux.set_progress_bar_config(disable=True)
    ip = attach(flux, dit["xlabs"], dit["clip"], scale=0.8)
    ref = reference_image()

    def image(control: Control) -> np.ndarray:
        out = ip(control, generator=torch.Generator().manual_seed(0), output_type="np", **call)
        return out.images

    plain = image(Control(images=[ref]))
    assert np.abs(image(Control(images=[ref], embeds_scaling="K+V")) - plain).max() > 1e-3
    assert np.abs(image(Control(images=[Reference(ref, crop="tiled")])) - plain).max() > 1e-3
    with pytest.raises(InputError, match="1280, SDXL's widest UNet layer"):
        image(Control(images=[ref], embeds_scaling="K+V w/ C penalty"))
    with pytest.raises(InputError, match="preset 'style-precise' is defined for SD1.5 / SDXL UNet blocks"):
        image(Control(images=[ref], preset="style-precise"))
    with pytest.raises(InputError, match="composition_image"):
        image(Control(images=[ref], composition_image=ref))
    sd3 = load_pipeline(dit["sd3"])
    other = attach(sd3, dit["instantx_sd3"], dit["siglip"])
    for control, word in (
        (Control(images=[ref], unfold_batch=True), "unfold_batch"),
        (Control(images=[Reference(ref, crop="tiled")]), "crop 'tiled'"),
        (Control(images=[ref], embeds_scaling="K+V"), "embeds_scaling"),
    ):
        with pytest.raises(InputError, match=word):
            other(control, **call)


def test_image_options_are_decoded_and_recorded_by_hash_like_the_negative_image(tmp_path: Path) -> None:
    """A composition image reaches the engine decoded (the server sends base64) and is recorded by its hash."""
    import io

    from ipadapter.jobs.options import job_from_options

    def png(seed: int) -> bytes:
        buffer = io.BytesIO()
        reference_image(seed=seed).save(buffer, format="PNG")
        return buffer.getvalue()

    data = {"ref": png(1), "layout": png(2), "neg": png(3)}
    options = {"base": "b", "adapter": "a", "image": "ref", "composition_image": "layout", "negative_image": "neg",
               "negative_noise": "dissolve", "embeds_scaling": "K+V", "unfold_batch": True, "enhance_tiles": 2}  # fmt: skip
    job = job_from_options(options, locate=lambda value, what: data[value], record_paths=False)
    entry = job.recipe.adapters[0]
    assert entry.composition_image.size == entry.negative_image.size == (56, 40)
    recorded = job.record["recipe"]["adapter"][0]
    assert recorded["composition_image"].startswith("sha1:") and recorded["negative_image"].startswith(
        "sha1:"
    )
    assert (recorded["embeds_scaling"], recorded["unfold_batch"], recorded["enhance_tiles"]) == (
        "K+V",
        True,
        2,
    )
    with pytest.raises(InputError, match="unfold_batch"):
        job_from_options({**options, "unfold_batch": "yes"}, locate=lambda value, what: data[value])
    with pytest.raises(InputError, match="enhance_tiles"):
        job_from_options({**options, "enhance_tiles": 2.5}, locate=lambda value, what: data[value])


def test_unfold_spreads_references_over_video_frames(models: dict) -> None:
    """A video's frames take one reference each, as the per-frame list does (a shorter list repeats its last)."""
    from helpers import mode_setup

    pipe, extra = mode_setup(models, "sd15", "video")
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.8)
    a, b = reference_image(), reference_image(seed=4)
    unfolded = run(ip, Control(images=[a, b], unfold_batch=True), **extra)
    per_frame = run(ip, [a, b], **extra)  # the plain API's one reference per frame
    assert np.abs(unfolded - per_frame).max() <= 1e-5
    repeated = run(ip, Control(images=[a], unfold_batch=True), **extra)
    assert np.abs(repeated - run(ip, a, **extra)).max() <= 1e-5


def test_a_job_seeds_its_noise_negative_and_picks_unfolded_references_per_chunk() -> None:
    from ipadapter.jobs.engine import _for_call
    from ipadapter.prompt.recipe import AdapterRecipe

    refs = [reference_image(seed=s) for s in range(2)]
    entry = AdapterRecipe(path="a", images=refs, negative_noise="fade", unfold_batch=True)
    first = _for_call(entry, seed=42, span=(0, 1))
    assert first.noise_seed == 42 and first.images == [entry.images[0]]
    later = _for_call(entry, seed=42, span=(1, 2))  # images 1 and 2: the last reference repeats
    assert later.images == [entry.images[1], entry.images[1]]
    own = _for_call(
        AdapterRecipe(path="a", images=refs, negative_noise="fade", noise_seed=3), seed=42, span=None
    )
    assert own.noise_seed == 3 and [r.path for r in own.images] == refs
