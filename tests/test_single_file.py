"""Single-file bases: an original-layout ("LDM") .safetensors checkpoint with ``--base-config``.

The checkpoints are written from the tiny diffusers pipelines by ``ldm_export``; loading them back must
give the very same weights, and generating from one must give the same image as from the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import pipeline_class
from ldm_export import SDXL_OPENCLIP_PREFIX, export_single_file
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ipadapter.cli import main
from ipadapter.errors import IncompatibleModelError, ModelNotAvailableError
from ipadapter.pipelines import SDXL_SINGLE_FILE_KEY, load_pipeline

BASES = ("sd15", "sdxl")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def single_files(models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """base -> (diffusers folder, single-file checkpoint written from it)."""
    root = tmp_path_factory.mktemp("single_file")
    return {
        base: (models[base], export_single_file(models[base], root / f"{base}.safetensors")) for base in BASES
    }


def _assert_same_weights(loaded: DiffusionPipeline, original: DiffusionPipeline) -> None:
    for name in COMPONENTS:
        want = getattr(original, name, None)
        if want is None:
            assert getattr(loaded, name, None) is None, name
            continue
        got_state, want_state = getattr(loaded, name).state_dict(), want.state_dict()
        assert got_state.keys() == want_state.keys(), name
        differ = [k for k, v in want_state.items() if not torch.equal(got_state[k], v)]
        assert not differ, f"{name}: {differ[:5]}"


def test_export_uses_original_layout(single_files: dict) -> None:
    with safe_open(str(single_files["sd15"][1]), framework="pt") as f:
        sd15 = set(f.keys())
        vae_q = f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
    with safe_open(str(single_files["sdxl"][1]), framework="pt") as f:
        sdxl = set(f.keys())
        proj = f.get_tensor(SDXL_OPENCLIP_PREFIX + "text_projection")
        qkv = f.get_tensor(SDXL_OPENCLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight")
    # layers_per_block=1: up block 0 = output slots 0, 1 (its upsampler after the attention, at .2)
    assert {"model.diffusion_model.output_blocks.3.0.skip_connection.weight",
            "model.diffusion_model.output_blocks.1.2.conv.weight",
            "model.diffusion_model.input_blocks.2.0.op.weight"} <= sd15  # fmt: skip
    assert vae_q.shape == (64, 64, 1, 1)  # 1x1 convolutions in the original VAE attention
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd15
    assert SDXL_SINGLE_FILE_KEY not in sd15 and SDXL_SINGLE_FILE_KEY in sdxl
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert "model.diffusion_model.output_blocks.1.2.conv.weight" in sdxl  # up block 0 has attentions
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl
    assert proj.shape == (48, 32) and qkv.shape == (3 * 48, 48)
    assert not any(k.startswith(("unet.", "vae.", "text_encoder")) for k in sd15 | sdxl)


@pytest.mark.parametrize("base", BASES)
def test_single_file_loads_the_same_weights(single_files: dict, base: str) -> None:
    folder, file = single_files[base]
    pipe = load_pipeline(file, base_config=str(folder))
    assert type(pipe) is pipeline_class(base)
    _assert_same_weights(pipe, pipeline_class(base).from_pretrained(folder))


def test_incomplete_single_file_is_refused(single_files: dict, tmp_path: Path) -> None:
    """A UNet-only file (or anything diffusers can't fill a component from) is one clear error."""
    folder, file = single_files["sd15"]
    with safe_open(str(file), framework="pt") as f:
        unet_only = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    with pytest.raises(IncompatibleModelError, match="unet_only.safetensors"):
        load_pipeline(tmp_path / "unet_only.safetensors", base_config=str(folder))


@pytest.mark.parametrize("base", BASES)
def test_single_file_without_config_is_unavailable_offline(
    single_files: dict, base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty cache: the message must not depend on what this machine happens to have downloaded.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotAvailableError, match="--base-config") as info:
        load_pipeline(single_files[base][1])
    assert str(single_files[base][1]) in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


@pytest.mark.parametrize("base", BASES)
def test_cli_single_file_matches_folder(
    models: dict, single_files: dict, ref_png: Path, tmp_path: Path, base: str
) -> None:
    folder, file = single_files[base]

    def generate(out: Path, *base_args: str) -> np.ndarray:
        argv = ["generate", *base_args, "--adapter", str(models["ckpt"][base, "safetensors"]), "--image", str(ref_png),
                "--prompt", "a cat", "--steps", "2", "--seed", "0", "--width", "32", "--height", "32",
                "--device", "cpu", "--output", str(out)]  # fmt: skip
        assert main(argv) == 0
        return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)

    ours = generate(tmp_path / "single.png", "--base", str(file), "--base-config", str(folder))
    want = generate(tmp_path / "folder.png", "--base", str(folder))
    assert ours.shape == (32, 32, 3)
    assert np.abs(ours - want).max() <= 2
    assert json.loads(Image.open(tmp_path / "single.png").text["parameters"])["base"] == str(file)


def test_inpainting_single_file_loads_with_its_config_and_needs_it(models: dict, tmp_path: Path) -> None:
    from ipadapter.pipelines import load_pipeline, mode_pipeline

    path = export_single_file(models["sd15_inpaint"], tmp_path / "inpainting.safetensors")
    pipe = load_pipeline(path, base_config=str(models["sd15_inpaint"]))
    assert pipe.unet.config.in_channels == 9
    assert type(mode_pipeline(pipe, "inpaint")).__name__ == "StableDiffusionInpaintPipeline"
    with pytest.raises(IncompatibleModelError, match=r"inpainting checkpoint \(9 input channels\)"):
        load_pipeline(path, base_config=str(models["sd15"]))
