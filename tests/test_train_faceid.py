"""`ipadapter train --variant faceid|faceid-plus`: precomputed faces per example, the UNet LoRA, the official
FaceID layout on export (with or without LoRA), resume, dropped faces, and one-line refusals of bad face data."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import CALL, fails, load_pipe, reference_image  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ipadapter import InputError, attach, detect, load_checkpoint  # noqa: E402
from ipadapter.cli import main  # noqa: E402
from ipadapter.prompt.faces import FaceEmbeds, save_face_embeds  # noqa: E402
from ipadapter.training.config import TrainConfig  # noqa: E402
from ipadapter.training.seeds import step_generator  # noqa: E402
from ipadapter.training.trainer import Trainer  # noqa: E402

RANK = 4


def _embedding(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((1, 512)).astype(np.float32)
    return e / np.linalg.norm(e)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images with captions and a face file each (embedding + aligned 224 px crop), listed in
    ``data/train.jsonl`` with paths relative to it; the images, captions and faces also form a folder."""
    folder = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        blocks = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((40, 32), Image.Resampling.NEAREST).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a portrait number {i}")
        crop = reference_image(i, (224, 224))
        save_face_embeds(folder / f"img{i}.safetensors", _embedding(i), [crop])
        rows.append({"image": f"img{i}.png", "text": f"a portrait number {i}", "face": f"img{i}.safetensors"})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    save_face_embeds(folder / "validation.safetensors", _embedding(99), [reference_image(99, (224, 224))])
    return folder


def config(models: dict, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(base=str(models["sd15"]), data=str(data), output=str(out), variant="faceid", lora_rank=RANK,
                  resolution=32, batch_size=3, max_steps=3, lr=1e-3, checkpoint_every=2, report_to="none",
                  log_every=1, export_dtype="float32")  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def trained(cfg: TrainConfig) -> Trainer:
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    return trainer


def _lora_keys(keys) -> list[str]:  # noqa: ANN001
    return sorted(k for k in keys if "_lora." in k)


def _generate(models: dict, path: Path, face: FaceEmbeds, encoder: Path | None = None) -> np.ndarray:
    ip = attach(load_pipe(models, "sd15"), path, encoder, scale=0.8)
    out = ip(face, generator=torch.Generator().manual_seed(0), **CALL).images
    return np.asarray(out)


def _face(folder: Path, i: int = 0) -> FaceEmbeds:
    from ipadapter.prompt.faces import load_face_file

    return load_face_file(folder / f"img{i}.safetensors")


def test_faceid_trains_projection_layers_and_lora_and_exports_the_official_layout(
    models: dict, faces: Path, tmp_path: Path
) -> None:
    trainer = Trainer(config(models, faces / "train.jsonl", tmp_path / "run", max_steps=4))
    trainer.setup()
    assert trainer.encoder_model is None  # faceid reads the face embedding only
    unet = {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items() if ".processor." not in k}
    start = trainer.handle.state_dict()
    start = {**{f"p.{k}": v.clone() for k, v in start.image_proj.items()},
             **{f"i.{k}": v.clone() for k, v in start.ip_adapter.items()}}  # fmt: skip
    ups = [k for k in start if k.endswith("_lora.up.weight")]
    assert ups and all(not start[k].any() for k in ups)  # LoRA starts as a no-op: the base UNet exactly
    trainer.train()
    assert np.isfinite(trainer.losses).all() and len(trainer.losses) == 4
    now = trainer.handle.state_dict()
    now = {
        **{f"p.{k}": v for k, v in now.image_proj.items()},
        **{f"i.{k}": v for k, v in now.ip_adapter.items()},
    }
    changed = {k.split(".")[0] + (".lora" if "_lora." in k else ".ip" if "_ip." in k else "")
               for k in start if not torch.equal(start[k], now[k].cpu())}  # fmt: skip
    assert changed == {"p", "i.ip", "i.lora"}  # the projection, the image layers and the LoRA all learn
    assert all(torch.equal(v, trainer.pipe.unet.state_dict()[k]) for k, v in unet.items())  # UNet frozen
    from ipadapter.training.model import trainable_state

    live = trainable_state(
        trainer.handle
    ).flat()  # FSDP's gathered state dict names the LoRA as the module does
    gathered = trainable_state(trainer.handle, dict(trainer.module.state_dict())).flat()
    assert live.keys() == gathered.keys() and all(torch.equal(live[k], gathered[k]) for k in live)

    final = tmp_path / "run" / "ip-adapter.safetensors"
    ckpt = load_checkpoint(final)
    spec = detect(ckpt)
    n_procs = len(trainer.pipe.unet.attn_processors)
    assert spec.layout == "faceid" and spec.lora_rank == RANK and spec.lora_ids == tuple(range(n_procs))
    assert spec.num_tokens == 4 and spec.feature_dim == 512 and spec.mlp_dim == 1024
    assert set(ckpt.image_proj) == {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                    "norm.weight", "norm.bias"}  # fmt: skip
    assert len(_lora_keys(ckpt.ip_adapter)) == 8 * n_procs  # to_{q,k,v,out}_lora.{down,up} on every processor
    assert ckpt.ip_adapter["0.to_q_lora.down.weight"].shape[0] == RANK
    assert ckpt.metadata["ipadapter.variant"] == "faceid" and ckpt.metadata["ipadapter.lora_rank"] == str(
        RANK
    )
    image = _generate(models, final, _face(faces))
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_faceid_plus_encodes_the_crop_drops_faces_and_exports_without_lora(
    models: dict, faces: Path, tmp_path: Path
) -> None:
    cfg = config(models, faces / "train.jsonl", tmp_path / "run", variant="faceid-plus", lora_rank=0,
                 image_encoder=str(models["vit_h"]), max_steps=2, validate_every=2,
                 validation_face=str(faces / "validation.safetensors"))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.handle.lora is None and trainer.module.lora is None
    batch = next(trainer._batches())
    assert batch["face"].shape == (3, 512) and batch["clip_pixel_values"].shape == (3, 3, 32, 32)
    seen: list = []
    trainer.handle.projection.register_forward_hook(lambda m, args, out: seen.append(args))
    trainer._loss(batch, step_generator(0, 0))  # drop_image 0.05: these three keep their faces
    face, clip = seen[-1][0], seen[-1][1]
    assert torch.equal(face, batch["face"]) and clip.shape == (3, 17, 32)  # ViT-H-like hidden states
    c = trainer.config
    c.drop_image, c.drop_text, c.drop_both = 1.0, 0.0, 0.0
    trainer._loss(batch, step_generator(0, 0))
    face, clip = seen[-1][0], seen[-1][1]
    zeros = torch.zeros(1, 3, 32, 32)
    negative = trainer.encoder_model(zeros, output_hidden_states=True).hidden_states[-2]
    assert not face.any() and torch.allclose(
        clip, negative.expand_as(clip), atol=1e-6
    )  # the reference's negatives
    c.drop_image, c.drop_text, c.drop_both = 0.05, 0.05, 0.05
    trainer.train()
    assert np.isfinite(trainer.losses).all()
    final = tmp_path / "run" / "ip-adapter.safetensors"
    ckpt = load_checkpoint(final)
    spec = detect(ckpt)
    assert spec.layout == "faceid-plus" and spec.lora_rank is None and not _lora_keys(ckpt.ip_adapter)
    assert spec.clip_feature == ("hidden", 32) and spec.resampler.depth == 4
    assert any(k.startswith("perceiver_resampler.") for k in ckpt.image_proj)
    assert [p.name for p in (tmp_path / "run" / "validation").glob("*.png")] == ["step-0000002.png"]
    image = _generate(models, final, _face(faces), models["vit_h"])
    assert np.isfinite(image).all()


def test_faceid_plus_v2_resumes_to_the_same_weights(models: dict, faces: Path, tmp_path: Path) -> None:
    common = dict(
        variant="faceid-plus", image_encoder=str(models["vit_h"]), plus_version="v2", drop_image=0.3
    )
    whole = trained(config(models, faces / "train.jsonl", tmp_path / "whole", max_steps=4, **common))
    assert whole.module.shortcut
    trained(config(models, faces / "train.jsonl", tmp_path / "split", max_steps=2, **common))
    resumed = Trainer(
        config(models, faces / "train.jsonl", tmp_path / "split", max_steps=4, resume=True, **common)
    )
    resumed.setup()
    assert resumed.step == 2
    resumed.train()
    a = load_checkpoint(tmp_path / "whole" / "ip-adapter.safetensors")
    b = load_checkpoint(tmp_path / "split" / "ip-adapter.safetensors")
    fa, fb = a.flat(), b.flat()
    assert fa.keys() == fb.keys() and _lora_keys(fa)
    for key in fa:
        assert torch.allclose(fa[key], fb[key], atol=1e-6), key
    assert b.metadata["ipadapter.plus_version"] == "v2"
    ip = attach(load_pipe(models, "sd15"), tmp_path / "split" / "ip-adapter.safetensors", models["vit_h"],
                plus_version="v2")  # fmt: skip
    assert ip.spec.lora_rank == RANK and ip.lora_scale == 1.0


def test_cli_trains_faceid_from_a_folder_without_lora_and_validates(
    models: dict, faces: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in faces.glob("img*"):
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "run"
    argv = _argv(models, folder, out, "--lora-rank", "0", "--max-steps", "2", "--validate-every", "2",
                 "--validation-face", str(faces / "validation.safetensors"), "--json")  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 2 and report["skipped"] == 0
    with safe_open(str(out / "ip-adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not _lora_keys(keys)
    assert detect(load_checkpoint(out / "ip-adapter.safetensors")).layout == "faceid"
    assert [p.name for p in (out / "validation").glob("*.png")] == ["step-0000002.png"]
    assert main(["train", "--resume", str(out), "--max-steps", "3"]) == 0  # resumes with its saved settings
    assert json.loads((out / "checkpoints" / "step-0000003" / "state.json").read_text())["step"] == 3


@pytest.mark.parametrize("variant", ["faceid", "faceid-plus"])
def test_cached_faceid_run_matches_the_uncached_one(
    models: dict, faces: Path, tmp_path: Path, variant: str
) -> None:
    extra = {"image_encoder": str(models["vit_h"])} if variant == "faceid-plus" else {}
    plain = trained(config(models, faces / "train.jsonl", tmp_path / "plain", drop_image=0.4, variant=variant,
                           **extra))  # fmt: skip
    cached = trained(config(models, faces / "train.jsonl", tmp_path / "cached", drop_image=0.4, variant=variant,
                            cache_dir=str(tmp_path / "cache"), **extra))  # fmt: skip
    assert np.allclose(plain.losses, cached.losses, rtol=1e-4), (plain.losses, cached.losses)
    with safe_open(str(tmp_path / "cache" / "shard-00000.safetensors"), "pt") as f:
        stored = {k.split(".", 1)[1] for k in f.keys() if k.startswith("0.")}
    # the face is cached; faceid-plus also the features of its crop, faceid (no image features) none
    assert stored == {"moments", "face", "original_size", "crop_top_left"} | (
        {"features"} if variant == "faceid-plus" else set()
    )


def test_a_saved_dataset_gives_faces_as_values_or_files_and_skips_a_bad_one(
    models: dict, faces: Path, tmp_path: Path
) -> None:
    from datasets import Dataset

    from ipadapter.training.data import open_source

    images = [str(faces / f"img{i}.png") for i in range(6)]
    texts = [f"face {i}" for i in range(6)]
    values = [_embedding(i)[0].tolist() for i in range(5)] + [
        [0.5] * 256
    ]  # the last one is no face embedding
    Dataset.from_dict({"image": images, "text": texts, "face": values}).save_to_disk(str(tmp_path / "values"))
    trainer = trained(config(models, tmp_path / "values", tmp_path / "run", batch_size=3, max_steps=2))
    assert [key for key, _ in trainer.skipped] == ["5"] and "256 values per face" in trainer.skipped[0][1]
    assert np.isfinite(trainer.losses).all()
    files = [f"img{i}.safetensors" for i in range(6)]  # relative to the dataset's folder
    Dataset.from_dict({"image": images, "text": texts, "face": files}).save_to_disk(str(tmp_path / "files"))
    (tmp_path / "files" / "img1.safetensors").write_bytes((faces / "img1.safetensors").read_bytes())
    source = open_source(str(tmp_path / "files"), face_column="face")
    assert source[1].face == str(tmp_path / "files" / "img1.safetensors")
    with pytest.raises(InputError, match="no column 'id'"):
        open_source(str(tmp_path / "files"), face_column="id")


@pytest.mark.heavy  # launches processes
@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch tested on Linux")
def test_two_process_faceid_plus_run_trains_the_lora_and_resumes(
    models: dict, faces: Path, tmp_path: Path
) -> None:
    from test_train import _ddp_train

    out = tmp_path / "ddp"
    extra = ("--variant", "faceid-plus", "--image-encoder", str(models["vit_h"]), "--lora-rank", "4")
    done = _ddp_train(
        _argv(models, faces / "train.jsonl", out, "--batch-size", "1", "--max-steps", "2", *extra)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 processes" in done.stdout  # the LoRA is part of the wrapped module: DDP syncs its gradients
    assert detect(load_checkpoint(out / "ip-adapter.safetensors")).lora_rank == 4
    resumed = _ddp_train(["train", "--resume", str(out), "--max-steps", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def _argv(models: dict, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--base", str(models["sd15"]), "--variant", "faceid", "--data", str(data), "--resolution",
            "32", "--batch-size", "2", "--lr", "1e-3", "--output", str(out), "--report-to", "none", *extra]  # fmt: skip


def test_bad_face_data_is_refused_in_one_line(models: dict, faces: Path, tmp_path: Path, capsys) -> None:
    rows = [json.loads(line) for line in (faces / "train.jsonl").read_text().splitlines()]
    data = tmp_path / "data"
    data.mkdir()
    for p in faces.glob("img*"):
        (data / p.name).write_bytes(p.read_bytes())

    def manifest(name: str, edit) -> Path:  # noqa: ANN001
        path = data / name
        path.write_text("\n".join(json.dumps(edit(dict(r), i)) for i, r in enumerate(rows)))
        return path

    no_face = manifest(
        "no_face.jsonl", lambda r, i: {k: v for k, v in r.items() if not (i == 2 and k == "face")}
    )
    fails(capsys, _argv(models, no_face, tmp_path / "a"), "line 3: no 'face' field")
    np.save(data / "short.npy", np.ones(256, np.float32))
    short = manifest("short.jsonl", lambda r, i: {**r, "face": "short.npy"} if i == 0 else r)
    fails(capsys, _argv(models, short, tmp_path / "a"), "short.npy", "256 values per face", "expected (512,)")
    np.save(data / "bare.npy", _embedding(5)[0])
    bare = manifest("bare.jsonl", lambda r, i: {**r, "face": "bare.npy"} if i == 1 else r)
    assert main(_argv(models, bare, tmp_path / "ok", "--max-steps", "1")) == 0  # faceid needs no crop
    capsys.readouterr()
    fails(capsys, _argv(models, bare, tmp_path / "a", "--variant", "faceid-plus", "--image-encoder",
                        str(models["vit_h"])), "bare.npy", "carries no aligned face crop")  # fmt: skip
    two = data / "two.safetensors"
    save_face_embeds(two, np.concatenate([_embedding(1), _embedding(2)]))
    pair = manifest("two.jsonl", lambda r, i: {**r, "face": "two.safetensors"} if i == 0 else r)
    fails(capsys, _argv(models, pair, tmp_path / "a"), "holds 2 faces", "a training example takes one")
    fails(capsys, _argv(models, faces / "train.jsonl", tmp_path / "a", "--variant", "basic", "--lora-rank", "4"),
          "--lora-rank applies to the FaceID variants")  # fmt: skip
    fails(
        capsys,
        _argv(models, faces / "train.jsonl", tmp_path / "a", "--face-column", "id"),
        "no entry has a 'id' field",
        "--face-column",
    )
    (data / "img4.safetensors").unlink()
    fails(capsys, _argv(models, data, tmp_path / "a"), "img4.png: no face file")
    fails(capsys, _argv(models, faces / "train.jsonl", tmp_path / "a", "--validate-every", "1"),
          "--validation-face")  # fmt: skip
    fails(capsys, _argv(models, faces / "train.jsonl", tmp_path / "a", "--validate-every", "1",
                        "--validation-face", str(data / "bare.npy"), "--variant", "faceid-plus",
                        "--image-encoder", str(models["vit_h"])), "--validation-face", "no aligned face crop")  # fmt: skip
    referenced = manifest("ref.jsonl", lambda r, i: {**r, "ref": r["image"]} if i == 1 else r)
    fails(capsys, _argv(models, referenced, tmp_path / "a", "--reference-column", "ref"),
          "line 2: 'ref' names a reference picture", "FaceID runs read the face file")  # fmt: skip
    assert not (tmp_path / "a").exists()  # refused before anything was written
