"""What influence maps cost: the same generation with recording off and on, side by side in one run.

One full-size SD1.5-architecture pipeline with random weights (bench_t2i.py's models; nothing is downloaded),
one adapter attached once, and these ways, each a whole pipeline call:

    off        ``ip(control)``: recording off (the code path every generation takes)
    on         ``ip(control, influence=InfluenceRecorder())`` and ``maps()``: the recorder's norms at every
               cross-attention layer and step, and the maps upsampled at the end
    off-2ref   two references attended together, recording off
    on-2ref    the same, recording on: each reference's share is split out of the attention (explicit scores)

The ways run round-robin ``--repeats`` times after one warm-up each (order rotated per round). Printed: median
seconds per way, the median of per-round ratios on/off (calls close in time), and the time spent inside the
recorder itself (its ``add`` and ``maps``, timed around the calls) as a share of the "on" calls: on a noisy
machine the share is the steadier number. The pictures of off and on are compared too: recording must not change
a pixel.

    python benchmarks/bench_influence.py                      # 256 px, 4 steps, 3 rounds
    python benchmarks/bench_influence.py --size 128 --repeats 5 --json
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_t2i import build_pipeline, log, reference_image, save_adapter  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter.prompt import recording  # noqa: E402
from ipadapter.prompt.recipe import Control  # noqa: E402
from ipadapter.prompt.recording import InfluenceRecorder  # noqa: E402

INSIDE = {"seconds": 0.0}  # time spent in the recorder's own methods


def _timed(method: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            INSIDE["seconds"] += time.perf_counter() - start

    return wrapper


recording.InfluenceRecorder.add = _timed(recording.InfluenceRecorder.add)
recording.InfluenceRecorder.maps = _timed(recording.InfluenceRecorder.maps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        log("building the pipeline (random weights)...")
        pipe = build_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        ip = ipadapter.attach(pipe, save_adapter(pipe, folder, "basic"), folder / "image_encoder", scale=0.8)
        one = Control(images=[reference_image(1)])
        two = Control(images=[reference_image(1), reference_image(2)])
        pictures: dict[str, np.ndarray] = {}

        def call(control: Control, record: bool, steps: int) -> np.ndarray:
            extra: dict[str, Any] = {"influence": InfluenceRecorder()} if record else {}
            out = ip(
                control,
                prompt="a photo",
                num_inference_steps=steps,
                height=args.size,
                width=args.size,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="np",
                **extra,
            ).images
            if record:
                extra["influence"].maps()
            return out

        ways = {
            "off": lambda s: call(one, False, s),
            "on": lambda s: call(one, True, s),
            "off-2ref": lambda s: call(two, False, s),
            "on-2ref": lambda s: call(two, True, s),
        }
        for name, way in ways.items():
            log(f"warm-up {name}")
            pictures[name] = way(args.steps)
        times: dict[str, list[float]] = {name: [] for name in ways}
        inside: dict[str, list[float]] = {name: [] for name in ways}
        names = list(ways)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                INSIDE["seconds"] = 0.0
                start = time.perf_counter()
                ways[name](args.steps)
                times[name].append(time.perf_counter() - start)
                inside[name].append(INSIDE["seconds"])
                log(f"round {r + 1} {name}: {times[name][-1]:.2f} s")
    report = {
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "ratio_on_off": statistics.median(a / b for a, b in zip(times["on"], times["off"], strict=True)),
        "ratio_on_off_2ref": statistics.median(
            a / b for a, b in zip(times["on-2ref"], times["off-2ref"], strict=True)
        ),
        "recorder_share": {
            name: statistics.median(i / t for i, t in zip(inside[name], times[name], strict=True))
            for name in ("on", "on-2ref")
        },
        "max_pixel_difference": {
            "one reference": float(np.abs(pictures["on"] - pictures["off"]).max()),
            "two references": float(np.abs(pictures["on-2ref"] - pictures["off-2ref"]).max()),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, seconds in report["median_s"].items():
            print(f"{name:>9}: {seconds:.3f} s per call")
        print(f"on / off, one reference:  {report['ratio_on_off']:.3f}x (median of paired rounds)")
        print(f"on / off, two references: {report['ratio_on_off_2ref']:.3f}x")
        for name, share in report["recorder_share"].items():
            print(f"time inside the recorder, {name}: {100 * share:.2f} % of the call")
        print(f"recording changed pixels by at most {max(report['max_pixel_difference'].values()):.2e}")
    return report


if __name__ == "__main__":
    main()
