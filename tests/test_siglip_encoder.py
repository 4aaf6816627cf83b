"""SigLIP vision towers behind ImageEncoder (the InstantX Flux / SD3.5 adapters' encoder), and CLIP unchanged.

References: transformers' own SiglipVisionModel outputs on pixels from SiglipImageProcessor.from_pretrained(folder),
exactly what diffusers' SD3 pipeline (hidden_states[-2]) and the InstantX Flux pipeline (pooler_output) compute.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiny_models as tm  # noqa: E402
import torch  # noqa: E402
from helpers import reference_image  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionModelWithProjection,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ipadapter.errors import IncompatibleModelError, InputError  # noqa: E402
from ipadapter.prompt.encoder import PREPROCESSOR_FOLDER, ImageEncoder  # noqa: E402
from ipadapter.sources import _encoder_dim, _hub_preprocessor_folder, load_image_encoder  # noqa: E402

SIZE, PATCH, HIDDEN = 32, 8, 32
PATCHES = (SIZE // PATCH) ** 2  # 16: SigLIP has no class token


def vision_config(**overrides) -> SiglipVisionConfig:
    settings = dict(hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    image_size=SIZE, patch_size=PATCH)  # fmt: skip
    return SiglipVisionConfig(**{**settings, **overrides})


def build_siglip(folder: Path, seed: int = 0, processor: bool = True, **overrides) -> Path:
    torch.manual_seed(seed)
    SiglipVisionModel(vision_config(**overrides)).save_pretrained(folder)
    if processor:
        SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_siglip(tmp_path_factory.mktemp("siglip") / "image_encoder")


@pytest.fixture(scope="module")
def encoder(siglip: Path) -> ImageEncoder:
    return ImageEncoder(load_image_encoder(siglip))


@pytest.fixture(scope="module")
def reference(siglip: Path) -> tuple[SiglipVisionModel, SiglipImageProcessor]:
    """What the reference pipelines load: the model, and SiglipImageProcessor.from_pretrained(encoder folder)."""
    return SiglipVisionModel.from_pretrained(siglip).eval(), SiglipImageProcessor.from_pretrained(siglip)


@torch.no_grad()
def reference_outputs(reference, image: Image.Image):
    model, processor = reference
    pixels = processor(images=image, return_tensors="pt").pixel_values  # the raw image: a squash resize
    return model(pixels, output_hidden_states=True)


def test_loads_a_siglip_vision_model(encoder: ImageEncoder) -> None:
    assert isinstance(encoder.model, SiglipVisionModel)
    assert encoder.kind == "siglip"
    assert (encoder.pooled_dim, encoder.hidden_dim, encoder.image_size) == (HIDDEN, HIDDEN, SIZE)
    assert encoder.feature_dim("pooled") == encoder.feature_dim("hidden") == HIDDEN
    with pytest.raises(AttributeError):
        encoder.kind = "clip"  # read-only


def test_features_match_the_reference_pipelines(encoder: ImageEncoder, reference) -> None:
    image = reference_image(size=(56, 40))  # not square: SigLIP squashes it, it does not crop
    out = reference_outputs(reference, image)
    pooled = encoder.features([image], "pooled")  # the default call (crop "center")
    hidden = encoder.features([image], "hidden")
    assert pooled.shape == (1, HIDDEN) and hidden.shape == (1, PATCHES, HIDDEN)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)  # InstantX Flux
    torch.testing.assert_close(hidden, out.hidden_states[-2], rtol=0, atol=0)  # SD3 encode_image
    assert not torch.equal(hidden, out.hidden_states[-1])  # the penultimate layer, not the last


def test_crop_modes_for_siglip(encoder: ImageEncoder) -> None:
    """center = the processor's own fit (a squash, as the reference) = stretch; pad keeps the aspect ratio."""
    image = reference_image(seed=3, size=(60, 36))
    center = encoder.features([image], "pooled", crop="center")
    torch.testing.assert_close(encoder.features([image], "pooled", crop="stretch"), center, rtol=0, atol=0)
    assert not torch.allclose(encoder.features([image], "pooled", crop="pad"), center)
    assert encoder.pixels([image]).shape == (1, 3, SIZE, SIZE)


def test_preprocessor_config_of_the_folder_is_used(tmp_path: Path) -> None:
    folder = build_siglip(tmp_path / "enc", processor=False)
    image = reference_image(seed=1)
    defaults = ImageEncoder(load_image_encoder(folder)).pixels([image])
    expected = SiglipImageProcessor(size={"height": SIZE, "width": SIZE})(images=image, return_tensors="pt")
    torch.testing.assert_close(defaults, expected.pixel_values, rtol=0, atol=0)

    custom = SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.45, 0.5])
    custom.save_pretrained(folder)
    pixels = ImageEncoder(load_image_encoder(folder)).pixels([image])
    torch.testing.assert_close(pixels, custom(images=image, return_tensors="pt").pixel_values, rtol=0, atol=0)
    assert not torch.allclose(pixels, defaults)

    # a hub-loaded model names its preprocessor folder (its name_or_path is the repo id, without subfolder)
    elsewhere = tmp_path / "hub_snapshot"
    custom.save_pretrained(elsewhere)
    (folder / "preprocessor_config.json").unlink()
    model = load_image_encoder(folder)
    setattr(model, PREPROCESSOR_FOLDER, str(elsewhere))
    torch.testing.assert_close(ImageEncoder(model).pixels([image]), pixels, rtol=0, atol=0)


def test_hub_preprocessor_lookup_offline_is_quiet() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert _hub_preprocessor_folder("nobody/no-such-siglip", "image_encoder") is None


@torch.no_grad()
def test_negative_policies(encoder: ImageEncoder, reference) -> None:
    model, processor = reference
    zeros_pooled = encoder.negative_features("pooled", how="zeros")
    assert torch.equal(zeros_pooled, torch.zeros(HIDDEN))
    zeros_hidden = encoder.negative_features("hidden", how="zeros")  # SD3: torch.zeros_like(image_embeds)
    assert zeros_hidden.shape == encoder.features([reference_image()], "hidden")[0].shape == (PATCHES, HIDDEN)
    assert not zeros_hidden.any()

    # Flux: np.zeros((width, height, 3), uint8) at the generation size, through the processor
    black = processor(
        images=Image.fromarray(np.zeros((64, 48, 3), np.uint8)), return_tensors="pt"
    ).pixel_values
    out = model(black, output_hidden_states=True)
    torch.testing.assert_close(encoder.negative_features("pooled", how="black"), out.pooler_output[0])
    torch.testing.assert_close(encoder.negative_features("hidden", how="black"), out.hidden_states[-2][0])

    default_hidden = model(torch.zeros(1, 3, SIZE, SIZE), output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(encoder.negative_features("hidden"), default_hidden, rtol=0, atol=0)
    assert torch.equal(encoder.negative_features("pooled"), torch.zeros(HIDDEN))
    assert not torch.allclose(default_hidden, out.hidden_states[-2][0])  # normalised zeros != black pixels

    for feature in ("pooled", "hidden"):
        for how in ("default", "zeros", "black"):  # computed once, then the same tensor
            assert encoder.negative_features(feature, how=how) is encoder.negative_features(feature, how=how)
    with pytest.raises(InputError, match="default, zeros, black"):
        encoder.negative_features("hidden", how="gray")


def test_full_siglip_model_folder_loads_its_vision_tower(tmp_path: Path) -> None:
    """google/siglip-so400m-patch14-384 is a whole SiglipModel; the reference loads SiglipVisionModel from it."""
    torch.manual_seed(5)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    full = SiglipModel(SiglipConfig(vision_config=vision_config().to_dict(), text_config=text)).eval()
    full.save_pretrained(tmp_path / "full")
    encoder = ImageEncoder(load_image_encoder(tmp_path / "full"))
    assert encoder.kind == "siglip" and isinstance(encoder.model, SiglipVisionModel)
    image = reference_image(seed=2)
    pixels = SiglipImageProcessor(size={"height": SIZE, "width": SIZE})(images=image, return_tensors="pt")
    with torch.no_grad():
        expected = full.vision_model(pixels.pixel_values).pooler_output
    torch.testing.assert_close(encoder.features([image], "pooled"), expected, rtol=0, atol=0)
    assert _encoder_dim(tmp_path / "full", "pooled") == _encoder_dim(tmp_path / "full", "hidden") == HIDDEN


def test_encoder_dim_reads_siglip_configs(siglip: Path, tmp_path: Path) -> None:
    build_siglip(tmp_path / "wide", hidden_size=48, processor=False)
    assert _encoder_dim(siglip, "pooled") == _encoder_dim(siglip, "hidden") == HIDDEN
    assert _encoder_dim(tmp_path / "wide", "pooled") == 48  # pooled = hidden_size, there is no projection_dim


def test_probe_tells_siglip_encoders_apart(encoder: ImageEncoder, tmp_path: Path) -> None:
    probe = encoder.probe()
    assert probe.shape == (64,) and probe.dtype == torch.float32
    assert torch.equal(probe, encoder.model.head.mlp.fc2.weight.detach().flatten()[:64])
    other = ImageEncoder(load_image_encoder(build_siglip(tmp_path / "other", seed=9)))
    assert not torch.allclose(other.probe(), probe)
    half = ImageEncoder(load_image_encoder(encoder.model.name_or_path, dtype=torch.bfloat16))
    torch.testing.assert_close(half.probe(), probe, rtol=1e-2, atol=1e-3)


def test_siglip_without_head_has_no_pooled_features(tmp_path: Path) -> None:
    encoder = ImageEncoder(load_image_encoder(build_siglip(tmp_path / "headless", vision_use_head=False)))
    assert encoder.features([reference_image()], "hidden").shape == (1, PATCHES, HIDDEN)
    assert encoder.probe().shape == (64,)
    with pytest.raises(IncompatibleModelError, match="no pooling head"):
        encoder.features([reference_image()], "pooled")


@torch.no_grad()
def test_clip_path_unchanged(tmp_path: Path) -> None:
    folder = tm.build_encoder(tmp_path / "clip", tm.VIT_H, seed=1)
    model = load_image_encoder(folder)
    assert isinstance(model, CLIPVisionModelWithProjection)
    encoder = ImageEncoder(model)
    assert encoder.kind == "clip"
    assert (encoder.pooled_dim, encoder.hidden_dim) == (tm.VIT_H["pooled"], tm.VIT_H["hidden"])
    reference = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    image = reference_image(size=(56, 40))
    pixels = CLIPImageProcessor(size=SIZE, crop_size=SIZE)(images=image, return_tensors="pt").pixel_values
    out = reference(pixels, output_hidden_states=True)
    torch.testing.assert_close(encoder.features([image], "pooled"), out.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(encoder.features([image], "hidden"), out.hidden_states[-2], rtol=0, atol=0)
    zeros = reference(torch.zeros(1, 3, SIZE, SIZE), output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(encoder.negative_features("hidden"), zeros, rtol=0, atol=0)
    assert torch.equal(encoder.negative_features("pooled"), torch.zeros(tm.VIT_H["pooled"]))
    assert encoder.negative_features("hidden", how="zeros").shape == (PATCHES + 1, tm.VIT_H["hidden"])
    black = CLIPImageProcessor(size=SIZE, crop_size=SIZE)(
        images=Image.new("RGB", (48, 64)), return_tensors="pt"
    )
    torch.testing.assert_close(
        encoder.negative_features("pooled", how="black"), reference(black.pixel_values).image_embeds[0]
    )
    assert torch.equal(encoder.probe(), reference.visual_projection.weight.flatten()[:64])
    assert _encoder_dim(folder, "pooled") == tm.VIT_H["pooled"]


def test_other_models_are_refused_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "dino"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 32}))
    with pytest.raises(IncompatibleModelError) as caught:
        load_image_encoder(folder)
    message = str(caught.value)
    assert "\n" not in message and "'dinov2'" in message and "SigLIP" in message and "CLIP" in message
    assert _encoder_dim(folder, "pooled") is None

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IncompatibleModelError, match="not a CLIP or SigLIP vision model folder") as caught:
        load_image_encoder(empty)
    assert "\n" not in str(caught.value)
