"""Which diffusers pipeline serves which base model and mode, and the schedulers users can name.

A base is a diffusers folder, a hub id, or a single-file ``.safetensors`` / ``.ckpt`` checkpoint (the way
fine-tuned community models are shared). Four families: SD1.5 and SDXL (a UNet), Flux and SD3 (a
transformer); single files are told apart by their weights (:func:`single_file_family`), loaded pipelines
by :func:`family_of`. A loaded text-to-image pipeline becomes any mode with :func:`mode_pipeline` (diffusers'
``from_pipe``: the same model components, no copy), optionally with ControlNets and, for video (UNet
families only), a motion adapter. Family: t2i, img2img, inpaint; video (``[CN]``: with ``controlnet=``):

- sd15: StableDiffusion[CN]Pipeline, ...[CN]Img2ImgPipeline, ...[CN]InpaintPipeline; AnimateDiff[CN]Pipeline
- sdxl: StableDiffusionXL[CN]Pipeline, ...[CN]Img2ImgPipeline, ...[CN]InpaintPipeline; AnimateDiffSDXLPipeline
- flux: Flux[CN]Pipeline, Flux[CN]Img2ImgPipeline, Flux[CN]InpaintPipeline; no video
- sd3: StableDiffusion3[CN]Pipeline, StableDiffusion3Img2ImgPipeline, ...3InpaintPipeline; no video

SD3 with a ControlNet is text-to-image only: diffusers has no SD3 ControlNet img2img pipeline, and its
``StableDiffusion3ControlNetInpaintingPipeline`` inpaints through an inpainting ControlNet (a control image
and mask, no init image), which is another contract.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
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
    FluxControlNetModel,
    FluxMultiControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    MotionAdapter,
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from safetensors import safe_open

from .adapters.variants import family
from .calls import base_module, native_size  # noqa: F401 - native_size: part of this module's API
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


# Keys that tell a single-file checkpoint's family, in the original layouts (with or without the
# ``model.diffusion_model.`` prefix of full checkpoints) and, for Flux, in diffusers' own key names.
FLUX_SINGLE_FILE_KEYS = ("double_blocks.0.img_attn.qkv.weight",)
FLUX_DIFFUSERS_KEYS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.")
SD3_SINGLE_FILE_PREFIX = "joint_blocks."
SINGLE_FILE_PREFIXES = ("model.diffusion_model.",)

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3"}
DIT_FAMILIES = ("flux", "sd3")
PIPELINE_CLASSES = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "flux": FluxPipeline,
    "sd3": StableDiffusion3Pipeline,
}
# What a full single file of each family holds, and an example diffusers folder for --base-config
SINGLE_FILE_CONTENTS = {
    "sd15": ("UNet, VAE and text encoder weights", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "sdxl": ("UNet, VAE and text encoder weights", "stabilityai/stable-diffusion-xl-base-1.0"),
    "flux": ("transformer, VAE, CLIP and T5 weights", "black-forest-labs/FLUX.1-dev"),
    "sd3": (
        "transformer, VAE and the three text encoders' weights",
        "stabilityai/stable-diffusion-3.5-large",
    ),
}


def single_file_family(keys: Iterable[str]) -> str:
    """``sd15`` / ``sdxl`` / ``flux`` / ``sd3``: a single-file checkpoint's family, from its weight names.

    Flux: ``double_blocks.0.img_attn.qkv.weight`` (original layout) or
    ``transformer_blocks.0.attn.to_q.weight`` with ``single_transformer_blocks.*`` (diffusers names);
    SD3: ``joint_blocks.*``; SDXL: OpenCLIP-bigG's ``conditioner.embedders.1...``; anything else is taken
    for SD1.5 (diffusers then checks the weights). A ``model.diffusion_model.`` prefix is ignored.
    """
    names = set()
    for key in keys:
        for prefix in SINGLE_FILE_PREFIXES:
            key = key.removeprefix(prefix)
        names.add(key)
    if any(k.startswith(SD3_SINGLE_FILE_PREFIX) for k in names):
        return "sd3"
    if any(k in names for k in FLUX_SINGLE_FILE_KEYS) or (
        FLUX_DIFFUSERS_KEYS[0] in names and any(k.startswith(FLUX_DIFFUSERS_KEYS[1]) for k in names)
    ):
        return "flux"
    return "sdxl" if SDXL_SINGLE_FILE_KEY in names else "sd15"


def _single_file_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return list(state.get("state_dict", state))


def _from_single_file(fam: str, path: Path, dtype: torch.dtype, base_config: str | None) -> Any:
    name, (contents, example) = FAMILY_NAMES[fam], SINGLE_FILE_CONTENTS[fam]
    expected = f"expected a full {name} single-file checkpoint ({contents})"
    if fam in DIT_FAMILIES:
        expected += f", or a diffusers folder / hub id (e.g. {example})"
    try:
        pipe = PIPELINE_CLASSES[fam].from_single_file(
            str(path), dtype=dtype, **({"config": base_config} if base_config else {})
        )
    except SingleFileComponentError as e:
        raise IncompatibleModelError(f"base '{path}': {str(e).splitlines()[0]}; {expected}") from None
    except ValueError as e:
        if "expected shape" not in str(e):
            raise
        where = f"--base-config '{base_config}'" if base_config else "the configs diffusers picked"
        denoiser = "transformer" if fam in DIT_FAMILIES else "UNet"
        hint = f"pass as --base-config a diffusers folder whose {denoiser} has the same layout"
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
    """A text-to-image pipeline for ``base``: SD1.5 or SDXL (a UNet), Flux or SD3 (a transformer).

    ``base_config``: for single-file checkpoints, a diffusers folder or hub id of the same family whose
    configs describe the model (needed offline: otherwise diffusers fetches them from the hub).
    """
    base = resolve_base(base)  # "mini": the shipped miniature base
    path = Path(base).expanduser()
    fam = None
    try:
        if path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise InputError(
                    f"base '{base}': unknown file type; expected a diffusers folder, a hub id, "
                    "or a single-file .safetensors/.ckpt checkpoint"
                )
            fam = single_file_family(_single_file_keys(path))
            pipe = _from_single_file(fam, path, dtype, base_config)
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
            same = f"the same family ({FAMILY_NAMES[fam]})" if fam else "the same family"
            how = (
                f"pass --base-config with a local diffusers folder of {same} so its configs need no download"
            )
        raise _unavailable("base model", str(base), how, e) from None
    if not isinstance(pipe, tuple(PIPELINE_CLASSES.values())):
        raise IncompatibleModelError(
            f"base '{base}' loads as {type(pipe).__name__}; expected a Stable Diffusion 1.5, SDXL, Flux or SD3 "
            "family text-to-image model (FluxPipeline, StableDiffusion3Pipeline, ...)"
        )
    return pipe.to(device)


_AUTO = {"t2i": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
         "inpaint": AutoPipelineForInpainting}  # fmt: skip


def is_sdxl(pipe: Any) -> bool:
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


def family_of(pipe: Any) -> str:
    """``sd15`` / ``sdxl`` (a UNet; ``sd15`` also for SD2-style UNets without SDXL's text-time conditioning),
    ``flux`` or ``sd3`` (a transformer) for a loaded pipeline of any mode."""
    if getattr(pipe, "unet", None) is not None:
        return "sdxl" if is_sdxl(pipe) else "sd15"
    transformer = base_module(getattr(pipe, "transformer", None))
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    raise IncompatibleModelError(
        f"{type(pipe).__name__} has neither a UNet nor a Flux/SD3 transformer; expected a Stable Diffusion 1.5, "
        "SDXL, Flux or SD3 pipeline (load one with ipadapter.load_pipeline)"
    )


CONTROLNET_CLASSES = {
    "ControlNetModel": ControlNetModel,  # SD1.5 / SDXL (a UNet encoder copy)
    "FluxControlNetModel": FluxControlNetModel,
    "SD3ControlNetModel": SD3ControlNetModel,
}
MULTI_CONTROLNETS = (MultiControlNetModel, FluxMultiControlNetModel, SD3MultiControlNetModel)


def controlnet_family(controlnet: Any) -> str:
    """``unet`` (an SD1.5/SDXL ControlNetModel), ``flux`` or ``sd3``."""
    net = base_module(controlnet)
    if isinstance(net, FluxControlNetModel):
        return "flux"
    return "sd3" if isinstance(net, SD3ControlNetModel) else "unet"


def _width(config: Any) -> str:
    """A transformer's inner width, with its heads: ``128 (2 heads x 64)``."""
    heads, dim = config.num_attention_heads, config.attention_head_dim
    return f"{heads * dim} ({heads} heads x {dim})"


def _describe_controlnet(controlnet: Any) -> str:
    config, kind = controlnet.config, controlnet_family(controlnet)
    if kind == "unet":
        cross = config.cross_attention_dim
        known = family(cross)
        known = "SD1.5/SDXL" if known == "unknown family" else known
        return f"a UNet ControlNet ({known}, cross-attention dim {cross})"
    return f"a {FAMILY_NAMES[kind]} ControlNet of width {_width(config)}"


def check_controlnet(controlnet: Any, unet: Any, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet made for another base (its residuals would not fit the UNet)."""
    have, want = controlnet.config, unet.config
    if controlnet_family(controlnet) != "unet":
        raise IncompatibleModelError(
            f"{name} is {_describe_controlnet(controlnet)} but the base is a UNet model (cross-attention dim "
            f"{want.cross_attention_dim}); use a ControlNet made for this base"
        )
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


def check_dit_controlnet(controlnet: Any, transformer: Any, fam: str, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet of another family, or of this family but another size, for a Flux/SD3 base."""
    have, want, base = controlnet.config, transformer.config, FAMILY_NAMES[fam]
    if controlnet_family(controlnet) != fam:
        raise IncompatibleModelError(
            f"{name} is {_describe_controlnet(controlnet)} but the base is {base}, of transformer width "
            f"{_width(want)}; use a ControlNet made for this {base} base"
        )
    why = None
    heads = lambda config: (config.num_attention_heads, config.attention_head_dim)  # noqa: E731
    if heads(have) != heads(want):
        why = f"its width is {_width(have)}, the base transformer's is {_width(want)}"
    else:
        for field, what in (
            ("in_channels", "input channels"),
            ("joint_attention_dim", "text (joint attention) dim"),
            ("pooled_projection_dim", "pooled text dim"),
        ):
            if getattr(have, field) != getattr(want, field):
                why = f"its {what} are {getattr(have, field)}, the base transformer's {getattr(want, field)}"
                break
    if why:
        raise IncompatibleModelError(
            f"{name} does not fit the {base} base: {why}; use a ControlNet made for this {base} base"
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

    ``mode``: ``t2i``, ``img2img``, ``inpaint`` or ``video`` (AnimateDiff, SD1.5/SDXL only; needs
    ``motion_adapter`` and builds a motion UNet without adapters, so attach adapters to the returned
    pipeline). ``controlnet``: a ControlNet of the base's family (ControlNetModel, FluxControlNetModel,
    SD3ControlNetModel) or a list of them (several at once), with any mode (SD3: t2i only). The classes
    per family are in this module's docstring. Everything is checked before anything is built.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode '{mode}'; expected one of: {', '.join(MODES)}")
    nets = (
        []
        if controlnet is None
        else list(controlnet.nets)
        if isinstance(controlnet, MULTI_CONTROLNETS)
        else list(controlnet)
        if isinstance(controlnet, (list, tuple))
        else [controlnet]
    )
    fam = family_of(pipe)
    if fam in DIT_FAMILIES:
        return _dit_mode_pipeline(pipe, fam, mode, nets, motion_adapter)
    unet = pipe.unet
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


def _dit_mode_pipeline(pipe: Any, fam: str, mode: str, nets: list[Any], motion_adapter: Any | None) -> Any:
    """``mode_pipeline`` for Flux / SD3: diffusers' AutoPipeline classes map every combination served."""
    base = FAMILY_NAMES[fam]
    if mode == "video":
        raise IncompatibleModelError(
            f"video is not available for a {base} base: diffusers' AnimateDiff pipelines animate an SD1.5 or "
            "SDXL UNet, and this base has a transformer; use an SD1.5/SDXL base for video, or t2i, img2img or "
            "inpaint with this one"
        )
    if motion_adapter is not None:
        raise InputError(f"a motion adapter is only used for video, not {mode}")
    for i, net in enumerate(nets):
        check_dit_controlnet(
            net, pipe.transformer, fam, f"ControlNet {i + 1}" if len(nets) > 1 else "the ControlNet"
        )
    if fam == "sd3" and nets and mode != "t2i":
        raise IncompatibleModelError(
            f"diffusers has no SD3 ControlNet pipeline for {mode} (only text-to-image, "
            "StableDiffusion3ControlNetPipeline); drop the ControlNet or run t2i"
        )
    multi = FluxMultiControlNetModel if fam == "flux" else SD3MultiControlNetModel
    net = None if not nets else nets[0] if len(nets) == 1 else multi(nets)
    return _AUTO[mode].from_pipe(pipe, controlnet=net)


def load_controlnet(spec: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A ControlNet from a diffusers folder, a hub id, or ``owner/repo/subfolder``: a ControlNetModel
    (SD1.5/SDXL), FluxControlNetModel or SD3ControlNetModel, as its config.json's ``_class_name`` says."""
    return _load_model(
        CONTROLNET_CLASSES,
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


def _model_class(classes: type | dict[str, type], kind: str, spec: str | Path, config: Any) -> type:
    """The class to load: ``classes`` itself, or the one its config's ``_class_name`` names (read lazily)."""
    if isinstance(classes, type):
        return classes
    name = config().get("_class_name")
    if name is None:  # configs written before diffusers recorded the class: the first (classic) one
        return next(iter(classes.values()))
    if name not in classes:
        raise IncompatibleModelError(f"{kind} '{spec}' is a {name}; expected one of: {', '.join(classes)}")
    return classes[name]


def _load_model(
    classes: type | dict[str, type], kind: str, spec: str | Path, dtype: torch.dtype, device: str, how: str
) -> Any:
    expected = classes.__name__ if isinstance(classes, type) else " / ".join(classes)
    folder = Path(spec).expanduser()
    try:
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise InputError(
                    f"{kind} '{spec}': folder has no config.json; expected a diffusers {expected} folder"
                )
            read = lambda: json.loads((folder / "config.json").read_text())  # noqa: E731
            cls = _model_class(classes, kind, spec, read)
            model = cls.from_pretrained(str(folder), dtype=dtype)
        elif folder.exists() or folder.suffix.lower() in {".safetensors", ".ckpt", ".pth", ".bin"}:
            raise InputError(
                f"{kind} '{spec}': expected a diffusers folder (config.json + weights) or a hub id, "
                "not a single file"
            )
        else:
            hub = split_hub_path(str(spec))
            repo, sub = hub if hub else (str(spec), None)
            where = {"subfolder": sub} if sub else {}
            first = classes if isinstance(classes, type) else next(iter(classes.values()))
            cls = _model_class(classes, kind, spec, lambda: first.load_config(repo, **where))
            model = cls.from_pretrained(repo, dtype=dtype, **where)
    except (InputError, IncompatibleModelError):
        raise
    except NETWORK_ERRORS as e:
        if folder.is_dir():
            raise IncompatibleModelError(
                f"{kind} '{spec}': not a {expected} folder ({str(e).splitlines()[0][:160]})"
            ) from None
        raise _unavailable(kind, str(spec), how, e) from None
    if not isinstance(model, cls):
        raise IncompatibleModelError(
            f"{kind} '{spec}' loads as {type(model).__name__}; expected {cls.__name__}"
        )
    return model.to(device)
