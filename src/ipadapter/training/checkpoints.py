"""A run folder's checkpoints: ``checkpoints/step-N`` with the adapter, optimizer, lr schedule and position.

A checkpoint is written into a temporary folder and renamed into place, so it exists whole or not at all;
a relaunch with ``resume`` checks the folder holds the same run and continues from the newest checkpoint,
read whole before any model is loaded (:func:`resume_point`): a damaged one (a crash before the disk had its
data, a bad copy) is refused by name, with the newest intact checkpoint before it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors.torch import load_file

from ..adapters.checkpoint import load_checkpoint, save_checkpoint
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


@dataclass
class ResumePoint:
    """A checkpoint read whole: its folder, ``state.json``, adapter weights and ``optimizer.pt``."""

    folder: Path
    saved: dict[str, Any]
    adapter: Any  # an adapters.checkpoint.Checkpoint
    state: dict[str, Any]


class _Damaged(Exception):
    """Why a checkpoint can't be resumed from (one line)."""


def _short(error: BaseException, path: Path | None = None) -> str:
    """An exception as a short clause: its first line, first sentence, without the file's path."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if path is not None:
        text = text.replace(f"{path}: ", "").replace(str(path), path.name)
    text = text.split(". ")[0][:160]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _present(path: Path) -> None:
    if not path.exists():
        raise _Damaged(f"{path.name} missing")
    if path.is_file() and path.stat().st_size == 0:
        raise _Damaged(f"{path.name} is empty (0 bytes)")


def read_checkpoint(folder: Path) -> ResumePoint:
    """Every file of the checkpoint ``folder``, read back; raises :class:`_Damaged` saying what is wrong."""
    path = folder / "state.json"
    _present(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Damaged(f"state.json unreadable: {_short(e)}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        raise _Damaged("state.json unreadable: it holds no step number")
    path = folder / "adapter.safetensors"
    _present(path)
    try:
        adapter = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 - any failure to read it back means the file is damaged
        reason: BaseException = e
        try:
            load_file(str(path))  # the low-level reason, when the file itself is broken
        except Exception as low:  # noqa: BLE001
            reason = low
        raise _Damaged(f"adapter.safetensors unreadable: {_short(reason, path)}") from None
    path = folder / "optimizer.pt"
    _present(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, EOF: all damage
        raise _Damaged(f"optimizer.pt unreadable: {_short(e, path)}") from None
    engine = saved.get("engine", "plain")
    wanted = ["lr_scheduler"] + (["optimizer"] if engine == "plain" else [])
    if not isinstance(state, dict) or any(key not in state for key in wanted):
        raise _Damaged(f"optimizer.pt unreadable: it holds no {' or '.join(wanted)} state")
    if engine == "deepspeed":
        _present(folder / "deepspeed")  # ZeRO's optimizer partitions
    elif engine == "fsdp" and not any(
        p.name.startswith("optimizer") and p.name != "optimizer.pt" for p in folder.iterdir()
    ):
        raise _Damaged("FSDP optimizer state (optimizer.bin) missing")
    return ResumePoint(folder, saved, adapter, state)


def resume_point(output: Path) -> ResumePoint | None:
    """The newest checkpoint of the run in ``output``, read whole (None: the run stopped before its first).

    A damaged newest checkpoint is refused, naming it and the newest intact one before it (delete the damaged
    ones to resume from that). Every process calls, before any model is loaded.
    """
    found = checkpoints(output)
    damaged: list[tuple[Path, str]] = []
    for folder in reversed(found):
        try:
            point = read_checkpoint(folder)
        except _Damaged as e:
            damaged.append((folder, str(e)))
            continue
        if not damaged:
            return point
        _refuse(output, damaged, folder)
    if damaged:
        _refuse(output, damaged, None)
    return None  # the run stopped before its first checkpoint: start from the beginning


def _refuse(output: Path, damaged: list[tuple[Path, str]], good: Path | None) -> NoReturn:
    """The one-line refusal: the newest damaged checkpoint, why, and which one to resume from instead."""
    (newest, why), others = damaged[0], ", ".join(folder.name for folder, _ in damaged[1:])
    if good is not None:
        also = f" and {others} (damaged too)" if others else ""
        todo = f"delete it{also} to resume from {good.name}, the previous good checkpoint"
    else:
        todo = (
            f"no earlier checkpoint is intact{f' ({others} damaged too)' if others else ''}; delete "
            f"{output / CHECKPOINTS} to start the run over from step 0, or start a new run with --output"
        )
    raise InputError(f"--resume: checkpoint {newest} is damaged ({why}); {todo}")


def latest_checkpoint(
    output: Path, accelerator: Any, engine: str, point: ResumePoint | None
) -> ResumePoint | None:
    """``point`` (the newest checkpoint, from :func:`resume_point`) checked against this launch (``engine`` on
    ``accelerator``'s processes); a killed run's half-written checkpoint folders are removed. Every process
    calls."""
    if accelerator.is_main_process:  # a run killed while writing leaves its temporary folder
        for stale in (output / CHECKPOINTS).glob(".step-*.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    if point is None:
        return None  # the run stopped before its first checkpoint: start from the beginning
    saved = point.saved
    written_by = saved.get("engine", "plain")
    if written_by != engine or (
        written_by != "plain" and saved.get("processes") != accelerator.num_processes
    ):
        raise InputError(
            f"--resume: the last checkpoint {point.folder.name} was written by a {written_by} run on "
            f"{saved.get('processes', '?')} process(es); this launch is {engine} on "
            f"{accelerator.num_processes}: launch it the same way to resume"
        )
    return point


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
    save_checkpoint(adapter, tmp / "adapter.safetensors")
    torch.save(state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(position, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)  # a checkpoint exists whole or not at all
    for old in checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
