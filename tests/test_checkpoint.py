"""Checkpoint reading, variant detection and conversion (no models run here)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from safetensors.torch import save_file

from ipadapter import Checkpoint, CheckpointError, detect, load_checkpoint, save_checkpoint
from ipadapter.cli import main

EXPECTED = {  # variant -> (layout, tokens, feature, feature dim, cross dim, layers)
    "sd15": ("basic", 4, "pooled", 24, 32, 7),
    "plus_sd15": ("plus", 8, "hidden", 32, 32, 7),
    "full-face_sd15": ("full-face", None, "hidden", 32, 32, 7),
    "sdxl": ("basic", 4, "pooled", 40, 64, 4),
    "sdxl_vit-h": ("basic", 4, "pooled", 24, 64, 4),
    "plus_sdxl_vit-h": ("plus", 8, "hidden", 32, 64, 4),
}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", list(EXPECTED))
def test_detects_every_tiny_variant_in_both_formats(models: dict, variant: str, fmt: str) -> None:
    spec = detect(load_checkpoint(models["ckpt"][variant, fmt]))
    layout, tokens, feature, feature_dim, cross, layers = EXPECTED[variant]
    assert (spec.layout, spec.num_tokens, spec.feature) == (layout, tokens, feature)
    assert (spec.feature_dim, spec.cross_attention_dim, spec.num_layers) == (feature_dim, cross, layers)
    assert spec.layer_ids == tuple(range(1, 2 * layers, 2))
    assert spec.hidden_sizes == tm.layer_sizes(tm.VARIANTS[variant][1])
    if layout == "plus":
        r = spec.resampler
        assert (r.dim, r.depth, r.heads, r.dim_head, r.num_queries, r.ff_mult) == (32, 4, 1, 64, 8, 4)


def test_both_formats_hold_the_same_tensors(models: dict) -> None:
    a = load_checkpoint(models["ckpt"]["plus_sd15", "bin"])
    b = load_checkpoint(models["ckpt"]["plus_sd15", "safetensors"])
    assert a.flat().keys() == b.flat().keys()
    assert all(torch.equal(a.flat()[k], b.flat()[k]) for k in a.flat())


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def _official(
    layout: str, cross: int, feature_dim: int, hidden: tuple[int, ...], heads: int = 12
) -> Checkpoint:
    """Official-size shapes (meta tensors: no memory) as DESIGN.md §3.1 lists them."""
    if layout == "basic":
        proj = {"proj.weight": _meta(4 * cross, feature_dim), "proj.bias": _meta(4 * cross), "norm.weight": _meta(cross),
                "norm.bias": _meta(cross)}  # fmt: skip
    elif layout == "full-face":
        proj = {"proj.0.weight": _meta(feature_dim, feature_dim), "proj.0.bias": _meta(feature_dim),
                "proj.2.weight": _meta(cross, feature_dim), "proj.2.bias": _meta(cross), "proj.3.weight": _meta(cross),
                "proj.3.bias": _meta(cross)}  # fmt: skip
    else:
        dim = 64 * heads
        proj = {"latents": _meta(1, 16, dim), "proj_in.weight": _meta(dim, feature_dim), "proj_in.bias": _meta(dim),
                "proj_out.weight": _meta(cross, dim), "proj_out.bias": _meta(cross), "norm_out.weight": _meta(cross),
                "norm_out.bias": _meta(cross)}  # fmt: skip
        for i in range(4):
            proj |= {f"layers.{i}.0.to_q.weight": _meta(dim, dim), f"layers.{i}.0.to_kv.weight": _meta(2 * dim, dim),
                     f"layers.{i}.0.to_out.weight": _meta(dim, dim), f"layers.{i}.1.1.weight": _meta(4 * dim, dim),
                     f"layers.{i}.1.3.weight": _meta(dim, 4 * dim)}  # fmt: skip
    ip = {}
    for k, h in enumerate(hidden):
        ip |= {f"{2 * k + 1}.to_k_ip.weight": _meta(h, cross), f"{2 * k + 1}.to_v_ip.weight": _meta(h, cross)}
    return Checkpoint(proj, ip, source="official-shapes")


SD15_HIDDEN = (320,) * 4 + (640,) * 4 + (1280,) * 4 + (1280,) * 3 + (640,) * 3 + (320,) * 3 + (1280,)
SDXL_HIDDEN = (640,) * 4 + (1280,) * 40 + (1280,) * 30 + (640,) * 6 + (1280,) * 10  # 70 layers


@pytest.mark.parametrize(
    "layout,cross,feature_dim,hidden,heads,names,encoder,tokens",
    [
        ("basic", 768, 1024, SD15_HIDDEN[:16], 12, ("ip-adapter_sd15", "ip-adapter_sd15_light"), "ViT-H/14", 4),
        ("basic", 2048, 1280, SDXL_HIDDEN[:70], 12, ("ip-adapter_sdxl",), "ViT-bigG/14", 4),
        ("basic", 2048, 1024, SDXL_HIDDEN[:70], 12, ("ip-adapter_sdxl_vit-h",), "ViT-H/14", 4),
        ("plus", 768, 1280, SD15_HIDDEN[:16], 12, ("ip-adapter-plus_sd15", "ip-adapter-plus-face_sd15"), "ViT-H/14", 16),
        ("plus", 2048, 1280, SDXL_HIDDEN[:70], 20, ("ip-adapter-plus_sdxl_vit-h", "ip-adapter-plus-face_sdxl_vit-h"),
         "ViT-H/14", 16),
        ("full-face", 768, 1280, SD15_HIDDEN[:16], 12, ("ip-adapter-full-face_sd15",), "ViT-H/14", None),
    ],
)  # fmt: skip
def test_official_shapes_get_official_names(
    layout, cross, feature_dim, hidden, heads, names, encoder, tokens
) -> None:
    spec = detect(_official(layout, cross, feature_dim, hidden, heads))
    assert spec.names == names and spec.encoder == encoder and spec.num_tokens == tokens
    assert spec.num_layers == len(hidden) and spec.base == ("SD1.5" if cross == 768 else "SDXL")
    if layout == "plus":
        assert (
            spec.resampler.heads == heads and spec.resampler.depth == 4 and spec.resampler.dim == 64 * heads
        )


def test_faceid_is_recognised_and_supported() -> None:  # the FaceID family: tests/test_faceid_projection.py
    ckpt = Checkpoint(
        {"proj.0.weight": _meta(1024, 512), "proj.0.bias": _meta(1024), "proj.2.weight": _meta(3072, 1024),
         "proj.2.bias": _meta(3072), "norm.weight": _meta(768), "norm.bias": _meta(768)},
        {"1.to_k_ip.weight": _meta(320, 768), "1.to_v_ip.weight": _meta(320, 768)},
    )  # fmt: skip
    spec = detect(ckpt)
    assert spec.layout == "faceid" and spec.supported and spec.num_tokens == 4 and spec.feature == "face"
    assert spec.lora_rank is None and spec.names == ("ip-adapter-faceid_sd15",)


def _write(path: Path, tensors: dict) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "tensors,needle",
    [
        ({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, "looks like a LoRA"),
        (
            {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)},
            "full Stable Diffusion checkpoint",
        ),
        ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, "diffusers UNet weights"),
        ({"image_proj.proj.weight": torch.zeros(8, 4)}, "no 'ip_adapter' tensors"),
    ],
)
def test_non_adapter_files_are_refused_with_what_was_found(
    tmp_path: Path, tensors: dict, needle: str
) -> None:
    path = _write(tmp_path / "thing.safetensors", tensors)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and needle in str(err.value) and "expected" in str(err.value)


def test_inconsistent_shapes_are_refused(tmp_path: Path, models: dict) -> None:
    ckpt = load_checkpoint(models["ckpt"]["sd15", "safetensors"])
    ckpt.ip_adapter["3.to_v_ip.weight"] = torch.zeros(64, 31)
    with pytest.raises(CheckpointError, match=r"layer 3: to_k_ip \[64, 32\] / to_v_ip \[64, 31\]"):
        detect(ckpt)
    del ckpt.ip_adapter["3.to_v_ip.weight"]
    with pytest.raises(CheckpointError, match="layer 3 has .*needs both"):
        detect(ckpt)


class Payload:
    """Anything whose unpickling would need our code."""

    def __reduce__(self):  # noqa: ANN204
        return (print, ("this must never run",))


def test_pickles_that_need_code_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"image_proj": Payload(), "ip_adapter": {}}))
    with pytest.raises(CheckpointError, match="refused: unpickling it would run code"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_empty_and_truncated_files_are_refused(tmp_path: Path, models: dict, fmt: str) -> None:
    empty = tmp_path / f"empty.{fmt}"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    cut = tmp_path / f"cut.{fmt}"
    data = models["ckpt"]["sd15", fmt].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)


def test_convert_round_trip_keeps_keys_and_values(tmp_path: Path, models: dict) -> None:
    src = models["ckpt"]["plus_sdxl_vit-h", "bin"]
    assert main(["convert", str(src), str(tmp_path / "a.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.bin")]) == 0
    original, back = load_checkpoint(src).flat(), load_checkpoint(tmp_path / "b.bin").flat()
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    flat = load_checkpoint(tmp_path / "a.safetensors")
    save_checkpoint(flat, tmp_path / "c.safetensors")
    assert load_checkpoint(tmp_path / "c.safetensors").flat().keys() == original.keys()


def test_convert_refuses_to_overwrite_and_refuses_non_adapters(tmp_path: Path, models: dict, capsys) -> None:
    src = models["ckpt"]["sd15", "bin"]
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(src), str(out)]) == 2
    assert out.read_bytes() == b"keep me" and "--force" in capsys.readouterr().err
    lora = _write(tmp_path / "lora.safetensors", {"lora_te_x.lora_up.weight": torch.zeros(2, 2)})
    assert main(["convert", str(lora), str(tmp_path / "y.bin")]) == 2
    assert not (tmp_path / "y.bin").exists()


def test_inspect_text_and_json(models: dict, capsys: pytest.CaptureFixture) -> None:
    import json

    path = models["ckpt"]["plus_sd15", "safetensors"]
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"layout:\s+plus", text) and re.search(r"tokens:\s+8", text)
    assert "7 cross-attention layers (ids 1..13)" in text and "heads 1 x 64" in text
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "plus" and info["num_tokens"] == 8 and info["feature"] == "hidden"
    assert info["layer_ids"] == list(range(1, 14, 2)) and info["dtypes"] == ["float16"]
    assert info["resampler"]["depth"] == 4


@pytest.mark.parametrize(
    "adapter,layout,cross,feature_dim,expected",
    [
        ("h94/IP-Adapter/models/ip-adapter_sd15.safetensors", "basic", 768, 1024, "h94/IP-Adapter/models/image_encoder"),
        ("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", "basic", 2048, 1280,
         "h94/IP-Adapter/sdxl_models/image_encoder"),
        # the most common mistake: SDXL *_vit-h adapters live under sdxl_models/ but need the ViT-H encoder
        ("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "basic", 2048, 1024,
         "h94/IP-Adapter/models/image_encoder"),
        ("h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "plus", 2048, 1280,
         "h94/IP-Adapter/models/image_encoder"),
        ("someone/custom/weights/adapter.safetensors", "basic", 64, 24, "someone/custom/weights/image_encoder"),
    ],
)  # fmt: skip
def test_default_encoder_follows_the_official_repository_layout(
    adapter, layout, cross, feature_dim, expected
) -> None:
    from ipadapter.sources import default_encoder

    hidden = SD15_HIDDEN if cross == 768 else SDXL_HIDDEN
    spec = detect(_official(layout, cross, feature_dim, hidden, heads=20 if layout == "plus" else 12))
    assert default_encoder(adapter, spec) == expected


def test_local_adapter_without_a_fitting_encoder_says_what_it_needs(tmp_path: Path, models: dict) -> None:
    from ipadapter import InputError
    from ipadapter.sources import default_encoder

    lonely = tmp_path / "alone" / "ip.safetensors"
    lonely.parent.mkdir()
    save_checkpoint(load_checkpoint(models["ckpt"]["sd15", "safetensors"]), lonely)
    spec = detect(load_checkpoint(lonely))
    with pytest.raises(InputError, match=r"needs 24-dim pooled features .* pass --image-encoder"):
        default_encoder(lonely, spec)
