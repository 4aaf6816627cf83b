"""Block map, presets, curves and layer-weight parsing (DESIGN.md §3.2) on tiny real diffusers UNets."""

from __future__ import annotations

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

from ipadapter.errors import IncompatibleModelError, InputError
from ipadapter.hosts.unet import block_map
from ipadapter.prompt.blocks import (
    CURVE_NAMES,
    PRESET_NAMES,
    block_weights,
    describe_blocks,
    layer_scales,
    normalize_layer_weights,
    parse_layer_weights,
)

SD15_STYLE = [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15]
X = "transformer_blocks.0.attn2.processor"


def _unet(**config) -> UNet2DConditionModel:
    torch.manual_seed(0)
    base = dict(
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=8,
        sample_size=8,
        layers_per_block=2,
    )
    return UNet2DConditionModel(**{**base, **config})


def _sd15_unet(layers_per_block: int = 2) -> UNet2DConditionModel:
    return _unet(
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


@pytest.fixture(scope="module")
def sd15() -> UNet2DConditionModel:
    return _sd15_unet()


@pytest.fixture(scope="module")
def sdxl() -> UNet2DConditionModel:
    return _unet(
        block_out_channels=(32, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2),
        use_linear_projection=True,
    )


@pytest.fixture(scope="module")
def small() -> UNet2DConditionModel:
    """7 blocks (t0 down0, t1 down1, t2 mid, t3-4 up0, t5-6 up1): no preset layout."""
    return _unet(
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
    )


def _cross_names(unet) -> list[str]:
    """The cross-attention processor names in attn_processors order (ipadapter.adapter's rule)."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor") and "motion_modules" not in n]


def _by_index(unet) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for name, block in block_map(unet).items():
        out.setdefault(block.index, set()).add(name)
    return out


# --- block map ------------------------------------------------------------------------------------------


def test_sd15_block_map(sd15):
    blocks = block_map(sd15)
    assert list(blocks) == _cross_names(sd15)  # same names, same order
    assert blocks[f"down_blocks.0.attentions.0.{X}"].index == 0
    assert blocks[f"down_blocks.0.attentions.1.{X}"].index == 1
    assert blocks[f"down_blocks.2.attentions.1.{X}"].index == 5
    assert blocks[f"mid_block.attentions.0.{X}"].index == 6
    assert blocks[f"up_blocks.1.attentions.0.{X}"].index == 7
    assert blocks[f"up_blocks.3.attentions.2.{X}"].index == 15
    assert len({b.index for b in blocks.values()}) == 16
    parts = {b.index: b.part for b in blocks.values()}
    assert [parts[t] for t in range(16)] == ["input"] * 6 + ["middle"] + ["output"] * 9
    assert blocks[f"up_blocks.1.attentions.0.{X}"].name == "up_blocks.1.attentions.0"
    assert describe_blocks(block_map(sd15).values()) == (
        "16 transformer blocks: t0-t1 down_blocks.0, t2-t3 down_blocks.1, t4-t5 down_blocks.2, t6 mid_block, "
        "t7-t9 up_blocks.1, t10-t12 up_blocks.2, t13-t15 up_blocks.3"
    )


def test_sdxl_block_map(sdxl):
    blocks = block_map(sdxl)
    by_index = _by_index(sdxl)
    assert sorted(by_index) == list(range(11))
    names = {t: {blocks[n].name for n in ns} for t, ns in by_index.items()}
    assert names[3] == {"down_blocks.2.attentions.1"}  # composition
    assert names[4] == {"mid_block.attentions.0"}
    assert names[6] == {"up_blocks.0.attentions.1"}  # style
    # a block with 2 transformer_blocks: both cross-attentions share t
    assert by_index[3] == {
        "down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor",
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.processor",
    }
    assert describe_blocks(block_map(sdxl).values()) == (
        "11 transformer blocks: t0-t1 down_blocks.1, t2-t3 down_blocks.2, t4 mid_block, t5-t7 up_blocks.0, "
        "t8-t10 up_blocks.1"
    )


def test_motion_unet_excludes_motion_modules():
    unet = _sd15_unet(layers_per_block=1)
    adapter = MotionAdapter(
        block_out_channels=(32, 32, 32, 32),
        motion_layers_per_block=1,
        motion_norm_num_groups=32,
        motion_num_attention_heads=2,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    )
    motion = UNetMotionModel.from_unet2d(unet, adapter)
    assert any("motion_modules" in n and n.endswith("attn2.processor") for n in motion.attn_processors)
    blocks = block_map(motion)
    assert not any("motion_modules" in n for n in blocks)
    assert blocks == block_map(unet)
    assert (
        describe_blocks(block_map(motion).values())
        == describe_blocks(block_map(unet).values())
        == (
            "10 transformer blocks: t0 down_blocks.0, t1 down_blocks.1, t2 down_blocks.2, t3 mid_block, "
            "t4-t5 up_blocks.1, t6-t7 up_blocks.2, t8-t9 up_blocks.3"
        )
    )


# --- block weights ----------------------------------------------------------------------------------------


def _on(n: int, weights: dict[int, float]) -> list[float]:
    return [weights.get(t, 0.0) for t in range(n)]


def test_defaults_all_one():
    assert block_weights(11) == [1.0] * 11


def test_sdxl_presets():
    assert block_weights(11, preset="style") == _on(11, {6: 1.0})
    assert block_weights(11, preset="composition") == _on(11, {3: 1.0})
    assert block_weights(11, preset="style+composition", composition_weight=0.3) == _on(11, {3: 0.3, 6: 1.0})
    assert block_weights(11, preset="strong-style") == _on(11, {t: 1.0 for t in range(11) if t != 3})


def test_sd15_presets():
    assert block_weights(16, preset="style") == _on(16, dict.fromkeys(SD15_STYLE, 1.0))
    assert block_weights(16, preset="composition") == _on(16, {4: 0.25, 5: 1.0})
    assert block_weights(16, preset="style+composition", composition_weight=2.0) == _on(
        16, {**dict.fromkeys(SD15_STYLE, 1.0), 4: 0.5, 5: 2.0}
    )
    assert block_weights(16, preset="strong-style") == _on(16, {t: 1.0 for t in range(16) if t not in (4, 5)})


def test_layer_weights_override_preset_and_unlisted_are_zero():
    assert block_weights(11, layer_weights={"t2": 0.5}) == _on(11, {2: 0.5})
    assert block_weights(11, preset="style", layer_weights={6: 0.4, "3": 0.7}) == _on(11, {3: 0.7, 6: 0.4})


def test_curves():
    n = 10
    ease_in = block_weights(n, curve="ease-in")
    assert ease_in[0] == pytest.approx(1.0)
    assert ease_in[5] == pytest.approx(0.525)
    ease_out = block_weights(n, curve="ease-out")
    assert ease_out[0] == pytest.approx(0.05)
    assert ease_out[5] == pytest.approx(0.525)
    assert block_weights(n, curve="ease-in-out")[5] == pytest.approx(1.0)
    assert block_weights(n, curve="ease-in-out")[0] == pytest.approx(0.05)
    assert block_weights(n, curve="reverse-in-out")[5] == pytest.approx(0.05)
    assert block_weights(n, curve="reverse-in-out")[0] == pytest.approx(1.0)
    # on top of a preset: multiplies the preset's weights
    assert block_weights(11, preset="style", curve="ease-in")[6] == pytest.approx(0.05 + 0.95 * (1 - 6 / 11))
    assert block_weights(11, preset="style", curve="ease-in")[3] == 0.0


def test_part_curves():
    parts = ["input"] * 2 + ["middle"] + ["output"] * 2
    assert block_weights(5, curve="weak-input", parts=parts) == pytest.approx([0.2, 0.2, 1, 1, 1])
    assert block_weights(5, curve="weak-output", parts=parts) == pytest.approx([1, 1, 1, 0.2, 0.2])
    assert block_weights(5, curve="weak-middle", parts=parts) == pytest.approx([1, 1, 0.2, 1, 1])
    assert block_weights(5, curve="strong-middle", parts=parts) == pytest.approx([0.2, 0.2, 1, 0.2, 0.2])
    with pytest.raises(InputError, match="part"):
        block_weights(5, curve="weak-input")
    with pytest.raises(InputError, match="parts"):
        block_weights(5, curve="weak-input", parts=parts[:4])


# --- per-layer expansion ------------------------------------------------------------------------------------


def test_layer_scales(sdxl, sd15):
    names = _cross_names(sdxl)
    assert layer_scales(block_map(sdxl), names) is None
    scales = layer_scales(block_map(sdxl), names, preset="style+composition", composition_weight=0.5)
    blocks = block_map(sdxl)
    assert len(scales) == len(names)
    for name, scale in zip(names, scales, strict=True):
        assert scale == {3: 0.5, 6: 1.0}.get(blocks[name].index, 0.0)
    assert sorted(scales).count(0.5) == 2  # t3's two transformer_blocks get the same value
    # a subset, in the caller's order
    subset = [f"up_blocks.0.attentions.1.{X}", f"down_blocks.2.attentions.1.{X}"]
    assert layer_scales(block_map(sdxl), subset, preset="style+composition", composition_weight=0.5) == (
        1.0,
        0.5,
    )
    # part curve with the UNet's own parts
    sd_names = [
        f"down_blocks.0.attentions.0.{X}",
        f"mid_block.attentions.0.{X}",
        f"up_blocks.3.attentions.2.{X}",
    ]
    assert layer_scales(block_map(sd15), sd_names, curve="weak-middle") == pytest.approx((1.0, 0.2, 1.0))


# --- errors ---------------------------------------------------------------------------------------------------


def test_unknown_preset_and_curve():
    with pytest.raises(InputError) as error:
        block_weights(11, preset="styl")
    assert all(name in str(error.value) for name in PRESET_NAMES)
    with pytest.raises(InputError) as error:
        block_weights(11, curve="linear")
    assert all(name in str(error.value) for name in CURVE_NAMES)


def test_preset_on_other_layout(small):
    names = list(block_map(small))
    with pytest.raises(InputError, match=r"has 7.*layer_weights") as error:
        layer_scales(block_map(small), names, preset="style")
    assert "t2 mid_block" in str(error.value)  # names this UNet's layout
    with pytest.raises(InputError, match="has 7"):
        block_weights(7, preset="composition")
    scales = layer_scales(block_map(small), names, layer_weights={"t2": 0.5})
    assert {n: s for n, s in zip(names, scales, strict=True) if s} == {f"mid_block.attentions.0.{X}": 0.5}


def test_index_out_of_range(sdxl):
    with pytest.raises(InputError, match=r"t11.*t0\.\.t10"):
        block_weights(11, layer_weights={"t11": 1.0})
    with pytest.raises(InputError, match=r"t0\.\.t10.*11 transformer blocks"):
        layer_scales(block_map(sdxl), list(block_map(sdxl)), layer_weights={11: 1.0})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, "0.5"])
def test_bad_composition_weight(value):
    with pytest.raises(InputError, match="composition weight"):
        block_weights(11, preset="style+composition", composition_weight=value)


def test_unknown_layer_name(sdxl):
    with pytest.raises(InputError, match="not a cross-attention processor"):
        layer_scales(
            block_map(sdxl),
            ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"],
            preset="style",
        )


def test_parse_layer_weights():
    assert parse_layer_weights("t3=0.5,t6=1.0") == {3: 0.5, 6: 1.0}
    assert parse_layer_weights(" t3 = 0.5 , 6=1 ") == {3: 0.5, 6: 1.0}
    assert parse_layer_weights("T0=0") == {0: 0.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t3:0.5", "not understood"),
        ("x=1", "not understood"),
        ("t3=", "not understood"),
        ("t3=0.5,", "not understood"),
        ("", "empty"),
        ("t3=abc", "not a number"),
        ("t3=nan", "finite"),
        ("t3=inf", "finite"),
        ("t3=-1", ">= 0"),
        ("t3=0.5, 3=1", "twice"),
    ],
)
def test_parse_layer_weights_errors(text, message):
    with pytest.raises(InputError, match=message) as error:
        parse_layer_weights(text)
    assert "t3=0.5,t6=1.0" in str(error.value)  # shows the expected syntax


def test_normalize_layer_weights():
    assert normalize_layer_weights({"t3": 0.5, "4": 1, 5: 0.0}) == {3: 0.5, 4: 1.0, 5: 0.0}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"t3": True}, "'t3'.*True"),
        ({"t3": "0.5"}, "'t3'.*'0.5'"),
        ({"t3": float("nan")}, "'t3'"),
        ({"t3": -1.0}, "'t3'"),
        ({"x3": 1.0}, "'x3'"),
        ({-1: 1.0}, "-1"),
        ({True: 1.0}, "True"),
        ({"t3": 1.0, 3: 0.5}, "twice"),
    ],
)
def test_normalize_layer_weights_errors(weights, message):
    with pytest.raises(InputError, match=message):
        normalize_layer_weights(weights)


def test_empty_layer_weights_refused():
    with pytest.raises(InputError, match="empty"):
        block_weights(11, layer_weights={})


def test_duck_typed_unet_and_unknown_layout():
    class Fake:
        attn_processors = {
            "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": None,
            "mid_block.attentions.0.transformer_blocks.0.attn2.processor": None,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor": None,  # self-attention: skipped
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": None,
        }

    assert (
        describe_blocks(block_map(Fake()).values())
        == "3 transformer blocks: t0 down_blocks.0, t1 mid_block, t2 up_blocks.0"
    )
    Fake.attn_processors = {"encoder.layers.0.attn2.processor": None}
    with pytest.raises(IncompatibleModelError, match="encoder.layers.0"):
        block_map(Fake())
