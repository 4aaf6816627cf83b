"""ipadapter: image prompts (IP-Adapter, Ye et al. 2023) for Stable Diffusion 1.5 / SDXL diffusers pipelines.

import ipadapter
ip = ipadapter.attach(pipe, "h94/IP-Adapter/models/ip-adapter_sd15.safetensors", scale=0.6)
image = ip(reference, prompt="a polar bear", num_inference_steps=30).images[0]
ip.scale = 0.8
ip.detach()
"""

from .adapter import IPAdapter, attach, attached, cross_attention_layers, detach
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .conditioning import ImagePrompt
from .encoder import ImageEncoder, load_image
from .errors import (
    CheckpointError,
    IncompatibleModelError,
    InputError,
    IPAdapterError,
    ModelNotAvailableError,
)
from .variants import AdapterSpec, ResamplerConfig, detect

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec",
    "Checkpoint",
    "CheckpointError",
    "ImageEncoder",
    "ImagePrompt",
    "IncompatibleModelError",
    "InputError",
    "IPAdapter",
    "IPAdapterError",
    "ModelNotAvailableError",
    "ResamplerConfig",
    "attach",
    "attached",
    "cross_attention_layers",
    "detach",
    "detect",
    "load_checkpoint",
    "load_image",
    "save_checkpoint",
]
