"""`ipadapter train` on hostile input: data with too few readable images, damaged checkpoints on --resume.

Each case must fail with one clear line (exit 2) before any training work and write nothing, or train only
on real samples.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import fails
from PIL import Image
from test_train import _train_argv, config

from ipadapter import InputError
from ipadapter.training.seeds import epoch_order
from ipadapter.training.trainer import FINAL, Trainer

CORRUPT = b"\x89PNG\r\n\x1a\n not really a picture"


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blocks).resize((40, 32), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(folder: Path, n: int, bad: set[int]) -> Path:
    """``n`` captioned images img0.png ... (sorted by index); those in ``bad`` are corrupt PNGs."""
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(CORRUPT if i in bad else png(i))
        (folder / f"img{i}.txt").write_text(f"a picture number {i}")
    return folder


def tar_shard(path: Path, n: int, bad: set[int]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for name, data in ((f"{i:04d}.png", CORRUPT if i in bad else png(i)), (f"{i:04d}.txt", b"a cat")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def no_models(*args: object) -> None:
    raise AssertionError("the models were loaded: the input was not checked first")


# ------------------------------------------------------------------------------ too few readable images


def test_a_folder_with_no_readable_image_is_refused_and_nothing_is_written(
    models: dict, tmp_path: Path, capsys
) -> None:
    data = image_folder(tmp_path / "data", 5, bad=set(range(5)))
    out = tmp_path / "run"
    line = fails(capsys, _train_argv(models, data, out, "--max-steps", "6"), "0 of 5 training images",
                 "could be read", "img0.png", "expected at least 2 (one batch", "--batch-size")  # fmt: skip
    assert "first problems" in line
    assert not out.exists()  # no adapter, no checkpoint, no config


@pytest.mark.parametrize(("bad", "found"), [({0, 1}, "3 of 5"), (set(), "5 of 5")])
def test_fewer_readable_images_than_one_batch_are_refused_before_loading_models(
    models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: set[int], found: str
) -> None:
    data = image_folder(tmp_path / "data", 5, bad=bad)
    monkeypatch.setattr(Trainer, "_load_models", no_models)
    trainer = Trainer(config(models, data, tmp_path / "run", batch_size=8))
    with pytest.raises(InputError, match=rf"{found} training images .* expected at least 8 \(one batch"):
        trainer.setup()
    assert not (tmp_path / "run").exists()


def test_streamed_shards_with_too_few_readable_images_are_refused(
    models: dict, tmp_path: Path, capsys
) -> None:
    dead = tar_shard(tmp_path / "dead.tar", 4, bad={0, 1, 2, 3})
    fails(capsys, _train_argv(models, dead, tmp_path / "a"), "0 of 4 training images", "at least 2")
    thin = tar_shard(tmp_path / "thin.tar", 3, bad={0, 2})
    fails(capsys, _train_argv(models, thin, tmp_path / "b"), "1 of 3 training images", "at least 2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    fails(capsys, _train_argv(models, empty, tmp_path / "c"), "is empty")


def test_a_first_batch_of_unreadable_images_is_no_step_on_nothing(models: dict, tmp_path: Path) -> None:
    first = set(epoch_order(8, 42, 0)[:4])  # the run's first batch (seed 42, batch 4): all corrupt
    data = image_folder(tmp_path / "data", 8, bad=first)
    trainer = Trainer(config(models, data, tmp_path / "run", max_steps=2, batch_size=4, seed=42))
    trainer.setup()
    sizes: list[int] = []
    loss = trainer._loss
    trainer._loss = lambda batch, gen: (sizes.append(len(batch["texts"])), loss(batch, gen))[1]
    trainer.train()
    assert len(sizes) == 2 and all(sizes), sizes  # every step learned from real samples
    assert len(trainer.skipped) >= 4


# ---------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def finished_run(models: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, run folder) of a 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("hostile_run")
    data = image_folder(root / "data", 8, bad=set())
    trainer = Trainer(config(models, data, root / "run", max_steps=4, checkpoint_every=2))
    trainer.setup()
    trainer.train()
    return data, root / "run"


def damage(folder: Path, how: str) -> None:
    name, _, kind = how.partition(":")
    path = folder / name
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "missing":
        path.unlink()
    else:  # garbage
        path.write_bytes(b"\x00garbage\xff" * 16)


@pytest.mark.parametrize(
    "how",
    ["state.json:truncated", "state.json:garbage", "adapter.safetensors:truncated", "adapter.safetensors:missing",
     "optimizer.pt:truncated", "optimizer.pt:empty", "optimizer.pt:garbage"],
)  # fmt: skip
def test_a_damaged_last_checkpoint_is_named_before_any_work(
    models: dict, finished_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    data, original = finished_run
    run = shutil.copytree(original, tmp_path / "run")
    damage(run / "checkpoints" / "step-0000004", how)
    monkeypatch.setattr(Trainer, "_load_models", no_models)
    trainer = Trainer(config(models, data, run, max_steps=6, checkpoint_every=2, resume=True))
    file = how.split(":")[0]
    with pytest.raises(InputError, match=rf"step-0000004 is damaged \({file} .*step-0000002") as caught:
        trainer.setup()
    assert "\n" not in str(caught.value)


def test_resume_from_a_damaged_checkpoint_fails_in_one_line_then_resumes_from_the_good_one(
    models: dict, finished_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    data, original = finished_run
    run = shutil.copytree(original, tmp_path / "run")
    newest = run / "checkpoints" / "step-0000004"
    damage(newest, "optimizer.pt:truncated")
    exported = (run / FINAL).stat().st_mtime_ns
    line = fails(capsys, ["train", "--resume", str(run), "--max-steps", "6"], str(newest), "is damaged",
                 "optimizer.pt", "delete", "step-0000002")  # fmt: skip
    assert "internal error" not in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert (run / FINAL).stat().st_mtime_ns == exported  # nothing was trained or written
    shutil.rmtree(newest)  # what the message says to do
    resumed = Trainer(config(models, data, run, max_steps=6, checkpoint_every=2, resume=True))
    resumed.setup()
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == 6 and (run / "checkpoints" / "step-0000006").is_dir()


def test_when_every_checkpoint_is_damaged_the_message_says_to_start_over(
    models: dict, finished_run: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    data, original = finished_run
    run = shutil.copytree(original, tmp_path / "run")
    damage(run / "checkpoints" / "step-0000004", "adapter.safetensors:truncated")
    damage(run / "checkpoints" / "step-0000002", "state.json:garbage")
    fails(capsys, ["train", "--resume", str(run), "--max-steps", "6"], "step-0000004 is damaged",
          "no earlier checkpoint is intact", "step 0")  # fmt: skip
