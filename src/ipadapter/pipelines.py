"""Which diffusers pipeline serves which base model, and the schedulers users can name.

A base is a diffusers folder, a hub id, or a single-file ``.safetensors`` / ``.ckpt`` checkpoint (the way
fine-tuned community models are shared). SD1.5 and SDXL families are told apart by their weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoPipelineForText2Image,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)

from .errors import IncompatibleModelError, InputError
from .sources import NETWORK_ERRORS, _unavailable

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.ln_final.weight"

# name -> (class, extra config). Names follow the common A1111/ComfyUI vocabulary.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {}),
    "dpm++-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def pick_device(device: str = "auto") -> str:
    """``auto`` -> cuda if available, else mps, else cpu; anything else is checked and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but MPS is not available here; use --device cpu")
    if not (device == "cpu" or device == "mps" or device.startswith("cuda")):
        raise InputError(f"unknown device '{device}'; expected auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    """No hidden policy: float16 on CUDA, float32 elsewhere, unless asked otherwise."""
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise InputError(f"unknown dtype '{dtype}'; expected float32, float16 or bfloat16")
    return names[dtype]


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the named one, keeping the base model's noise schedule config."""
    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler '{name}'; expected one of: {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _single_file_is_sdxl(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return SDXL_SINGLE_FILE_KEY in f.keys()
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return SDXL_SINGLE_FILE_KEY in state


def _from_single_file(cls: type, path: Path, dtype: torch.dtype, base_config: str | None) -> Any:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    expected = "expected a full SD1.5/SDXL single-file checkpoint (UNet, VAE and text encoder weights)"
    try:
        pipe = cls.from_single_file(
            str(path), torch_dtype=dtype, **({"config": base_config} if base_config else {})
        )
    except SingleFileComponentError as e:
        raise IncompatibleModelError(f"base '{path}': {str(e).splitlines()[0]}; {expected}") from None
    unfilled = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)
                and any(t.is_meta for t in (*module.parameters(), *module.buffers()))]  # fmt: skip
    if unfilled:
        raise IncompatibleModelError(
            f"base '{path}': the checkpoint leaves {', '.join(unfilled)} without weights (missing or in a layout "
            f"diffusers does not recognise); {expected}"
        )
    return pipe


def load_pipeline(
    base: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    base_config: str | None = None,
) -> Any:
    """A text-to-image pipeline (SD1.5 or SDXL family) for ``base``.

    ``base_config``: for single-file checkpoints, a diffusers folder or hub id of the same family whose
    configs describe the model (needed offline: otherwise diffusers fetches them from the hub).
    """
    path = Path(base).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise InputError(f"base '{base}': unknown file type; expected a diffusers folder, a hub id, "
                                 "or a single-file .safetensors/.ckpt checkpoint")  # fmt: skip
            cls = StableDiffusionXLPipeline if _single_file_is_sdxl(path) else StableDiffusionPipeline
            pipe = _from_single_file(cls, path, dtype, base_config)
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise InputError(f"base '{base}': folder has no model_index.json; expected a diffusers pipeline "
                                 "folder (or pass a single-file checkpoint)")  # fmt: skip
            pipe = AutoPipelineForText2Image.from_pretrained(str(path), torch_dtype=dtype)
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(str(base), torch_dtype=dtype)
    except InputError:
        raise
    except NETWORK_ERRORS as e:
        how = f"download it (`hf download {base}`) or pass a local diffusers folder or single-file checkpoint"
        if path.is_file():
            how = ("pass --base-config with a local diffusers folder of the same family (SD1.5 or SDXL) so its "
                   "configs need no download")  # fmt: skip
        raise _unavailable("base model", str(base), how, e) from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise IncompatibleModelError(
            f"base '{base}' loads as {type(pipe).__name__}; expected a Stable Diffusion 1.5 or SDXL family model"
        )
    return pipe.to(device)
