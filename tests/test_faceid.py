"""FaceID adapters on the tiny SD models against diffusers' FaceID path (its projections, its LoRA through peft).

diffusers' reference: ``load_ip_adapter(..., image_encoder_folder=None)``, then ``ip_adapter_image_embeds=[t]``
with t = [zero embedding; face embedding] under classifier-free guidance; for Plus the CLIP features of the face
crop are set by hand on the projection (``clip_embeds``), and ``shortcut`` for PlusV2 (DESIGN.md §3.6).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiny_models as tm  # noqa: E402
import torch  # noqa: E402
from faceid_checkpoints import save_faceid  # noqa: E402
from helpers import CALL, reference_image  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter.errors import InputError  # noqa: E402
from ipadapter.pipelines import load_pipeline  # noqa: E402
from ipadapter.prompt.faces import FaceEmbeds  # noqa: E402

pytest.importorskip("peft")  # diffusers loads the FaceID LoRA through peft; without it the reference skips it

TOLERANCE = 2 / 255
PIPES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def _face(seed: int = 0) -> FaceEmbeds:
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.nn.functional.normalize(torch.randn(1, 512, generator=gen), dim=-1)
    return FaceEmbeds(embeds.numpy(), crops=[reference_image(seed + 3, (224, 224))], source="face")


def _diffusers(models: dict, path, base: str, face: FaceEmbeds, scale: float, plus: str | None):  # noqa: ANN001
    import diffusers

    cls = getattr(diffusers, PIPES[base])
    extra = {}
    if plus:
        extra = dict(
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(models["vit_h"]),
            feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        )
    pipe = cls.from_pretrained(models[base], **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    embeds = torch.as_tensor(face.embeds).reshape(1, 1, 1, 512)
    id_embeds = torch.cat([torch.zeros_like(embeds), embeds])  # (2, 1, 1, 512): negatives first
    if plus:
        clip = pipe.prepare_ip_adapter_image_embeds([face.crops[0]], None, "cpu", 1, True)[0]
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds = clip
        projection.shortcut = plus == "v2"
    out = pipe(**CALL, ip_adapter_image_embeds=[id_embeds], generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images, dtype=np.float32)


@pytest.mark.parametrize(
    ("layout", "base", "plus"),
    [
        ("faceid", "sd15", None),
        ("faceid", "sdxl", None),
        ("faceid-plus", "sd15", "v1"),
        ("faceid-plus", "sd15", "v2"),
        ("faceid-plus", "sdxl", "v2"),
    ],
)
def test_faceid_equals_diffusers(models: dict, tmp_path, layout: str, base: str, plus: str | None) -> None:  # noqa: ANN001
    name = {None: None, "v1": f"ip-adapter-faceid-plus_{base}", "v2": f"ip-adapter-faceid-plusv2_{base}"}[
        plus
    ]
    path = save_faceid(tmp_path, layout, base, "safetensors", name=name)
    face = _face()
    want = _diffusers(models, path, base, face, 0.7, plus)
    pipe = load_pipeline(models[base])
    encoder = models["vit_h"] if plus else None
    ip = ipadapter.attach(pipe, path, encoder, scale=0.7)
    assert ip.plus_version == plus  # told by the file name (keys cannot)
    got = np.asarray(ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images, dtype=np.float32)
    plain_ip = ipadapter.attach(load_pipeline(models[base]), path, encoder, scale=0.0, lora_scale=0.0)
    plain = np.asarray(plain_ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(want - got).max() <= TOLERANCE
    assert np.abs(plain - got).max() > 3 * TOLERANCE  # the adapter (and its LoRA) did something


def test_lora_strength_zero_is_the_adapter_without_lora_and_detach_restores(models: dict, tmp_path) -> None:  # noqa: ANN001
    path = save_faceid(tmp_path, "faceid", "sd15", "bin")
    pipe = load_pipeline(models["sd15"])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = np.asarray(pipe(**CALL, generator=torch.Generator().manual_seed(0)).images)
    ip = ipadapter.attach(pipe, path, scale=0.8, lora_scale=0.0)
    face = _face(1)
    no_lora = np.asarray(ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images)
    # the same file without its LoRA tensors gives exactly the picture of LoRA strength 0
    ckpt = ipadapter.load_checkpoint(path)
    ckpt.ip_adapter = {k: v for k, v in ckpt.ip_adapter.items() if "_lora." not in k}
    bare = ipadapter.attach(load_pipeline(models["sd15"]), ckpt, scale=0.8)
    assert bare.lora is None
    assert np.array_equal(
        np.asarray(bare(face, **CALL, generator=torch.Generator().manual_seed(0)).images), no_lora
    )
    ip.lora_scale = 1.0
    with_lora = np.asarray(ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(with_lora - no_lora).max() > 3 * TOLERANCE
    ip.lora_scale = 0.0
    assert np.array_equal(
        np.asarray(ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images), no_lora
    )
    ip.scale = 0.0
    assert np.array_equal(
        np.asarray(ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images), base
    )
    ip.detach()
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert np.array_equal(np.asarray(pipe(**CALL, generator=torch.Generator().manual_seed(0)).images), base)
    assert not any(m._forward_hooks for m in pipe.unet.modules())  # every LoRA hook is gone


def test_faceid_next_to_a_plain_adapter_and_a_peft_lora(models: dict, tmp_path) -> None:  # noqa: ANN001
    """Neither breaks the other: the plain adapter alone gives its own picture again once FaceID is detached,
    and a user's own LoRA (peft) keeps acting with FaceID's LoRA hooked on top of it."""
    from peft import LoraConfig

    path = save_faceid(tmp_path, "faceid", "sd15", "safetensors")
    pipe = load_pipeline(models["sd15"])
    plain = ipadapter.attach(
        pipe, models["ckpt"]["sd15", "safetensors"], models["vit_h"], name="plain", scale=0.7
    )
    alone = np.asarray(plain(reference_image(), **CALL, generator=torch.Generator().manual_seed(0)).images)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    user = np.asarray(plain(reference_image(), **CALL, generator=torch.Generator().manual_seed(0)).images)
    assert np.abs(user - alone).max() > 3 * TOLERANCE  # the user's LoRA acts
    face_ip = ipadapter.attach(pipe, path, name="face", scale=0.7)
    with_face = np.asarray(face_ip(_face(), **CALL, generator=torch.Generator().manual_seed(0)).images)
    assert np.isfinite(with_face).all()
    face_ip.detach()
    again = np.asarray(plain(reference_image(), **CALL, generator=torch.Generator().manual_seed(0)).images)
    assert np.array_equal(again, user)  # the plain adapter and the user's LoRA, exactly as before


def test_plus_without_a_face_crop_and_bad_face_input_are_one_line(models: dict, tmp_path) -> None:  # noqa: ANN001
    path = save_faceid(tmp_path, "faceid-plus", "sd15", "safetensors", name="ip-adapter-faceid-plusv2_sd15")
    pipe = load_pipeline(models["sd15"])
    ip = ipadapter.attach(pipe, path, models["vit_h"])
    with pytest.raises(InputError, match="FaceID-Plus adapter.*no face crop.*face-embed") as err:
        ip(FaceEmbeds(np.ones((1, 512), np.float32) / 512**0.5), **CALL)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="128 values per face; expected 512"):
        ip(np.ones((1, 128), np.float32), **CALL)
    with pytest.raises(InputError, match="plus_version 'v3' is not one of v1, v2"):
        ipadapter.attach(pipe, path, models["vit_h"], plus_version="v3", name="x")
    assert ipadapter.attach(pipe, path, models["vit_h"], plus_version="v1", name="y").plus_version == "v1"


def test_portrait_concatenates_faces_as_its_math_says(models: dict, tmp_path) -> None:  # noqa: ANN001
    path = save_faceid(tmp_path, "faceid-portrait", "sd15", "safetensors")
    pipe = load_pipeline(models["sd15"])
    ip = ipadapter.attach(pipe, path)
    faces = np.stack([_face(i).embeds[0] for i in range(3)])
    pos, neg = ip.face_tokens(faces)
    image_proj = ipadapter.load_checkpoint(path).image_proj
    hidden = torch.nn.functional.gelu(
        torch.as_tensor(faces) @ image_proj["proj.0.weight"].T + image_proj["proj.0.bias"]
    )
    tokens = (hidden @ image_proj["proj.2.weight"].T + image_proj["proj.2.bias"]).reshape(
        3, 16, tm.SD15_CROSS
    )
    tokens = torch.nn.functional.layer_norm(
        tokens, (tm.SD15_CROSS,), image_proj["norm.weight"], image_proj["norm.bias"]
    )
    assert pos.shape == (1, 48, tm.SD15_CROSS) and torch.allclose(pos[0], tokens.reshape(48, -1), atol=1e-5)
    assert neg.shape == pos.shape
    image = ip(faces, **CALL, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(np.asarray(image)).all()


def test_faces_through_controls_and_the_cli_equal_the_handle_and_diffusers(
    models: dict, tmp_path, capsys
) -> None:  # noqa: ANN001
    """A face-embeddings file through a recipe Control and through `generate --face-embeds` gives the handle's
    picture, which is diffusers'; per-call lora_scale, window and masks act; wrong controls are one line."""
    from helpers import fails, half_mask, png_pixels

    from ipadapter.cli import main
    from ipadapter.prompt.faces import save_face_embeds
    from ipadapter.prompt.recipe import Control, Reference

    path = save_faceid(tmp_path, "faceid-plus", "sd15", "safetensors", name="ip-adapter-faceid-plusv2_sd15")
    face = _face(2)
    file = save_face_embeds(tmp_path / "face.safetensors", face.embeds, face.crops)
    pipe = load_pipeline(models["sd15"])
    ip = ipadapter.attach(pipe, path, models["vit_h"], scale=0.7)
    kw = {**CALL, "generator": None}

    def seeded() -> dict:
        return {**kw, "generator": torch.Generator().manual_seed(0)}

    direct = np.asarray(ip(face, **seeded()).images)
    via_control = np.asarray(
        ipadapter.run(pipe, [(ip, Control(images=[Reference(face=file)]))], **seeded()).images
    )
    assert np.abs(direct - via_control).max() <= 1e-6
    weaker = Control(images=[Reference(face=file)], lora_scale=0.0, s_scale=0.3, start=0.0, end=0.6)
    changed = np.asarray(ipadapter.run(pipe, [(ip, weaker)], **seeded()).images)
    assert np.abs(changed - direct).max() > 3 * TOLERANCE and ip.lora_scale == 1.0  # per call only
    left, right = _face(4), _face(5)
    two = Control(
        images=[Reference(face=left, mask=half_mask("left")), Reference(face=right, mask=half_mask("right"))]
    )
    assert np.isfinite(np.asarray(ipadapter.run(pipe, [(ip, two)], **seeded()).images)).all()

    out = tmp_path / "cli.png"
    argv = ["generate", "--base", str(models["sd15"]), "--adapter", str(path), "--image-encoder", str(models["vit_h"]),
            "--face-embeds", str(file), "--prompt", "a cat", "--negative-prompt", "blurry", "--scale", "0.7",
            "--steps", "2", "--width", "32", "--height", "32", "--seed", "0", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    want = _diffusers(models, path, "sd15", face, 0.7, "v2")
    assert np.abs(png_pixels(out) / 255.0 - want[0]).max() <= TOLERANCE + 1 / 255
    basic = ["generate", "--base", str(models["sd15"]), "--adapter", str(models["ckpt"]["sd15", "safetensors"]),
             "--image", str(file.with_suffix(".png")), "--steps", "1", "--output", str(tmp_path / "x.png")]  # fmt: skip
    face.crops[0].save(file.with_suffix(".png"))
    fails(capsys, [*basic, "--lora-scale", "0.5"], "lora_scale", "carries none")
    fails(
        capsys, [*argv[:-2], "--output", str(tmp_path / "y.png"), "--plus-version", "v3"], "plus", "v1", "v2"
    )


def test_server_takes_a_face_image_and_detects_its_largest_face(models: dict, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The server's JSON carries the face as a base64 image; InsightFace (a stand-in following its documented
    format, since its weights cannot be had here) finds the faces, the largest is used: the handle's picture."""
    from fastapi.testclient import TestClient
    from helpers import b64_png
    from PIL import Image
    from test_cli_faces import RIGHT, fake_insightface, model_root, normed, photo

    from ipadapter.jobs.engine import Engine
    from ipadapter.server import ServerConfig, create_app

    fake_insightface(monkeypatch)
    model_root(tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home" / ".."))  # ~/.insightface is insightface's own default
    (tmp_path / "home" / "insightface").rename(tmp_path / ".insightface")
    path = save_faceid(tmp_path, "faceid", "sd15", "safetensors")
    config = ServerConfig(base=str(models["sd15"]), adapters=[str(path)])
    image = Image.open(photo(tmp_path / "two.png", (256, 256), 1))
    body = {"face_image": b64_png(image), "prompt": "a cat", "negative_prompt": "blurry", "scale": 0.7,
            "width": 32, "height": 32, "steps": 2, "seed": 0}  # fmt: skip
    with TestClient(create_app(config, Engine("cpu"))) as client:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    import base64
    import io

    got = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16
    )
    ip = ipadapter.attach(load_pipeline(models["sd15"]), path, scale=0.7)
    want = ip(
        normed(RIGHT)[None], **{**CALL, "output_type": "pil"}, generator=torch.Generator().manual_seed(0)
    )
    assert np.abs(np.asarray(want.images[0], dtype=np.int16) - got).max() <= 2


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "controlnet", "video"])
def test_faceid_in_every_mode(models: dict, tmp_path, mode: str) -> None:  # noqa: ANN001
    """FaceID-PlusV2 (its LoRA hooked, a face crop encoded) in each mode: the face changes the output, and a
    scale of 0 with LoRA strength 0 is the mode's own pipeline exactly."""
    from helpers import mode_setup

    path = save_faceid(tmp_path, "faceid-plus", "sd15", "safetensors", name="ip-adapter-faceid-plusv2_sd15")
    pipe, extra = mode_setup(models, "sd15", mode)
    kw = {**CALL, **extra}
    base = pipe(**kw, generator=torch.Generator().manual_seed(0))
    base = np.asarray(base.frames if mode == "video" else base.images)
    ip = ipadapter.attach(pipe, path, models["vit_h"], scale=0.0, lora_scale=0.0)
    off = ip(_face(), **kw, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(off.frames if mode == "video" else off.images), base)
    ip.scale, ip.lora_scale = 0.8, 1.0
    on = ip(_face(), **kw, generator=torch.Generator().manual_seed(0))
    on = np.asarray(on.frames if mode == "video" else on.images)
    assert np.isfinite(on).all() and np.abs(on - base).max() > 3 * TOLERANCE


def test_server_takes_face_embeddings_as_numbers(models: dict, tmp_path) -> None:  # noqa: ANN001
    from fastapi.testclient import TestClient

    from ipadapter.jobs.engine import Engine
    from ipadapter.server import ServerConfig, create_app

    path = save_faceid(tmp_path, "faceid", "sd15", "safetensors")
    face = _face(6).embeds[0]
    config = ServerConfig(base=str(models["sd15"]), adapters=[str(path)])
    body = {"face_embeds": [float(v) for v in face], "prompt": "a cat", "negative_prompt": "blurry",
            "scale": 0.7, "width": 32, "height": 32, "steps": 2, "seed": 0}  # fmt: skip
    with TestClient(create_app(config, Engine("cpu"))) as client:
        schema = client.get("/openapi.json").json()
        r = client.post("/v1/generate", json=body)
        bad = client.post("/v1/generate", json={**body, "face_embeds": ["me.safetensors"]})
        short = client.post("/v1/generate", json={**body, "face_embeds": [0.1] * 128})
    assert r.status_code == 200, r.text
    assert bad.status_code == 422 and "not accepted here" in bad.json()["error"]["message"]
    assert (
        short.status_code == 422 and "128 values per face; expected 512" in short.json()["error"]["message"]
    )
    assert "face_embeds" in json.dumps(schema)
    got = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"), dtype=np.int16
    )
    ip = ipadapter.attach(load_pipeline(models["sd15"]), path, scale=0.7)
    want = ip(
        face[None], **{**CALL, "output_type": "pil"}, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert np.abs(np.asarray(want, dtype=np.int16) - got).max() <= 2


def test_cli_face_image_with_face_index_and_model_root(models: dict, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """`generate --face-image` detects with InsightFace (a stand-in following its documented format) under
    --face-model-root, and --face-index picks the leftmost face instead of the largest."""
    from helpers import png_pixels
    from test_cli_faces import LEFT, fake_insightface, model_root, normed, photo

    from ipadapter.cli import main

    fake_insightface(monkeypatch)
    root = model_root(tmp_path)
    path = save_faceid(tmp_path, "faceid", "sd15", "safetensors")
    image = photo(tmp_path / "two.png", (256, 256), 1)
    out = tmp_path / "left.png"
    argv = ["generate", "--base", str(models["sd15"]), "--adapter", str(path), "--face-image", str(image),
            "--face-model-root", str(root), "--face-index", "0", "--prompt", "a cat", "--negative-prompt", "blurry",
            "--scale", "0.7", "--steps", "2", "--width", "32", "--height", "32", "--seed", "0", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    ip = ipadapter.attach(load_pipeline(models["sd15"]), path, scale=0.7)
    want = ip(
        normed(LEFT)[None], **{**CALL, "output_type": "pil"}, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert np.abs(np.asarray(want, dtype=np.int16) - png_pixels(out)).max() <= 2


def test_negative_face_and_batch_manifest(models: dict, tmp_path) -> None:  # noqa: ANN001
    """A negative face replaces the zero embedding in the negative tokens; a batch manifest line with a face
    gives the picture the handle makes."""
    from helpers import png_pixels

    from ipadapter.batch import run_batch
    from ipadapter.prompt.faces import save_face_embeds

    path = save_faceid(tmp_path, "faceid", "sd15", "safetensors")
    ip = ipadapter.attach(load_pipeline(models["sd15"]), path, scale=0.7)
    face, other = _face(7), _face(8)
    pos, zero_neg = ip.face_tokens(face)
    _, neg = ip.face_tokens(face, other)
    other_pos, _ = ip.face_tokens(other)
    assert torch.allclose(neg, other_pos) and not torch.allclose(neg, zero_neg)
    assert torch.allclose(zero_neg, ip.face_tokens(np.zeros((1, 512), np.float32) + 1e-9)[0], atol=1e-4)

    file = save_face_embeds(tmp_path / "face.safetensors", face.embeds)
    line = {"base": str(models["sd15"]), "adapter": str(path), "face_embeds": str(file), "prompt": "a cat",
            "negative_prompt": "blurry", "scale": 0.7, "steps": 2, "width": 32, "height": 32, "seed": 0}  # fmt: skip
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps(line))
    report = run_batch(manifest, tmp_path / "out", device="cpu", quiet=True)
    assert report is not None and report["counts"] == {"done": 1, "failed": 0, "skipped": 0}
    want = ip(face, **{**CALL, "output_type": "pil"}, generator=torch.Generator().manual_seed(0)).images[0]
    got = png_pixels(sorted((tmp_path / "out").glob("*.png"))[0])
    assert np.abs(np.asarray(want, dtype=np.int16) - got).max() <= 2


@pytest.mark.heavy
def test_faceid_compiles_and_a_new_lora_strength_makes_no_new_graph(models: dict, tmp_path) -> None:  # noqa: ANN001
    from torch._dynamo.utils import counters

    path = save_faceid(tmp_path, "faceid-plus", "sd15", "safetensors", name="ip-adapter-faceid-plusv2_sd15")
    pipe = load_pipeline(models["sd15"])
    ip = ipadapter.attach(pipe, path, models["vit_h"], scale=0.7)

    def run() -> np.ndarray:
        return np.asarray(ip(_face(), **CALL, generator=torch.Generator().manual_seed(0)).images)

    eager_full = run()
    ip.lora_scale = 0.3
    eager_weak = run()
    ip.lora_scale = 1.0
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="aot_eager")
    full = run()
    graphs = counters["stats"]["unique_graphs"]
    ip.lora_scale = 0.3
    weak = run()
    assert counters["stats"]["unique_graphs"] == graphs  # the strength is a tensor the graph reads
    assert np.abs(full - eager_full).max() <= 1e-3 and np.abs(weak - eager_weak).max() <= 1e-3
    assert np.abs(full - weak).max() > 3 * TOLERANCE
