"""Training speed: samples/s and peak memory of `ipadapter train`, with and without the feature/latent cache.

Each way runs the real command in its own process (so its peak RSS is its own), on the same data, for a tiny
SD1.5-style model and a full-size SD1.5-architecture model with random weights (ViT-H/14 image encoder), both
built from configs (nothing is downloaded). Ways:

    plain        images decoded, VAE and image encoder run on every step
    cache-build  --cache-dir on an empty folder: latents/features computed first (setup time), then trained
    cache        --cache-dir already filled: epochs read latents/features only

Prints samples/s (training loop only), setup and cache-build seconds, peak RSS, and ratios against `plain`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

WAYS = ("plain", "cache-build", "cache")


def build_models(size: str, root: Path) -> tuple[Path, Path]:
    """Save a pipeline folder and an image-encoder folder; return their paths."""
    import tiny_models as tm

    if size == "tiny":
        return tm.build_sd15(root / "base"), tm.build_encoder(root / "encoder", tm.VIT_H, seed=1)
    from bench_t2i import build_pipeline

    pipe = build_pipeline(root)  # also writes root/image_encoder
    pipe.image_encoder = None
    pipe.register_to_config(image_encoder=(None, None))
    pipe.save_pretrained(root / "base")
    return root / "base", root / "image_encoder"


def make_data(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        blocks = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((320, 240), Image.Resampling.BILINEAR).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a test picture number {i}")
    return folder


def run_way(
    way: str, base: Path, encoder: Path, data: Path, root: Path, args: argparse.Namespace, size: str
) -> dict:
    steps = args.steps_tiny if size == "tiny" else args.steps_full
    resolution = 64 if size == "tiny" else args.resolution
    argv = [
        sys.executable, "-m", "ipadapter", "train", "--base", str(base), "--image-encoder", str(encoder),
        "--variant", args.variant, "--data", str(data), "--resolution", str(resolution), "--batch-size",
        str(args.batch_size), "--max-steps", str(steps), "--checkpoint-every", str(steps), "--report-to", "none",
        "--output", str(root / f"run-{way}"), "--json", "--mixed-precision", args.mixed_precision,
    ]  # fmt: skip
    if way != "plain":
        argv += ["--cache-dir", str(root / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(root / f"{way}.out", "w+") as out, open(root / f"{way}.err", "w+") as err:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read().strip()
    if proc.returncode:
        raise SystemExit(f"{way} failed: {errors.splitlines()[-1] if errors else proc.returncode}")
    result = json.loads(text)
    return {"samples_per_second": result["samples_per_second"], "seconds": result["seconds"],
            "peak_rss_gb": _peak_rss_gb(usage), "peak_gpu_gb": result.get("peak_gpu_gb")}  # fmt: skip


def _peak_rss_gb(usage: Any) -> float | None:
    return None if usage is None else usage.ru_maxrss / 2**20  # Linux reports KiB


def bench(size: str, args: argparse.Namespace) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{size}-") as tmp:
        root = Path(tmp)
        print(f"[{size}] building models and data", file=sys.stderr, flush=True)
        base, encoder = build_models(size, root / "models")
        data = make_data(root / "data", args.images)
        results = {}
        for way in WAYS:
            print(f"[{size}] {way}", file=sys.stderr, flush=True)
            results[way] = run_way(way, base, encoder, data, root, args, size)
        return results


def report(size: str, results: dict[str, dict]) -> str:
    plain = results["plain"]
    lines = [
        f"{size}: way          samples/s  vs plain  setup s  cache s  peak RSS GB  vs plain  peak GPU GB"
    ]
    for way, r in results.items():
        ratio = r["samples_per_second"] / plain["samples_per_second"]
        rss = r["peak_rss_gb"]
        rss_ratio = f"{rss / plain['peak_rss_gb']:.2f}x" if rss and plain["peak_rss_gb"] else "-"
        lines.append(f"  {way:<12} {r['samples_per_second']:>10.3f} {ratio:>8.2f}x {r['seconds']['setup']:>8.1f} "
                     f"{r['seconds']['cache']:>8.1f} {rss or float('nan'):>12.2f} {rss_ratio:>9} "
                     f"{r['peak_gpu_gb'] if r['peak_gpu_gb'] is not None else float('nan'):>12.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,full", help="comma list of tiny, full (default both)")
    parser.add_argument("--variant", default="plus", choices=["basic", "plus"])
    parser.add_argument("--images", type=int, default=16, help="training images (default 16)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps-tiny", type=int, default=40)
    parser.add_argument("--steps-full", type=int, default=4)
    parser.add_argument(
        "--resolution", type=int, default=128, help="full-size training resolution (default 128)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = {size: bench(size, args) for size in args.sizes.split(",")}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for size, results in out.items():
            print(report(size, results))
    return out


if __name__ == "__main__":
    main()
