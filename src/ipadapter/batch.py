"""``ipadapter batch``: a JSON-lines manifest of jobs, run with models loaded once; resumable, accelerate-ready.

One job per line: the command line's generation options as JSON keys (:data:`ipadapter.jobs.options.OPTIONS`)
plus :data:`BATCH_KEYS` (``output``). Relative paths are relative to the manifest's folder. Blank
lines and lines starting with ``#`` are skipped; line numbers count every line, from 1.

- A job whose output file(s) exist is skipped: rerunning a manifest resumes it. Results are written to a
  temporary name and renamed, so a killed run never leaves a half file under a final name.
- A line that fails (bad JSON, unknown key, missing file, models that do not fit, anything the engine
  raises) is reported with its number and one line of text, appended to ``DIR/failures.jsonl``, and the run
  goes on.
- In a process group (``accelerate launch --num_processes N``, ``torchrun``) the jobs left to do are split
  between the processes (each job done by exactly one); each process has its own device, engine and
  ``failures-<rank>.jsonl``, and the main process returns the merged report. CPU processes form a gloo group:
  accelerate 1.15 starts several of them with ``--multi_gpu`` on a machine without CUDA (its ``--cpu
  --num_processes N`` starts ONE process unless MPI is configured).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files, media
from .errors import InputError, IPAdapterError
from .jobs.engine import Engine
from .jobs.job import Result
from .jobs.options import Limits, check_options, job_from_options, local_files, near
from .prompt.influence_render import check_influence_path, write_influence

BATCH_KEYS: dict[str, str] = {
    "output": "file name inside the output folder: .png (.gif or .mp4 for video); default LINE.png / LINE.gif",
    "influence_map": "also write where each adapter / reference acted, inside the output folder: .png (overlaid "
    "on the output) or .npy (the raw maps)",
}
_MODEL_KEYS = ("base", "base_config", "adapter", "image_encoder", "controlnet", "motion_adapter")
_FAILURES = re.compile(r"failures(-\d+)?\.jsonl")


@dataclass
class Line:
    """One job line of a manifest, planned: its options and output files, or why it cannot run."""

    line: int
    options: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None  # inside the output folder
    files: list[Path] = field(default_factory=list)  # what the job writes (numbered when several images)
    error: str | None = None
    influence: Path | None = None  # the influence map's file, inside the output folder


# ---------------------------------------------------------------------------------------------------------
# Reading and planning (no models, no torch)
# ---------------------------------------------------------------------------------------------------------


def read_manifest(manifest: Path, output_dir: Path, limits: Limits = Limits()) -> list[Line]:  # noqa: B008
    """Every job line of ``manifest`` with its output files in ``output_dir``, or the line's error.

    Raises InputError only for the manifest itself (missing, a folder, not UTF-8); a bad line is returned
    with ``error`` set so the others still run.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        what = "is a folder" if manifest.is_dir() else "does not exist"
        raise InputError(
            f"manifest '{manifest}' {what}; expected a .jsonl file with one job (a JSON object) per line"
        )
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"manifest '{manifest}' is not UTF-8 text; save it as UTF-8") from None
    lines: list[Line] = []
    claimed: dict[Path, int] = {}  # output file -> the line that writes it
    for number, raw in enumerate(text.split("\n"), start=1):  # "\n" only: numbers match an editor's
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            continue
        entry = Line(number)
        try:
            _parse_line(entry, raw, output_dir, limits)
            for path in entry.files:
                if path in claimed:
                    raise InputError(
                        f"output '{path.relative_to(output_dir)}' is also written by line {claimed[path]}; "
                        "give each line its own 'output'"
                    )
            claimed.update(dict.fromkeys(entry.files, number))
        except InputError as e:
            entry.error = _one_line(e)
        lines.append(entry)
    return lines


def _parse_line(entry: Line, raw: str, output_dir: Path, limits: Limits) -> None:
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(
            f"not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line"
        ) from None
    except RecursionError:
        raise InputError(
            "the JSON is nested too deeply to read; write one flat JSON object per line"
        ) from None
    if not isinstance(options, dict):
        raise InputError(
            f"got a JSON {type(options).__name__}; expected an object such as "
            '{"base": "...", "adapter": "...", "image": "ref.png"}'
        )
    video = options.get("mode") == "video"
    name = _output_name(options.pop("output", None), entry.line, video, output_dir)
    influence = options.pop("influence_map", None)
    if influence is not None:
        influence = _inside(influence, "influence_map", output_dir)
        check_influence_path(influence)
    checked = check_options(options)  # every option's type and bounds, and the limits, before any model
    limits.check(checked)
    count = checked.get("num_images") or 1
    entry.options = options
    entry.output = output_dir / name
    entry.files = media.numbered(entry.output, 1 if video else count)
    if influence is not None:
        entry.influence = output_dir / influence
        maps = media.numbered(entry.influence, 1 if video else count)
        if set(maps) & set(entry.files):
            raise InputError(
                f"'influence_map' '{influence}' would overwrite the line's own output; give it another name, e.g. "
                f'"{entry.influence.stem}-influence{entry.influence.suffix}"'
            )
        entry.files += maps


def _output_name(value: Any, line: int, video: bool, output_dir: Path) -> Path:
    """The job's file name inside the output folder (subfolders allowed; nothing that leaves it)."""
    if value is None:
        return Path(f"{line:05d}{'.gif' if video else '.png'}")
    path = _inside(value, "output", output_dir)
    media.check_output(path, video, "'output'")
    return path


def _inside(value: Any, key: str, output_dir: Path) -> Path:
    """A file name inside the output folder (subfolders allowed; nothing that leaves it)."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"'{key}' is {value!r}; expected a file name such as \"cat.png\"")
    path = Path(value)
    inside = (output_dir / path).resolve().is_relative_to(output_dir.resolve())
    if path.is_absolute() or ".." in path.parts or not inside:
        raise InputError(
            f"'{key}' '{value}' is outside the output folder; give a file name inside it (subfolders are "
            "fine; absolute paths and '..' are not)"
        )
    if files.temp_target(path.name) is not None:
        raise InputError(
            f"'{key}' '{value}' looks like a temporary file of this command; choose another name"
        )
    return Path(os.path.normpath(value))


# ---------------------------------------------------------------------------------------------------------
# Running one line
# ---------------------------------------------------------------------------------------------------------


def _models_near(options: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Model keys naming a file or folder beside the manifest point there; others stay (hub ids, names)."""

    def beside(value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return value
        there = near(value, base_dir)
        return there if Path(there).exists() else value

    out = dict(options)
    for key in _MODEL_KEYS:
        if key in out:
            out[key] = [beside(v) for v in out[key]] if isinstance(out[key], list) else beside(out[key])
    return out


def run_line(entry: Line, engine: Engine, manifest: Path, limits: Limits = Limits()) -> list[Path]:  # noqa: B008
    """Run one planned line with ``engine`` and write its result(s); returns the files written."""
    base_dir = Path(manifest).absolute().parent
    locate, resolve_file = local_files(base_dir)
    job = job_from_options(
        _models_near(entry.options, base_dir),
        locate=locate,
        resolve_file=resolve_file,
        base_dir=base_dir,
        limits=limits,
    )
    if entry.influence is not None:
        job = dataclasses.replace(job, influence=True)
    result = engine.run(job)  # its parameters name files as the manifest wrote them
    params = {**result.params, "manifest": Path(manifest).name, "line": entry.line}
    written = _write(result, entry, job.fps, params)
    if entry.influence is not None:
        pictures = [result.images[len(result.images) // 2]] if result.video else result.images
        written += write_influence(entry.influence, result.influence, pictures)
    return written


def _write(result: Result, entry: Line, fps: float, params: dict[str, Any]) -> list[Path]:
    """Write under temporary names, then rename them all: a final name only ever holds a complete file."""
    assert entry.output is not None
    entry.output.parent.mkdir(parents=True, exist_ok=True)
    finals = media.numbered(entry.output, 1 if result.video else len(result.images))
    temp = files.temp_path(entry.output)  # numbered like the finals: media writes exactly the temps below
    with files.atomic_paths(finals) as temps:
        assert temps == media.numbered(temp, len(finals))
        if result.video:
            media.save_video(result.images, temp, fps, params)
        else:
            media.save_images(result.images, temp, params)
    return finals


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def run_batch(
    manifest: Path,
    output: Path,
    *,
    device: str = "auto",
    dtype: str | None = None,
    quiet: bool = False,
    compile: bool = False,
    limits: Limits = Limits(),  # noqa: B008 - frozen
) -> dict[str, Any] | None:
    """Run every job of ``manifest`` into the folder ``output``; returns the report (None on non-main processes).

    ``compile``: each denoiser is compiled once, on first use (see :class:`~ipadapter.jobs.engine.Engine`).
    ``limits``: the most work one line may ask for (a line over them fails alone, before any model loads).

    Report: ``{"jobs": n, "done": [files], "skipped": [files], "failed": [{"line": k, "error": "..."}],
    "seconds": s, "failures": [files], "processes": [{"process", "device", "done", "failed", "seconds"}]}``.
    Without ``quiet``, prints one line per job and a summary. Raises InputError only for problems of the
    whole run (the manifest, the output folder, the device); a failing line is reported and the run goes on.
    """
    started = time.perf_counter()
    manifest, output = Path(manifest), Path(output)
    state = _process_group(device)
    multi = state is not None and state.num_processes > 1
    rank = state.process_index if multi else 0
    main = not multi or state.is_main_process
    if output.exists() and not output.is_dir():
        raise InputError(
            f"--output '{output}' is a file; expected a folder for the results (made if missing)"
        )
    lines = read_manifest(manifest, output, limits)
    engine = Engine(_device(state, device), dtype, compile=compile)  # loads nothing until a job runs
    pending, skipped = [], []
    for entry in lines:
        done = entry.error is None and all(path.is_file() for path in entry.files)
        (skipped if done else pending).append(entry)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(output, lines)
        if not quiet:
            for entry in skipped:
                print(f"line {entry.line}: skipped, {_names(entry.files)} exists", flush=True)
    share = pending
    if multi:
        state.wait_for_everyone()  # every process planned before anyone writes a result
        with state.split_between_processes(pending) as mine:
            share = list(mine)
    failures = output / (f"failures-{rank}.jsonl" if multi else "failures.jsonl")
    part = _run_share(share, engine, manifest, failures, f"[{rank}] " if multi else "", quiet, limits)
    part.update(process=rank, device=engine.device, seconds=round(time.perf_counter() - started, 3))
    if multi:
        # heavy: only runs of several processes need accelerate (CLI start-up)
        from accelerate.utils import gather_object

        parts = gather_object([part])
    else:
        parts = [part]
    if not main:
        return None
    report = _merge(lines, skipped, parts, output, started)
    if not quiet:
        print(_summary(report), flush=True)
    return report


def _process_group(device: str) -> Any:
    """accelerate's PartialState when this process is one of several (accelerate launch, torchrun, MPI), else None.

    CPU processes (no CUDA, ``--device cpu``, or ``accelerate launch --cpu``) join a gloo group.
    """
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if max(int(os.environ.get(name) or 1) for name in sizes) <= 1:
        return None
    # heavy: only runs of several processes need torch / accelerate here (CLI start-up)
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def _device(state: Any, device: str) -> str:
    """``auto`` in a process group: the process's own device (cuda:N per process, or cpu)."""
    if device != "auto" or state is None:
        return device
    kind = state.device.type
    if kind == "cuda":
        return str(state.device)
    return kind if kind in ("cpu", "mps") else device


def _clear_leftovers(output: Path, lines: list[Line]) -> None:
    """Failures of an earlier run (their lines are retried) and temporary files a killed run left of the files
    this manifest plans; nothing else (a user's own files in the folder stay, whatever their names)."""
    for path in output.iterdir():
        if _FAILURES.fullmatch(path.name):
            path.unlink()
    planned: dict[Path, set[str]] = {}  # folder -> the names planned in it
    for entry in lines:
        for path in entry.files:
            planned.setdefault(path.parent, set()).add(path.name)
    for folder, names in planned.items():
        if not folder.is_dir():
            continue
        for path in folder.glob(f"{files.TEMP_PREFIX}*"):
            if files.temp_target(path.name) in names and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def _run_share(
    share: list[Line],
    engine: Engine,
    manifest: Path,
    failures: Path,
    prefix: str,
    quiet: bool,
    limits: Limits,
) -> dict[str, Any]:
    done: list[tuple[int, list[str]]] = []
    failed: list[dict[str, Any]] = []
    for entry in share:
        started = time.perf_counter()
        try:
            if entry.error is not None:
                raise InputError(entry.error)
            written = run_line(entry, engine, manifest, limits)
        except Exception as e:  # noqa: BLE001 - one line's failure never stops the others
            failure = {"line": entry.line, "error": _message(e)}
            failed.append(failure)
            with open(failures, "a", encoding="utf-8") as f:
                f.write(json.dumps(failure) + "\n")
            if not quiet:
                print(f"{prefix}line {entry.line}: failed: {failure['error']}", flush=True)
            continue
        done.append((entry.line, [str(p) for p in written]))
        if not quiet:
            seconds = time.perf_counter() - started
            print(f"{prefix}line {entry.line}: wrote {_names(written)} ({seconds:.1f} s)", flush=True)
    return {"done": done, "failed": failed, "failures": str(failures) if failed else None}


def _merge(
    lines: list[Line], skipped: list[Line], parts: list[dict[str, Any]], output: Path, started: float
) -> dict[str, Any]:
    done = sorted(item for part in parts for item in part["done"])
    failed = sorted((f for part in parts for f in part["failed"]), key=lambda f: f["line"])
    processes = [
        {
            "process": p["process"],
            "device": p["device"],
            "done": len(p["done"]),
            "failed": len(p["failed"]),
            "seconds": p["seconds"],
        }
        for p in parts
    ]
    return {
        "jobs": len(lines),
        "done": [path for _, paths in done for path in paths],
        "skipped": [str(path) for entry in skipped for path in entry.files],
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 3),
        "failures": [p["failures"] for p in parts if p["failures"]],
        "processes": processes,
        "counts": {"done": len(done), "skipped": len(skipped), "failed": len(failed)},
    }


def _summary(report: dict[str, Any]) -> str:
    counts = report["counts"]
    text = (
        f"batch: {report['jobs']} jobs: {counts['done']} done, {counts['skipped']} skipped, "
        f"{counts['failed']} failed in {report['seconds']:.1f} s"
    )
    if report["failures"]:
        text += f" (failures: {', '.join(report['failures'])})"
    return text


def _names(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"


def _message(error: BaseException) -> str:
    """One line: our own errors as they are; anything else with its type (a bug or the environment)."""
    text = _one_line(error)
    return text if isinstance(error, IPAdapterError) else f"{type(error).__name__}: {text}"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
