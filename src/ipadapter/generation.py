"""One generation, described as data, and the engine that runs it with models loaded once.

The command line, ``ipadapter batch`` and the server all describe a generation as a :class:`Job` and run it
with an :class:`Engine`, so the same settings give the same pixels everywhere. The engine keeps what it
loaded (base pipelines, ControlNets, motion adapters, the pipelines of each mode, attached adapters and
their image encoders) and reuses it for later jobs that name the same models.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .errors import InputError
from .recipe import Recipe

MODES = ("t2i", "img2img", "inpaint", "video")


class Cancelled(Exception):
    """Raised from a progress callback to stop a running job between two denoising steps."""


@dataclass(kw_only=True)
class Job:
    """Everything one generation needs; images are decoded PIL images, models are names or paths.

    ``recipe``: the image prompt (one or more adapters, their references and options); None runs the plain
    base model, without image prompt (to compare with and without it). ``per_frame``: for a
    video, the recipe's single adapter lists one reference per frame (or one for all) instead of references
    to combine. ``control_images``: one per ControlNet (for a video: one image or a list of frames each).
    ``seed`` None: the engine picks one and reports it.
    """

    base: str
    recipe: Recipe | None = None
    mode: str = "t2i"
    per_frame: bool = False
    base_config: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    init: Image.Image | None = None
    strength: float | None = None
    mask: Image.Image | None = None
    controlnets: list[str] = field(default_factory=list)
    control_images: list[Any] = field(default_factory=list)
    control_scale: float | list[float] = 1.0
    motion_adapter: str | None = None
    frames: int = 16
    vae_slicing: bool = False
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown mode '{self.mode}'; expected one of: {', '.join(MODES)}")
        if self.mode in ("img2img", "inpaint") and self.init is None:
            raise InputError(f"{self.mode} needs an init image")
        if self.mode == "inpaint" and self.mask is None:
            raise InputError("inpaint needs a mask (white = repaint)")
        if self.mode == "video" and not self.motion_adapter:
            raise InputError("video needs a motion adapter, e.g. guoyww/animatediff-motion-adapter-v1-5-2")
        if len(self.control_images) != len(self.controlnets):
            raise InputError(
                f"{len(self.controlnets)} ControlNets but {len(self.control_images)} control images; give one "
                "control image per ControlNet, in the same order"
            )
        if self.per_frame and (self.mode != "video" or self.recipe is None or len(self.recipe.adapters) != 1):
            raise InputError("one reference per frame needs a video and a single adapter")


@dataclass
class Result:
    """What a job made: images (or one video's frames), its parameters (as stored in the files), timings."""

    images: list[Image.Image]
    params: dict[str, Any]
    seed: int
    seconds: dict[str, float]
    video: bool = False


ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all); may raise Cancelled

# torch.compile's options for ``Engine(compile=True)``: one graph per UNet (a graph break is an error, not a
# silent slowdown) in the default mode ("max-autotune" can spend many minutes tuning a full-size UNet).
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True}
COMPILE_NOTICE = (
    "ipadapter: compiling the denoiser (--compile): the first generation takes a while (minutes for a "
    "full-size model), later ones of the same size run faster"
)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Engine:
    """Loads models on first use and keeps them: one engine per device, one job at a time.

    At most ``max_bases`` base models stay in memory (with their mode pipelines and attached adapters); a job
    naming another one drops the least recently used, so a manifest naming many bases cannot exhaust memory.
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
        compile: bool = False,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        from .pipelines import pick_device, pick_dtype

        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_bases = max(1, int(max_bases))
        self.compile = bool(compile)
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
        from .pipelines import load_pipeline

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
        import gc

        import torch

        self._bases.pop(key)
        gone = [k for k in self._modes if k[:2] == key]
        unets = {id(self._modes[k][0].unet) for k in gone}
        for k in gone:
            del self._modes[k]
        for k in [k for k in self._adapters if k[0] in unets]:
            del self._adapters[k]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def pipeline(self, job: Job) -> Any:
        """The pipeline for the job's mode, ControlNets and motion adapter, built once over its base."""
        from .pipelines import load_controlnet, load_motion_adapter, mode_pipeline

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
        from .calls import base_module

        unet = base_module(pipe.unet)
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

    def adapter(self, pipe: Any, path: str, image_encoder: str | None = None) -> Any:
        """Adapter ``path`` attached to ``pipe``'s UNet (once per UNet; its scale is given per call)."""
        from .adapter import attach

        key = (id(pipe.unet), path, image_encoder)
        ip = self._adapters.get(key)
        if ip is None or not ip.attached:
            ip = attach(pipe, path, image_encoder, scale=1.0, name=f"engine{len(self._adapters)}")
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

        from .adapter import run as run_adapters
        from .calls import check_call
        from .schedulers import set_scheduler

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
        pipe.scheduler = default_scheduler
        if job.scheduler:
            set_scheduler(pipe, job.scheduler)
        entries = job.recipe.adapters if job.recipe is not None else []
        adapters = [self.adapter(pipe, e.path, e.image_encoder) for e in entries]
        if job.vae_slicing:
            pipe.vae.enable_slicing()
        if job.cpu_offload:
            pipe.enable_model_cpu_offload(device=self.device)
        loaded = time.perf_counter()

        seed = secrets.randbelow(2**31) if job.seed is None else job.seed
        call = self._call(job, seed, progress)
        if job.recipe is None:  # the plain base model (adapters attached by earlier jobs stay idle)
            out = pipe(**check_call(pipe, call))
        elif job.per_frame:
            ip = adapters[0]
            ip.scale = 1.0 if entries[0].scale is None else entries[0].scale
            frames = [ref.path for ref in entries[0].images]
            out = ip(frames, pipeline=pipe, **call)
        else:
            pairs = [
                (ip, dataclasses.replace(e, scale=1.0 if e.scale is None else e.scale))
                for ip, e in zip(adapters, entries, strict=True)
            ]
            out = run_adapters(pipe, pairs, **call)
        done = time.perf_counter()
        images = list(out.frames[0]) if job.mode == "video" else list(out.images)
        params = self._params(job, pipe, adapters, seed, images)
        seconds = {"load": round(loaded - started, 3), "generate": round(done - loaded, 3)}
        return Result(images, params, seed, seconds, video=job.mode == "video")

    def _call(self, job: Job, seed: int, progress: ProgressCallback | None) -> dict[str, Any]:
        import torch

        call: dict[str, Any] = {"prompt": job.prompt, "generator": torch.Generator("cpu").manual_seed(seed)}
        if job.mode in ("img2img", "inpaint"):
            default = 1.0 if job.mode == "inpaint" else 0.8
            call.update(image=job.init, strength=default if job.strength is None else job.strength)
            if job.mode == "inpaint":
                call.update(mask_image=job.mask, width=job.init.width, height=job.init.height)
        else:
            call.update({k: v for k, v in (("width", job.width), ("height", job.height)) if v})
        if job.controlnets:
            key = {"t2i": "image", "video": "conditioning_frames"}.get(job.mode, "control_image")
            images = job.control_images
            call[key] = images[0] if len(images) == 1 else images
            call["controlnet_conditioning_scale"] = job.control_scale
        optional = {
            "negative_prompt": job.negative_prompt,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance,
        }
        call.update({k: v for k, v in optional.items() if v is not None})
        if job.mode == "video":
            call["num_frames"] = job.frames
        else:
            call["num_images_per_prompt"] = job.num_images
        if progress is not None:
            total = job.steps or 50

            def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
                progress(step + 1, getattr(pipe, "num_timesteps", None) or total)
                return kwargs

            call["callback_on_step_end"] = on_step
        return call

    def _params(self, job: Job, pipe: Any, adapters: list[Any], seed: int, images: list[Image.Image]) -> dict:
        from . import __version__

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
            "seed": seed,
            "scheduler": job.scheduler or type(pipe.scheduler).__name__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device,
            "width": images[0].width,
            "height": images[0].height,
        }
        if job.mode in ("img2img", "inpaint"):
            params["strength"] = job.strength
        if job.controlnets:
            params.update(controlnet=list(job.controlnets), control_scale=job.control_scale)
        if job.mode == "video":
            params.update(motion_adapter=job.motion_adapter, frames=job.frames)
        return params


# ---------------------------------------------------------------------------------------------------------
# Jobs from options: the command line's options as data (batch manifests, the server's JSON body)
# ---------------------------------------------------------------------------------------------------------

# key -> what it is (messages and docs). Image-valued keys go through the caller's `locate`.
OPTIONS: dict[str, str] = {
    "mode": "t2i | img2img | inpaint | video",
    "base": "base model", "base_config": "config source of a single-file base",
    "adapter": "adapter file, hub path or name", "image_encoder": "CLIP vision model",
    "image": "reference image(s): one, or a list; PATH[:WEIGHT]", "embeds": "`ipadapter embed` file(s)",
    "image_mask": "regional mask per reference", "combine": "concat | average | norm-average | add | subtract",
    "crop": "center | pad | stretch", "negative_image": "image whose tokens replace the unconditional ones",
    "layer_weights": 'per-block weights: "t3=0.5,t6=1" or {"t3": 0.5}', "preset": "style / composition preset",
    "composition_weight": "composition blocks' weight", "curve": "weight curve over blocks",
    "start": "progress at which the image prompt starts", "end": "progress at which it ends",
    "scale": "image prompt strength", "recipe": "a whole recipe (replaces adapter/image/... keys)",
    "prompt": "text prompt", "negative_prompt": "negative text prompt", "steps": "denoising steps",
    "guidance": "classifier-free guidance", "seed": "seed", "width": "width (multiple of 8)",
    "height": "height (multiple of 8)", "num_images": "images to make", "scheduler": "sampler",
    "init": "init image (img2img, inpaint)", "strength": "how much to repaint, (0, 1]",
    "mask": "inpainting mask (white = repaint)", "controlnet": "ControlNet(s)",
    "control_image": "control image per ControlNet", "control_scale": "ControlNet strength(s)",
    "motion_adapter": "AnimateDiff motion adapter", "frames": "video frames",
}  # fmt: skip
CONTROL_KEYS = ("embeds", "image_mask", "combine", "crop", "negative_image", "layer_weights", "preset",
                "composition_weight", "curve", "start", "end")  # fmt: skip
PROMPT_KEYS = ("adapter", "image_encoder", "image", "scale", *CONTROL_KEYS)  # what makes an image prompt
_MODEL_KEYS = ("adapter", "image_encoder")


def split_weight(value: str) -> tuple[str, float | None]:
    """``PATH[:WEIGHT]`` -> (path, weight or None); a colon followed by a non-number belongs to the path."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, None


def _listed(value: Any, key: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InputError(f"'{key}' must be a string or a list of strings; got {type(value).__name__}")
    return values


def plain_options(options: dict[str, Any]) -> bool:
    """True when ``options`` name no image prompt at all (no recipe, adapter, reference or image-prompt
    option): the job runs the plain base model."""
    return options.get("recipe") is None and all(options.get(k) in (None, [], "") for k in PROMPT_KEYS)


def recipe_from_options(options: dict[str, Any], where: str = "") -> Recipe:
    """A one-adapter recipe from flag-style options (``adapter``, ``image``, ``embeds``, ``combine``, ...).

    Reference values stay as given (paths, or whatever the caller's ``locate`` understands later).
    """
    from .layers import parse_layer_weights
    from .recipe import AdapterRecipe, Reference

    if not options.get("adapter"):
        raise InputError(f"{where}no adapter: give an adapter (a file, hub path or name) or a recipe")
    images = _listed(options.get("image") or [], "image")
    embeds = _listed(options.get("embeds") or [], "embeds")
    if not images and not embeds:
        raise InputError(f"{where}no reference: give an image (or embeds, or a recipe)")
    refs = [(*split_weight(v), "path") for v in images] + [(*split_weight(v), "embeds") for v in embeds]
    masks = _listed(options.get("image_mask") or [], "image_mask")
    if masks and len(masks) != len(refs):
        raise InputError(
            f"{where}{len(masks)} image masks for {len(refs)} references; give one mask per reference (images "
            "first, then embeds) or none"
        )
    crop = options.get("crop") or "center"
    references = [
        Reference(
            **{kind: path},
            weight=1.0 if weight is None else weight,
            mask=masks[i] if masks else None,
            crop=crop,
        )
        for i, (path, weight, kind) in enumerate(refs)
    ]
    weights = options.get("layer_weights")
    if isinstance(weights, str):
        weights = parse_layer_weights(weights)
    control = {
        k: options[k]
        for k in ("combine", "start", "end", "preset", "curve", "negative_image", "composition_weight")
        if options.get(k) is not None
    }
    scale = options.get("scale")
    entry = AdapterRecipe(
        path=options["adapter"],
        image_encoder=options.get("image_encoder"),
        scale=1.0 if scale is None else scale,
        images=references,
        layer_weights=weights or None,
        **control,
    )
    return Recipe([entry])


def per_frame_video(options: dict[str, Any]) -> bool:
    """Plain references for a video with no control options: one for all frames, or one per frame."""
    images = options.get("image") or []
    images = [images] if isinstance(images, str) else images
    plain = all(isinstance(v, str) and split_weight(v)[1] is None for v in images)
    return (
        options.get("mode") == "video"
        and not options.get("recipe")
        and plain
        and not any(options.get(k) not in (None, [], "") for k in CONTROL_KEYS)
    )


def fit_init(init: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """The init image at the requested size, cropped to multiples of 8 (what the VAE needs)."""
    if width or height:
        init = init.resize((width or init.width, height or init.height), Image.Resampling.BICUBIC)
    w, h = init.width // 8 * 8, init.height // 8 * 8
    return init if (w, h) == init.size else init.crop((0, 0, w, h))


def _number(
    options: dict[str, Any],
    key: str,
    where: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    multiple: int | None = None,
) -> Any:
    value = options.get(key)
    if value is None:
        return None
    import math
    import numbers

    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise InputError(
            f"{where}'{key}' is {value!r}; expected {'a whole number' if integer else 'a finite number'}"
        )
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{where}'{key}' is {value}; expected {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise InputError(f"{where}'{key}' is {value}; expected <= {high}")
    if multiple and value % multiple:
        raise InputError(f"{where}'{key}' is {value}; expected a multiple of {multiple}")
    return int(value) if integer else float(value)


def job_from_options(
    options: dict[str, Any],
    *,
    locate: Callable[[str, str], Any],
    resolve_file: Callable[[str, str], str] | None = None,
    base_dir: str | None = None,
    where: str = "",
) -> Job:
    """A :class:`Job` from the command line's options as a JSON object (see :data:`OPTIONS`).

    ``locate(value, what)`` turns an image value into something :func:`~ipadapter.images.load_image` reads (a
    path, or bytes); ``resolve_file(value, what)`` does the same for embeddings files (None: refused).
    ``base_dir``: where relative paths inside a ``recipe`` point. Every image is decoded here, so a bad one
    fails before any model loads.
    """
    from .images import load_image, load_mask

    if not isinstance(options, dict):
        raise InputError(f"{where}a job must be a JSON object; got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(
            f"{where}unknown key(s) {', '.join(unknown)}; expected some of: {', '.join(OPTIONS)}"
        )
    mode = options.get("mode") or "t2i"
    if mode not in MODES:
        raise InputError(f"{where}'mode' is {mode!r}; expected one of: {', '.join(MODES)}")
    if not options.get("base"):
        raise InputError(f"{where}no base model: give 'base'")
    for key in ("prompt", "negative_prompt", "base", "base_config", "scheduler", "motion_adapter"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise InputError(f"{where}'{key}' must be a string; got {type(options[key]).__name__}")
    plain = plain_options(options)  # the plain base model: no recipe
    per_frame = per_frame_video(options) and not plain
    recipe: Recipe | None = None
    if plain:
        pass
    elif options.get("recipe") is not None:
        clash = [k for k in PROMPT_KEYS if options.get(k) is not None]
        if clash:
            raise InputError(f"{where}'recipe' replaces {', '.join(clash)}: put them in the recipe")
        recipe = Recipe.from_dict(options["recipe"], base_dir=base_dir, source=f"{where}recipe")
    elif per_frame:
        recipe = recipe_from_options(
            {**options, "image": _listed(options.get("image") or [], "image")}, where
        )
    else:
        recipe = recipe_from_options(options, where)
    if recipe is not None:
        recipe = load_recipe_inputs(recipe, locate, resolve_file, where)
    steps = _number(options, "steps", where, integer=True, low=1)
    width = _number(options, "width", where, integer=True, low=8, multiple=8)
    height = _number(options, "height", where, integer=True, low=8, multiple=8)
    job: dict[str, Any] = {
        "base": options["base"],
        "base_config": options.get("base_config"),
        "mode": mode,
        "recipe": recipe,
        "per_frame": per_frame,
        "prompt": options.get("prompt") or "",
        "negative_prompt": options.get("negative_prompt"),
        "steps": steps,
        "guidance": _number(options, "guidance", where),
        "seed": _number(options, "seed", where, integer=True, low=0),
        "num_images": _number(options, "num_images", where, integer=True, low=1) or 1,
        "scheduler": options.get("scheduler"),
        "width": width,
        "height": height,
        "motion_adapter": options.get("motion_adapter"),
        "frames": _number(options, "frames", where, integer=True, low=1) or 16,
    }
    _number(options, "scale", where, low=0)
    if mode in ("img2img", "inpaint"):
        if not options.get("init"):
            raise InputError(f"{where}{mode} needs 'init' (the image to start from)")
        init = fit_init(
            load_image(locate(options["init"], "init image"), f"{where}init image"), width, height
        )
        job.update(init=init, strength=_number(options, "strength", where, low=0, low_open=True, high=1))
        if mode == "inpaint":
            if not options.get("mask"):
                raise InputError(f"{where}inpaint needs 'mask' (white = repaint)")
            job["mask"], _ = load_mask(locate(options["mask"], "mask"), init.size)
    nets = _listed(options.get("controlnet") or [], "controlnet")
    images = options.get("control_image") or []
    images = [images] if isinstance(images, str) else images
    if len(images) != len(nets):
        raise InputError(
            f"{where}{len(nets)} ControlNets but {len(images)} control images; give one per ControlNet"
        )
    controls = []
    for value in images:
        frames = value if isinstance(value, list) else [value]
        loaded = [
            load_image(locate(v, "control image"), f"{where}control image")
            for v in _listed(frames, "control_image")
        ]
        controls.append(loaded if isinstance(value, list) else loaded[0])
    scale = options.get("control_scale", 1.0)
    scales = scale if isinstance(scale, list) else [scale]
    if "control_scale" in options and not nets:
        raise InputError(
            f"{where}'control_scale' without 'controlnet'; add a controlnet and its control_image"
        )
    if isinstance(scale, list) and len(scale) not in (1, len(nets)):
        raise InputError(
            f"{where}{len(scale)} control scales for {len(nets)} ControlNets; give one for all or one per ControlNet"
        )
    for value in scales:
        _number({"control_scale": value}, "control_scale", where)
    if isinstance(scale, list):
        scale = scale[0] if len(nets) == 1 else scale * len(nets) if len(scale) == 1 else scale
    job.update(controlnets=nets, control_images=controls, control_scale=scale)
    return Job(**job)


def load_recipe_inputs(
    recipe: Recipe,
    locate: Callable[[str, str], Any],
    resolve_file: Callable[[str, str], str] | None,
    where: str = "",
) -> Recipe:
    """The recipe with every image, mask and negative image decoded, and embeddings files located.

    Messages name a reference by its index only where its adapter has several (``image[1] reference image``),
    and the adapter only where the recipe has several.
    """
    from .images import load_image, load_mask

    entries = []
    for a, entry in enumerate(recipe.adapters):
        at = f"{where}adapter[{a}]." if len(recipe.adapters) > 1 else where
        refs = []
        for i, ref in enumerate(entry.images):
            label = f"{at}image[{i}] reference image" if len(entry.images) > 1 else f"{at}reference image"
            changes: dict[str, Any] = {}
            if isinstance(ref.path, str | bytes) or hasattr(ref.path, "__fspath__"):
                value = (
                    locate(str(ref.path), "reference image") if not isinstance(ref.path, bytes) else ref.path
                )
                changes["path"] = load_image(value, label)
            if ref.embeds is not None:
                if resolve_file is None:
                    raise InputError(
                        f"{at}image[{i}]: embeddings files are not accepted here; send the image"
                    )
                changes["embeds"] = resolve_file(str(ref.embeds), "embeddings")
            if isinstance(ref.mask, str) or hasattr(ref.mask, "__fspath__"):
                changes["mask"], _ = load_mask(locate(str(ref.mask), "mask"))
            refs.append(dataclasses.replace(ref, **changes) if changes else ref)
        changes = {"images": refs}
        if isinstance(entry.negative_image, str) or hasattr(entry.negative_image, "__fspath__"):
            changes["negative_image"] = load_image(
                locate(str(entry.negative_image), "negative image"), f"{at}negative image"
            )
        entries.append(dataclasses.replace(entry, **changes))
    return Recipe(entries)
