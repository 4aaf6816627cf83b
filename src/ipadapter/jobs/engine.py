"""The engine that runs :class:`~ipadapter.jobs.job.Job` s with models loaded once.

The engine keeps what it loaded (base pipelines, ControlNets, motion adapters, the pipelines of each mode,
attached adapters and their image encoders) and reuses it for later jobs that name the same models. The heavy
libraries (torch, diffusers) are imported inside its methods: the command line imports this module to check its
options before paying seconds for them.
"""

from __future__ import annotations

import dataclasses
import gc
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from PIL import Image

from .. import __version__
from ..errors import InputError
from ..modes import STRENGTH
from ..prompt.influence import InfluenceMaps
from ..prompt.recipe import AdapterRecipe
from ..schedulers import set_scheduler
from .job import Job, ProgressCallback, Result

# torch.compile's options for ``Engine(compile=True)``: one graph per UNet (a graph break is an error, not a
# silent slowdown) in the default mode ("max-autotune" can spend many minutes tuning a full-size UNet).
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True}
COMPILE_NOTICE = (
    "ipadapter: compiling the denoiser (--compile): the first generation takes a while (minutes for a "
    "full-size model), later ones of the same size run faster"
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    """(first image, count) of each pipeline call: ``total`` images, at most ``size`` per call."""
    return [(first, min(size, total - first)) for first in range(0, total, size)]


def _progress_of(progress: ProgressCallback | None, index: int, chunks: int) -> ProgressCallback | None:
    """Chunk ``index``'s progress as part of the whole job's (steps count across every chunk)."""
    if progress is None or chunks == 1:
        return progress
    return lambda done, total: progress(index * total + done, chunks * total)


def _check_family_options(job: Job, pipe: Any) -> None:
    """Refuse, by name, options the base's family has no use for (before anything runs)."""
    from ..pipelines import FAMILY_NAMES, family_of

    family = family_of(pipe)
    name = FAMILY_NAMES.get(family, family)
    if job.true_cfg_scale is not None and family != "flux":
        raise InputError(
            f"true_cfg_scale is for Flux bases (its second, negative transformer call); the base is {name}, whose "
            "pipelines guide with guidance_scale alone: drop true_cfg_scale"
        )
    if job.max_sequence_length is not None and family not in ("flux", "sd3"):
        raise InputError(
            f"max_sequence_length sets the T5 prompt length of Flux and SD3 bases; the base is {name}, which "
            "has no T5 encoder: drop max_sequence_length"
        )


class Engine:
    """Loads models on first use and keeps them: one engine per device, one job at a time.

    At most ``max_bases`` base models stay in memory (with their mode pipelines and attached adapters); a job
    naming another one drops the least recently used, so a manifest naming many bases cannot exhaust memory.
    ``batch_size``: the most images one pipeline call makes; a job asking for more runs in several calls (memory
    stays bounded) and gives the same images, since image i always has its own generator seeded ``seed + i``.
    ``compile``: each denoiser is compiled (``torch.compile``, :data:`COMPILE_OPTIONS`) the first time a job
    uses it, and ``notice`` (default: standard error) is told once that this takes a while. Adapters,
    references and scales change without recompiling; a new image size, number of images or references does
    compile once more (README, "Compiling").
    """

    def __init__(
        self,
        device: str = "auto",
        dtype: str | None = None,
        max_bases: int = 2,
        *,
        batch_size: int = 4,
        compile: bool = False,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        from ..pipelines import pick_device, pick_dtype

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_bases = max(1, int(max_bases))
        self.compile = bool(compile)
        self.batch_size = max(1, int(batch_size))
        self._notice = notice or _stderr
        self._noticed = False
        self._bases: OrderedDict[tuple, Any] = OrderedDict()
        self._nets: dict[str, Any] = {}
        self._motion: dict[str, Any] = {}
        self._modes: dict[tuple, tuple[Any, Any]] = {}  # key -> (pipeline, its own scheduler)
        self._adapters: dict[tuple, Any] = {}

    # -- models -------------------------------------------------------------------------------------------
    def base(self, base: str, base_config: str | None = None) -> Any:
        """The text-to-image pipeline of ``base`` (loaded once)."""
        from ..pipelines import load_pipeline

        key = (base, base_config)
        if key not in self._bases:
            while len(self._bases) >= self.max_bases:
                self._forget(next(iter(self._bases)))
            pipe = load_pipeline(base, dtype=self.dtype, device=self.device, base_config=base_config)
            pipe.set_progress_bar_config(disable=True)
            self._bases[key] = pipe
        self._bases.move_to_end(key)
        return self._bases[key]

    def _forget(self, key: tuple) -> None:
        """Drop base ``key`` with its mode pipelines and the adapters attached to them, and free the memory."""
        import torch

        self._bases.pop(key)
        from ..calls import denoiser

        gone = [k for k in self._modes if k[:2] == key]
        unets = {id(denoiser(self._modes[k][0])) for k in gone}
        for k in gone:
            del self._modes[k]
        for k in [k for k in self._adapters if k[0] in unets]:
            del self._adapters[k]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def pipeline(self, job: Job) -> Any:
        """The pipeline for the job's mode, ControlNets and motion adapter, built once over its base."""
        from ..pipelines import load_controlnet, load_motion_adapter, mode_pipeline

        key = (job.base, job.base_config, job.mode, tuple(job.controlnets), job.motion_adapter)
        base = self.base(job.base, job.base_config)  # loaded, or marked as just used
        if key not in self._modes:
            nets = [self._load(self._nets, n, load_controlnet) for n in job.controlnets]
            motion = (
                self._load(self._motion, job.motion_adapter, load_motion_adapter)
                if job.mode == "video"
                else None
            )
            pipe = mode_pipeline(base, job.mode, controlnet=nets or None, motion_adapter=motion)
            pipe.set_progress_bar_config(disable=True)
            self._modes[key] = (pipe, pipe.scheduler)
        if self.compile:
            self._compile(self._modes[key][0])
        return self._modes[key]

    def _compile(self, pipe: Any) -> None:
        """Compile ``pipe``'s denoiser in place, once (mode pipelines made with ``from_pipe`` share it)."""
        from ..calls import denoiser

        unet = denoiser(pipe)
        if getattr(unet, "_compiled_call_impl", None) is not None:
            return
        if not self._noticed:
            self._notice(COMPILE_NOTICE)
            self._noticed = True
        unet.compile(**COMPILE_OPTIONS)

    def _load(self, cache: dict[str, Any], name: str, loader: Callable[..., Any]) -> Any:
        if name not in cache:
            cache[name] = loader(name, dtype=self.dtype, device=self.device)
        return cache[name]

    def adapter(
        self, pipe: Any, path: str, image_encoder: str | None = None, lora_file: str | None = None
    ) -> Any:
        """Adapter ``path`` attached to ``pipe``'s denoiser (once per denoiser; its scale is given per call)."""
        from ..adapter import attach
        from ..calls import denoiser

        key = (id(denoiser(pipe)), path, image_encoder, lora_file)
        ip = self._adapters.get(key)
        if ip is None or not ip.attached:
            name = f"engine{len(self._adapters)}"
            ip = attach(pipe, path, image_encoder, scale=1.0, name=name, lora_file=lora_file)
            self._adapters[key] = ip
        return ip

    def loaded(self) -> dict[str, Any]:
        """What is in memory, by kind (for reports)."""
        return {
            "bases": sorted({k[0] for k in self._bases}),
            "controlnets": sorted(self._nets),
            "motion_adapters": sorted(self._motion),
            "adapters": sorted({k[1] for k in self._adapters}),
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # -- running ----------------------------------------------------------------------------------------
    def run(self, job: Job, progress: ProgressCallback | None = None) -> Result:
        """Run ``job``; ``progress(done, total)`` is called after every denoising step (raise Cancelled to stop)."""
        started = time.perf_counter()
        if job.cpu_offload and self.compile:
            raise InputError(
                "--cpu-offload moves the models between devices at every call, which a compiled denoiser "
                "cannot follow; use one of --compile and --cpu-offload"
            )
        if job.cpu_offload and not self.device.startswith("cuda"):
            raise InputError(
                f"--cpu-offload needs a CUDA device (got '{self.device}'); drop it or use --device cuda"
            )
        pipe, default_scheduler = self.pipeline(job)
        _check_family_options(job, pipe)
        pipe.scheduler = default_scheduler
        if job.scheduler:
            set_scheduler(pipe, job.scheduler)
        most = pipe.scheduler.config.get("num_train_timesteps", 1000)
        if job.steps is not None and job.steps > most:
            raise InputError(
                f"{job.steps} steps asked, but the scheduler has only {most} training timesteps; ask for at "
                f"most {most} steps"
            )
        entries = job.recipe.adapters if job.recipe is not None else []
        adapters = [self.adapter(pipe, e.path, e.image_encoder, e.lora_file) for e in entries]
        if job.vae_slicing:
            pipe.vae.enable_slicing()
        if job.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        loaded = time.perf_counter()

        seed = secrets.randbelow(2**31) if job.seed is None else job.seed
        from ..pipelines import family_of

        images, maps = [], []
        chunks = _chunks(1 if job.mode == "video" else job.num_images, self.batch_size)
        for index, (first, count) in enumerate(chunks):
            call = self._call(
                job, seed, first, count, _progress_of(progress, index, len(chunks)), family_of(pipe)
            )
            if job.influence:
                from ..prompt.recording import InfluenceRecorder  # torch: once a job runs

                call["influence"] = InfluenceRecorder()
            out = self._generate(pipe, job, adapters, call, seed, first, count)
            images.extend(out.frames[0] if job.mode == "video" else out.images)
            if job.influence:
                maps.append(call["influence"].maps())
        done = time.perf_counter()
        params = self._params(job, pipe, adapters, seed, images)
        seconds = {"load": round(loaded - started, 3), "generate": round(done - loaded, 3)}
        influence = InfluenceMaps.join(maps) if maps else None
        return Result(images, params, seed, seconds, video=job.mode == "video", influence=influence)

    @staticmethod
    def _generate(
        pipe: Any, job: Job, adapters: list[Any], call: dict, seed: int = 0, first: int = 0, count: int = 1
    ) -> Any:
        """One pipeline call: the plain base model, one reference per frame, or the recipe's adapters.

        ``seed``: the job's (a noise negative without a seed of its own takes it); ``first`` / ``count``: the
        images this call makes (unfolded references are picked for them).
        """
        from ..adapter import run as run_adapters
        from ..calls import check_call

        span = None if job.mode == "video" else (first, count)  # a video's frames: one call, all references
        entries = [_for_call(e, seed, span) for e in (job.recipe.adapters if job.recipe is not None else [])]
        if job.recipe is None:  # the plain base model (adapters attached by earlier jobs stay idle)
            return pipe(**check_call(pipe, call))
        if job.per_frame:
            ip = adapters[0]
            ip.scale = 1.0 if entries[0].scale is None else entries[0].scale
            return ip([ref.path for ref in entries[0].images], pipeline=pipe, **call)
        pairs = [
            (ip, dataclasses.replace(e, scale=1.0 if e.scale is None else e.scale))
            for ip, e in zip(adapters, entries, strict=True)
        ]
        return run_adapters(pipe, pairs, **call)

    def _call(
        self,
        job: Job,
        seed: int,
        first: int,
        count: int,
        progress: ProgressCallback | None,
        family: str = "sd15",
    ) -> dict[str, Any]:
        """The pipeline arguments for images ``first .. first + count - 1`` of the job.

        One image: one CPU generator seeded ``seed`` (diffusers' examples). Several: image i has its own,
        seeded ``seed + i``, so it is the image ``--seed seed+i`` makes alone, whichever chunk it runs in.
        """
        import torch

        if job.num_images == 1:
            generator: Any = torch.Generator("cpu").manual_seed(seed)
        else:
            generator = [torch.Generator("cpu").manual_seed((seed + first + i) % 2**64) for i in range(count)]
        call: dict[str, Any] = {"prompt": job.prompt, "generator": generator}
        if job.mode in ("img2img", "inpaint"):
            strength = STRENGTH[job.mode] if job.strength is None else job.strength
            call.update(image=job.init, strength=strength)
            if job.mode == "inpaint":
                call.update(mask_image=job.mask, width=job.init.width, height=job.init.height)
            elif family in ("flux", "sd3"):  # their img2img would resize the init to the native size
                call.update(width=job.width or job.init.width, height=job.height or job.init.height)
        else:
            call.update({k: v for k, v in (("width", job.width), ("height", job.height)) if v})
        if job.controlnets:
            key = {"t2i": "image", "video": "conditioning_frames"}.get(job.mode, "control_image")
            if family in ("flux", "sd3"):  # the DiT ControlNet pipelines name it so in every mode
                key = "control_image"
            images = job.control_images
            call[key] = images[0] if len(images) == 1 else images
            call["controlnet_conditioning_scale"] = job.control_scale
        optional = {
            "negative_prompt": job.negative_prompt,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
            "true_cfg_scale": job.true_cfg_scale,
            "max_sequence_length": job.max_sequence_length,
        }
        call.update({k: v for k, v in optional.items() if v is not None})
        if job.mode == "video":
            call["num_frames"] = job.frames
        else:
            call["num_images_per_prompt"] = count
        if progress is not None:
            total = job.steps or 50

            def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
                progress(step + 1, getattr(pipe, "num_timesteps", None) or total)
                return kwargs

            call["callback_on_step_end"] = on_step
        return call

    def _params(self, job: Job, pipe: Any, adapters: list[Any], seed: int, images: list[Image.Image]) -> dict:
        entries = job.recipe.adapters if job.recipe is not None else []
        scales = [1.0 if e.scale is None else e.scale for e in entries]
        paths = [e.path for e in entries]

        def one_or_list(values: list[Any]) -> Any:  # None for the plain base model
            return values if len(values) > 1 else values[0] if values else None

        params: dict[str, Any] = {
            "tool": f"ipadapter {__version__}",
            "mode": job.mode,
            "base": job.base,
            "adapter": one_or_list(paths),
            "variant": "+".join("/".join(ip.spec.names) or ip.spec.layout for ip in adapters) or None,
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt,
            "scale": one_or_list(scales),
            "steps": job.steps,
            "guidance": job.guidance,
            **{k: v for k in ("true_cfg_scale", "max_sequence_length") if (v := getattr(job, k)) is not None},
            "seed": seed,
            **({"seeds": [(seed + i) % 2**64 for i in range(job.num_images)]} if job.num_images > 1 else {}),
            "scheduler": job.scheduler or type(pipe.scheduler).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "width": images[0].width,
            "height": images[0].height,
        }
        if job.mode in ("img2img", "inpaint"):
            params["strength"] = STRENGTH[job.mode] if job.strength is None else job.strength
        if job.controlnets:
            params.update(controlnet=list(job.controlnets), control_scale=job.control_scale)
        if job.mode == "video":
            params.update(motion_adapter=job.motion_adapter, frames=job.frames)
        params.update(job.record)  # the inputs as the user named them (job_from_options)
        return params


def _for_call(entry: AdapterRecipe, seed: int, span: tuple[int, int] | None) -> AdapterRecipe:
    """``entry`` for the pipeline call making images ``span`` = (first, count): its noise negative seeded by the
    job (unless it has a seed), and unfolded references picked for those images (the last one repeats)."""
    changes: dict[str, Any] = {}
    if entry.negative_noise is not None and entry.noise_seed is None:
        changes["noise_seed"] = seed % 2**63
    first, count = span or (0, len(entry.images))
    if entry.unfold_batch and (first or count < len(entry.images)):
        last = len(entry.images) - 1
        changes["images"] = [entry.images[min(first + i, last)] for i in range(count)]
    return dataclasses.replace(entry, **changes) if changes else entry
