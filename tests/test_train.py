"""`ipadapter train`: the recipe learns, touches only the adapter, resumes exactly, exports for diffusers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CALL, fails, free_port, load_pipe, reference_image, run
from PIL import Image
from safetensors import safe_open
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from ipadapter import InputError, attach, load_checkpoint
from ipadapter.cli import main
from ipadapter.training.config import TrainConfig
from ipadapter.training.seeds import step_generator
from ipadapter.training.trainer import Trainer

TOL = 2 / 255


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight image-caption pairs (blocky colour images, varied sizes) as a folder with .txt captions."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for i in range(8):
        w, h = (40, 32) if i % 2 else (32, 48)
        blocks = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture number {i}")
    return folder


def config(models: dict, data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(base=str(models["sd15"]), data=str(data), output=str(out), variant="basic",
                  image_encoder=str(models["vit_h"]), resolution=32, batch_size=4, max_steps=4, lr=1e-3,
                  checkpoint_every=2, report_to="none", log_every=1)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).flat()


def fixed_loss(trainer: Trainer, batches: list[dict]) -> float:
    """The training loss on fixed batches with fixed noise, drops off: comparable before and after."""
    c = trainer.config
    saved = (c.drop_text, c.drop_image, c.drop_both)
    c.drop_text = c.drop_image = c.drop_both = 0.0
    with torch.no_grad():
        loss = sum(trainer._loss(b, step_generator(123, i)).item() for i, b in enumerate(batches))
    c.drop_text, c.drop_image, c.drop_both = saved
    return loss / len(batches)


def test_loss_goes_down_and_only_the_adapter_changes(models: dict, pairs: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(models, pairs, tmp_path / "run", max_steps=50, checkpoint_every=50, lr=2e-3))
    trainer.setup()
    frozen = {
        "unet": {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items() if ".processor." not in k},
        "vae": {k: v.clone() for k, v in trainer.pipe.vae.state_dict().items()},
        "text": {k: v.clone() for k, v in trainer.pipe.text_encoder.state_dict().items()},
        "image": {k: v.clone() for k, v in trainer.encoder_model.state_dict().items()},
    }
    batches = [next(trainer._batches()) for _ in range(1)]
    before = fixed_loss(trainer, batches)
    start = {k: v.clone() for k, v in trainer.handle.projection.state_dict().items()}
    trainer.train()
    after = fixed_loss(trainer, batches)
    assert after < 0.8 * before, (before, after)
    now = {"unet": trainer.pipe.unet.state_dict(), "vae": trainer.pipe.vae.state_dict(),
           "text": trainer.pipe.text_encoder.state_dict(), "image": trainer.encoder_model.state_dict()}  # fmt: skip
    for part, tensors in frozen.items():
        for key, value in tensors.items():
            assert torch.equal(now[part][key], value), f"{part} {key} changed"
    assert any(not torch.equal(v, start[k]) for k, v in trainer.handle.projection.state_dict().items())
    assert (tmp_path / "run" / "ip-adapter.safetensors").is_file()


def test_branches_start_as_copies_of_the_layer_keys_and_values(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    trainer = Trainer(config(models, pairs, tmp_path / "run"))
    trainer.setup()
    unet = trainer.pipe.unet
    state = trainer.handle.state_dict().ip_adapter  # official keys, e.g. "1.to_k_ip.weight"
    names = trainer.handle.unet_names()  # the same weights' names inside the UNet
    assert set(names) == set(state) and len(state) == 2 * len(trainer.handle.spec.layer_ids)
    unet_state = unet.state_dict()
    for key, name in names.items():
        attn = unet.get_submodule(name.split(".processor.")[0])
        assert torch.equal(unet_state[name], state[key])
        assert torch.equal(state[key], (attn.to_k if ".to_k_ip." in key else attn.to_v).weight.float())


def test_resumed_run_ends_with_the_same_weights(models: dict, pairs: Path, tmp_path: Path) -> None:
    whole = Trainer(config(models, pairs, tmp_path / "whole", max_steps=6, variant="plus", drop_image=0.3,
                           random_crop=True, random_flip=True, batch_size=3))  # fmt: skip
    whole.setup()
    whole.train()
    first = Trainer(config(models, pairs, tmp_path / "split", max_steps=4, variant="plus", drop_image=0.3,
                           random_crop=True, random_flip=True, batch_size=3))  # fmt: skip
    first.setup()
    first.train()
    resumed = Trainer(config(models, pairs, tmp_path / "split", max_steps=6, variant="plus", drop_image=0.3,
                             random_crop=True, random_flip=True, batch_size=3, resume=True))  # fmt: skip
    resumed.setup()
    assert resumed.step == 4
    resumed.train()
    a, b = (
        adapter_tensors(tmp_path / "whole" / "ip-adapter.safetensors"),
        adapter_tensors(tmp_path / "split" / "ip-adapter.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000004", "step-0000006"]


def test_deterministic_runs_with_deterministic_kernels_and_puts_torch_back(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    plain = Trainer(config(models, pairs, tmp_path / "plain", max_steps=2))
    plain.setup()
    plain.train()
    seen = []
    strict = Trainer(config(models, pairs, tmp_path / "strict", max_steps=1, deterministic=True))
    strict.setup()
    loss = strict._loss
    strict._loss = lambda *a: (seen.append(torch.are_deterministic_algorithms_enabled()), loss(*a))[1]
    strict.train()
    assert seen == [True] and not torch.are_deterministic_algorithms_enabled()
    # the switch may change on resume (it changes how, not what, the run computes); the CLI passes it on
    assert main([*_train_argv(models, pairs, tmp_path / "strict", "--resume", str(tmp_path / "strict"),
                              "--max-steps", "2", "--deterministic", "--batch-size", "4")]) == 0  # fmt: skip
    assert not torch.are_deterministic_algorithms_enabled()
    a = adapter_tensors(tmp_path / "plain" / "ip-adapter.safetensors")
    b = adapter_tensors(tmp_path / "strict" / "ip-adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # on the CPU the kernels were deterministic already
    broken = Trainer(config(models, tmp_path / "no-such-data", tmp_path / "broken", deterministic=True))
    with pytest.raises(InputError):
        broken.setup()
    assert not torch.are_deterministic_algorithms_enabled()  # a failed setup leaves nothing switched on
    # an op with no deterministic kernel (torch raises on CUDA) stops the run with a message saying what to do
    stuck = Trainer(config(models, pairs, tmp_path / "stuck", max_steps=1, deterministic=True))
    stuck.setup()

    def no_kernel(*args: object) -> torch.Tensor:
        raise RuntimeError("foo_backward_cuda does not have a deterministic implementation, but you set ...")

    stuck._loss = no_kernel
    with pytest.raises(InputError, match="foo_backward_cuda .* without --deterministic"):
        stuck.train()
    assert not torch.are_deterministic_algorithms_enabled()


def _ddp_train(train_argv: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of the CLI on two CPU processes (DDP over gloo)."""
    # accelerate's `--cpu --num_processes 2` starts ONE process unless MPI is set up; its torch-elastic launcher
    # (`--multi_gpu`) with no visible GPU starts two CPU processes in a gloo group.
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "ipadapter", *train_argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _engine_argv(models: dict, data: Path, out: Path, *extra: str) -> list[str]:
    """The CLI run the engine tests compare: plus, two micro-batches a step, float32 export, checkpoints every 2."""
    return _train_argv(models, data, out, "--variant", "plus", "--grad-accum", "2", "--export-dtype", "float32",
                       "--checkpoint-every", "2", *extra)  # fmt: skip


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ipadapter: error")]


def _train_argv(models: dict, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--base", str(models["sd15"]), "--image-encoder", str(models["vit_h"]), "--variant", "basic",
        "--data", str(data), "--resolution", "32", "--batch-size", "2", "--lr", "1e-3", "--output", str(out),
        "--report-to", "none", *extra,
    ]  # fmt: skip


@pytest.mark.heavy  # launches processes
def test_killed_run_resumes_to_the_same_weights(models: dict, pairs: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = ["--max-steps", "16", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    argv = [sys.executable, "-m", "ipadapter", *_train_argv(models, pairs, tmp_path / "killed", *steps)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "ip-adapter.safetensors").exists(), "the run ended before it was killed"
    (checkpoints / ".step-0000099.tmp-1").mkdir(parents=True, exist_ok=True)  # as a kill mid-write leaves
    assert main(["train", "--resume", str(tmp_path / "killed"), "--json"]) == 0
    assert main(_train_argv(models, pairs, tmp_path / "whole", *steps)) == 0
    # the float32 weights of the last checkpoint (the float16 export could flip a last bit either way)
    a = adapter_tensors(tmp_path / "killed" / "checkpoints" / "step-0000016" / "adapter.safetensors")
    b = adapter_tensors(tmp_path / "whole" / "checkpoints" / "step-0000016" / "adapter.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert not list(checkpoints.glob(".step-*"))  # no half-written checkpoint is left behind


def test_export_loads_in_diffusers_with_the_same_image(models: dict, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_train_argv(models, pairs, out, "--max-steps", "2", "--variant", "plus", "--export-dtype",
                            "float32")) == 0  # fmt: skip
    final = out / "ip-adapter.safetensors"
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
        assert {k.split(".")[0] for k in f.keys()} == {"image_proj", "ip_adapter"}
    assert meta["ipadapter.variant"] == "plus" and meta["ipadapter.steps"] == "2"
    from diffusers import StableDiffusionPipeline

    encoder = CLIPVisionModelWithProjection.from_pretrained(models["vit_h"])
    theirs = StableDiffusionPipeline.from_pretrained(
        models["sd15"], image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32)
    )
    theirs.set_progress_bar_config(disable=True)
    theirs.load_ip_adapter(str(out), subfolder="", weight_name=final.name, image_encoder_folder=None)
    theirs.set_ip_adapter_scale(0.7)
    expected = run(theirs, ip_adapter_image=reference_image())
    ip = attach(load_pipe(models, "sd15"), final, models["vit_h"], scale=0.7)
    assert np.abs(run(ip, reference_image()) - expected).max() <= TOL


def test_sdxl_trains_and_exports(models: dict, pairs: Path, tmp_path: Path) -> None:
    cfg = config(models, pairs, tmp_path / "xl", base=str(models["sdxl"]), image_encoder=str(models["big_g"]),
                 max_steps=2, batch_size=2)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.train()
    ip = attach(load_pipe(models, "sdxl"), tmp_path / "xl" / "ip-adapter.safetensors", models["big_g"])
    assert ip.spec.layout == "basic" and ip.spec.cross_attention_dim == 64
    assert np.isfinite(run(ip, reference_image(), **{k: CALL[k] for k in ("height", "width")})).all()


def test_bad_training_input_is_refused_before_training(
    models: dict, pairs: Path, tmp_path: Path, capsys
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, _train_argv(models, empty, tmp_path / "a"), "no images")
    fails(capsys, _train_argv(models, pairs, tmp_path / "a", "--resolution", "30"), "not a multiple of 8")
    fails(capsys, _train_argv(models, pairs, tmp_path / "a", "--drop-text", "0.7", "--drop-image", "0.7"),
           "sum to at most 1")  # fmt: skip
    fails(capsys, _train_argv(models, pairs, tmp_path / "a", "--noise-offset", "-0.1"), "noise_offset -0.1")
    fails(capsys, ["train", "--data", str(pairs)], "missing --base", "--output")
    fails(capsys, ["train", "--resume", str(tmp_path / "nothing")], "holds no training run")
    other = load_checkpoint(models["ckpt"]["plus_sd15", "safetensors"])  # 16 hidden-state tokens, not basic
    fails(capsys, _train_argv(models, pairs, tmp_path / "a", "--init-adapter",
                               str(models["ckpt"]["plus_sd15", "safetensors"])), "is a plus adapter")  # fmt: skip
    assert other.image_proj
    out = tmp_path / "done"
    assert main(_train_argv(models, pairs, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    fails(capsys, _train_argv(models, pairs, out, "--max-steps", "1"), "already holds a training run")
    fails(capsys, ["train", "--resume", str(out), "--lr", "5e-4"], "another configuration", "lr")
    with pytest.raises(InputError, match="validation image"):
        config(models, pairs, tmp_path / "b", validate_every=2)


def test_corrupt_images_are_skipped_and_counted(models: dict, pairs: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for p in pairs.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "broken.txt").write_text("a broken picture")
    assert main(_train_argv(models, data, tmp_path / "run", "--max-steps", "3", "--json")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] >= 1
    assert "skipped" in captured.err and "broken.png" in captured.err


def test_validation_images_are_written(models: dict, pairs: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.png"
    reference_image().save(ref)
    trainer = Trainer(config(models, pairs, tmp_path / "run", max_steps=2, validate_every=1, report_to="tensorboard",
                             validation_image=str(ref), validation_prompt="a picture"))  # fmt: skip
    trainer.setup()
    trainer.train()
    images = sorted((tmp_path / "run" / "validation").glob("*.png"))
    assert [p.name for p in images] == ["step-0000001.png", "step-0000002.png"]
    assert Image.open(images[0]).size == (32, 32)
    assert list(
        (tmp_path / "run" / "logs").rglob("events.out.tfevents.*")
    )  # loss, lr, images for TensorBoard


def test_a_plain_install_trains_without_tensorboard(
    models: dict, pairs: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default TensorBoard logs when installed; without the package the run trains and says so once."""
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    assert main(_train_argv(models, pairs, tmp_path / "run", "--max-steps", "1", "--report-to", "auto")) == 0
    err = capsys.readouterr().err
    assert (
        err.count("no TensorBoard logging") == 1 and (tmp_path / "run" / "ip-adapter.safetensors").is_file()
    )
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))
    asked = _train_argv(models, pairs, tmp_path / "b", "--max-steps", "1", "--report-to", "tensorboard")
    assert main(asked) == 2
    assert any("needs the tensorboard package" in line for line in _error_lines(capsys.readouterr().err))


@pytest.mark.heavy  # launches processes
@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch tested on Linux")
def test_two_process_cpu_run_writes_one_checkpoint(models: dict, pairs: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = _ddp_train(_train_argv(models, pairs, out, "--max-steps", "2", "--checkpoint-every", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert done.stdout.count("wrote ") == 1  # one report, from the main process
    assert "on 2 processes" in done.stdout  # really distributed
    assert (out / "ip-adapter.safetensors").is_file()


def test_cached_run_matches_the_uncached_one(models: dict, pairs: Path, tmp_path: Path) -> None:
    common = dict(max_steps=3, variant="plus", drop_image=0.4, batch_size=3, export_dtype="float32")
    plain = Trainer(config(models, pairs, tmp_path / "plain", **common))
    plain.setup()
    plain.train()
    cache = tmp_path / "cache"
    cached = Trainer(config(models, pairs, tmp_path / "cached", cache_dir=str(cache), **common))
    cached.setup()
    shard = cache / "shard-00000.safetensors"
    built = shard.stat().st_mtime_ns
    cached.train()
    a = adapter_tensors(tmp_path / "plain" / "ip-adapter.safetensors")
    b = adapter_tensors(tmp_path / "cached" / "ip-adapter.safetensors")
    # Same latents (sampled from the cached moments with the step's generator) and features, up to float
    # rounding from other batch compositions; Adam can turn such rounding into lr-sized steps on weights
    # whose gradient is ~0, so compare the losses tightly and the weights on average.
    assert np.allclose(plain.losses, cached.losses, rtol=1e-4), (plain.losses, cached.losses)
    for key in a:
        assert (a[key] - b[key]).abs().mean() < 1e-4, key
    again = Trainer(config(models, pairs, tmp_path / "again", cache_dir=str(cache), **common))
    again.setup()
    assert shard.stat().st_mtime_ns == built  # reused, not recomputed
    with pytest.raises(InputError, match="built for other settings.*resolution"):
        Trainer(
            config(models, pairs, tmp_path / "other", cache_dir=str(cache), resolution=48, **common)
        ).setup()
    with pytest.raises(InputError, match="random crops"):
        config(models, pairs, tmp_path / "x", cache_dir=str(cache), random_crop=True)


def test_sdxl_gets_size_and_crop_ids_and_v_prediction_targets_velocity(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    import shutil

    base = tmp_path / "sdxl_v"
    shutil.copytree(models["sdxl"], base)
    sched = base / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"}))
    trainer = Trainer(config(models, pairs, tmp_path / "run", base=str(base), image_encoder=str(models["big_g"]),
                             batch_size=2, random_crop=True))  # fmt: skip
    trainer.setup()
    seen: dict = {}
    trainer.pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw["added_cond_kwargs"]), with_kwargs=True
    )
    velocity = trainer.noise_scheduler.get_velocity
    calls = []
    trainer.noise_scheduler.get_velocity = lambda *a: calls.append(1) or velocity(*a)
    batch = next(trainer._batches())
    trainer._loss(batch, step_generator(0, 0))
    want = torch.cat([batch["original_size"], batch["crop_top_left"], torch.tensor([[32, 32]] * 2)], dim=1)
    assert torch.equal(seen["time_ids"].cpu(), want.float())
    assert seen["text_embeds"].shape == (2, 32)  # the second text encoder's pooled projection
    assert calls == [1]  # the base predicts v, so the target is the velocity


def test_noise_offset_moves_each_examples_channels_by_one_constant(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    """``--noise-offset`` (offset noise): the step's noise plus, per example and channel, one random constant."""
    noises = {}
    for offset in (0.0, 0.5):
        trainer = Trainer(config(models, pairs, tmp_path / str(offset), batch_size=3, noise_offset=offset))
        trainer.setup()
        seen: list[torch.Tensor] = []

        def add_noise(x, noise, t, seen=seen, real=trainer.noise_scheduler.add_noise):
            seen.append(noise)
            return real(x, noise, t)

        trainer.noise_scheduler.add_noise = add_noise
        trainer._loss(next(trainer._batches()), step_generator(0, 0))
        noises[offset] = seen[0]
    shift = noises[0.5] - noises[0.0]
    assert shift.abs().amin() > 0  # every value moved ...
    per_channel = shift.amax(dim=(2, 3)) - shift.amin(dim=(2, 3))
    assert per_channel.max() < 1e-5  # ... by one constant per example and channel
    assert len(set(shift[:, :, 0, 0].flatten().tolist())) == shift.shape[0] * shift.shape[1]


def test_streamed_tar_shards_train_and_resume_exactly(models: dict, pairs: Path, tmp_path: Path) -> None:
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    images = sorted(pairs.glob("*.png"))
    for s in range(2):
        with tarfile.open(shards / f"data-{s:03d}.tar", "w") as tar:
            for img in images[s * 4 : (s + 1) * 4]:
                tar.add(img, arcname=img.name)
                tar.add(img.with_suffix(".txt"), arcname=img.with_suffix(".txt").name)
    data = str(shards / "data-{000..001}.tar")
    whole = Trainer(
        config(models, data, tmp_path / "whole", max_steps=4, batch_size=3, export_dtype="float32")
    )
    whole.setup()
    assert whole.source.streaming
    whole.train()
    first = Trainer(
        config(models, data, tmp_path / "split", max_steps=2, batch_size=3, export_dtype="float32")
    )
    first.setup()
    first.train()
    resumed = Trainer(config(models, data, tmp_path / "split", max_steps=4, batch_size=3, export_dtype="float32",
                             resume=True))  # fmt: skip
    resumed.setup()
    resumed.train()
    assert np.allclose(whole.losses[2:], resumed.losses, rtol=1e-6)
    a = adapter_tensors(tmp_path / "whole" / "ip-adapter.safetensors")
    b = adapter_tensors(tmp_path / "split" / "ip-adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_engine_options_gradient_checkpointing_accumulation_bf16(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    common = dict(max_steps=2, variant="plus", batch_size=2, export_dtype="float32")
    runs = {}
    for name, extra in {"plain": {}, "ckpt": {"gradient_checkpointing": True},
                        "accum": {"grad_accum": 2}, "bf16": {"mixed_precision": "bf16"}}.items():  # fmt: skip
        trainer = Trainer(config(models, pairs, tmp_path / name, **common, **extra))
        trainer.setup()
        trainer.train()
        runs[name] = (trainer, adapter_tensors(tmp_path / name / "ip-adapter.safetensors"))
    plain, ckpt = runs["plain"][1], runs["ckpt"][1]
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)  # recomputation, same result
    assert runs["accum"][0].samples == 2 * runs["plain"][0].samples  # two micro-batches per step
    assert np.isfinite(runs["bf16"][0].losses).all() and runs["bf16"][0].weight_dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in runs["bf16"][1].values())


def test_an_fsdp_gathered_state_dict_gives_the_same_adapter(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    from ipadapter.training.model import trainable_state

    trainer = Trainer(config(models, pairs, tmp_path / "run", variant="plus"))
    trainer.setup()
    trainer.train()
    live = trainable_state(trainer.handle).flat()
    # FSDP's full state dict has the wrapped module's own parameter names (here: the unwrapped module's)
    gathered = trainable_state(trainer.handle, dict(trainer.module.state_dict())).flat()
    assert live.keys() == gathered.keys()
    for key in live:
        assert torch.equal(live[key], gathered[key]), key


def _deepspeed_train(
    models: dict, pairs: Path, out: Path, env: dict, *extra: str
) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        str(Path(__file__).parent / "deepspeed_cpu.py"),
        *_engine_argv(models, pairs, out, *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **env}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy  # launches processes
def test_deepspeed_zero2_trains_the_same_weights_and_resumes_exactly(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    pytest.importorskip("deepspeed")
    plain = Trainer(config(models, pairs, tmp_path / "plain", variant="plus", batch_size=2, grad_accum=2,
                           export_dtype="float32"))  # fmt: skip
    plain.setup()
    plain.train()
    zero2 = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    first = _deepspeed_train(models, pairs, tmp_path / "ds", zero2, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "(DeepSpeed)" in first.stdout
    assert (
        tmp_path / "ds" / "checkpoints" / "step-0000002" / "deepspeed"
    ).is_dir()  # ZeRO optimizer partitions
    second = _deepspeed_train(
        models, pairs, tmp_path / "ds", zero2, "--max-steps", "4", "--resume", str(tmp_path / "ds")
    )
    assert second.returncode == 0, second.stderr[-3000:]
    a = adapter_tensors(tmp_path / "plain" / "ip-adapter.safetensors")
    b = adapter_tensors(tmp_path / "ds" / "ip-adapter.safetensors")
    for key in a:  # DeepSpeed's accumulation, clipping off and optimizer step are the plain run's
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    with pytest.raises(InputError, match="written by a deepspeed run on 1 process.*launch it the same way"):
        Trainer(config(models, pairs, tmp_path / "ds", variant="plus", batch_size=2, grad_accum=2,
                       export_dtype="float32", max_steps=6, resume=True)).setup()  # fmt: skip


@pytest.mark.heavy  # launches processes
def test_deepspeed_bf16_validates_and_bad_configs_are_refused_in_one_line(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    pytest.importorskip("deepspeed")
    from concurrent.futures import ThreadPoolExecutor

    config_file = tmp_path / "ds.json"
    config_file.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": 5, "zero_optimization": {"stage": 2}})
    )
    zero2 = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    bf16_args = ("--mixed-precision", "bf16", "--max-steps", "2", "--validate-every", "2", "--validation-image",
                 str(pairs / "img0.png"))  # fmt: skip
    with ThreadPoolExecutor(3) as pool:  # independent launches, side by side
        runs = [
            pool.submit(_deepspeed_train, models, pairs, tmp_path / "z3", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
            pool.submit(_deepspeed_train, models, pairs, tmp_path / "b",
                        {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config_file)}),
            pool.submit(_deepspeed_train, models, pairs, tmp_path / "bf16", zero2, *bf16_args),
        ]  # fmt: skip
        stage3, batch, bf16 = (run.result() for run in runs)
    # bf16: DeepSpeed casts the whole wrapped module (the adapter too); training and validation still run
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    assert [p.name for p in (tmp_path / "bf16" / "validation").glob("*.png")] == ["step-0000002.png"]
    exported = adapter_tensors(tmp_path / "bf16" / "ip-adapter.safetensors")
    assert all(torch.isfinite(v).all() for v in exported.values())
    assert stage3.returncode != 0
    lines = _error_lines(stage3.stderr)
    assert len(lines) == 1 and "ZeRO stage 3 is not supported" in lines[0] and "zero_stage 1 or 2" in lines[0]
    lines = _error_lines(batch.stderr)
    assert batch.returncode != 0 and len(lines) == 1, batch.stderr[-2000:]
    assert "train_micro_batch_size_per_gpu = 5 but this run has --batch-size 2" in lines[0]
    assert (
        not (tmp_path / "z3").exists() and not (tmp_path / "b").exists()
    )  # refused before anything is written


def _fsdp_train(
    models: dict,
    pairs: Path,
    out: Path,
    processes: int,
    *extra: str,
    version: int = 2,
    check: bool = True,
    **env: str,
) -> str:
    """Run the CLI under FSDP on `processes` CPU processes (gloo); rank 0's stdout (+ stderr when not checked)."""
    rendezvous = out.parent / f".{out.name}-rendezvous-{time.time_ns()}"  # a file: no port to race for
    argv = [
        sys.executable,
        str(Path(__file__).parent / "fsdp_cpu.py"),
        *_engine_argv(models, pairs, out, *extra),
    ]
    procs, logs = [], []
    for rank in range(processes):
        rank_env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "RANK": str(rank),
                    "WORLD_SIZE": str(processes), "FSDP_RENDEZVOUS": str(rendezvous), "FSDP_VERSION": str(version),
                    **env}  # fmt: skip
        log = out.parent / f".{out.name}-rank{rank}.log"  # files, not pipes: a full pipe would block a rank
        logs.append(log)
        with open(log, "w") as sink:
            procs.append(subprocess.Popen(argv, env=rank_env, stdout=sink, stderr=subprocess.STDOUT))
    deadline = time.time() + 300
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(
            p.returncode not in (None, 0) for p in procs
        ):  # one rank failed: the others would wait forever
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    texts = [log.read_text() for log in logs]
    if check:
        for rank, (p, text) in enumerate(zip(procs, texts, strict=True)):
            assert p.returncode == 0, f"rank {rank}: {text[-3000:]}"
    return texts[0]


@pytest.mark.heavy  # launches processes
@pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU launch tested on Linux")
def test_fsdp_over_two_processes_trains_like_ddp_and_resumes(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    done = _ddp_train(_engine_argv(models, pairs, tmp_path / "ddp", "--max-steps", "4"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "fsdp"
    validation = ["--validate-every", "2", "--validation-image", str(pairs / "img0.png")]
    # rank 1 starts late: rank 0 must not make the folder a run before rank 1 has checked it is free
    first = _fsdp_train(models, pairs, out, 2, "--max-steps", "2", *validation, FSDP_LATE_S="8")
    assert "on 2 processes (FSDP)" in first
    assert (
        out / "checkpoints" / "step-0000002" / "optimizer.bin"
    ).is_file()  # FSDP's gathered optimizer state
    _fsdp_train(models, pairs, out, 2, "--max-steps", "4", "--resume", str(out), *validation)
    a = adapter_tensors(tmp_path / "ddp" / "ip-adapter.safetensors")
    b = adapter_tensors(out / "ip-adapter.safetensors")
    for key in a:  # sharded gradients and optimizer, gathered for export: DDP's weights up to summation order
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    images = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert images == ["step-0000002.png", "step-0000004.png"]  # rendered by every rank, saved by one


@pytest.mark.heavy  # launches processes
def test_fsdp1_trains_the_plain_runs_weights_and_size_based_wrapping_is_refused(
    models: dict, pairs: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # independent launches, side by side
        fsdp1 = pool.submit(_fsdp_train, models, pairs, tmp_path / "fsdp1", 1, "--max-steps", "2", version=1)
        sized = pool.submit(_fsdp_train, models, pairs, tmp_path / "sized", 1, check=False,
                            FSDP_POLICY="size_based_wrap")  # fmt: skip
        plain = Trainer(config(models, pairs, tmp_path / "plain", variant="plus", batch_size=2, grad_accum=2,
                               export_dtype="float32", max_steps=2))  # fmt: skip
        plain.setup()
        plain.train()
        fsdp1_out, sized_out = fsdp1.result(), sized.result()
    assert "(FSDP)" in fsdp1_out
    a = adapter_tensors(tmp_path / "plain" / "ip-adapter.safetensors")
    b = adapter_tensors(tmp_path / "fsdp1" / "ip-adapter.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    lines = _error_lines(sized_out)
    assert len(lines) == 1 and "SIZE_BASED_WRAP" in lines[0] and "TRANSFORMER_BASED_WRAP" in lines[0]
    assert not (tmp_path / "sized").exists()  # refused before anything is written


def test_reference_pictures_are_what_the_encoder_reads(models: dict, pairs: Path, tmp_path: Path) -> None:
    """A manifest's ``reference`` field: example i is encoded from another picture; its target stays its own."""
    from ipadapter.training.cache import FeatureCache

    own = tmp_path / "own.jsonl"
    own.write_text(
        "\n".join(json.dumps({"image": str(pairs / f"img{i}.png"), "text": f"t{i}"}) for i in range(8))
    )
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("\n".join(json.dumps({"image": str(pairs / f"img{i}.png"), "text": f"t{i}",
                                             "reference": str(pairs / f"img{(i + 1) % 8}.png")})
                                 for i in range(8)))  # fmt: skip
    common = dict(max_steps=1, variant="plus", batch_size=2, export_dtype="float32")
    runs = {}
    for name, data in (("own", own), ("swapped", swapped)):
        trainer = Trainer(
            config(models, data, tmp_path / name, cache_dir=str(tmp_path / f"cache-{name}"), **common)
        )
        trainer.setup()
        runs[name] = FeatureCache(
            tmp_path / f"cache-{name}", json.loads((tmp_path / f"cache-{name}" / "index.json").read_text())
        )
    for i in range(8):
        a, b = runs["own"].example((i + 1) % 8), runs["swapped"].example(i)
        assert torch.allclose(a["features"], b["features"])  # the reference's features
        assert torch.equal(runs["own"].example(i)["moments"], b["moments"])  # the example's own target
    with pytest.raises(InputError, match="built for other settings.*reference_column"):
        Trainer(
            config(models, swapped, tmp_path / "x", cache_dir=str(tmp_path / "cache-own"), **common)
        ).setup()
