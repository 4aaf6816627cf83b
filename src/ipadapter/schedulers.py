"""The samplers users can name, in the common A1111/ComfyUI vocabulary, mapped to diffusers schedulers.

Names only here (no diffusers import), so the command line can list them without loading anything.
"""

from __future__ import annotations

from typing import Any

from .errors import InputError

# name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the named one, keeping the base model's noise schedule config."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}'; expected one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
