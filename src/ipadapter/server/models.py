"""Loading what the server serves, once, at start: so a wrong model fails then, not on the first request."""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..jobs.engine import Engine
from ..jobs.job import Job
from ..modes import IMAGE_MODES
from ..prompt.recipe import AdapterRecipe, Recipe, Reference
from ..schedulers import FLOW_PREFIX, SCHEDULERS
from .bodies import Served
from .config import ServerConfig


def _probe(config: ServerConfig, mode: str, nets: list[str]) -> Job:
    """A job that names the models of one pipeline (it is never run; its images are blanks)."""
    blank = Image.new("RGB", (8, 8))
    recipe = Recipe([AdapterRecipe(path=config.adapters[0], images=[Reference(path=blank)])])
    return Job(
        base=config.base,
        base_config=config.base_config,
        recipe=recipe,
        mode=mode,
        controlnets=nets,
        control_images=[blank] * len(nets),
        init=blank,
        mask=blank.convert("L"),
        motion_adapter=config.motion_adapter if mode == "video" else None,
    )


def preload(engine: Engine, config: ServerConfig) -> tuple[Served, dict[str, Any]]:
    """Load the base, every ControlNet and the motion adapter; attach every adapter (to the motion UNet too).

    Returns what requests may use and the description GET /v1/models gives.
    """
    from ..pipelines import DIT_FAMILIES, family_of  # torch and diffusers: loaded with the models, not before

    base = engine.base(config.base, config.base_config)
    family = family_of(base)
    unet = getattr(base, "unet", None)  # Flux / SD3 bases have a transformer: every image mode
    inpainting = unet is not None and unet.config.in_channels == 9  # an inpainting base runs inpaint only
    modes = ["inpaint"] if inpainting else list(IMAGE_MODES)
    first = modes[0]
    adapters = []
    for name in config.adapters:
        ip = engine.adapter(engine.pipeline(_probe(config, first, []))[0], name, config.image_encoder)
        spec = ip.spec
        adapters.append(
            {
                "name": name,
                "variant": "/".join(spec.names) or spec.layout,
                "base": spec.base,
                "tokens": spec.num_tokens,
                "feature": spec.feature,
            }
        )
    for net in config.controlnets:
        engine.pipeline(_probe(config, first, [net]))
    if config.motion_adapter:
        video, _ = engine.pipeline(_probe(config, "video", []))
        for name in config.adapters:
            engine.adapter(video, name, config.image_encoder)
        modes.append("video")

    info = {
        "base": config.base,
        "adapters": adapters,
        "controlnets": list(config.controlnets),
        "motion_adapter": config.motion_adapter,
        "modes": modes,
        "family": family,
        "schedulers": sorted(n for n in SCHEDULERS if n.startswith(FLOW_PREFIX) == (family in DIT_FAMILIES)),
        "device": engine.device,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "limits": {
            "max_queue": config.max_queue,
            "max_body_bytes": config.max_body_bytes,
            "max_pixels": config.max_pixels,
        },
    }
    # heavy (torch): kept out of `import ipadapter.server`, which `ipadapter serve` does before its checks
    from ..pipelines import native_size

    size = native_size(base)
    if engine.compile:
        warm_up(engine, config, modes, size)
    return Served(config, modes, size), info


def warm_up(engine: Engine, config: ServerConfig, modes: list[str], size: int) -> None:
    """Compile each served denoiser now: one step of a generation at the native size with one reference (the
    most common request), in the first image mode and, if served, in video (16 frames, the default)."""
    grey = Image.new("RGB", (size, size), (128, 128, 128))
    recipe = Recipe([AdapterRecipe(path=config.adapters[0], images=[Reference(path=grey)])])
    for mode in [modes[0]] + (["video"] if "video" in modes else []):
        job = Job(
            base=config.base,
            base_config=config.base_config,
            recipe=recipe,
            mode=mode,
            steps=1,
            seed=0,
            init=grey,
            mask=Image.new("L", (size, size), 255),
            width=None if mode == "inpaint" else size,
            height=None if mode == "inpaint" else size,
            motion_adapter=config.motion_adapter if mode == "video" else None,
        )
        engine.run(job)
