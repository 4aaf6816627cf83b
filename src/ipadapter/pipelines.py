"""Which diffusers pipeline serves which base model and mode, and the schedulers users can name.

A base is a diffusers folder, a hub id, or a single-file ``.safetensors`` / ``.ckpt`` checkpoint (the way
fine-tuned community models are shared). SD1.5 and SDXL families are told apart by their weights.
A loaded text-to-image pipeline becomes any mode with :func:`mode_pipeline` (diffusers' ``from_pipe``: the
same model components, no copy), optionally with ControlNets and, for video, a motion adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AnimateDiffControlNetPipeline,
    AnimateDiffPipeline,
    AnimateDiffSDXLPipeline,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    ControlNetModel,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from safetensors import safe_open

from .adapters.variants import family
from .calls import native_size  # noqa: F401 - part of this module's API
from .errors import IncompatibleModelError, InputError
from .hosts.unet import original_processors
from .mini.shipped import resolve_base
from .modes import MODES
from .schedulers import SCHEDULERS, set_scheduler  # noqa: F401 - part of this module's API
from .sources import NETWORK_ERRORS, _unavailable, split_hub_path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.ln_final.weight"


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
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in names:
        raise InputError(f"unknown dtype '{dtype}'; expected float32, float16 or bfloat16")
    return names[dtype]


def _single_file_is_sdxl(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return SDXL_SINGLE_FILE_KEY in f.keys()
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return SDXL_SINGLE_FILE_KEY in state


def _from_single_file(cls: type, path: Path, dtype: torch.dtype, base_config: str | None) -> Any:
    expected = "expected a full SD1.5/SDXL single-file checkpoint (UNet, VAE and text encoder weights)"
    try:
        pipe = cls.from_single_file(
            str(path), dtype=dtype, **({"config": base_config} if base_config else {})
        )
    except SingleFileComponentError as e:
        raise IncompatibleModelError(f"base '{path}': {str(e).splitlines()[0]}; {expected}") from None
    except ValueError as e:
        if "expected shape" not in str(e):
            raise
        where = f"--base-config '{base_config}'" if base_config else "the configs diffusers picked"
        hint = "pass as --base-config a diffusers folder whose UNet has the same layout"
        if "conv_in.weight" in str(e) and "9, 3, 3" in str(e):
            hint = (
                "this is an inpainting checkpoint (9 input channels): pass as --base-config an inpainting "
                "model's folder or hub id (e.g. stable-diffusion-v1-5/stable-diffusion-inpainting)"
            )
        raise IncompatibleModelError(
            f"base '{path}': its weights do not fit {where} ({str(e).split(' If ')[0].strip()}); {hint}"
        ) from None
    unfilled = [
        name
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        and any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    ]
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
    base = resolve_base(base)  # "mini": the shipped miniature base
    path = Path(base).expanduser()
    try:
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise InputError(
                    f"base '{base}': unknown file type; expected a diffusers folder, a hub id, "
                    "or a single-file .safetensors/.ckpt checkpoint"
                )
            cls = StableDiffusionXLPipeline if _single_file_is_sdxl(path) else StableDiffusionPipeline
            pipe = _from_single_file(cls, path, dtype, base_config)
        elif path.is_dir():
            if not (path / "model_index.json").is_file():
                raise InputError(
                    f"base '{base}': folder has no model_index.json; expected a diffusers pipeline "
                    "folder (or pass a single-file checkpoint)"
                )
            pipe = AutoPipelineForText2Image.from_pretrained(str(path), dtype=dtype)
        else:
            pipe = AutoPipelineForText2Image.from_pretrained(str(base), dtype=dtype)
    except InputError:
        raise
    except NETWORK_ERRORS as e:
        how = f"download it (`hf download {base}`) or pass a local diffusers folder or single-file checkpoint"
        if path.is_file():
            how = (
                "pass --base-config with a local diffusers folder of the same family (SD1.5 or SDXL) so its "
                "configs need no download"
            )
        raise _unavailable("base model", str(base), how, e) from None
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise IncompatibleModelError(
            f"base '{base}' loads as {type(pipe).__name__}; expected a Stable Diffusion 1.5 or SDXL family model"
        )
    return pipe.to(device)


_AUTO = {"t2i": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
         "inpaint": AutoPipelineForInpainting}  # fmt: skip


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def check_controlnet(controlnet: Any, unet: Any, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet made for another base (its residuals would not fit the UNet)."""
    have, want = controlnet.config, unet.config
    why = None
    if have.cross_attention_dim != want.cross_attention_dim:
        why = f"its cross-attention dim is {have.cross_attention_dim}, the base UNet's is {want.cross_attention_dim}"
    elif tuple(have.block_out_channels) != tuple(want.block_out_channels):
        why = f"its blocks are {tuple(have.block_out_channels)}, the base UNet's {tuple(want.block_out_channels)}"
    elif getattr(have, "addition_embed_type", None) != getattr(want, "addition_embed_type", None):
        why = "SDXL's size/text-time conditioning is in one of them only"
    if why:
        families = (family(have.cross_attention_dim), family(unet))
        known = (
            ""
            if families == ("unknown family",) * 2
            else f" (it is for the {families[0]}, the base is {families[1]})"
        )
        raise IncompatibleModelError(
            f"{name} does not fit the base model: {why}{known}; use a ControlNet made for this base"
        )


def check_motion_adapter(adapter: Any, unet: Any, name: str = "motion adapter") -> None:
    """Refuse a motion adapter whose blocks do not match the UNet (e.g. an SD1.5 one on SDXL)."""
    have, want = adapter.config, unet.config
    blocks, unet_blocks = tuple(have.block_out_channels), tuple(want.block_out_channels)
    layers = have.motion_layers_per_block
    unet_layers = want.layers_per_block
    expand = lambda v, n: [v] * n if isinstance(v, int) else list(v)  # noqa: E731
    if blocks != unet_blocks or expand(layers, len(blocks)) != expand(unet_layers, len(unet_blocks)):
        guess = "SD1.5 family" if len(blocks) == 4 else "SDXL family" if len(blocks) == 3 else "another base"
        raise IncompatibleModelError(
            f"{name} has motion blocks {blocks} x {layers} layers (made for the {guess}) but the base UNet has "
            f"blocks {unet_blocks} x {unet_layers} layers ({family(unet)}); use a motion adapter made for "
            "this base (SD1.5: guoyww/animatediff-motion-adapter-v1-5-*, SDXL: "
            "guoyww/animatediff-motion-adapter-sdxl-beta)"
        )


def mode_pipeline(
    pipe: Any,
    mode: str = "t2i",
    *,
    controlnet: Any | Sequence[Any] | None = None,
    motion_adapter: Any | None = None,
) -> Any:
    """The diffusers pipeline for ``mode`` over ``pipe``'s components (``from_pipe``: shared, not copied).

    ``mode``: ``t2i``, ``img2img``, ``inpaint`` or ``video`` (AnimateDiff; needs ``motion_adapter`` and
    builds a motion UNet without adapters, so attach adapters to the returned pipeline). ``controlnet``: a ControlNetModel or
    a list of them (several at once), with any mode. Everything is checked before anything is built.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; expected one of: {', '.join(MODES)}")
    unet = pipe.unet
    nets = (
        []
        if controlnet is None
        else list(controlnet)
        if isinstance(controlnet, (list, tuple))
        else [controlnet]
    )
    if isinstance(controlnet, MultiControlNetModel):
        nets = list(controlnet.nets)
    in_channels = unet.config.in_channels
    if in_channels == 9 and mode != "inpaint":
        raise IncompatibleModelError(
            f"the base is an inpainting model (its UNet takes 9 input channels: latents, mask, masked image); "
            f"it cannot run {mode}. Use it for inpainting (`ipadapter inpaint`) or choose an ordinary base"
        )
    for i, net in enumerate(nets):
        check_controlnet(net, unet, f"ControlNet {i + 1}" if len(nets) > 1 else "the ControlNet")
    if mode == "video":
        if motion_adapter is None:
            raise InputError("video needs a motion adapter, e.g. guoyww/animatediff-motion-adapter-v1-5-2")
        check_motion_adapter(motion_adapter, unet)
        if is_sdxl(pipe) and nets:
            raise IncompatibleModelError(
                "diffusers has no AnimateDiff pipeline for SDXL with ControlNet; drop --controlnet or use an "
                "SD1.5-family base"
            )
    elif motion_adapter is not None:
        raise InputError(f"a motion adapter is only used for video, not {mode}")
    net = None if not nets else nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    if mode == "video":
        cls = (
            AnimateDiffSDXLPipeline
            if is_sdxl(pipe)
            else AnimateDiffControlNetPipeline
            if net
            else AnimateDiffPipeline
        )
        extra = {"controlnet": net} if net is not None else {}
        # The motion UNet copies the 2D UNet's weights; attached adapters' weights must not come along.
        with original_processors(unet):
            video = cls.from_pipe(pipe, motion_adapter=motion_adapter, **extra)
        if video.unet.device != unet.device:  # the motion UNet is built on the CPU
            video.unet.to(unet.device)
        return video
    return _AUTO[mode].from_pipe(pipe, controlnet=net)


def load_controlnet(spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A ControlNet from a diffusers folder, a hub id, or ``owner/repo/subfolder``."""
    return _load_model(
        ControlNetModel,
        "ControlNet",
        spec,
        dtype,
        device,
        "download it (`hf download <id>`) or pass a local diffusers ControlNet folder",
    )


def load_motion_adapter(spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """An AnimateDiff motion adapter from a diffusers folder, a hub id, or ``owner/repo/subfolder``."""
    return _load_model(
        MotionAdapter,
        "motion adapter",
        spec,
        dtype,
        device,
        "download it (e.g. `hf download guoyww/animatediff-motion-adapter-v1-5-2`) or pass a local folder",
    )


def _load_model(cls: type, kind: str, spec: str | Path, dtype: torch.dtype, device: str, how: str) -> Any:
    folder = Path(spec).expanduser()
    try:
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise InputError(
                    f"{kind} '{spec}': folder has no config.json; expected a diffusers {cls.__name__} folder"
                )
            model = cls.from_pretrained(str(folder), dtype=dtype)
        elif folder.exists() or folder.suffix.lower() in {".safetensors", ".ckpt", ".pth", ".bin"}:
            raise InputError(
                f"{kind} '{spec}': expected a diffusers folder (config.json + weights) or a hub id, "
                "not a single file"
            )
        else:
            hub = split_hub_path(str(spec))
            repo, sub = hub if hub else (str(spec), None)
            model = cls.from_pretrained(repo, dtype=dtype, **({"subfolder": sub} if sub else {}))
    except InputError:
        raise
    except NETWORK_ERRORS as e:
        if folder.is_dir():
            raise IncompatibleModelError(
                f"{kind} '{spec}': not a {cls.__name__} folder ({str(e).splitlines()[0][:160]})"
            ) from None
        raise _unavailable(kind, str(spec), how, e) from None
    if not isinstance(model, cls):
        raise IncompatibleModelError(
            f"{kind} '{spec}' loads as {type(model).__name__}; expected {cls.__name__}"
        )
    return model.to(device)
