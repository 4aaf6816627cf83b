"""The paper's training recipe (Ye et al. 2023, DESIGN.md §3.4) on accelerate: the :class:`Trainer` and its loop.

Frozen UNet, VAE, text and image encoders; trained: the image projection and every layer's ``to_k_ip`` /
``to_v_ip`` (:mod:`.model`), and a FaceID adapter's UNet LoRA. Text, image or both are dropped at set rates (a
dropped text is the empty string, a dropped image the adapter's own negative: a zero embedding for pooled
features, the encoder on an all-zero input for hidden states; a dropped face: the zero face embedding, and for
faceid-plus the encoder on an all-zero input for its crop), so the result supports classifier-free guidance.
Loss: MSE to the noise (or the velocity, when the base predicts v).

Every random choice of a step comes from a generator seeded by (seed, step, micro-batch, rank), and the data
order from (seed, epoch) (:mod:`.seeds`): so a run resumed from a checkpoint (:mod:`.checkpoints`) repeats
exactly what the uninterrupted run would have done. The run's settings are a :class:`~.config.TrainConfig`;
DeepSpeed and FSDP specifics live in :mod:`.engines`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from ..adapter import attach
from ..adapters.checkpoint import save_checkpoint
from ..errors import InputError
from ..files import atomic_path
from ..prompt.images import load_image
from ..sources import load_image_encoder
from .cache import CachedExamples, FeatureCache, fill_shards
from .checkpoints import check_output, latest_checkpoint, resume_point, step_folder, write_checkpoint
from .config import CONFIG, TrainConfig
from .data import open_source
from .datasets import EpochIndexed, RankPositions, StreamingDataset, collate, first_usable
from .engines import configure_engine, engine_of, load_optimizer, save_optimizer, whole_weights
from .faces import validation_face
from .model import (
    AdapterTrainModule,
    default_training_encoder,
    freeze,
    new_spec,
    start_checkpoint,
    trainable_state,
)
from .seeds import deterministic_kernels, step_generator, training_noise
from .transform import Transform
from .validation import render_validation, save_validation

FINAL = "ip-adapter.safetensors"


class Trainer:
    """One training run: set up (validating everything first), train, checkpoint, resume, export."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output = Path(config.output)
        self.skipped: list[tuple[str, str]] = []
        self.losses: list[float] = []  # per optimizer step, this process
        self.seconds = {"setup": 0.0, "cache": 0.0, "train": 0.0}
        self.samples = 0  # examples trained on in this session, all processes
        self.usable: list[Any] = []  # the data's first readable samples, one batch of every process (setup)
        self.resume_from: Any = None  # the checkpoint a resumed run starts from, read whole (setup)
        self._kernels_before: tuple[bool, bool, bool] | None = None  # torch's switches, while --deterministic

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate everything, load the models, wrap them for the engine, and restore a resumed run."""
        # deterministic kernels are chosen before anything runs on the GPU (cuBLAS reads its workspace
        # setting once); torch's process-wide switches are put back when the run ends or setup fails
        self._kernels_before = deterministic_kernels(True) if self.config.deterministic else None
        try:
            self._setup()
        except BaseException:
            self._restore_kernels()
            raise

    def _restore_kernels(self) -> None:
        if self._kernels_before is not None:
            deterministic_kernels(*self._kernels_before)
            self._kernels_before = None

    def _setup(self) -> None:
        started = time.perf_counter()
        c = self.config
        check_output(c)
        # a resumed run's newest checkpoint is read whole now: a damaged one is refused before any work
        self.resume_from = resume_point(self.output) if c.resume else None
        self.report_to = self._report_to()
        crops = c.variant == "faceid-plus"  # FaceID-Plus also encodes each face's aligned crop
        self.source = open_source(c.data, image_column=c.image_column, text_column=c.text_column,
                                  face_column=c.face_column if c.faceid else None, face_crops=crops,
                                  reference_column=c.reference_column)  # fmt: skip
        if c.validation_image:
            self.validation_reference = load_image(c.validation_image, "validation image")
        if c.validation_face:
            self.validation_reference = validation_face(c.validation_face, crops)
        self._start_accelerator()
        configure_engine(c, self.accelerator)
        # at least one batch of every process must be readable (else a run "trains" on nothing)
        faces = crops if c.faceid else None
        self.usable = first_usable(self.source, c.batch_size, self.accelerator.num_processes, faces)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            c.mixed_precision, torch.float32
        )
        encoder_spec = self._load_models()
        self.cache = None
        if c.cache_dir:
            cache_started = time.perf_counter()
            self._build_cache(encoder_spec)
            self.seconds["cache"] = time.perf_counter() - cache_started
        self._prepare()
        acc = self.accelerator
        # every rank has checked the output folder (check_output) before it holds a run: wrapping need not
        # synchronise the ranks (FSDP2 shards locally), and a late rank would otherwise find this run's config
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.output / CONFIG) as temp:
                temp.write_text(json.dumps(c.to_dict(), indent=2))
        self.seconds["setup"] = time.perf_counter() - started
        if self.report_to != "none":
            acc.init_trackers("ipadapter", config={k: v for k, v in c.to_dict().items() if v is not None})

    def _start_accelerator(self) -> None:
        """The run's :class:`accelerate.Accelerator` (its engine, precision and process group)."""
        c = self.config
        # A second run in the same process (a notebook, tests) may use another precision: accelerate keeps
        # that in a process-wide singleton. Reset it; the distributed PartialState is kept.
        AcceleratorState._reset_state()
        # Without CUDA, processes started by `accelerate launch --multi_gpu` or torchrun form a gloo group on
        # the CPU; accelerate only does that when asked for the CPU explicitly.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
            mixed_precision=c.mixed_precision,
            gradient_accumulation_steps=1,  # accumulation is done explicitly, step by step (DeepSpeed: see below)
            log_with=None if self.report_to == "none" else self.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output), logging_dir=str(self.output / "logs")
            ),
        )
        acc = self.accelerator
        if c.report_to == "auto" and self.report_to == "none" and acc.is_main_process:
            print(
                "ipadapter: note: no TensorBoard logging (the tensorboard package is not installed; "
                "`pip install tensorboard` turns it on)",
                file=sys.stderr,
            )

    @property
    def plus_version(self) -> str | None:
        """faceid-plus: v1, or v2 (the shortcut); None for the other variants."""
        return self.config.plus_version if self.config.variant == "faceid-plus" else None

    def _load_models(self) -> str | None:
        """The base pipeline, image encoder and adapter (fresh or ``init_adapter``), all frozen but the adapter
        and placed on the device; returns the image encoder's name (None: faceid reads no image)."""
        # heavy: diffusers pipelines load with the models, after the run inputs are checked
        from ..pipelines import load_pipeline

        c = self.config
        pipe = load_pipeline(c.base, dtype=torch.float32, device="cpu", base_config=c.base_config)
        pipe.set_progress_bar_config(disable=True)
        encoder_spec, encoder_model = None, None  # faceid reads the face embedding only
        if c.variant != "faceid":
            encoder_spec = c.image_encoder or default_training_encoder(pipe, c.variant)
            encoder_model = load_image_encoder(encoder_spec)
        spec = new_spec(c.variant, pipe.unet, encoder_model, c.tokens, c.lora)
        start = start_checkpoint(spec, pipe.unet, c.seed, c.init_adapter)
        # attach validates the layout against the UNet and the encoder before anything changes
        handle = attach(pipe, start, encoder_model, scale=1.0, name="train", plus_version=self.plus_version)
        self.transform = Transform(
            resolution=c.resolution,
            clip_size=int(encoder_model.config.image_size) if encoder_model is not None else 224,
            random_crop=c.random_crop,
            random_flip=c.random_flip,
            faces=c.faceid,
            face_crops=c.variant == "faceid-plus",
        )
        # Freeze everything, then unfreeze the adapter's weights (kept in float32).
        self.params = freeze(pipe, handle, encoder_model, self.accelerator.device, self.weight_dtype)
        if c.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        self.pipe, self.handle, self.encoder_model, self.spec = pipe, handle, encoder_model, spec
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        return encoder_spec

    def _prepare(self) -> None:
        """The optimizer and lr schedule; the adapter wrapped for the engine; a resumed run's state restored."""
        c, acc, handle = self.config, self.accelerator, self.handle
        shortcut = self.plus_version == "v2"
        module = AdapterTrainModule(self.pipe.unet, handle.projection, handle.name, handle.lora, shortcut)
        optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        )
        self.step = 0
        latest = latest_checkpoint(self.output, acc, self.engine, self.resume_from) if c.resume else None
        if latest is not None:  # weights go in before wrapping: FSDP shards and DDP broadcasts what it finds
            handle.load_state_dict(latest.adapter)
        self.module, self.optimizer = acc.prepare(module, optimizer)
        self.lr_scheduler = lr_scheduler
        if latest is not None:
            self._load_state(latest.folder, latest.saved, latest.state)
        self.resume_from = None  # its tensors are in the model and optimizer now

    def _report_to(self) -> str:
        """Where losses go: TensorBoard when asked for (its package must be there) or, by default, when
        installed; without it a default run trains unlogged (and says so once it knows its main process)."""
        # looked up per call: tests patch accelerate.utils
        from accelerate.utils import is_tensorboard_available

        wanted = self.config.report_to
        if wanted == "none" or is_tensorboard_available():
            return "tensorboard" if wanted == "auto" else wanted
        if wanted == "tensorboard":
            raise InputError(
                "TensorBoard logging needs the tensorboard package: `pip install tensorboard` "
                "(or `pip install -e '.[train]'`), or pass --report-to none"
            )
        return "none"

    @property
    def engine(self) -> str:
        """How the adapter is wrapped: ``plain`` (one process or DDP), ``deepspeed`` or ``fsdp``."""
        return engine_of(self.accelerator)

    # -- data --------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches from the run's current position onwards."""
        c, acc = self.config, self.accelerator
        per_rank = c.batch_size
        start = self.step * c.grad_accum * per_rank  # examples this rank has consumed
        if self.source.streaming:
            dataset = StreamingDataset(
                self.source,
                self.transform,
                seed=c.seed,
                rank=acc.process_index,
                world_size=acc.num_processes,
                start=start,
            )
            loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, collate_fn=collate)
            yield from loader
            return
        if self.cache is not None:
            dataset = CachedExamples(self.cache, self.source)
        else:
            dataset = EpochIndexed(self.source, self.transform, c.seed)
        sampler = RankPositions(
            len(self.source), c.seed, acc.process_index, acc.num_processes, per_rank, start
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, collate_fn=collate, num_workers=c.num_workers
        )
        yield from loader

    def _first_batch(self) -> dict[str, Any]:
        """A batch of the data's first readable examples (found by setup): what a micro-batch of unreadable
        images trains on when no earlier batch can be repeated, so no step learns from nothing."""
        c = self.config
        first = self.usable[: c.batch_size]
        batch = collate([self.transform(s, step_generator(c.seed, 8, i)) for i, s in enumerate(first)])
        if not batch["texts"]:
            raise InputError(
                f"the training images of '{c.data}' that could be read at the start can't be read any more "
                f"(e.g. {batch['skipped'][0][0]}: {batch['skipped'][0][1]}); check the data and resume the run"
            )
        return batch

    # -- one step ----------------------------------------------------------------------------------------
    def _encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.pipe.encode_prompt(
            prompt=texts,
            device=self.accelerator.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        if len(out) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
            return out[0], out[2]
        return out[0], None

    def _loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        c, device = self.config, self.accelerator.device
        pixels = batch.get("pixel_values")
        n = len(batch["texts"])
        # which examples lose their text, their image, or both (the official rule: one draw per example)
        draw = torch.rand(n, generator=gen)
        drop_image = draw < c.drop_image
        drop_text = (draw >= c.drop_image) & (draw < c.drop_image + c.drop_text)
        both = (draw >= c.drop_image + c.drop_text) & (draw < c.drop_image + c.drop_text + c.drop_both)
        drop_image, drop_text = drop_image | both, drop_text | both
        texts = ["" if d else t for t, d in zip(batch["texts"], drop_text.tolist(), strict=True)]
        with torch.no_grad():
            if "moments" in batch:  # cached: sample the stored latent distribution with this step's generator
                latents = DiagonalGaussianDistribution(batch["moments"].to(device)).sample(generator=gen)
            else:
                latents = self.pipe.vae.encode(pixels.to(device).float()).latent_dist.sample(generator=gen)
            shift = getattr(self.pipe.vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * self.pipe.vae.config.scaling_factor).to(self.weight_dtype)
            text, pooled = self._encode_text(texts)
            features, face = None, None
            if "features" in batch:
                features = self._dropped(batch["features"].to(device), drop_image.to(device))
            elif "clip_pixel_values" in batch:  # faceid-plus: the face crop's pixels
                features = self._features(batch["clip_pixel_values"].to(device), drop_image.to(device))
            if "face" in batch:  # FaceID: a dropped face is the zero embedding (the reference's negative)
                face = batch["face"].to(device)
                face = torch.where(drop_image.to(device)[:, None], torch.zeros_like(face), face)
        noise = training_noise(latents.shape, c.noise_offset, gen).to(device=device, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        added = None
        if pooled is not None:  # SDXL micro-conditioning: original size, crop top-left, target size
            target_size = torch.tensor([c.resolution, c.resolution]).expand(n, 2)
            time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target_size], dim=1)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(device=device, dtype=text.dtype)}
        with self.accelerator.autocast():
            pred = self.module(noisy, timesteps, text, features, added, face)
        return F.mse_loss(pred.float(), target.float())

    def _raw_features(self, clip: torch.Tensor) -> torch.Tensor:
        """Encoder features in the dtype the encoder runs in: pooled image_embeds or penultimate states
        (faceid-plus: those of the face crops)."""
        model = self.encoder_model
        if self.spec.feature == "pooled":
            return model(pixel_values=clip.to(self.weight_dtype)).image_embeds
        return model(pixel_values=clip.to(self.weight_dtype), output_hidden_states=True).hidden_states[-2]

    def _features(self, clip: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Features (float32); dropped images get the adapter's negative (zeros / encoder on zeros)."""
        if self.spec.feature == "pooled":
            feats = self._raw_features(clip)
            return torch.where(dropped[:, None], torch.zeros_like(feats), feats).float()
        clip = torch.where(dropped[:, None, None, None], torch.zeros_like(clip), clip)
        return self._raw_features(clip).float()

    def _dropped(self, feats: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Cached features with the dropped rows replaced by the cached negative."""
        negative = self.negative.to(device=feats.device, dtype=feats.dtype).expand_as(feats)
        mask = dropped.view(-1, *([1] * (feats.ndim - 1)))
        return torch.where(mask, negative, feats).float()

    def _build_cache(self, encoder_spec: str | None) -> None:
        """Compute the missing cache shards (ranks share them), then read the negative features."""
        c, acc = self.config, self.accelerator
        if self.source.streaming:
            raise InputError(
                f"--cache-dir needs data with random access; '{c.data}' is streamed (hub dataset or "
                "tar shards): drop --cache-dir"
            )
        n = len(self.source)
        fingerprint = {
            "data": c.data,
            "examples": n,
            "base": c.base,
            "image_encoder": encoder_spec,
            "feature": self.spec.feature,
            "resolution": c.resolution,
            "dtype": str(self.weight_dtype),
        }
        if c.faceid:  # the faces (and for faceid-plus the features of their crops) are cached too
            fingerprint.update(variant=c.variant, face_column=c.face_column)
        if self.source.has_references:  # the features are the references', not the images'
            fingerprint.update(reference_column=c.reference_column)
        cache = FeatureCache(c.cache_dir, fingerprint)
        if acc.is_main_process and not (cache.folder / "index.json").is_file():
            with torch.no_grad():
                if self.spec.feature == "pooled" or self.encoder_model is None:  # faceid: the zero face
                    negative = torch.zeros(self.spec.feature_dim, dtype=self.weight_dtype)
                else:
                    size = int(self.encoder_model.config.image_size)
                    zeros = torch.zeros(1, 3, size, size, device=acc.device)
                    negative = self._raw_features(zeros)[0]
            cache.write_index(negative)  # first: shards are only ever read under a matching fingerprint
        acc.wait_for_everyone()
        fill_shards(
            cache,
            self.source,
            self.transform,
            self._encode_for_cache,
            c.batch_size,
            acc.process_index,
            acc.num_processes,
        )
        acc.wait_for_everyone()
        self.cache = cache
        self.negative = cache.negative()

    def _encode_for_cache(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A collated batch's latent moments (B, 2C, h, w) and raw image features (what the cache stores;
        None for faceid, which reads no image)."""
        device = self.accelerator.device
        moments = self.pipe.vae.encode(batch["pixel_values"].to(device)).latent_dist.parameters
        if "clip_pixel_values" not in batch:
            return moments, None
        return moments, self._raw_features(batch["clip_pixel_values"].to(device))

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to ``max_steps`` (checkpointing and validating on the way); export and return the adapter."""
        try:
            return self._train()
        except RuntimeError as e:
            if "deterministic" not in str(e) or not self.config.deterministic:
                raise
            raise InputError(
                f"--deterministic: {str(e).splitlines()[0]} Train without --deterministic (a "
                "resumed run then matches the whole one within float tolerance)."
            ) from e
        finally:
            self._restore_kernels()

    def _train(self) -> Path:
        c, acc = self.config, self.accelerator
        batches = self._batches()
        bar = tqdm(
            total=c.max_steps, initial=self.step, disable=not acc.is_local_main_process, desc="training"
        )
        last_good: dict[str, Any] | None = None
        started, seen = time.perf_counter(), 0
        while self.step < c.max_steps:
            total = 0.0
            for micro in range(c.grad_accum):
                batch = next(batches)
                self.skipped.extend(batch.get("skipped", []))
                if not batch["texts"]:  # every image of this micro-batch was unreadable: repeat the last one
                    batch = last_good if last_good is not None else self._first_batch()
                last_good = batch
                gen = step_generator(c.seed, self.step, micro, acc.process_index)
                # accumulate() tells DeepSpeed which micro-batch ends a step (it counts and scales itself);
                # elsewhere accelerate's count is 1 and the loss is scaled here
                with acc.accumulate(self.module):
                    raw = self._loss(batch, gen)
                    acc.backward(raw if self.engine == "deepspeed" else raw / c.grad_accum)
                total += raw.detach().item() / c.grad_accum
                seen += len(batch["texts"]) * acc.num_processes
            if c.max_grad_norm:
                acc.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(total)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.2f}")
            if self.step % c.log_every == 0 or self.step == c.max_steps:
                acc.log({"loss": total, "lr": lr, "samples_per_second": rate}, step=self.step)
            if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                self.save_checkpoint()
            if c.validate_every and (self.step % c.validate_every == 0 or self.step == c.max_steps):
                self.validate()
        bar.close()
        self.seconds["train"], self.samples = time.perf_counter() - started, seen
        final = self.export(self.output / FINAL)
        acc.end_training()
        return final

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """``checkpoints/step-N``: adapter weights, optimizer, lr schedule, position; written atomically.

        Every process takes part (FSDP gathers the adapter from its shards, DeepSpeed writes each rank's
        optimizer partition); the main process then renames the finished folder into place.
        """
        acc = self.accelerator
        folder = step_folder(self.output, self.step)
        tmp = folder.with_name(f".{folder.name}.tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt = self._adapter_checkpoint()
        state: dict[str, Any] = {"lr_scheduler": self.lr_scheduler.state_dict()}
        state.update(save_optimizer(self.engine, acc, self.module, self.optimizer, tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.metadata = self._metadata()
            position = {
                "step": self.step,
                "skipped": len(self.skipped),
                "config": self.config.to_dict(),
                "engine": self.engine,
                "processes": acc.num_processes,
            }
            keep = self.config.keep_checkpoints
            write_checkpoint(
                self.output, folder, tmp, adapter=ckpt, state=state, position=position, keep=keep
            )
        acc.wait_for_everyone()
        return folder

    def _adapter_checkpoint(self) -> Any:
        """The adapter's weights on the main process, None elsewhere (every process must call: FSDP gathers)."""
        gathered = self.accelerator.get_state_dict(self.module) if self.engine == "fsdp" else None
        return trainable_state(self.handle, gathered) if self.accelerator.is_main_process else None

    def _load_state(self, folder: Path, saved: dict[str, Any], state: dict[str, Any]) -> None:
        """Optimizer, lr schedule and position from a checkpoint (``state``: its optimizer.pt), after the
        adapter is wrapped."""
        load_optimizer(self.engine, self.accelerator, self.module, self.optimizer, folder, state)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(saved["step"])

    def _metadata(self) -> dict[str, str]:
        c = self.config
        return {
            "ipadapter.base": c.base,
            "ipadapter.image_encoder": str(c.image_encoder or ""),
            "ipadapter.variant": c.variant,
            "ipadapter.steps": str(self.step),
            "ipadapter.num_tokens": str(c.tokens),
            "ipadapter.resolution": str(c.resolution),
            **({"ipadapter.lora_rank": str(c.lora)} if c.faceid else {}),
            **({"ipadapter.plus_version": c.plus_version} if self.plus_version else {}),
        }

    # -- validation and export ---------------------------------------------------------------------------
    def validate(self) -> Path | None:
        """An image from the validation reference and prompt with the current weights (saved by the main process).

        Under FSDP every process renders it too: the sharded layers gather their weights collectively.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        with whole_weights(self.engine, acc, self.module):
            if self.engine == "fsdp" or acc.is_main_process:
                image = render_validation(
                    self.handle, self.validation_reference, self.config, acc.device, self.weight_dtype
                )
        if acc.is_main_process:
            path = save_validation(image, self.output, self.step, acc.trackers)
        acc.wait_for_everyone()
        return path

    def export(self, path: Path) -> Path:
        """The adapter as an official-format ``.safetensors`` in the export dtype, with run metadata."""
        acc = self.accelerator
        acc.wait_for_everyone()
        ckpt = self._adapter_checkpoint()
        if acc.is_main_process:
            dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
                self.config.export_dtype, torch.float32
            )
            ckpt.image_proj = {k: v.to(dtype) for k, v in ckpt.image_proj.items()}
            ckpt.ip_adapter = {k: v.to(dtype) for k, v in ckpt.ip_adapter.items()}
            ckpt.metadata = self._metadata()
            save_checkpoint(ckpt, path)  # written whole or not at all (files.atomic_path)
            if self.skipped:
                print(
                    f"ipadapter: note: skipped {len(self.skipped)} unreadable image(s), e.g. "
                    f"{self.skipped[0][0]}: {self.skipped[0][1]}",
                    file=sys.stderr,
                )
        acc.wait_for_everyone()
        return path


def train(config: TrainConfig) -> Path:
    """Run (or resume) training and return the exported adapter's path."""
    trainer = Trainer(config)
    trainer.setup()
    return trainer.train()
