"""FaceID checkpoints (DESIGN.md §3.6): detection from shapes, the projections against diffusers' reference
(IPAdapterFaceIDImageProjection / IPAdapterFaceIDPlusImageProjection / IPAdapterPlusImageProjection, built by its
own converter from the same official-layout state dict) and against the portrait math written out here."""

from __future__ import annotations

from pathlib import Path

import faceid_checkpoints as fc
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from diffusers.loaders.unet import UNet2DConditionLoadersMixin

from ipadapter import Checkpoint, CheckpointError, detect, load_checkpoint
from ipadapter.adapters.checks import problems
from ipadapter.adapters.info import adapter_info, describe
from ipadapter.adapters.projection import build_projection
from ipadapter.adapters.variants import plus_version_hint

FORMATS = ("bin", "safetensors", "fp16.safetensors")
LORA_LAYOUTS = ("faceid", "faceid-plus")


@pytest.fixture(scope="session")
def faceid_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every official FaceID file as a tiny random checkpoint, named as shipped: .bin, .safetensors, fp16."""
    folder = tmp_path_factory.mktemp("faceid")
    files = {}
    for seed, (variant, (layout, base)) in enumerate(fc.FACEID_VARIANTS.items()):
        for fmt in FORMATS:
            dtype = torch.float16 if fmt.startswith("fp16") else torch.float32
            name = f"ip-adapter-{variant}" + (".fp16" if dtype == torch.float16 else "")
            files[variant, fmt] = fc.save_faceid(
                folder, layout, base, fmt.removeprefix("fp16."), dtype=dtype, seed=seed, name=name
            )
    return files


def _loaded(files: dict, variant: str, fmt: str = "safetensors") -> tuple[Checkpoint, object]:
    ckpt = load_checkpoint(files[variant, fmt])
    return ckpt, detect(ckpt)


def _ours(ckpt: Checkpoint, spec) -> torch.nn.Module:
    model = build_projection(spec).eval()
    model.load_state_dict(ckpt.image_proj, strict=True)
    return model


def _theirs(ckpt: Checkpoint) -> torch.nn.Module:
    convert = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers
    return convert(None, dict(ckpt.image_proj), low_cpu_mem_usage=False).eval()  # self is unused on this path


def _randn(*shape: int, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", list(fc.FACEID_VARIANTS))
def test_detects_every_faceid_layout_in_every_format(faceid_files: dict, variant: str, fmt: str) -> None:
    layout, base = fc.FACEID_VARIANTS[variant]
    ckpt, spec = _loaded(faceid_files, variant, fmt)
    cross = tm.SD15_CROSS if base == "sd15" else tm.SDXL_CROSS
    hidden = tm.layer_sizes(base)
    portrait = layout.startswith("faceid-portrait")
    assert spec.layout == layout and spec.supported and spec.host == "unet"
    assert (spec.num_tokens, spec.feature, spec.feature_dim, spec.cross_attention_dim) == (
        16 if portrait else 4,
        "face",
        512,
        cross,
    )
    assert spec.layer_ids == tuple(range(1, 2 * len(hidden), 2)) and spec.hidden_sizes == hidden
    assert spec.faces == (5 if portrait else 1) and spec.plus_version is None and spec.names == ()
    assert spec.face_encoder == "InsightFace buffalo_l"
    if layout in LORA_LAYOUTS:
        assert spec.lora_rank == fc.LORA_RANK and spec.lora_ids == tuple(range(2 * len(hidden)))
    else:
        assert spec.lora_rank is None and spec.lora_ids == ()
    r = spec.resampler
    if layout == "faceid-plus":  # width = the face tokens' width; queries = the MLP's 4 tokens
        assert (r.dim, r.depth, r.heads, r.num_queries, r.embedding_dim, r.output_dim, r.ff_mult) == (
            cross,
            4,
            1,
            4,
            tm.VIT_H["hidden"],
            cross,
            4,
        )
        assert spec.clip_feature == ("hidden", tm.VIT_H["hidden"])
    elif layout == "faceid-portrait-unnorm":  # a plus Resampler over the 512-d face embedding
        assert (r.dim, r.depth, r.heads, r.num_queries, r.embedding_dim, r.output_dim) == (
            32,
            4,
            1,
            16,
            512,
            cross,
        )
        assert spec.clip_feature is None and spec.mlp_dim is None
    else:
        assert r is None and spec.mlp_dim == 1024 and spec.clip_feature is None and spec.encoder is None
    assert problems(ckpt, spec) == []
    _ours(ckpt, spec)  # the official image_proj loads with strict=True


@pytest.mark.parametrize("variant", list(fc.FACEID_VARIANTS))
def test_official_shapes_get_official_names(variant: str) -> None:
    layout, base = fc.FACEID_VARIANTS[variant]
    ckpt = fc.official_faceid(variant)
    spec = detect(ckpt)
    sd15 = base == "sd15"
    assert spec.layout == layout and spec.base == ("SD1.5" if sd15 else "SDXL")
    assert f"ip-adapter-{variant}" in spec.names
    assert spec.num_layers == (16 if sd15 else 70) and spec.feature_dim == 512
    if layout in LORA_LAYOUTS:
        assert spec.lora_rank == 128 and spec.lora_ids == tuple(range(32 if sd15 else 140))
    if layout == "faceid-plus":  # the face crop goes through ViT-H: h94/IP-Adapter's models/image_encoder
        assert spec.encoder == "ViT-H/14" and spec.encoder_subfolder == "models/image_encoder"
        assert (spec.resampler.heads, spec.resampler.dim) == ((12, 768) if sd15 else (32, 2048))
    else:
        assert spec.encoder is None and spec.encoder_subfolder is None
    if layout == "faceid-portrait-unnorm":
        assert (spec.resampler.dim, spec.resampler.heads, spec.resampler.num_queries) == (1280, 20, 16)
    assert problems(ckpt, spec) == []


def test_plus_and_plusv2_are_told_apart_only_by_the_file_name(faceid_files: dict) -> None:
    plus, plus_spec = _loaded(faceid_files, "faceid-plus_sd15")
    v2, v2_spec = _loaded(faceid_files, "faceid-plusv2_sd15")
    assert plus.image_proj.keys() == v2.image_proj.keys() and plus.ip_adapter.keys() == v2.ip_adapter.keys()
    assert plus_spec.plus_version is None and v2_spec.plus_version is None  # keys cannot tell
    info1 = adapter_info(faceid_files["faceid-plus_sd15", "bin"])
    info2 = adapter_info(faceid_files["faceid-plusv2_sd15", "safetensors"])
    assert (info1["plus_version"], info1["plus_version_hint"]) == (None, "v1")
    assert (info2["plus_version"], info2["plus_version_hint"]) == (None, "v2")
    text = describe(info2)
    assert "cannot tell FaceID-Plus from PlusV2" in text and "file name suggests PlusV2" in text
    assert "explicit option overrides" in text and "suggests PlusV2" not in describe(info1)
    assert "lora:        rank 4 on 14 attention layers (ids 0..13)" in text
    other = adapter_info(faceid_files["faceid-portrait_sd15", "bin"])
    assert other["plus_version_hint"] is None and "PlusV2" not in describe(other)
    assert "16 per face" in describe(other) and "lora:" not in describe(other)


@pytest.mark.parametrize(
    "name,hint",
    [
        ("ip-adapter-faceid-plusv2_sd15.bin", "v2"),
        ("/models/IP-Adapter-FaceID-PlusV2_SDXL.safetensors", "v2"),
        ("faceid_plus_v2.bin", "v2"),
        ("ip-adapter-faceid-plus_sd15.bin", "v1"),
        ("ip-adapter-faceid_sd15.bin", None),
        ("my_adapter.safetensors", None),
    ],
)
def test_plus_version_hint(name: str, hint: str | None) -> None:
    assert plus_version_hint(name) == hint


@pytest.mark.parametrize(
    "variant", ["faceid_sd15", "faceid_sdxl", "faceid-portrait_sd15", "faceid-portrait_sdxl"]
)
def test_face_mlp_equals_diffusers(faceid_files: dict, variant: str) -> None:
    ckpt, spec = _loaded(faceid_files, variant)
    ours, theirs = _ours(ckpt, spec), _theirs(ckpt)
    assert type(theirs).__name__ == "IPAdapterFaceIDImageProjection"
    faces = F.normalize(_randn(3, 512), dim=-1)  # (B, 512): normed_embedding
    with torch.no_grad():
        got, want = ours(faces), theirs(faces)
    assert got.shape == (3, spec.num_tokens, spec.cross_attention_dim)
    assert (got - want).abs().max() < 1e-5
    assert (got[0] - got[1]).abs().max() > 1e-2  # different faces, different tokens


@pytest.mark.parametrize("variant", ["faceid-plus_sd15", "faceid-plusv2_sd15", "faceid-plusv2_sdxl"])
def test_face_plus_equals_diffusers(faceid_files: dict, variant: str) -> None:
    ckpt, spec = _loaded(faceid_files, variant)
    ours, theirs = _ours(ckpt, spec), _theirs(ckpt)
    assert type(theirs).__name__ == "IPAdapterFaceIDPlusImageProjection"
    faces = F.normalize(_randn(2, 512), dim=-1)
    clip = _randn(2, 17, tm.VIT_H["hidden"], seed=2)  # the face crop's penultimate hidden states
    theirs.clip_embeds = clip[:, None]  # (B, images, S, F), as diffusers' docs set it by hand
    results = {}
    with torch.no_grad():
        for shortcut, scale in ((False, 1.0), (True, 1.0), (True, 0.3)):
            theirs.shortcut, theirs.shortcut_scale = shortcut, scale
            got, want = ours(faces, clip, shortcut, scale), theirs(faces)
            assert got.shape == (2, 4, spec.cross_attention_dim)
            assert (got - want).abs().max() < 1e-5, (shortcut, scale)
            results[shortcut, scale] = got
        as_tensor = ours(faces, clip, True, torch.tensor(0.3))  # a tensor scale gives the same tokens
    assert (as_tensor - results[True, 0.3]).abs().max() < 1e-6
    assert (results[False, 1.0] - results[True, 1.0]).abs().max() > 1e-2  # V2's shortcut really changes them
    assert (results[True, 1.0] - results[True, 0.3]).abs().max() > 1e-2


def _portrait_by_hand(state: dict[str, torch.Tensor], faces: torch.Tensor) -> torch.Tensor:
    """The portrait math, written out: per face MLP -> 16 tokens -> LayerNorm; faces side by side."""
    w1, b1, w2, b2 = (
        state[k].float() for k in ("proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias")
    )
    gain, shift = state["norm.weight"].float(), state["norm.bias"].float()
    width = gain.shape[0]
    out = []
    for sample in faces:  # (faces, 512)
        tokens = []
        for e in sample:
            h = e @ w1.T + b1
            h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
            t = (h @ w2.T + b2).reshape(-1, width)  # (16, D)
            t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
            tokens.append(t * gain + shift)
        out.append(torch.cat(tokens))
    return torch.stack(out)  # (B, faces*16, D)


@pytest.mark.parametrize(
    "variant", ["faceid-portrait_sd15", "faceid-portrait-v11_sd15", "faceid-portrait_sdxl"]
)
def test_portrait_concatenates_faces_as_written_out(faceid_files: dict, variant: str) -> None:
    ckpt, spec = _loaded(faceid_files, variant)
    ours = _ours(ckpt, spec)
    faces = F.normalize(_randn(2, 5, 512), dim=-1)  # (B, faces, 512)
    with torch.no_grad():
        got = ours(faces)
        one = ours(faces[:, 0])  # (B, 512): one face
    want = _portrait_by_hand(ckpt.image_proj, faces)
    assert got.shape == (2, 5 * 16, spec.cross_attention_dim) and one.shape == (
        2,
        16,
        spec.cross_attention_dim,
    )
    assert (got - want).abs().max() < 1e-5
    assert (one - want[:, :16]).abs().max() < 1e-5
    assert (got[:, :16] - got[:, 16:32]).abs().max() > 1e-2  # each face keeps its own tokens


def test_portrait_unnorm_equals_diffusers_resampler_per_face(faceid_files: dict) -> None:
    """Its image_proj is a plain plus Resampler (diffusers converts it as one); each face is a one-position
    sequence of the raw embedding, and the faces' tokens are concatenated."""
    ckpt, spec = _loaded(faceid_files, "faceid-portrait_sdxl_unnorm")
    ours, theirs = _ours(ckpt, spec), _theirs(ckpt)
    assert type(theirs).__name__ == "IPAdapterPlusImageProjection"
    faces = _randn(2, 3, 512, scale=1.2)  # raw embeddings: norm ~ 27, as InsightFace's `embedding`
    with torch.no_grad():
        got = ours(faces)
        want = theirs(faces.reshape(6, 1, 512)).reshape(2, 3 * 16, -1)
        one = ours(faces[:, 1])
    assert got.shape == (2, 48, tm.SDXL_CROSS)
    assert (got - want).abs().max() < 1e-5
    assert (one - got[:, 16:32]).abs().max() < 1e-5


def test_fp16_files_project_in_fp16(faceid_files: dict) -> None:
    ckpt, spec = _loaded(faceid_files, "faceid-plusv2_sdxl", "fp16.safetensors")
    assert {t.dtype for t in ckpt.flat().values()} == {torch.float16}
    model = build_projection(spec).to(torch.float16).eval()
    model.load_state_dict(ckpt.image_proj, strict=True)
    with torch.no_grad():
        out = model(_randn(1, 512).half(), _randn(1, 17, 32).half(), True, 1.0)
    assert out.dtype == torch.float16 and out.shape == (1, 4, tm.SDXL_CROSS) and torch.isfinite(out).all()


def test_plus_scale_tensor_traces_once() -> None:
    """No graph break, and a new s_scale tensor value recompiles nothing (a counting backend: fast)."""
    from torch._dynamo.testing import CompileCounter

    ckpt = fc.faceid_checkpoint("faceid-plus", fc.tiny_unet_dims("sd15"), tm.SD15_CROSS)
    spec = detect(ckpt)
    model = _ours(ckpt, spec)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    faces, clip = _randn(2, 512), _randn(2, 17, 32)
    with torch.no_grad():
        for s in (0.5, 1.5, 2.0):
            scale = torch.tensor(s)
            assert (compiled(faces, clip, True, scale) - model(faces, clip, True, s)).abs().max() < 1e-6
    assert counter.frame_count == 1


def _edited(files: dict, variant: str, edit) -> tuple[Checkpoint, object]:
    ckpt = load_checkpoint(files[variant, "safetensors"])
    edit(ckpt.image_proj, ckpt.ip_adapter)
    return ckpt, detect(ckpt)


@pytest.mark.parametrize(
    "variant,edit,needles",
    [
        (
            "faceid-plus_sd15",
            lambda p, _: p.__setitem__("perceiver_resampler.layers.1.0.to_out.weight", torch.zeros(32, 32)),
            [
                "shapes do not fit the faceid-plus layout",
                "perceiver_resampler.layers.1.0.to_out.weight [32, 32]",
            ],
        ),
        (
            "faceid-plusv2_sd15",
            lambda p, _: p.pop("perceiver_resampler.layers.3.1.3.weight"),
            ["missing", "perceiver_resampler.layers.3.1.3.weight"],
        ),
        (
            "faceid_sd15",
            lambda p, _: p.__setitem__("proj.4.weight", torch.zeros(3)),
            ["unexpected", "proj.4.weight"],
        ),
        (
            "faceid-portrait_sdxl",
            lambda p, _: p.__setitem__("norm.bias", torch.zeros(63)),
            ["faceid-portrait layout", "norm.bias [63] (expected [64])"],
        ),
        (
            "faceid-portrait_sdxl_unnorm",
            lambda p, _: p.__setitem__("layers.2.0.norm1.weight", torch.ones(31)),
            ["faceid-portrait-unnorm layout", "layers.2.0.norm1.weight [31] (expected [32])"],
        ),
        (
            "faceid_sdxl",
            lambda _, ip: ip["3.to_q_lora.up.weight"].view(-1).__setitem__(0, float("nan")),
            ["non-finite", "ip_adapter.3.to_q_lora.up.weight"],
        ),
    ],
)
def test_problems_name_what_is_wrong(faceid_files: dict, variant: str, edit, needles: list[str]) -> None:
    ckpt, spec = _edited(faceid_files, variant, edit)
    found = " | ".join(problems(ckpt, spec))
    assert all(n in found for n in needles), found


def _lora_rank_mismatch(_, ip: dict) -> None:
    ip["5.to_v_lora.up.weight"] = torch.zeros(64, 3)


@pytest.mark.parametrize(
    "variant,edit,needle",
    [
        ("faceid_sd15", _lora_rank_mismatch, "different ranks [3, 4]"),
        ("faceid_sd15", lambda _, ip: ip.pop("7.to_k_lora.down.weight"), "LoRA of layer 7 has"),
        (
            "faceid-plus_sd15",
            lambda _, ip: [ip.pop(k) for k in list(ip) if k.startswith("9.") and "lora" in k],
            "image layers [9] have no LoRA",
        ),
        (
            "faceid_sd15",
            lambda _, ip: ip.update(
                {"2.to_k_ip.weight": torch.zeros(64, 32), "2.to_v_ip.weight": torch.zeros(64, 32)}
            ),
            "even ids [2]",
        ),
        (
            "faceid_sd15",
            lambda p, _: p.__setitem__("proj.2.weight", torch.zeros(100, 1024)),
            "multiple of the norm",
        ),
        (
            "faceid-plus_sd15",
            lambda p, _: p.__setitem__("perceiver_resampler.proj_out.weight", torch.zeros(48, 32)),
            "must both equal the face tokens' width 32",
        ),
    ],
)
def test_inconsistent_faceid_files_are_refused(faceid_files: dict, variant: str, edit, needle: str) -> None:
    ckpt = load_checkpoint(faceid_files[variant, "bin"])
    edit(ckpt.image_proj, ckpt.ip_adapter)
    with pytest.raises(CheckpointError) as err:
        detect(ckpt)
    assert needle in str(err.value) and str(faceid_files[variant, "bin"]) in str(err.value)


def test_the_neighbouring_layouts_keep_their_own_detection(faceid_files: dict) -> None:
    """A plus file (CLIP hidden states in) stays plus; 4 tokens per face is FaceID, 16 a portrait."""
    assert detect(tm.make_checkpoint("plus_sdxl_vit-h")).layout == "plus"
    ckpt = load_checkpoint(faceid_files["faceid-portrait_sd15", "bin"])
    four = dict(ckpt.image_proj)
    four["proj.2.weight"], four["proj.2.bias"] = four["proj.2.weight"][:128], four["proj.2.bias"][:128]
    assert detect(Checkpoint(four, ckpt.ip_adapter)).layout == "faceid"


def test_describe_faceid(faceid_files: dict) -> None:
    text = describe(adapter_info(faceid_files["faceid_sd15", "bin"]))
    assert "layout:      faceid\n" in text and "not supported" not in text
    assert "InsightFace buffalo_l face embedding (512 dims)" in text
    assert "lora:        rank 4 on 14 attention layers (ids 0..13)" in text
    plus = describe(adapter_info(faceid_files["faceid-plusv2_sdxl", "bin"]))
    assert "+ a CLIP vision model hidden states of the face crop (32 dims)" in plus


def test_save_faceid_writes_the_official_formats(tmp_path: Path) -> None:
    bin_path = fc.save_faceid(tmp_path, "faceid", "sd15", "bin")
    st_path = fc.save_faceid(tmp_path, "faceid", "sd15", "safetensors")
    nested = torch.load(bin_path, weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"} and "0.to_q_lora.down.weight" in nested["ip_adapter"]
    a, b = load_checkpoint(bin_path).flat(), load_checkpoint(st_path).flat()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
