"""Build the miniature model family from nothing: shapes data -> mini CLIP -> vision tower -> VAE -> UNet -> IP-Adapters.

Every stage writes a standard diffusers/transformers folder under ``out`` and a marker with its losses, so a
build resumes stage by stage. The adapters are trained by :mod:`ipadapter.training` — the code path users run.
Layout of ``out`` (the pieces the rest of the toolkit loads):

    data/train, data/eval          shapes pairs (images + .txt captions + metadata.jsonl); data/drawn: held-out
                                   references drawn differently
    clip_joint/                    the jointly trained CLIP (its text tower is the UNet's)
    clip/                          its text tower + the vision stage's tower (CLIPModel), also the scorer
    pipeline/                      StableDiffusionPipeline folder: tokenizer, text_encoder, vae, unet, scheduler
    models/image_encoder/          the vision stage's tower (CLIPVisionModelWithProjection), h94-style layout
    models/ip-adapter_mini.safetensors, models/ip-adapter-plus_mini.safetensors
    build_record.json              settings, seed, per-stage losses and seconds

``--install`` (or :func:`install`) copies pipeline/, models/, clip/ and the record into the package, where
``--base mini`` / ``--adapter mini|mini-plus`` find them. The shipped family is that output for the defaults
of :class:`BuildConfig` (83 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..files import atomic_path
from ..quiet import quiet_libraries
from ..training.config import TrainConfig
from ..training.seeds import training_noise
from .config import BuildConfig
from .drawn import draw_example, write_drawn
from .loop import CLIP_MEAN, CLIP_STD, loss_curve, read_rows, say, train_loop, uniform
from .shapes import BACKGROUNDS, is_held_out, render, write_dataset
from .shipped import MODEL_DIR

STAGES = ("data", "clip", "vision", "vae", "unet", "pipeline", "adapters")
RECORD = "build_record.json"


def _record(out: Path) -> dict[str, Any]:
    path = out / RECORD
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def _write_record(out: Path, record: dict[str, Any]) -> None:
    with atomic_path(out / RECORD) as temp:  # a killed build never leaves half a record
        temp.write_text(json.dumps(record, indent=2))


def _finish(out: Path, stage: str, info: dict[str, Any]) -> None:
    record = _record(out)
    record["stages"][stage] = info
    _write_record(out, record)


# -- data ----------------------------------------------------------------------------------------------------
def stage_data(c: BuildConfig, out: Path) -> dict[str, Any]:
    write_dataset(
        out / "data" / "train", c.train_images, seed=c.seed, size=c.size, split="train", overwrite=True
    )
    write_dataset(
        out / "data" / "eval", c.eval_images, seed=c.seed + 1, size=c.size, split="eval", overwrite=True
    )
    write_drawn(out / "data" / "drawn", c.drawn_images, seed=c.seed + 1, split="eval")
    return {"train": c.train_images, "eval": c.eval_images, "drawn": c.drawn_images}


def _load_pairs(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """All images of a shapes folder as a (N, 3, S, S) tensor in [-1, 1], and their captions."""
    rows = read_rows(folder)
    images = np.stack([np.asarray(Image.open(folder / r["image"]).convert("RGB")) for r in rows])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [r["text"] for r in rows]


# -- mini CLIP -----------------------------------------------------------------------------------------------
def _tokenizer(out: Path) -> Any:
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from .tokenizer import build_tokenizer

    return build_tokenizer(out / "tokenizer")


def stage_clip(c: BuildConfig, out: Path) -> dict[str, Any]:
    """A small CLIP trained contrastively on the captions; towers saved for the pipeline and the adapter."""
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tok = _tokenizer(out)
    pixels, texts = _load_pairs(out / "data" / "train")
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=c.width,
        intermediate_size=4 * c.width,
        num_hidden_layers=c.clip_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=c.width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=c.width,
        intermediate_size=4 * c.width,
        num_hidden_layers=c.clip_layers,
        num_attention_heads=4,
        image_size=c.size,
        patch_size=c.patch,
        projection_dim=c.width,
    )
    torch.manual_seed(c.seed)
    model = CLIPModel(
        CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=c.width)
    )
    ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    clip_pixels = ((pixels + 1) / 2 - CLIP_MEAN) / CLIP_STD  # what the encoder's processor does too
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(c.seed)
    history = train_loop(
        c.clip_steps,
        optimizer,
        gen,
        _grouped(read_rows(out / "data" / "train"), c.clip_batch, c.clip_group),
        lambda idx: model(input_ids=ids[idx], pixel_values=clip_pixels[idx], return_loss=True).loss,
        c.log,
        "clip",
    )
    model.save_pretrained(out / "clip")
    tok.save_pretrained(out / "clip")
    return {"steps": c.clip_steps, "loss": loss_curve(history)}


def _grouped(rows: list[dict[str, Any]], batch: int, group: int) -> Callable[[torch.Generator], torch.Tensor]:
    """Batches made of groups of ``group`` examples sharing object colour and background.

    Within a group the captions differ mostly in the shape word, so the contrastive loss cannot be
    lowered by colour and background alone: these in-batch hard negatives are what teach CLIP shape.
    """
    keys: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        keys.setdefault((r["color"], r["background"]), []).append(i)
    pools = [torch.tensor(v) for v in keys.values()]
    sizes = torch.tensor([len(v) for v in pools], dtype=torch.float64)

    def sample(gen: torch.Generator) -> torch.Tensor:
        picks = []
        for key in torch.multinomial(sizes, max(1, batch // group), replacement=True, generator=gen).tolist():
            pool = pools[key]
            picks.append(pool[torch.randperm(len(pool), generator=gen)[:group]])
        return torch.cat(picks)

    return sample


# -- VAE -----------------------------------------------------------------------------------------------------
def stage_vae(c: BuildConfig, out: Path) -> dict[str, Any]:
    """A small KL autoencoder (one 2x downsampling per ``vae_channels`` entry after the first, 4 latent
    channels); its scaling factor makes latents unit-variance."""
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from diffusers import AutoencoderKL

    pixels, _ = _load_pairs(out / "data" / "train")
    torch.manual_seed(c.seed)
    blocks = len(c.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=tuple(c.vae_channels),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=min(32, c.vae_channels[0]),
        mid_block_add_attention=c.vae_attention,
        sample_size=c.size,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=c.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(c.seed + 1)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    history = train_loop(
        c.vae_steps, optimizer, gen, uniform(len(pixels), c.vae_batch), loss_fn, c.log, "vae"
    )
    with torch.no_grad():
        sample = pixels[: min(512, len(pixels))]
        std = float(vae.encode(sample).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "vae")
    return {"steps": c.vae_steps, "loss": loss_curve(history), "scaling_factor": 1.0 / std}


# -- UNet ----------------------------------------------------------------------------------------------------
def new_unet(c: BuildConfig) -> Any:
    """The build's UNet for ``c``, random weights (seeded by the caller): latents of the VAE's side, 4 channels."""
    # heavy: only its callers pay for it (importing this module stays torch-only)
    from diffusers import UNet2DConditionModel

    down, up = ("DownBlock2D", "CrossAttnDownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(
        sample_size=c.size // 2 ** (len(c.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(c.unet_channels),
        layers_per_block=1,
        down_block_types=tuple(down[a] for a in c.unet_attention),
        up_block_types=tuple(up[a] for a in reversed(c.unet_attention)),
        cross_attention_dim=c.width,
        attention_head_dim=8,
        norm_num_groups=min(32, c.unet_channels[0]),
    )


def stage_unet(c: BuildConfig, out: Path) -> dict[str, Any]:
    """A small text-conditioned UNet trained on the VAE's latents (epsilon prediction).

    Each example is conditioned on its full caption, or (``unet_partial`` of the time each) on only its scene
    phrase ("on a striped blue background") or only its object phrase ("a red circle"), or on the empty text
    (10 %, for classifier-free guidance). Partial texts make a prompt like "on a green background" mean
    something to the base model, which the image prompt then completes with the object.

    On a fine latent grid, the mean of a latent survives the last noise levels: averaged over 16 x 16 positions,
    the noise hides a plain background's colour less than over 8 x 8, so the UNet learns to read the colour
    from the noise instead of the text, and at sampling the seed picks the background. ``unet_noise_offset``
    adds a per-example, per-channel constant to the noise, which hides that mean again.
    """
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    pixels, texts = _load_pairs(out / "data" / "train")
    tok = _tokenizer(out)
    text_model = CLIPTextModel.from_pretrained(out / "clip").eval()
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    variants = [(t, *_phrases(t)[::-1]) for t in texts]  # full, scene only, object only
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)]
        )
        latents = latents * vae.config.scaling_factor
        unique = sorted({v for row in variants for v in row}) + [""]
        ids = tok(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        table = torch.cat([text_model(ids[i : i + 256])[0] for i in range(0, len(ids), 256)])
    position = {t: i for i, t in enumerate(unique)}
    which = torch.tensor([[position[v] for v in row] + [len(unique) - 1] for row in variants])  # (N, 4)
    # cumulative bounds of a uniform draw: empty, scene only, object only, else full
    bounds = torch.tensor([0.1, 0.1 + c.unet_partial, 0.1 + 2 * c.unet_partial])
    pick_of = torch.tensor([3, 1, 2, 0])  # column of ``which`` for each interval
    torch.manual_seed(c.seed)
    unet = new_unet(c)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=c.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(c.seed + 2)

    def loss_fn(idx: torch.Tensor) -> torch.Tensor:
        x0 = latents[idx]
        noise = training_noise(x0.shape, c.unet_noise_offset, gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        column = pick_of[torch.bucketize(torch.rand(len(idx), generator=gen), bounds, right=True)]
        cond = table[which[idx, column]]
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        return F.mse_loss(pred, noise)

    history = train_loop(
        c.unet_steps, optimizer, gen, uniform(len(latents), c.unet_batch), loss_fn, c.log, "unet"
    )
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    return {"steps": c.unet_steps, "loss": loss_curve(history)}


# -- assembly and adapters -----------------------------------------------------------------------------------
def stage_pipeline(c: BuildConfig, out: Path) -> dict[str, Any]:
    """The standard pipeline folder, plus the vision tower where the h94 layout puts the image encoder."""
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    from .vision import vision_tower

    clip = CLIPModel.from_pretrained(out / "clip")
    scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
    scheduler.register_to_config(set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(out / "clip"),
        tokenizer=_tokenizer(out),
        unet=UNet2DConditionModel.from_pretrained(out / "unet"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out / "pipeline")  # half the bytes; loaders upcast on request
    vision = vision_tower(clip)  # its vision tower and projection, in the h94 layout
    vision.to(torch.float16).save_pretrained(out / "models" / "image_encoder")
    return {"pipeline": str(out / "pipeline")}


def _phrases(caption: str) -> tuple[str, str]:
    """A caption's object and scene phrases: "a red circle on a blue background" -> ("a red circle", "on a blue background")."""
    cut = caption.index(" on ")
    return caption[:cut], caption[cut + 1 :]


def _adapter_manifest(c: BuildConfig, folder: Path) -> Path:
    """The adapters' examples: each training picture with its caption, and for some a reference picture.

    Captions are the full caption, or only its background phrase ("on a striped blue background"). The base
    model only ever saw full captions. Half the adapter examples name the background alone, so the image
    tokens learn to bring the object while the text brings the scene: the combination ("this object, on a
    green background") the paper calls text compatible.

    A share ``adapter_swap`` of the examples shows the image encoder another picture (the manifest's
    ``reference`` field): the same object, in the same place and colour, on another background (never the
    object's colour, never a held-out pairing), while the caption names the target's background. The image
    then never tells the background when the text does, so the adapter learns to carry the object apart from
    its background. A share ``adapter_empty`` of the other examples has an empty caption: with no text, the
    picture's own background is the answer. (The trainer's ``adapter_drop_text`` empties captions at random,
    swapped examples included.)

    A share ``adapter_drawn`` of the examples not swapped shows the image encoder the same scene drawn anew
    by :func:`~.drawn.draw_example` (turned, resized, moved, other edges), so the adapter learns to carry
    what a user's reference shows rather than the generator's exact pose.
    """
    rng = np.random.default_rng([c.seed, 5])
    swaps = np.random.default_rng([c.seed, 6])
    views = np.random.default_rng([c.seed, 8])
    lines = []
    for name, share in (("swapped", c.adapter_swap), ("views", c.adapter_drawn)):
        if share > 0:
            (folder / name).mkdir(exist_ok=True)
    for index, row in enumerate(read_rows(folder)):
        text = row["text"]
        if rng.random() < c.adapter_scene_only:
            text = _phrases(text)[1]
        swapped = swaps.random() < c.adapter_swap
        if not swapped and swaps.random() < c.adapter_empty:
            text = ""  # the picture alone, with its own background: what an empty prompt must give
        entry = {"image": row["image"], "text": text}
        if swapped:
            other = [b for b in BACKGROUNDS if b not in (row["background"], row["color"])
                     and not is_held_out(row["shape"], row["color"], b)]  # fmt: skip
            background = other[int(swaps.integers(len(other)))]
            picture = render(row["shape"], row["color"], background, row["texture"], tuple(row["box"]), c.size,
                             np.random.default_rng([c.seed, 7, index]))  # fmt: skip
            entry["text"] = _phrases(row["text"])[1]  # the target's background, named
            entry["reference"] = f"swapped/{index:06d}.png"
            picture.save(folder / entry["reference"])
        elif views.random() < c.adapter_drawn:
            scene = (row["shape"], row["color"], row["background"], row["texture"])
            view = draw_example(c.seed + 20, index, "train", (c.size,), scene=scene)
            entry["reference"] = f"views/{index:06d}.png"
            view.image.save(folder / entry["reference"])
        lines.append(json.dumps(entry))
    path = folder / "adapter_captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_adapters(c: BuildConfig, out: Path) -> dict[str, Any]:
    """Basic and plus adapters, trained by ``ipadapter.training`` on the same data."""
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from ..training.trainer import Trainer

    manifest = _adapter_manifest(c, out / "data" / "train")
    info = {}
    variants = (
        ("basic", "ip-adapter_mini", c.adapter_lr),
        ("plus", "ip-adapter-plus_mini", c.adapter_plus_lr),
    )
    for variant, name, lr in variants:
        run = out / "runs" / name
        config = TrainConfig(
            base=str(out / "pipeline"),
            data=str(manifest),
            output=str(run),
            variant=variant,
            image_encoder=str(out / "models" / "image_encoder"),
            resolution=c.size,
            batch_size=c.adapter_batch,
            max_steps=c.adapter_steps,
            lr=lr,
            seed=c.seed,
            checkpoint_every=max(1, c.adapter_steps // 4),
            keep_checkpoints=1,
            report_to="none",
            export_dtype="float16",
            drop_text=c.adapter_drop_text,
            noise_offset=c.unet_noise_offset,  # the adapters see the noise the base learned on
            cache_dir=str(out / "cache" / variant),
            resume=(run / "train_config.json").is_file(),
        )
        trainer = Trainer(config)
        trainer.setup()
        final = trainer.train()
        target = out / "models" / f"{name}.safetensors"
        target.write_bytes(final.read_bytes())
        info[variant] = {"steps": trainer.step, "loss": loss_curve(trainer.losses)}
    return info


def stage_vision(c: BuildConfig, out: Path) -> dict[str, Any]:
    """The vision tower retrained against the frozen text tower (see :mod:`.vision`); skipped at 0 steps."""
    if c.vision_steps <= 0:
        return {"steps": 0}
    # heavy: only the stage that uses it pays for it (importing this module stays torch-only)
    from .vision import stage_vision as run

    return run(c, out)


RUNNERS = {"data": stage_data, "clip": stage_clip, "vision": stage_vision, "vae": stage_vae,
           "unet": stage_unet, "pipeline": stage_pipeline, "adapters": stage_adapters}  # fmt: skip


def build(config: BuildConfig, stages: tuple[str, ...] = STAGES) -> Path:
    """Run the missing stages (a stage recorded as done is skipped) and return ``out``."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        _run_stages(config, out, stages)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was
    return out


def _run_stages(config: BuildConfig, out: Path, stages: tuple[str, ...]) -> None:
    record = _record(out)
    # the latest run's settings: the stages it runs use them (a resumed build keeps its earlier stages)
    record["config"] = {k: v for k, v in asdict(config).items() if k != "log"}
    _write_record(out, record)
    for stage in stages:
        if stage in _record(out)["stages"]:
            say(config, f"mini build: {stage} already done")
            continue
        say(config, f"mini build: {stage}...")
        started = time.perf_counter()
        info = RUNNERS[stage](config, out)
        info["seconds"] = round(time.perf_counter() - started, 1)
        _finish(out, stage, info)
        say(config, f"mini build: {stage} done in {info['seconds']} s")


SHIPPED = ("pipeline", "models", "clip", RECORD)  # what the package carries; data, runs and caches stay out


def install(out: str | Path, dest: str | Path | None = None) -> Path:
    """Copy a finished build's shipped pieces into ``dest`` (default: the package's ``mini/model``), replacing it.

    The new folder is assembled beside ``dest`` and swapped in, so a failed copy leaves the old model whole.
    """

    out, dest = Path(out), Path(dest or MODEL_DIR)
    done = _record(out)["stages"]
    missing = [s for s in STAGES if s not in done]
    if missing:
        raise ValueError(
            f"the build in {out} has not finished (missing stages: {', '.join(missing)}); run it first"
        )
    staging = dest.with_name(dest.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in SHIPPED:
        source = out / name
        if source.is_dir():
            shutil.copytree(source, staging / name)
        else:
            shutil.copy2(source, staging / name)
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> Path:
    """``python -m ipadapter.mini.build --out DIR [--set name=value ...]``: build (or finish) a family."""
    parser = argparse.ArgumentParser(
        prog="python -m ipadapter.mini.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, help="folder of the build (resumes the stages it has)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list (default {','.join(STAGES)})")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a BuildConfig field, e.g. --set size=32 --set unet_steps=4000",
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="when every stage is done, copy the result into the package (what --base mini loads)",
    )
    args = parser.parse_args(argv)
    fields = BuildConfig.__dataclass_fields__
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields or name in ("out", "log"):
            parser.error(f"--set {item}: unknown field '{name}'; expected one of {', '.join(sorted(fields))}")
        try:
            overrides[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--set {item}: '{value}' is not a Python literal (numbers, tuples in parentheses)")
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; expected {', '.join(STAGES)}")
    try:
        config = BuildConfig(
            out=args.out, **overrides, log=lambda s: print(time.strftime("%H:%M:%S"), s, flush=True)
        )
    except ValueError as e:
        parser.error(str(e))
    quiet_libraries()  # stages load text towers out of whole-CLIP folders: no skipped-keys tables, no bars
    out = build(config, stages)
    if args.install:
        try:
            print(f"installed the miniature family into {install(out)}")
        except ValueError as e:
            parser.error(str(e))
    return out


if __name__ == "__main__":
    main()
