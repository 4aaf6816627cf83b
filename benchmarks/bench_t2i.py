"""Text-to-image with an image prompt: ours vs diffusers' built-in IP-Adapter vs no adapter, in one run.

Measures seconds per pipeline call (prompt encoding, reference encoding, denoising, VAE decode) on one
full-size SD1.5-architecture ``StableDiffusionPipeline`` with RANDOM weights (nothing is downloaded):

    base       the pipeline without adapter
    ours       ``ipadapter.attach(...)`` handle called with a reference it has seen (encoder features cached)
    ours-ctl   the same work through the fine-control path: ``ip(Control(images=[ref, ref],
               combine="average", layer_weights={every block: 1.0}))`` (the reference twice, per-block weights)
    ours-cold  the same handle with a reference it has not seen (the image encoder runs)
    diffusers  ``pipe.load_ip_adapter(...)`` + ``ip_adapter_image=`` (encodes the reference on every call)

Targets (issue 6), printed with the ratios: a repeated reference costs <= 1.03x the plain pipeline (ours/base,
ours-ctl/base); the plus variant from a new image costs <= 0.9x diffusers' built-in (ours-cold/diffusers).

All ways share one pipeline object (ours is attached/detached, diffusers' loaded/unloaded around each timed
call, outside the timing), so every weight is identical. After one short warm-up per way (``--warmup-steps``,
same shapes), the ways run round-robin ``--repeats`` times so that drift affects all of them alike; the
order rotates each round, so that no way always follows the same one. Printed:
median seconds per way, ratios of the medians, and the median of per-round ratios (calls close in time; more
robust on a noisy machine). The first timed outputs of ours and diffusers (same reference, same seed) are
compared as a sanity check.

    python benchmarks/bench_t2i.py                   # basic (ip-adapter_sd15 layout), 256 px, 4 steps
    python benchmarks/bench_t2i.py --variant plus    # plus: diffusers encodes an all-zero input on every call too
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
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter.adapters.projection import build_projection  # noqa: E402
from ipadapter.hosts.unet import block_map  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import make_tokenizer  # noqa: E402

WEIGHT_NAME = {"basic": "ip-adapter_sd15.safetensors", "plus": "ip-adapter-plus_sd15.safetensors"}
PROMPT = "a photo of a red fox in the snow"
SCALE = 0.6
GUIDANCE = 7.5


def log(msg: str) -> None:
    """Progress on stderr, so ``--json`` output on stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Models: full-size SD1.5 architecture and ViT-H/14 image encoder, random weights from configs
# ---------------------------------------------------------------------------------------------------------


def build_pipeline(folder: Path) -> StableDiffusionPipeline:
    """SD1.5-architecture pipeline with a ViT-H/14 image encoder (also saved to ``folder/image_encoder``)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=1024,
            hidden_act="gelu",
        )
    )
    image_encoder.save_pretrained(folder / "image_encoder")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(folder / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size=224, crop_size=224),
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )
    for module in (unet, vae, text_encoder, image_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_adapter(pipe: StableDiffusionPipeline, folder: Path, variant: str) -> Path:
    """Random adapter weights in the official sd15 checkpoint layout (fp16, flat ``.safetensors``)."""
    hidden = tuple(layer.hidden_size for layer in ipadapter.cross_attention_layers(pipe.unet))
    cross = 768
    resampler = None
    if variant == "plus":
        resampler = ipadapter.ResamplerConfig(
            dim=768,
            depth=4,
            dim_head=64,
            heads=12,
            num_queries=16,
            embedding_dim=1280,
            output_dim=cross,
            ff_mult=4,
        )
    spec = ipadapter.AdapterSpec(
        layout=variant,
        names=(),
        num_tokens=4 if variant == "basic" else 16,
        feature="pooled" if variant == "basic" else "hidden",
        feature_dim=1024 if variant == "basic" else 1280,
        cross_attention_dim=cross,
        layer_ids=tuple(range(1, 2 * len(hidden), 2)),
        hidden_sizes=hidden,
        resampler=resampler,
    )
    gen = torch.Generator().manual_seed(1)
    image_proj = build_projection(spec).state_dict()
    ip_adapter = {
        f"{layer_id}.{name}.weight": torch.randn(size, cross, generator=gen) * cross**-0.5
        for layer_id, size in zip(spec.layer_ids, hidden, strict=True)
        for name in ("to_k_ip", "to_v_ip")
    }
    ckpt = ipadapter.Checkpoint(
        {k: v.half() for k, v in image_proj.items()}, {k: v.half() for k, v in ip_adapter.items()}
    )
    return ipadapter.save_checkpoint(ckpt, folder / WEIGHT_NAME[variant])


def reference_image(seed: int, size: int = 320) -> Image.Image:
    """A deterministic synthetic reference (smooth colour field + noise); each seed gives new content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(4 * (xx + yy))], axis=-1)
    pixels = 127.5 * (base + 1) * 0.8 + rng.uniform(0, 51, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")


# ---------------------------------------------------------------------------------------------------------
# The ways: setup (untimed) -> call (timed) -> teardown (untimed)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Way:
    """One way to run the work, with its untimed setup/teardown around the timed call."""

    name: str
    call: Callable[[], np.ndarray]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)

    def run(self) -> tuple[float, np.ndarray]:
        self.setup()
        try:
            start = time.perf_counter()
            images = self.call()
            elapsed = time.perf_counter() - start
        finally:
            self.teardown()
        return elapsed, images


class Bench:
    """Holds the shared pipeline and builds the ways."""

    def __init__(self, pipe: StableDiffusionPipeline, folder: Path, ckpt: Path, args: argparse.Namespace):
        self.pipe = pipe
        self.folder = folder
        self.ckpt = ckpt
        self.args = args
        self.vision = pipe.image_encoder  # diffusers' unload_ip_adapter drops it; we put it back
        self.reference = reference_image(0)
        self.fresh_seed = 100
        self.fresh = self.reference
        self.ip: Any = None
        self.encoder: ipadapter.ImageEncoder | None = None
        self.attach_s: float | None = None
        self.steps = args.steps

    def common(self) -> dict[str, Any]:
        a = self.args
        return dict(
            prompt=PROMPT,
            num_inference_steps=self.steps,
            guidance_scale=GUIDANCE,
            height=a.size,
            width=a.size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        )

    # -- ours ------------------------------------------------------------------------------------------
    def attach_ours(self) -> None:
        if self.encoder is None:  # first time through the real loader (encoder from its folder)
            start = time.perf_counter()
            self.ip = ipadapter.attach(
                self.pipe, self.ckpt, image_encoder=self.folder / "image_encoder", scale=SCALE
            )
            self.attach_s = time.perf_counter() - start
            self.encoder = self.ip.encoder
        else:  # keep the encoder (and its feature cache), as a user who stays attached would
            self.ip = ipadapter.attach(self.pipe, self.ckpt, image_encoder=self.encoder, scale=SCALE)

    def detach_ours(self) -> None:
        self.ip.detach()
        self.ip = None

    def call_ours(self) -> np.ndarray:
        return self.ip(self.reference, **self.common()).images

    def call_ours_control(self) -> np.ndarray:
        blocks = len({b.index for b in block_map(self.pipe.unet).values()})
        control = ipadapter.Control(images=[self.reference, self.reference], combine="average",
                                    layer_weights={f"t{t}": 1.0 for t in range(blocks)})  # fmt: skip
        return self.ip(control, **self.common()).images

    def attach_ours_fresh(self) -> None:
        self.attach_ours()
        self.fresh_seed += 1
        self.fresh = reference_image(self.fresh_seed)  # new content: a cache miss (made outside the timing)

    def call_ours_cold(self) -> np.ndarray:
        return self.ip(self.fresh, **self.common()).images

    # -- diffusers -------------------------------------------------------------------------------------
    def load_diffusers(self) -> None:
        if self.pipe.image_encoder is None:
            self.pipe.register_modules(image_encoder=self.vision)
        self.pipe.load_ip_adapter(
            str(self.ckpt.parent),
            subfolder="",
            weight_name=self.ckpt.name,
            image_encoder_folder=None,
        )
        self.pipe.set_ip_adapter_scale(SCALE)

    def call_diffusers(self) -> np.ndarray:
        return self.pipe(ip_adapter_image=self.reference, **self.common()).images

    def ways(self) -> list[Way]:
        return [
            Way("base", lambda: self.pipe(**self.common()).images),
            Way("ours", self.call_ours, self.attach_ours, self.detach_ours),
            Way("ours-ctl", self.call_ours_control, self.attach_ours, self.detach_ours),
            Way("ours-cold", self.call_ours_cold, self.attach_ours_fresh, self.detach_ours),
            Way("diffusers", self.call_diffusers, self.load_diffusers, self.pipe.unload_ip_adapter),
        ]


def check_restored(pipe: StableDiffusionPipeline, names: dict[str, type]) -> None:
    """Every way must leave the UNet as it found it (processor classes, no diffusers hid-proj)."""
    now = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    if now != names or pipe.unet.encoder_hid_proj is not None or ipadapter.attached(pipe):
        raise RuntimeError("a way left the pipeline modified; the timings would not be comparable")


RATIOS = (
    ("ours", "base"),
    ("ours-ctl", "base"),
    ("ours", "diffusers"),
    ("ours-cold", "diffusers"),
    ("ours-cold", "base"),
    ("diffusers", "base"),
)


# (what, ratio, limit): issue 6's speed targets, judged on the paired ratios
TARGETS = (
    ("repeated reference vs plain pipeline", "ours/base", 1.03),
    ("repeated reference, fine-control path, vs plain", "ours-ctl/base", 1.03),
    ("plus variant from a new image vs diffusers", "ours-cold/diffusers", 0.9),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--size", type=int, default=256, help="image height and width in px (default 256)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed calls per way after the warm-up (default 2: about 6 min on 2 slow cores; 3+ for decisions)",
    )
    p.add_argument(
        "--variant", choices=("basic", "plus"), default="basic", help="adapter layout (default basic)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="denoising steps of the untimed warm-up call per way (default 1: same shapes, less time)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a table (or JSON) and return the result dict."""
    args = parse_args(argv)
    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers_logging.disable_progress_bar()  # save/load bars of the encoder folder
    with tempfile.TemporaryDirectory(prefix="bench_t2i_") as tmp:
        folder = Path(tmp)
        log(f"building full-size SD1.5 + ViT-H/14 with random weights ({args.variant} adapter) ...")
        start = time.perf_counter()
        pipe = build_pipeline(folder)
        ckpt = save_adapter(pipe, folder, args.variant)
        build_s = time.perf_counter() - start
        log(f"  built in {build_s:.1f} s")

        bench = Bench(pipe, folder, ckpt, args)
        ways = bench.ways()
        original = {n: type(p) for n, p in pipe.unet.attn_processors.items()}

        warmup: dict[str, float] = {}
        bench.steps = args.warmup_steps
        for way in ways:
            if way.name == "ours-cold":
                continue  # same code path as ours; ours' warm-up already ran its encoder once
            warmup[way.name], _ = way.run()
            check_restored(pipe, original)
            log(f"  warm-up ({args.warmup_steps} step) {way.name:<10} {warmup[way.name]:6.2f} s")

        bench.steps = args.steps
        outputs: dict[str, np.ndarray] = {}
        for r in range(args.repeats):
            for way in ways[r % len(ways) :] + ways[: r % len(ways)]:  # rotate: no way always runs first
                seconds, images = way.run()
                way.times.append(seconds)
                outputs.setdefault(way.name, images)  # first timed run: same reference and seed per way
                check_restored(pipe, original)
                log(f"  repeat {r + 1}/{args.repeats} {way.name:<10} {seconds:6.2f} s")

    times = {way.name: way.times for way in ways}
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "config": {
            "model": "SD1.5 architecture (random weights), ViT-H/14 image encoder",
            "variant": args.variant,
            "size": args.size,
            "steps": args.steps,
            "guidance_scale": GUIDANCE,
            "scale": SCALE,
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
        "build_s": round(build_s, 2),
        "ours_first_attach_s": round(bench.attach_s or 0.0, 2),
        "warmup_s": {k: round(v, 3) for k, v in warmup.items()},
        "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        # ratio of the medians, and the median of per-round ratios (calls next to each other in time)
        "ratios": {f"{a}/{b}": round(med[a] / med[b], 3) for a, b in RATIOS},
        "paired_ratios": {
            f"{a}/{b}": round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 3)
            for a, b in RATIOS
        },
        "sanity": {
            "max_abs_diff_ours_vs_diffusers": float(np.abs(outputs["ours"] - outputs["diffusers"]).max()),
            "max_abs_diff_ours_vs_base": float(np.abs(outputs["ours"] - outputs["base"]).max()),
        },
    }
    result["targets"] = {
        name: {"paired_ratio": result["paired_ratios"][key], "limit": limit,
               "met": result["paired_ratios"][key] <= limit}
        for name, key, limit in TARGETS
        if args.variant == "plus" or "cold" not in key
    }  # fmt: skip
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return result


def report(r: dict[str, Any]) -> str:
    """The human-readable table."""
    c = r["config"]
    lines = [
        f"bench_t2i: {c['model']}; variant {c['variant']}, {c['size']}x{c['size']}, {c['steps']} steps, "
        f"guidance {c['guidance_scale']}, scale {c['scale']}, {c['dtype']} {c['device']}, {c['threads']} threads, "
        f"{c['repeats']} repeats (round-robin), torch {c['torch']}",
        f"setup: build models {r['build_s']:.1f} s; ours' first attach (encoder from folder) "
        f"{r['ours_first_attach_s']:.1f} s",
        f"{'way':<11}{'median s':>10}   runs (s)",
    ]
    for name, times in r["times_s"].items():
        runs = " ".join(f"{t:.2f}" for t in times)
        lines.append(f"{name:<11}{r['median_s'][name]:>10.2f}   {runs}")
    lines.append("ratio            of medians   paired (median of per-round ratios)")
    for key, value in r["ratios"].items():
        lines.append(f"{key:<20}{value:>7.3f}x   {r['paired_ratios'][key]:.3f}x")
    s = r["sanity"]
    lines.append(
        f"sanity (first timed run, images in [0,1], same reference and seed): max |ours - diffusers| = "
        f"{s['max_abs_diff_ours_vs_diffusers']:.3g}; max |ours - base| = {s['max_abs_diff_ours_vs_base']:.3g} "
        "(> 0: the adapter acts)"
    )
    for name, t in r["targets"].items():
        verdict = "met" if t["met"] else "NOT met"
        lines.append(f"target: {name}: {t['paired_ratio']:.3f}x (limit {t['limit']}x) {verdict}")
    lines.append(f"total wall time {r['wall_s']:.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
