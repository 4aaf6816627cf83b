"""Flux and SD3.5 with an image prompt: ours vs diffusers' built-in IP-Adapter vs no adapter, in one run.

Measures seconds per pipeline call (prompt encoding, reference encoding, denoising, VAE decode) on one
``FluxPipeline`` (XLabs adapter layout: CLIP pooled features, an image branch in every double block) and one
``StableDiffusion3Pipeline`` (InstantX SD3.5 layout: SigLIP hidden states through a time-conditioned resampler
at every step), built from configs with RANDOM weights (nothing is downloaded):

    base       the pipeline without adapter
    ours       ``ipadapter.attach(...)`` handle called with a reference it has seen (encoder features cached)
    ours-cold  the same handle with a reference it has not seen (the image encoder runs)
    diffusers  ``pipe.load_ip_adapter(...)`` + ``ip_adapter_image=`` (encodes the reference on every call; Flux
               also encodes a black image as the negative image prompt on every call)

Targets, printed with the ratios: per call ``ours/diffusers <= 1.00`` (paired ratio), and a repeated reference
costs no image encoder pass (counted by a forward hook on each vision model).

All ways of a family share one pipeline object (ours is attached/detached, diffusers' loaded/unloaded around
each timed call, outside the timing), so every weight is identical. After one short warm-up per way
(``--warmup-steps``, same shapes), the ways run round-robin ``--repeats`` times, the order rotating each round.
Printed per family: median and fastest seconds per way, ratios of the medians, the median of per-round ratios
(calls close in time), the ratio of the fastest calls (other load only ever adds time), encoder passes per call,
and the max abs difference between ours' and diffusers' first timed images (same reference, same seed; 0
expected). A ``NOISY`` line flags a run where a way's slowest call took > 1.3x its fastest: on a shared machine
two torch threads can stall 10x and more; ``--threads 1`` is slower but steadier there.

    python benchmarks/bench_dit.py --size tiny --repeats 2      # the test models' dims, seconds
    python benchmarks/bench_dit.py --size mid --repeats 3       # ~0.3-1.5 s per call on 2 cores
    python benchmarks/bench_dit.py --family flux --true-cfg 3   # Flux with true CFG (negative prompt)
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# CPU only; DeepSpeed (imported by a dependency when installed) would otherwise print its accelerator
# auto-detection warning on stdout, into the --json output
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5EncoderModel,
)
from transformers.utils import logging as transformers_logging  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter.mini.tokenizer import build_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dit_models import make_t5_tokenizer  # noqa: E402

PROMPT = "a photo of a red fox in the snow"
NEGATIVE = "blurry, low quality"
SCALE = {"flux": 0.7, "sd3": 0.6}
GUIDANCE = {"flux": 3.5, "sd3": 4.0}  # Flux: the distilled guidance embedding; SD3: CFG (batch of 2)
MAX_SEQ = 32  # T5 tokens (the T5 tokenizer here spells characters)
HEAD_DIM = 64  # every converter derives heads as to_q rows // 64
NOISY = 1.3  # slowest / fastest call of one way above this: the run was disturbed


def log(msg: str) -> None:
    """Progress on stderr, so ``--json`` output on stdout stays clean."""
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Configs: tiny = tests/dit_models.py + tests/dit_checkpoints.py dims; mid = visible on 2 CPU cores
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Every size the benchmark builds. Heads are 64 wide; ``inner = heads * 64``."""

    heads: int  # attention heads of both transformers
    flux_double: int  # Flux double-stream blocks (XLabs: one IP pair each)
    flux_single: int  # Flux single-stream blocks
    sd3_blocks: int  # SD3 joint blocks (InstantX: one IP branch each)
    text_dim: int  # T5 d_model = both transformers' joint_attention_dim
    t5: tuple[int, int, int, int]  # T5 (d_kv, d_ff, layers, heads)
    # CLIP text (hidden, ff, layers). Flux: one, pooled = hidden. SD3: two, each of hidden text_dim / 2 (side by
    # side = the T5 width) and projection = this hidden (pooled = 2 x it)
    clip_text: tuple[int, int, int]
    vae: tuple[int, ...]  # VAE block widths (len - 1 = log2 of the VAE factor)
    vae_groups: int
    # CLIP (Flux) / SigLIP (SD3) vision towers: (image size, patch, hidden, ff, layers, heads)
    encoder: tuple[int, int, int, int, int, int]
    clip_projection: int  # CLIP vision pooled width (XLabs reads it; the real one: 768)
    xlabs_tokens: int  # diffusers reads 4 tokens unless proj has 65536 rows
    resampler: tuple[int, int, int]  # SD3 time resampler (hidden, queries, timestep_in); depth 4 (diffusers)
    px: int  # default image size

    @property
    def inner(self) -> int:
        return self.heads * HEAD_DIM


SIZES = {
    # The tests' tiny DiTs (tests/dit_models.py) and adapters (tests/dit_checkpoints.py, tests/tiny_models.VIT_H)
    "tiny": Dims(
        heads=2, flux_double=2, flux_single=2, sd3_blocks=2, text_dim=32, t5=(8, 37, 2, 4),
        clip_text=(32, 37, 2), vae=(16, 32), vae_groups=8, encoder=(32, 8, 32, 37, 2, 4),
        clip_projection=24, xlabs_tokens=4, resampler=(64, 8, 32), px=32,
    ),
    # ~0.3-1.5 s per call on 2 cores at 128 px, 4 steps
    "mid": Dims(
        heads=8, flux_double=4, flux_single=8, sd3_blocks=8, text_dim=512, t5=(64, 1024, 4, 8),
        clip_text=(256, 1024, 4), vae=(32, 64, 128), vae_groups=16, encoder=(224, 14, 384, 1536, 6, 6),
        clip_projection=768, xlabs_tokens=4, resampler=(256, 32, 320), px=128,
    ),
}  # fmt: skip


def _t5(d: Dims, vocab: int) -> T5EncoderModel:
    d_kv, d_ff, layers, heads = d.t5
    config = T5Config(
        vocab_size=vocab, d_model=d.text_dim, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=8 if d.text_dim < 64 else 32, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config)


def _clip_text(d: Dims, hidden: int, projection: int) -> CLIPTextConfig:
    _, ff, layers = d.clip_text
    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=4,
        vocab_size=1000, max_position_embeddings=77, projection_dim=projection, bos_token_id=0,
        eos_token_id=1, pad_token_id=1,
    )  # fmt: skip


def _vae(d: Dims, latent_channels: int) -> AutoencoderKL:
    """The Flux/SD3 VAE config fields (shift, scale, no quant convs), as diffusers' tests."""
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=d.vae,
        down_block_types=["DownEncoderBlock2D"] * len(d.vae), up_block_types=["UpDecoderBlock2D"] * len(d.vae),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=d.vae_groups, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip


def _encoder_sizes(d: Dims) -> dict[str, int]:
    image, patch, hidden, ff, layers, heads = d.encoder
    return dict(
        image_size=image, patch_size=patch, hidden_size=hidden, intermediate_size=ff,
        num_hidden_layers=layers, num_attention_heads=heads,
    )  # fmt: skip


def _eval(pipe: Any) -> Any:
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # a freshly built T5 is in train mode: dropout would make runs differ
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rand(gen: torch.Generator) -> Callable[..., torch.Tensor]:
    """Random weights scaled by fan-in (the last dim), so activations stay of order one at any size."""
    return lambda *shape: torch.randn(*shape, generator=gen) * shape[-1] ** -0.5


def build_flux(d: Dims, folder: Path) -> tuple[FluxPipeline, Path, Path]:
    """Flux (dev-like: guidance embedding), a CLIP vision encoder folder and an XLabs-layout adapter file."""
    torch.manual_seed(0)
    t5_tok = make_t5_tokenizer(folder / "flux_t5tok")
    hidden = d.clip_text[0]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=d.flux_double, num_single_layers=d.flux_single,
        attention_head_dim=HEAD_DIM, num_attention_heads=d.heads, joint_attention_dim=d.text_dim,
        pooled_projection_dim=hidden, guidance_embeds=True, axes_dims_rope=(16, 24, 24),
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(d, 4),
        text_encoder=CLIPTextModel(_clip_text(d, hidden, hidden)),
        tokenizer=build_tokenizer(folder / "flux_tok"),
        text_encoder_2=_t5(d, len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    torch.manual_seed(1)
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**_encoder_sizes(d), projection_dim=d.clip_projection)
    ).eval()
    clip.save_pretrained(folder / "clip")
    # XLabs' own flat key names (DESIGN.md §3.5): ImageProjection + one k/v pair (with bias) per double block
    r = _rand(torch.Generator().manual_seed(3))
    n, dim = d.xlabs_tokens, d.text_dim
    state = {
        "ip_adapter_proj_model.proj.weight": r(n * dim, d.clip_projection),
        "ip_adapter_proj_model.proj.bias": 0.1 * r(n * dim, 1)[:, 0],
        "ip_adapter_proj_model.norm.weight": 1 + 0.1 * r(dim, 1)[:, 0],
        "ip_adapter_proj_model.norm.bias": 0.1 * r(dim, 1)[:, 0],
    }
    for i in range(d.flux_double):
        for kv in "kv":
            key = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            state[f"{key}.weight"] = r(d.inner, dim)
            state[f"{key}.bias"] = 0.1 * r(d.inner, 1)[:, 0]
    ckpt = folder / "flux_adapter" / "ip_adapter.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(ckpt))
    return _eval(pipe), folder / "clip", ckpt


def build_sd3(d: Dims, folder: Path) -> tuple[StableDiffusion3Pipeline, Path, Path]:
    """SD3 (3.5-like: RMS q/k norm), a SigLIP vision encoder folder and an InstantX-SD3.5-layout adapter file."""
    torch.manual_seed(0)
    clip_tok = build_tokenizer(folder / "sd3_tok")
    t5_tok = make_t5_tokenizer(folder / "sd3_t5tok")
    hidden = d.text_dim // 2  # two CLIP text encoders, their hidden states side by side = the T5 width
    proj = d.clip_text[0]
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16,
        num_layers=d.sd3_blocks, attention_head_dim=HEAD_DIM, num_attention_heads=d.heads,
        joint_attention_dim=d.text_dim, caption_projection_dim=d.inner, pooled_projection_dim=2 * proj,
        qk_norm="rms_norm",
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(d, 16),
        text_encoder=CLIPTextModelWithProjection(_clip_text(d, hidden, proj)),
        tokenizer=clip_tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_text(d, hidden, proj)),
        tokenizer_2=clip_tok,
        text_encoder_3=_t5(d, len(t5_tok)),
        tokenizer_3=t5_tok,
        transformer=transformer,
    )
    torch.manual_seed(1)
    siglip = SiglipVisionModel(SiglipVisionConfig(**_encoder_sizes(d))).eval()
    siglip.save_pretrained(folder / "siglip")
    size = d.encoder[0]
    SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(folder / "siglip")
    # InstantX SD3.5: the time resampler (its original key names; depth 4, diffusers' converter builds 4),
    # then per joint block norm_ip (AdaLN on the resampler's time embedding), to_k_ip / to_v_ip and 3 RMS norms
    r = _rand(torch.Generator().manual_seed(5))
    h, queries, t_in = d.resampler
    f, inner = d.encoder[2], d.inner
    image_proj = {
        "latents": r(1, queries, h) * h**0.5 * 0.1, "proj_in.weight": r(h, f), "proj_in.bias": 0.1 * r(h, 1)[:, 0],
        "proj_out.weight": r(inner, h), "proj_out.bias": 0.1 * r(inner, 1)[:, 0],
        "norm_out.weight": 1 + 0.1 * r(inner, 1)[:, 0], "norm_out.bias": 0.1 * r(inner, 1)[:, 0],
        "time_embedding.linear_1.weight": r(h, t_in), "time_embedding.linear_1.bias": 0.1 * r(h, 1)[:, 0],
        "time_embedding.linear_2.weight": r(h, h), "time_embedding.linear_2.bias": 0.1 * r(h, 1)[:, 0],
    }  # fmt: skip
    for i in range(4):
        p = f"layers.{i}"
        image_proj.update({
            f"{p}.0.norm1.weight": 1 + 0.1 * r(h, 1)[:, 0], f"{p}.0.norm1.bias": 0.1 * r(h, 1)[:, 0],
            f"{p}.0.norm2.weight": 1 + 0.1 * r(h, 1)[:, 0], f"{p}.0.norm2.bias": 0.1 * r(h, 1)[:, 0],
            f"{p}.0.to_q.weight": r(h, h), f"{p}.0.to_kv.weight": r(2 * h, h), f"{p}.0.to_out.weight": r(h, h),
            f"{p}.1.0.weight": 1 + 0.1 * r(h, 1)[:, 0], f"{p}.1.0.bias": 0.1 * r(h, 1)[:, 0],
            f"{p}.1.1.weight": r(4 * h, h), f"{p}.1.3.weight": r(h, 4 * h),
            f"{p}.2.1.weight": r(4 * h, h), f"{p}.2.1.bias": 0.1 * r(4 * h, 1)[:, 0],
        })  # fmt: skip
    ip_adapter = {}
    for i in range(d.sd3_blocks):
        ip_adapter.update({
            f"{i}.norm_ip.linear.weight": r(2 * inner, h), f"{i}.norm_ip.linear.bias": 0.1 * r(2 * inner, 1)[:, 0],
            f"{i}.to_k_ip.weight": r(inner, inner), f"{i}.to_v_ip.weight": r(inner, inner),
            f"{i}.norm_q.weight": 1 + 0.1 * r(HEAD_DIM, 1)[:, 0], f"{i}.norm_k.weight": 1 + 0.1 * r(HEAD_DIM, 1)[:, 0],
            f"{i}.norm_ip_k.weight": 1 + 0.1 * r(HEAD_DIM, 1)[:, 0],
        })  # fmt: skip
    flat = {f"image_proj.{k}": v for k, v in image_proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
    ckpt = folder / "sd3_adapter" / "ip-adapter.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.half().contiguous() for k, v in flat.items()}, str(ckpt))
    return _eval(pipe), folder / "siglip", ckpt


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


class EncoderCounter:
    """Counts forward calls of the vision models it is hooked on (ours' and diffusers')."""

    def __init__(self) -> None:
        self.calls = 0
        self._hooked: set[int] = set()

    def hook(self, model: torch.nn.Module) -> None:
        if id(model) not in self._hooked:
            self._hooked.add(id(model))
            model.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


@dataclass
class Way:
    """One way to run the work, with its untimed setup/teardown around the timed call."""

    name: str
    call: Callable[[], np.ndarray]
    setup: Callable[[], None] = lambda: None
    teardown: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    encoder_passes: list[int] = field(default_factory=list)

    def run(self, counter: EncoderCounter) -> tuple[float, int, np.ndarray]:
        self.setup()
        try:
            before = counter.calls
            start = time.perf_counter()
            images = self.call()
            elapsed = time.perf_counter() - start
            passes = counter.calls - before
        finally:
            self.teardown()
        return elapsed, passes, images


class FamilyBench:
    """One family's shared pipeline, its adapter file and encoders, and the ways to call it."""

    def __init__(self, family: str, pipe: Any, encoder_folder: Path, ckpt: Path, args: argparse.Namespace):
        self.family = family
        self.pipe = pipe
        self.encoder_folder = encoder_folder
        self.ckpt = ckpt
        self.args = args
        self.counter = EncoderCounter()
        self.steps = args.steps
        self.reference = reference_image(0)
        self.fresh_seed = 100
        self.fresh = self.reference
        self.ip: Any = None
        self.encoder: ipadapter.ImageEncoder | None = None
        self.attach_s: float | None = None
        # diffusers' own encoder and processor, loaded once from the same folder and put back before every
        # load_ip_adapter (its unload_ip_adapter drops both), so it never reloads them inside the benchmark
        if family == "flux":
            self.vision = CLIPVisionModelWithProjection.from_pretrained(encoder_folder).eval()
            size = int(self.vision.config.image_size)
            self.processor: Any = CLIPImageProcessor(size=size, crop_size=size)
        else:
            self.vision = SiglipVisionModel.from_pretrained(encoder_folder).eval()
            self.processor = SiglipImageProcessor.from_pretrained(encoder_folder)
        self.counter.hook(self.vision)
        self.original = self.processors()

    def processors(self) -> dict[str, type]:
        return {n: type(p) for n, p in self.pipe.transformer.attn_processors.items()}

    def common(self) -> dict[str, Any]:
        a = self.args
        kw = dict(
            prompt=PROMPT,
            num_inference_steps=self.steps,
            guidance_scale=GUIDANCE[self.family],
            height=a.px,
            width=a.px,
            max_sequence_length=MAX_SEQ,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        )
        if self.family == "flux" and a.true_cfg > 1:
            kw.update(negative_prompt=NEGATIVE, true_cfg_scale=a.true_cfg)
        return kw

    # -- ours ------------------------------------------------------------------------------------------
    def attach_ours(self) -> None:
        scale = SCALE[self.family]
        if self.encoder is None:  # first time through the real loader (encoder from its folder)
            start = time.perf_counter()
            self.ip = ipadapter.attach(self.pipe, self.ckpt, self.encoder_folder, scale=scale)
            self.attach_s = time.perf_counter() - start
            self.encoder = self.ip.encoder
            self.counter.hook(self.encoder.model)
        else:  # keep the encoder (and its feature cache), as a user who stays attached would
            self.ip = ipadapter.attach(self.pipe, self.ckpt, self.encoder, scale=scale)

    def detach_ours(self) -> None:
        self.ip.detach()
        self.ip = None

    def call_ours(self) -> np.ndarray:
        return self.ip(self.reference, **self.common()).images

    def attach_ours_fresh(self) -> None:
        self.attach_ours()
        self.fresh_seed += 1
        self.fresh = reference_image(self.fresh_seed)  # new content: a cache miss (made outside the timing)

    def call_ours_cold(self) -> np.ndarray:
        return self.ip(self.fresh, **self.common()).images

    # -- diffusers -------------------------------------------------------------------------------------
    def load_diffusers(self) -> None:
        self.pipe.register_modules(image_encoder=self.vision, feature_extractor=self.processor)
        folder, name = str(self.ckpt.parent), self.ckpt.name
        if self.family == "flux":
            self.pipe.load_ip_adapter(
                folder,
                weight_name=name,
                image_encoder_pretrained_model_name_or_path=str(self.encoder_folder),
                image_encoder_dtype=torch.float32,
            )
        else:
            self.pipe.load_ip_adapter(
                folder,
                weight_name=name,
                image_encoder_folder=str(self.encoder_folder),
                low_cpu_mem_usage=False,
            )
        self.pipe.set_ip_adapter_scale(SCALE[self.family])

    def call_diffusers(self) -> np.ndarray:
        return self.pipe(ip_adapter_image=self.reference, **self.common()).images

    def ways(self) -> list[Way]:
        return [
            Way("base", lambda: self.pipe(**self.common()).images),
            Way("ours", self.call_ours, self.attach_ours, self.detach_ours),
            Way("ours-cold", self.call_ours_cold, self.attach_ours_fresh, self.detach_ours),
            Way("diffusers", self.call_diffusers, self.load_diffusers, self.pipe.unload_ip_adapter),
        ]

    def check_restored(self) -> None:
        """Every way must leave the transformer as it found it (processor classes, no diffusers projection)."""
        t = self.pipe.transformer
        extra = (
            getattr(t, "encoder_hid_proj", None) if self.family == "flux" else getattr(t, "image_proj", None)
        )
        if self.processors() != self.original or extra is not None or ipadapter.attached(self.pipe):
            raise RuntimeError("a way left the pipeline modified; the timings would not be comparable")


RATIOS = (
    ("ours", "diffusers"),
    ("ours", "base"),
    ("ours-cold", "diffusers"),
    ("ours-cold", "base"),
    ("diffusers", "base"),
)


def run_family(family: str, dims: Dims, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    log(f"[{family}] building {args.size} models with random weights ...")
    load_before = os.getloadavg()[0]
    if load_before > 1.5:
        log(
            f"  note: load average {load_before:.1f} before this family: other processes share the CPU; with "
            f"{args.threads} torch threads, timings can swing by 10x (--threads 1 is steadier on a busy machine)"
        )
    start = time.perf_counter()
    pipe, encoder_folder, ckpt = (build_flux if family == "flux" else build_sd3)(dims, folder)
    bench = FamilyBench(family, pipe, encoder_folder, ckpt, args)
    build_s = time.perf_counter() - start
    log(f"  built in {build_s:.1f} s")
    ways = bench.ways()

    warmup: dict[str, float] = {}
    bench.steps = args.warmup_steps
    for way in ways:
        if way.name == "ours-cold":
            continue  # same code path as ours; ours' warm-up already ran its encoder once
        warmup[way.name], _, _ = way.run(bench.counter)
        bench.check_restored()
        log(f"  warm-up ({args.warmup_steps} step) {way.name:<10} {warmup[way.name]:6.2f} s")

    bench.steps = args.steps
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for way in ways[r % len(ways) :] + ways[: r % len(ways)]:  # rotate: no way always runs first
            seconds, passes, images = way.run(bench.counter)
            way.times.append(seconds)
            way.encoder_passes.append(passes)
            outputs.setdefault(way.name, images)  # first timed run: same reference and seed per way
            bench.check_restored()
            log(f"  repeat {r + 1}/{args.repeats} {way.name:<10} {seconds:6.3f} s  encoder passes {passes}")

    times = {way.name: way.times for way in ways}
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": (
            f"Flux {dims.flux_double} double + {dims.flux_single} single blocks, XLabs adapter, CLIP encoder"
            if family == "flux"
            else f"SD3 {dims.sd3_blocks} joint blocks, InstantX SD3.5 adapter, SigLIP encoder"
        ),
        "scale": SCALE[family],
        "guidance_scale": GUIDANCE[family],
        "true_cfg_scale": args.true_cfg if family == "flux" and args.true_cfg > 1 else None,
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "build_s": round(build_s, 2),
        "ours_first_attach_s": round(bench.attach_s or 0.0, 3),
        "warmup_s": {k: round(v, 3) for k, v in warmup.items()},
        "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "min_s": {k: round(min(v), 4) for k, v in times.items()},
        "ratios": {f"{a}/{b}": round(med[a] / med[b], 3) for a, b in RATIOS},
        # contention only ever adds time: the fastest call of each way is the steadiest estimate on a busy machine
        "min_ratios": {f"{a}/{b}": round(min(times[a]) / min(times[b]), 3) for a, b in RATIOS},
        "spread": round(max(max(t) / min(t) for t in times.values()), 2),  # slowest / fastest call of a way
        "paired_ratios": {
            f"{a}/{b}": round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 3)
            for a, b in RATIOS
        },
        "encoder_passes": {way.name: way.encoder_passes for way in ways},
        "sanity": {
            "max_abs_diff_ours_vs_diffusers": float(np.abs(outputs["ours"] - outputs["diffusers"]).max()),
            "max_abs_diff_ours_vs_base": float(np.abs(outputs["ours"] - outputs["base"]).max()),
        },
    }
    paired = result["paired_ratios"]["ours/diffusers"]
    result["targets"] = {
        "ours/diffusers <= 1.00 (paired)": {"value": paired, "met": paired <= 1.0},
        "repeated reference: no encoder pass": {
            "value": max(result["encoder_passes"]["ours"]),
            "met": max(result["encoder_passes"]["ours"]) == 0,
        },
    }
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("flux", "sd3", "both"), default="both", help="default both")
    p.add_argument("--size", choices=tuple(SIZES), default="mid", help="model dims (default mid)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--px", type=int, default=None, help="image height and width (default: 128 mid, 32 tiny)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per way after the warm-up (default 3)")
    p.add_argument(
        "--true-cfg",
        type=float,
        default=0.0,
        help="Flux only: > 1 runs true classifier-free guidance with a negative prompt (true_cfg_scale): "
        "two transformer calls per step (default 0: off)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=1,
        help="denoising steps of the untimed warm-up call per way (default 1: same shapes, less time)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = p.parse_args(argv)
    if args.px is None:
        args.px = SIZES[args.size].px
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables (or JSON) and return the result dict."""
    args = parse_args(argv)
    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers_logging.disable_progress_bar()
    dims = SIZES[args.size]
    families = ("flux", "sd3") if args.family == "both" else (args.family,)
    result: dict[str, Any] = {
        "config": {
            "size": args.size,
            "dims": asdict(dims),
            "px": args.px,
            "steps": args.steps,
            "max_sequence_length": MAX_SEQ,
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
        },
        "families": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_dit_") as tmp:
        for family in families:
            result["families"][family] = run_family(family, dims, Path(tmp), args)
    result["all_targets_met"] = all(
        t["met"] for f in result["families"].values() for t in f["targets"].values()
    )
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return result


def report(r: dict[str, Any]) -> str:
    """The human-readable tables."""
    c = r["config"]
    lines = [
        f"bench_dit: size {c['size']} (random weights), {c['px']}x{c['px']}, {c['steps']} steps, "
        f"max_sequence_length {c['max_sequence_length']}, {c['dtype']} {c['device']}, {c['threads']} threads, "
        f"{c['repeats']} repeats (round-robin), torch {c['torch']}, diffusers {c['diffusers']}",
    ]
    for family, f in r["families"].items():
        tcfg = f", true CFG {f['true_cfg_scale']}" if f["true_cfg_scale"] else ""
        lines += [
            "",
            f"[{family}] {f['model']}; scale {f['scale']}, guidance {f['guidance_scale']}{tcfg}",
            f"setup: build {f['build_s']:.1f} s; ours' first attach (encoder from folder) "
            f"{f['ours_first_attach_s']:.2f} s; load average {f['load_average']['before']:.1f} before, "
            f"{f['load_average']['after']:.1f} after (1-min, whole machine)",
            f"{'way':<11}{'median s':>10}{'min s':>9}   {'encoder passes/call':<20} runs (s)",
        ]
        for name, times in f["times_s"].items():
            runs = " ".join(f"{t:.3f}" for t in times)
            passes = ",".join(str(p) for p in f["encoder_passes"][name])
            lines.append(
                f"{name:<11}{f['median_s'][name]:>10.3f}{f['min_s'][name]:>9.3f}   {passes:<20} {runs}"
            )
        lines.append(
            f"{'ratio':<20}{'of medians':>11}{'paired':>9}{'of minimums':>13}   (paired: median of per-round ratios)"
        )
        for key, value in f["ratios"].items():
            paired, least = f["paired_ratios"][key], f["min_ratios"][key]
            lines.append(f"{key:<20}{value:>10.3f}x{paired:>8.3f}x{least:>12.3f}x")
        if f["spread"] > NOISY:
            lines.append(
                f"NOISY: a way's slowest call took {f['spread']:.1f}x its fastest (other processes on the CPU?); "
                "read the minimums, or rerun with more --repeats, on a quieter machine, or with --threads 1"
            )
        s = f["sanity"]
        lines.append(
            f"sanity (first timed run, images in [0,1], same reference and seed): max |ours - diffusers| = "
            f"{s['max_abs_diff_ours_vs_diffusers']:.3g}; max |ours - base| = {s['max_abs_diff_ours_vs_base']:.3g} "
            "(> 0: the adapter acts)"
        )
        for name, t in f["targets"].items():
            lines.append(f"target: {name}: {t['value']} {'met' if t['met'] else 'NOT met'}")
    lines.append(
        f"all targets met: {'yes' if r['all_targets_met'] else 'NO'}; total wall time {r['wall_s']:.1f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
