"""A run folder's checkpoints: ``checkpoints/step-N`` with the adapter, optimizer, lr schedule and position.

A checkpoint is written into a temporary folder and renamed into place, so it exists whole or not at all;
a relaunch with ``resume`` checks the folder holds the same run and continues from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .config import CONFIG, TrainConfig

CHECKPOINTS = "checkpoints"


def checkpoints(output: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def check_output(config: TrainConfig) -> dict[str, Any] | None:
    """The saved config when resuming (after checking it matches), else None (after checking the output
    folder holds no run)."""
    c = config
    output = Path(c.output)
    saved_path = output / CONFIG
    if c.resume:
        if not saved_path.is_file():
            raise InputError(
                f"--resume: '{output}' holds no training run ({CONFIG} missing); "
                "start a new run with --output"
            )
        saved = json.loads(saved_path.read_text())
        diff = c.differences(saved)
        if diff:
            raise InputError(
                f"--resume: '{output}' was trained with another configuration ("
                + "; ".join(diff)
                + "); resume with the same settings or start a new run"
            )
        return saved
    if saved_path.is_file() or checkpoints(output):
        raise InputError(
            f"output '{output}' already holds a training run; pass --resume to continue it "
            "or choose a new --output"
        )
    if output.exists() and not output.is_dir():
        raise InputError(f"output '{output}' is a file; expected a folder for the run")
    return None


def latest_checkpoint(output: Path, accelerator: Any, engine: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint of the run being resumed and its state.json, checked against this
    launch (``engine`` on ``accelerator``'s processes). Every process calls."""
    if accelerator.is_main_process:  # a run killed while writing leaves its temporary folder
        for stale in (output / CHECKPOINTS).glob(".step-*.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    found = checkpoints(output)
    if not found:
        return None  # the run stopped before its first checkpoint: start from the beginning
    saved = json.loads((found[-1] / "state.json").read_text())
    written_by = saved.get("engine", "plain")
    if written_by != engine or (
        written_by != "plain" and saved.get("processes") != accelerator.num_processes
    ):
        raise InputError(
            f"--resume: the last checkpoint {found[-1].name} was written by a {written_by} run on "
            f"{saved.get('processes', '?')} process(es); this launch is {engine} on "
            f"{accelerator.num_processes}: launch it the same way to resume"
        )
    return found[-1], saved


def step_folder(output: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``checkpoints/step-0000042``."""
    return output / CHECKPOINTS / f"step-{step:07d}"


def write_checkpoint(
    output: Path,
    folder: Path,
    tmp: Path,
    *,
    adapter: Any,
    state: dict[str, Any],
    position: dict[str, Any],
    keep: int,
) -> None:
    """Main process: the adapter, ``optimizer.pt`` (``state``) and ``state.json`` (``position``) into ``tmp``,
    which then replaces ``folder``; the run's checkpoints older than the newest ``keep`` are removed."""
    from ..adapters.checkpoint import save_checkpoint

    save_checkpoint(adapter, tmp / "adapter.safetensors")
    torch.save(state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(position, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)  # a checkpoint exists whole or not at all
    for old in checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
