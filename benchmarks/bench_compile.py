"""torch.compile with an image prompt: the plain pipeline, ours and diffusers' IP-Adapter, eager and compiled.

One run, same work, on full-size SD1.5-architecture ``StableDiffusionPipeline``s with RANDOM weights (built from
configs by ``bench_t2i.py``; nothing is downloaded). Each way has its own copy of the same UNet (so each keeps
its compiled graph) and shares the text encoder, VAE and image encoder:

    plain      the pipeline without adapter
    ours       ``ipadapter.attach(...)``; the reference's features are cached after the first call
    diffusers  ``pipe.load_ip_adapter(...)`` with ``ip_adapter_image_embeds`` made once per reference (so
               neither adapter runs the image encoder in the timed calls: the denoiser is what is compared)

Phases: eager calls, round-robin over the ways (``--repeats`` rounds, the order rotating); then each way's UNet
is compiled (``torch.compile(unet, fullgraph=True, mode=...)``; inductor's cache starts empty, so compile
seconds are cold ones); compiled calls, round-robin again; then one call per way with another reference and
scale (same shapes), counting the graphs dynamo adds (target 0; diffusers keeps its scale as a Python
attribute of its processors, so a new scale recompiles). Printed per way: compile seconds (first compiled call
minus the steady median), median seconds per call eager and compiled, speed-up, new graphs, graph breaks and
compiled-vs-eager difference; and the medians of per-round ratios: ours / diffusers compiled (target <= 1.00),
ours / plain compiled and ours / plain eager.

    python benchmarks/bench_compile.py                                  # CPU: 256 px, 4 steps, float32
    python benchmarks/bench_compile.py --device cuda --dtype float16 --size 512 --steps 20 --mode max-autotune
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Cold compiles: inductor's on-disk cache would make a second run's compile seconds meaningless
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-compile-inductor-"))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_t2i import GUIDANCE, PROMPT, build_pipeline, log, reference_image, save_adapter  # noqa: E402

import ipadapter  # noqa: E402


class Way:
    """One way to run, on its own pipeline: ``call(reference, scale)`` -> images."""

    def __init__(self, name: str, pipe: Any, call: Callable[[Any, float], np.ndarray]) -> None:
        self.name, self.pipe, self.call = name, pipe, call
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.result: dict[str, Any] = {}
        self.images: dict[str, np.ndarray] = {}

    def timed(self, reference: Any, scale: float, device: str) -> tuple[float, np.ndarray]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = self.call(reference, scale)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, images


def rounds(
    ways: list[Way], repeats: int, record: Callable[[Way, float], None], refs: list[Any], device: str
) -> None:
    """``repeats`` rounds over the ways, the order rotating so that no way always runs first."""
    for r in range(repeats):
        for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
            record(way, way.timed(refs[0], 0.6, device)[0])


def paired(ways: dict[str, Way], a: str, b: str, phase: str) -> float | None:
    """Median of per-round ratios a / b (calls close in time: robust on a noisy machine)."""
    if a not in ways or b not in ways:
        return None
    pairs = zip(getattr(ways[a], phase), getattr(ways[b], phase), strict=True)
    return round(statistics.median(x / y for x, y in pairs), 3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per call (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed calls per phase (default 3)")
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
    base = build_pipeline(folder)
    ckpt = save_adapter(base, folder, args.variant)
    base.to(args.device, dtype)
    names = args.ways.split(",")
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

    def own_unet() -> StableDiffusionPipeline:
        """A pipeline sharing ``base``'s components but with its own copy of the UNet."""
        pipe = StableDiffusionPipeline(**{**base.components, "unet": copy.deepcopy(base.unet)})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    ways: dict[str, Way] = {}
    if "plain" in names:
        ways["plain"] = Way("plain", base, lambda ref, scale: base(**seeded()).images)
    if "ours" in names:
        pipe = own_unet()
        ip = ipadapter.attach(pipe, ckpt, folder / "image_encoder")

        def call_ours(ref: Any, scale: float, ip: Any = ip) -> np.ndarray:
            ip.scale = scale
            return ip(ref, **seeded()).images

        ways["ours"] = Way("ours", pipe, call_ours)
    if "diffusers" in names:
        pipe = own_unet()
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=ckpt.name, image_encoder_folder=None)
        embeds: dict[int, Any] = {}

        def call_diffusers(ref: Any, scale: float, pipe: Any = pipe) -> np.ndarray:
            pipe.set_ip_adapter_scale(scale)
            if id(ref) not in embeds:
                embeds[id(ref)] = pipe.prepare_ip_adapter_image_embeds(ref, None, args.device, 1, True)
            return pipe(ip_adapter_image_embeds=embeds[id(ref)], **seeded()).images

        ways["diffusers"] = Way("diffusers", pipe, call_diffusers)
    order = [ways[n] for n in names]
    log(
        f"{args.device} {args.dtype}, {args.size} px, {args.steps} steps, {args.repeats} rounds, "
        f"mode={args.mode or 'default'}, variant={args.variant}, torch {torch.__version__}"
    )

    for (
        way
    ) in order:  # warm-up (kernels, our feature cache, diffusers' embeds) and the eager reference output
        way.images["eager"] = way.timed(refs[0], 0.6, args.device)[1]
    rounds(order, args.repeats, lambda way, t: way.eager.append(t), refs, args.device)
    log("eager: " + ", ".join(f"{w.name} {statistics.median(w.eager):.3f} s" for w in order))

    torch._dynamo.reset()
    counters.clear()
    first: dict[str, float] = {}
    for way in order:
        way.pipe.unet = torch.compile(way.pipe.unet, fullgraph=True, mode=args.mode)
        first[way.name], way.images["compiled"] = way.timed(refs[0], 0.6, args.device)
        log(f"{way.name}: first compiled call {first[way.name]:.1f} s")
    rounds(order, args.repeats, lambda way, t: way.compiled.append(t), refs, args.device)
    breaks = sum(counters["graph_break"].values())
    for way in order:
        graphs = counters["stats"]["unique_graphs"]
        changed = way.timed(refs[1], 0.4, args.device)[0]  # another reference and scale: same shapes
        eager_s, compiled_s = statistics.median(way.eager), statistics.median(way.compiled)
        way.result = {
            "eager_s": round(eager_s, 3),
            "compiled_s": round(compiled_s, 3),
            "speedup": round(eager_s / compiled_s, 3),
            "compile_s": round(first[way.name] - compiled_s, 1),
            "changed_call_s": round(changed, 3),
            "new_graphs_on_change": int(counters["stats"]["unique_graphs"] - graphs),
            "compiled_vs_eager_max_abs": float(np.abs(way.images["compiled"] - way.images["eager"]).max()),
        }
        log(f"{way.name}: {json.dumps(way.result)}")
    ratios = {
        "ours_compiled_over_diffusers_compiled": paired(ways, "ours", "diffusers", "compiled"),
        "ours_compiled_over_plain_compiled": paired(ways, "ours", "plain", "compiled"),
        "ours_eager_over_plain_eager": paired(ways, "ours", "plain", "eager"),
        "diffusers_compiled_over_plain_compiled": paired(ways, "diffusers", "plain", "compiled"),
    }
    report = {
        "setup": {
            k: getattr(args, k) for k in ("device", "dtype", "size", "steps", "repeats", "mode", "variant")
        },
        "torch": torch.__version__,
        "graph_breaks": int(breaks),
        "ways": {way.name: way.result for way in order},
        "ratios": {k: v for k, v in ratios.items() if v is not None},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    head = ("way", "eager s", "compiled s", "speed-up", "compile s", "new graphs on change", "max |c-e|")
    print(" | ".join(head))
    for name, r in report["ways"].items():
        row = (name, r["eager_s"], r["compiled_s"], f"{r['speedup']}x", r["compile_s"], r["new_graphs_on_change"],
               f"{r['compiled_vs_eager_max_abs']:.1e}")  # fmt: skip
        print(" | ".join(str(v) for v in row))
    print(f"graph breaks: {report['graph_breaks']}")
    for key, value in report["ratios"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
