"""`ipadapter train` under each accelerate engine on the visible GPU: mixed precision, DeepSpeed, FSDP.

For every engine the real command is launched with `accelerate launch` (one process per GPU here) on tiny
random-weight SD1.5-style models, three ways (engines side by side, --jobs at a time):

    whole    4 optimizer steps (2 micro-batches each), a checkpoint and a validation image every 2
    again    the whole run once more (how far two identical runs drift: GPU kernels are not all deterministic)
    split    the same run stopped after 2 steps, then `--resume`d to 4

and checked: all finish, the resumed run ends with the adapter of the whole one as closely as a rerun does
(max and mean |diff| printed for both),
the validation images exist, and the export loads in diffusers' `load_ip_adapter` and gives the same image as
this library's loader. Engines named `*-deterministic` train with `--deterministic`: for them both differences
must be 0. Configurations that must be refused (ZeRO stage 3, a DeepSpeed config whose batch size
disagrees with --batch-size, FSDP's size-based wrapping) are launched too and their one-line message is checked.

    python benchmarks/train_engines.py [--engines plain-fp16,deepspeed-fp16,...] [--out FOLDER]

Prints one line per engine (samples/s, peak GPU memory, resume difference, export difference) and writes
engines.json to --out. Needs CUDA (except plain-fp32[-deterministic], smoke runs on CPU); DeepSpeed engines need the deepspeed package.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests")]

_DS_AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}  # fmt: skip
_WRAP = [
    "--fsdp_auto_wrap_policy",
    "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap",
    "BasicTransformerBlock",
]

# name -> (accelerate launch flags, DeepSpeed config file contents or None)
ENGINES: dict[str, tuple[list[str], dict | None]] = {
    "plain-fp32": (["--mixed_precision", "no"], None),
    "plain-fp16": (["--mixed_precision", "fp16"], None),
    "plain-bf16": (["--mixed_precision", "bf16"], None),
    "deepspeed-fp16": (["--mixed_precision", "fp16", "--use_deepspeed", "--zero_stage", "2"], None),
    "deepspeed-bf16-config": (["--mixed_precision", "bf16"], {**_DS_AUTO, "zero_optimization": {"stage": 2}}),
    "fsdp1-bf16": (["--mixed_precision", "bf16", "--use_fsdp", "--fsdp_version", "1", *_WRAP], None),
    "fsdp2-bf16": (["--mixed_precision", "bf16", "--use_fsdp", "--fsdp_version", "2", *_WRAP], None),
}
# the same engines with `ipadapter train --deterministic`: the rerun and the resumed run should match bit for bit
DETERMINISTIC = "-deterministic"
for _name in ("plain-fp32", "deepspeed-fp16", "fsdp2-bf16"):
    ENGINES[_name + DETERMINISTIC] = ENGINES[_name]
# name -> (accelerate launch flags, DeepSpeed config or None, what the one-line refusal must say)
REFUSED: dict[str, tuple[list[str], dict | None, str]] = {
    "deepspeed-zero3": (["--mixed_precision", "bf16"], {**_DS_AUTO, "zero_optimization": {"stage": 3}},
                        "ZeRO stage 3 is not supported"),
    "deepspeed-batch": (["--mixed_precision", "bf16"],
                        {**_DS_AUTO, "train_micro_batch_size_per_gpu": 5, "zero_optimization": {"stage": 2}},
                        "--batch-size"),
    "fsdp-size-wrap": (["--mixed_precision", "bf16", "--use_fsdp", "--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP",
                        "--fsdp_min_num_params", "2000"], None, "TRANSFORMER_BASED_WRAP"),
}  # fmt: skip


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(
    name: str, flags: list[str], ds_config: dict | None, root: Path, train: list[str]
) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--dynamo_backend", "no", "--main_process_port", str(_port()), *flags]  # fmt: skip
    if ds_config is not None:
        path = root / f"ds-{name}.json"  # one file per engine: engines launch side by side
        path.write_text(json.dumps(ds_config))
        argv += ["--use_deepspeed", "--deepspeed_config_file", str(path)]
    argv += ["-m", "ipadapter", "train", *train]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def _train_args(models: dict, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--base", str(models["base"]), "--image-encoder", str(models["encoder"]), "--variant", "plus",
            "--data", str(models["data"]), "--resolution", "64", "--batch-size", "2", "--grad-accum", "2",
            "--lr", "1e-3", "--max-steps", str(steps), "--checkpoint-every", "2", "--validate-every", "2",
            "--validation-image", str(models["reference"]), "--export-dtype", "float32", "--report-to", "none",
            "--output", str(out), "--json", *extra]  # fmt: skip


def _tensors(path: Path) -> dict:
    from ipadapter import load_checkpoint

    return load_checkpoint(path).flat()


def _diffs(a: dict, b: dict) -> tuple[float, float]:
    """(max, mean) |a - b| over every weight of two adapters."""
    gaps = [(a[k].float() - b[k].float()).abs().flatten() for k in a]
    return max(g.max().item() for g in gaps), float(
        sum(g.sum().item() for g in gaps) / sum(len(g) for g in gaps)
    )


def _export_matches_diffusers(models: dict, adapter: Path) -> float:
    """Max pixel difference (0-255) between diffusers' loader and ours on the exported file."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ipadapter import attach

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = Image.open(models["reference"]).convert("RGB")
    call = dict(prompt="a picture", num_inference_steps=3, height=64, width=64, output_type="np")
    encoder = CLIPVisionModelWithProjection.from_pretrained(models["encoder"])
    theirs = StableDiffusionPipeline.from_pretrained(
        models["base"], image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=32, crop_size=32)
    ).to(device)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_ip_adapter(
        str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None
    )
    theirs.set_ip_adapter_scale(0.8)
    a = theirs(ip_adapter_image=reference, generator=torch.Generator(device).manual_seed(0), **call).images[0]
    ours = StableDiffusionPipeline.from_pretrained(models["base"]).to(device)
    ours.set_progress_bar_config(disable=True)
    ip = attach(ours, str(adapter), str(models["encoder"]), scale=0.8)
    b = ip(reference, generator=torch.Generator(device).manual_seed(0), **call).images[0]
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() * 255)


def build(root: Path) -> dict:
    import tiny_models as tm

    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        blocks = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((80, 64), Image.Resampling.NEAREST).save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(f"a picture number {i}")
    return {"base": tm.build_sd15(root / "base"), "encoder": tm.build_encoder(root / "encoder", tm.VIT_H, seed=1),
            "data": data, "reference": data / "00.png"}  # fmt: skip


def launch_engine(name: str, models: dict, root: Path) -> list[subprocess.CompletedProcess]:
    """The whole run, then the split run and its resumption (the split's second launch needs its first)."""
    flags, ds_config = ENGINES[name]
    extra = ["--deterministic"] if name.endswith(DETERMINISTIC) else []
    whole, split = root / f"{name}-whole", root / f"{name}-split"
    runs = [_launch(name, flags, ds_config, root, _train_args(models, whole, 4, *extra))]
    # the same whole run again: how far two identical GPU runs drift (non-deterministic kernels)
    runs.append(_launch(name, flags, ds_config, root, _train_args(models, root / f"{name}-again", 4, *extra)))
    runs.append(_launch(name, flags, ds_config, root, _train_args(models, split, 2, *extra)))
    if not runs[-1].returncode:
        resume = _train_args(models, split, 4, "--resume", str(split), *extra)
        runs.append(_launch(name, flags, ds_config, root, resume))
    return runs


def check_engine(name: str, runs: list[subprocess.CompletedProcess], models: dict, root: Path) -> dict:
    for run in runs:
        if run.returncode:
            return {"engine": name, "ok": False, "error": run.stderr.strip().splitlines()[-12:]}
    whole, split = root / f"{name}-whole", root / f"{name}-split"
    report = json.loads(runs[0].stdout[runs[0].stdout.index("{") :])
    final = _tensors(whole / "ip-adapter.safetensors")
    resumed = _diffs(final, _tensors(split / "ip-adapter.safetensors"))
    rerun = _diffs(final, _tensors(root / f"{name}-again" / "ip-adapter.safetensors"))
    images = sorted(p.name for p in (whole / "validation").glob("*.png"))
    export = _export_matches_diffusers(models, whole / "ip-adapter.safetensors")
    expected = name.split("-")[0].removesuffix("1").removesuffix("2")
    ok = report.get("engine") == expected and images == ["step-0000002.png", "step-0000004.png"]
    if name.endswith(DETERMINISTIC):
        ok = ok and resumed[0] == rerun[0] == 0.0
    return {"engine": name, "ok": ok, "reported": report.get("engine"),
            "samples_per_second": report["samples_per_second"], "peak_gpu_gb": report.get("peak_gpu_gb"),
            "resume_max_diff": resumed[0], "resume_mean_diff": resumed[1], "rerun_max_diff": rerun[0],
            "rerun_mean_diff": rerun[1], "export_vs_diffusers_max_px": export, "validation": images}  # fmt: skip


def launch_refused(name: str, models: dict, root: Path) -> list[subprocess.CompletedProcess]:
    flags, config, _ = REFUSED[name]
    return [_launch(name, flags, config, root, _train_args(models, root / name, 2))]


def check_refused(name: str, runs: list[subprocess.CompletedProcess]) -> dict:
    expected = REFUSED[name][2]
    run = runs[0]
    message = [line for line in run.stderr.splitlines() if line.startswith("ipadapter: error")]
    return {"engine": name, "ok": run.returncode != 0 and bool(message) and expected in message[0],
            "message": message[0] if message else run.stderr.strip().splitlines()[-5:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join([*ENGINES, *REFUSED]))
    parser.add_argument("--out", default=".", help="folder for engines.json")
    parser.add_argument("--jobs", type=int, default=4, help="engines launched side by side (default 4)")
    args = parser.parse_args()
    import torch

    cpu_ok = {"plain-fp32", "plain-fp32" + DETERMINISTIC}
    if not torch.cuda.is_available() and not set(args.engines.split(",")) <= cpu_ok:
        raise SystemExit(
            "train_engines.py needs a CUDA GPU (DeepSpeed and FSDP run on CUDA only); "
            "without one only --engines plain-fp32[-deterministic] run"
        )
    results = []
    with tempfile.TemporaryDirectory(prefix="train-engines-") as tmp:
        root = Path(tmp)
        models = build(root / "models")
        names = args.engines.split(",")
        started = time.perf_counter()
        # the launches of different engines run side by side (one GPU holds them all); checks run after
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            launched = {
                name: pool.submit(launch_engine if name in ENGINES else launch_refused, name, models, root)
                for name in names
            }
            runs = {name: future.result() for name, future in launched.items()}
        print(f"launches took {time.perf_counter() - started:.0f} s", flush=True)
        for name in names:
            if name in ENGINES:
                result = check_engine(name, runs[name], models, root)
            else:
                result = check_refused(name, runs[name])
            results.append(result)
            print(json.dumps(result), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "engines.json").write_text(json.dumps(results, indent=2))
    print(f"{sum(r['ok'] for r in results)}/{len(results)} engines ok")


if __name__ == "__main__":
    main()
