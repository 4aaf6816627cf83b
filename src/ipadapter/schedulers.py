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
    # flow matching (Flux, SD3): these only
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
FLOW_PREFIX = "flow-"


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the named one, keeping the base model's noise schedule config."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}'; expected one of: {', '.join(SCHEDULERS)}")
    flow_model = type(pipe.scheduler).__name__.startswith("FlowMatch")
    if flow_model != name.startswith(FLOW_PREFIX):
        fits = [n for n in SCHEDULERS if n.startswith(FLOW_PREFIX) == flow_model]
        kind = "a flow-matching model (Flux, SD3)" if flow_model else "a diffusion model (SD1.5, SDXL)"
        raise InputError(
            f"scheduler '{name}' does not fit the base, which is {kind}; expected one of: {', '.join(fits)}"
        )
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
