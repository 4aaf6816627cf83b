"""ipadapter: image prompts (IP-Adapter, Ye et al. 2023) for Stable Diffusion 1.5 / SDXL diffusers pipelines.

The package's folders follow the data: ``adapters/`` (what an adapter file is), ``prompt/`` (the per-call
image prompt: references -> tokens), ``hosts/`` (where the tokens enter a denoiser), ``adapter.py`` (attach),
``jobs/`` (one generation as data), then the front ends (``cli/``, ``server/``, ``batch.py``).

import ipadapter
ip = ipadapter.attach(pipe, "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", scale=0.6)
image = ip(reference, prompt="a polar bear", num_inference_steps=30).images[0]
ip.scale = 0.8
ip.detach()

Fine control (several references, masks, layer weights, step windows; several adapters via a Recipe):
image = ip(ipadapter.Control(images=["a.png", ipadapter.Reference("b.png", weight=0.5)], combine="average",
                             end=0.8, preset="style"), prompt="a polar bear").images[0]
run = ipadapter.apply(pipe, ipadapter.Recipe.load("ip.toml")); image = run(prompt="...").images[0]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    CheckpointError,
    IncompatibleModelError,
    InputError,
    IPAdapterError,
    ModelNotAvailableError,
)

# Everything else loads on first use: importing torch/diffusers takes seconds, and the command line must be
# able to report a bad input before paying for that.
_LAZY = {
    "IPAdapter": "adapter", "attach": "adapter", "attached": "adapter", "cross_attention_layers": "hosts.unet",
    "detach": "adapter", "apply": "adapter", "run": "adapter", "RecipeRun": "adapter",
    "Reference": "prompt.recipe", "Control": "prompt.recipe", "AdapterRecipe": "prompt.recipe",
    "Recipe": "prompt.recipe", "Engine": "jobs.engine", "Job": "jobs.job", "Checkpoint": "adapters.checkpoint",
    "load_checkpoint": "adapters.checkpoint", "save_checkpoint": "adapters.checkpoint",
    "ImagePrompt": "prompt.conditioning", "ImageEncoder": "prompt.encoder", "load_image": "prompt.images",
    "load_mask": "prompt.images", "AdapterSpec": "adapters.variants", "ResamplerConfig": "adapters.variants",
    "detect": "adapters.variants", "InfluenceRecorder": "prompt.recording", "InfluenceMaps": "prompt.influence",
    "write_influence": "prompt.influence_render",
}  # fmt: skip

if TYPE_CHECKING:
    from .adapter import IPAdapter, RecipeRun, apply, attach, attached, detach, run
    from .adapters.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from .adapters.variants import AdapterSpec, ResamplerConfig, detect
    from .hosts.unet import cross_attention_layers
    from .jobs.engine import Engine
    from .jobs.job import Job
    from .prompt.conditioning import ImagePrompt
    from .prompt.encoder import ImageEncoder
    from .prompt.images import load_image, load_mask
    from .prompt.influence import InfluenceMaps
    from .prompt.influence_render import write_influence
    from .prompt.recipe import AdapterRecipe, Control, Recipe, Reference
    from .prompt.recording import InfluenceRecorder


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ipadapter' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AdapterRecipe",
    "AdapterSpec",
    "Checkpoint",
    "CheckpointError",
    "Control",
    "Engine",
    "ImageEncoder",
    "ImagePrompt",
    "IncompatibleModelError",
    "InfluenceMaps",
    "InfluenceRecorder",
    "InputError",
    "IPAdapter",
    "IPAdapterError",
    "Job",
    "ModelNotAvailableError",
    "Recipe",
    "RecipeRun",
    "Reference",
    "ResamplerConfig",
    "apply",
    "attach",
    "attached",
    "cross_attention_layers",
    "detach",
    "detect",
    "load_checkpoint",
    "load_image",
    "load_mask",
    "run",
    "save_checkpoint",
    "write_influence",
]
