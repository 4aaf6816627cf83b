"""torch.compile with an image prompt: the plain pipeline, ours and diffusers' IP-Adapter, eager and compiled.

One run, same work, on one full-size SD1.5-architecture ``StableDiffusionPipeline`` with RANDOM weights (built
from configs by ``bench_t2i.py``; nothing is downloaded). Each way runs eagerly, then with its UNet compiled
(``torch.compile(unet, fullgraph=True, mode=...)``):

    plain      the pipeline without adapter
    ours       ``ipadapter.attach(...)``; the reference's features are cached after the first call
    diffusers  ``pipe.load_ip_adapter(...)`` with ``ip_adapter_image_embeds`` made once per reference (so
               neither adapter runs the image encoder in the timed calls: the denoiser is what is compared)

Printed per way: compile seconds (first compiled call minus a steady one), steady seconds per call eager and
compiled (median of ``--repeats``), the compiled / eager speed-up, and how many new graphs dynamo made when a
later call changed the scale and the reference (target 0; diffusers' scale is a Python attribute of its
processors, so each new scale recompiles). Ratios: ours-compiled / diffusers-compiled (target <= 1.00) and
ours-compiled / plain-compiled. The compiled output is compared with the eager one.

    python benchmarks/bench_compile.py                                  # CPU: 256 px, 4 steps, float32
    python benchmarks/bench_compile.py --device cuda --dtype float16 --size 512 --steps 20 --mode max-autotune
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
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_t2i import GUIDANCE, PROMPT, build_pipeline, log, reference_image, save_adapter  # noqa: E402

import ipadapter  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Way:
    """One way to run: ``call(reference, scale)`` -> images; ``setup``/``teardown`` around all its calls."""

    def __init__(
        self,
        name: str,
        call: Callable[[Any, float], np.ndarray],
        setup: Callable[[], None] = lambda: None,
        teardown: Callable[[], None] = lambda: None,
    ) -> None:
        self.name, self.call, self.setup, self.teardown = name, call, setup, teardown
        self.result: dict[str, Any] = {"way": name}


def timed(way: Way, reference: Any, scale: float, device: str) -> tuple[float, np.ndarray]:
    sync(device)
    start = time.perf_counter()
    images = way.call(reference, scale)
    sync(device)
    return time.perf_counter() - start, images


def measure(way: Way, pipe: Any, refs: list[Any], args: argparse.Namespace) -> None:
    """Eager, then compiled: steady seconds, compile seconds, new graphs when scale and reference change."""
    unet = pipe.unet
    way.setup()
    try:
        timed(way, refs[0], 0.6, args.device)  # warm-up (and our feature cache)
        eager = [timed(way, refs[0], 0.6, args.device) for _ in range(args.repeats)]
        eager_images = eager[0][1]
        torch._dynamo.reset()
        counters.clear()
        pipe.unet = torch.compile(unet, fullgraph=True, mode=args.mode)
        first, compiled_images = timed(way, refs[0], 0.6, args.device)
        steady = [timed(way, refs[0], 0.6, args.device)[0] for _ in range(args.repeats)]
        graphs = counters["stats"]["unique_graphs"]
        changed = timed(way, refs[1], 0.4, args.device)[0]  # another reference and scale: same shapes
        new_graphs = counters["stats"]["unique_graphs"] - graphs
        breaks = sum(counters["graph_break"].values())
    finally:
        pipe.unet = unet
        torch._dynamo.reset()
        way.teardown()
    eager_s = statistics.median(t for t, _ in eager)
    steady_s = statistics.median(steady)
    way.result.update(
        eager_s=round(eager_s, 3),
        compiled_s=round(steady_s, 3),
        speedup=round(eager_s / steady_s, 3),
        compile_s=round(first - steady_s, 1),
        changed_call_s=round(changed, 3),
        new_graphs_on_change=int(new_graphs),
        graph_breaks=int(breaks),
        compiled_vs_eager_max_abs=float(np.abs(compiled_images - eager_images).max()),
    )
    log(f"{way.name}: {json.dumps(way.result)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per call (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per way and state (default 3)")
    parser.add_argument(
        "--mode", default=None, help="torch.compile mode (default: torch's; e.g. max-autotune)"
    )
    parser.add_argument("--variant", default="basic", choices=["basic", "plus"])
    parser.add_argument("--ways", default="plain,ours,diffusers", help="comma-separated subset")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch._dynamo.config.cache_size_limit = 64  # diffusers' recompiles must not exhaust it mid-run
    warnings.filterwarnings("ignore")

    folder = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    log(f"building a full-size SD1.5-architecture pipeline (random weights) in {folder} ...")
    pipe = build_pipeline(folder)
    ckpt = save_adapter(pipe, folder, args.variant)
    pipe.to(args.device, dtype)
    vision = pipe.image_encoder
    refs = [reference_image(0), reference_image(1)]
    common = dict(
        prompt=PROMPT,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        height=args.size,
        width=args.size,
        output_type="np",
    )

    def seeded() -> dict[str, Any]:
        return {**common, "generator": torch.Generator("cpu").manual_seed(0)}

    holder: dict[str, Any] = {}

    def attach_ours() -> None:
        holder["ip"] = ipadapter.attach(pipe, ckpt, folder / "image_encoder")

    def call_ours(ref: Any, scale: float) -> np.ndarray:
        holder["ip"].scale = scale
        return holder["ip"](ref, **seeded()).images

    def load_diffusers() -> None:
        pipe.image_encoder = vision
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=ckpt.name, image_encoder_folder=None)
        holder["embeds"] = {}

    def call_diffusers(ref: Any, scale: float) -> np.ndarray:
        pipe.set_ip_adapter_scale(scale)
        key = id(ref)
        if key not in holder["embeds"]:
            holder["embeds"][key] = pipe.prepare_ip_adapter_image_embeds(ref, None, args.device, 1, True)
        return pipe(ip_adapter_image_embeds=holder["embeds"][key], **seeded()).images

    def unload_diffusers() -> None:
        pipe.unload_ip_adapter()
        pipe.image_encoder = vision

    all_ways = {
        "plain": Way("plain", lambda ref, scale: pipe(**seeded()).images),
        "ours": Way("ours", call_ours, attach_ours, lambda: holder["ip"].detach()),
        "diffusers": Way("diffusers", call_diffusers, load_diffusers, unload_diffusers),
    }
    ways = [all_ways[name] for name in args.ways.split(",")]
    log(
        f"{args.device} {args.dtype}, {args.size} px, {args.steps} steps, {args.repeats} repeats, "
        f"mode={args.mode or 'default'}, variant={args.variant}, torch {torch.__version__}"
    )
    for way in ways:
        measure(way, pipe, refs, args)
    results = {way.name: way.result for way in ways}
    ratios = {}
    if "ours" in results and "diffusers" in results:
        ratios["ours_compiled_over_diffusers_compiled"] = round(
            results["ours"]["compiled_s"] / results["diffusers"]["compiled_s"], 3
        )
    if "ours" in results and "plain" in results:
        ratios["ours_compiled_over_plain_compiled"] = round(
            results["ours"]["compiled_s"] / results["plain"]["compiled_s"], 3
        )
        ratios["ours_eager_over_plain_eager"] = round(
            results["ours"]["eager_s"] / results["plain"]["eager_s"], 3
        )
    report = {
        "setup": {
            k: getattr(args, k) for k in ("device", "dtype", "size", "steps", "repeats", "mode", "variant")
        },
        "torch": torch.__version__,
        "ways": results,
        "ratios": ratios,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    head = ("way", "eager s", "compiled s", "speed-up", "compile s", "new graphs", "breaks", "max |c-e|")
    print(" | ".join(head))
    for name, r in report["ways"].items():
        row = (name, r["eager_s"], r["compiled_s"], f"{r['speedup']}x", r["compile_s"], r["new_graphs_on_change"],
               r["graph_breaks"], f"{r['compiled_vs_eager_max_abs']:.1e}")  # fmt: skip
        print(" | ".join(str(v) for v in row))
    for key, value in report["ratios"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
