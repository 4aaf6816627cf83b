from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import tiny_models as tm  # noqa: E402
import torch  # noqa: E402
from helpers import reference_image  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny pipelines, encoders and every variant's checkpoint in both formats, saved once per session.

    Also: ``sd15_inpaint`` (9-channel UNet), ``controlnet[base]`` folders, ``motion`` (motion adapter folder).
    Encoders sit where the h94/IP-Adapter layout puts them (models/image_encoder = ViT-H-like,
    sdxl_models/image_encoder = bigG-like), so default encoder discovery is exercised too.
    """
    root = tmp_path_factory.mktemp("tiny")
    out = {
        "root": root,
        "sd15": tm.build_sd15(root / "sd15"),
        "sdxl": tm.build_sdxl(root / "sdxl"),
        "vit_h": tm.build_encoder(root / "repo" / "models" / "image_encoder", tm.VIT_H, seed=1),
        "big_g": tm.build_encoder(root / "repo" / "sdxl_models" / "image_encoder", tm.BIG_G, seed=2),
        "ckpt": {},
    }
    # Issue 3's modes: a 9-channel inpainting base, a ControlNet per base family, a motion adapter
    out["sd15_inpaint"] = tm.build_sd15(root / "sd15_inpaint", in_channels=9)
    out["controlnet"] = {
        base: tm.build_controlnet(root / f"controlnet_{base}", out[base]) for base in ("sd15", "sdxl")
    }
    out["motion"] = tm.build_motion_adapter(root / "motion_adapter")
    for variant, (_, base, _) in tm.VARIANTS.items():
        folder = root / "repo" / ("models" if base == "sd15" else "sdxl_models")
        for fmt in ("bin", "safetensors"):
            out["ckpt"][variant, fmt] = tm.save_variant(folder, variant, fmt)
    return out


@pytest.fixture(scope="session")
def ref_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default reference image (helpers.reference_image()) saved as a PNG file."""
    path = tmp_path_factory.mktemp("ref") / "ref.png"
    reference_image().save(path)
    return path


@pytest.fixture(scope="session")
def dit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny Flux and SD3 pipelines (tests/dit_models.py), their ControlNets, a CLIP and a SigLIP encoder, and
    checkpoints in the three DiT adapter layouts (tests/dit_checkpoints.py), saved once per session."""
    import dit_checkpoints as dc  # the DiT builders: only sessions that use them pay for the imports
    import dit_models as dm

    root = tmp_path_factory.mktemp("dit")
    out = {
        "flux": dm.build_flux(root / "flux"),
        "sd3": dm.build_sd3(root / "sd3"),
        "clip": tm.build_encoder(root / "clip", tm.VIT_H, seed=1),
        "siglip": dc.build_siglip(root / "siglip"),
        "flux_cn": dm.build_flux_controlnet(root / "flux_cn"),
        "sd3_cn": dm.build_sd3_controlnet(root / "sd3_cn"),
    }
    (root / "ckpt").mkdir()
    out["xlabs"] = dc.xlabs_flux(root / "ckpt" / "xlabs.safetensors")
    out["xlabs2"] = dc.xlabs_flux(root / "ckpt" / "xlabs2.safetensors", seed=13)
    out["instantx_flux"] = dc.instantx_flux(root / "ckpt" / "ip-adapter.bin")
    out["instantx_sd3"] = dc.instantx_sd3(root / "ckpt" / "sd3-ip-adapter.safetensors")
    return out
