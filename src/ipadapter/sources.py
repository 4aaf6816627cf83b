"""Resolve what the user named: an adapter file, an image encoder, a base model.

Each can be local (a file or a diffusers folder) or on the Hugging Face hub. Hub look-ups go through the
local cache first and honour ``HF_HUB_OFFLINE``; anything that can't be had becomes one
:class:`ModelNotAvailableError` that names the model and says how to provide it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from transformers import CLIPVisionModelWithProjection, PreTrainedConfig, SiglipVisionModel

from .adapters.variants import AdapterSpec
from .errors import IncompatibleModelError, InputError, ModelNotAvailableError
from .mini.shipped import ADAPTER_FILES, adapter_file
from .prompt.encoder import PREPROCESSOR_FOLDER

NETWORK_ERRORS = (OSError, HFValidationError, ValueError)  # hub errors subclass OSError


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(
    kind: str, name: str, how: str, error: BaseException | None = None
) -> ModelNotAvailableError:
    where = (
        "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        if offline()
        else ("it is not a local path and could not be fetched from the Hugging Face hub")
    )
    detail = f" ({str(error).strip().splitlines()[0][:160]})" if error and not offline() else ""
    return ModelNotAvailableError(f"{kind} '{name}' is not available: {where}{detail}; {how}")


def split_hub_path(spec: str) -> tuple[str, str] | None:
    """``owner/repo/path/in/repo`` -> (``owner/repo``, ``path/in/repo``); None if it has no path part."""
    parts = spec.strip("/").split("/")
    if len(parts) < 3 or any(not p for p in parts) or spec.startswith((".", "/", "~")):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def resolve_adapter(spec: str | Path) -> Path:
    """A local adapter file for ``spec``: a path as given, or ``owner/repo/path/in/repo.ext`` from the hub."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path

    if str(spec) in ADAPTER_FILES:  # the shipped miniature adapters ("mini", "mini-plus")
        return adapter_file(str(spec))
    hub = split_hub_path(str(spec))
    if hub is None or path.suffix.lower() not in {".safetensors", ".bin", ".pt", ".pth"}:
        raise InputError(
            f"adapter '{spec}': no such file; expected a local .safetensors/.bin file or a hub path "
            "like h94/IP-Adapter/models/ip-adapter_sd15.safetensors"
        )
    repo, filename = hub
    try:
        return Path(hf_hub_download(repo, filename))
    except NETWORK_ERRORS as e:
        raise _unavailable(
            "adapter", str(spec), f"download it with `hf download {repo} {filename}` or pass a local file", e
        ) from None


ENCODER_CLASSES = {"clip": CLIPVisionModelWithProjection, "siglip": SiglipVisionModel}


def encoder_config_kind(config: object) -> str | None:
    """Which vision tower a config.json describes: ``"clip"``, ``"siglip"``, or None for neither.

    SigLIP: ``siglip_vision_model``, or a full ``siglip`` model with a ``vision_config`` (e.g.
    google/siglip-so400m-patch14-384, whose vision tower SiglipVisionModel loads). CLIP: ``clip_vision_model``,
    ``clip``, or no model_type at all (old CLIP exports).
    """
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    if model_type == "siglip_vision_model" or (
        model_type == "siglip" and isinstance(config.get("vision_config"), dict)
    ):
        return "siglip"
    if model_type in (None, "clip_vision_model", "clip"):
        return "clip"
    return None


def _encoder_dim(folder: Path, feature: str) -> int | None:
    """The feature dim a CLIP or SigLIP vision model folder would give, read from its config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    kind = encoder_config_kind(config)
    if kind is None:
        return None
    vision = config.get("vision_config", config)
    if not isinstance(vision, dict):
        return None
    if kind == "siglip":  # pooled = the pooling head's output, as wide as the tower
        return vision.get("hidden_size")
    return vision.get("projection_dim" if feature == "pooled" else "hidden_size")


def default_encoder(adapter_source: str | Path, spec: AdapterSpec) -> str:
    """Where the image encoder for an adapter lives, following the h94/IP-Adapter repository layout.

    ViT-H adapters use ``models/image_encoder``, bigG ones ``sdxl_models/image_encoder`` (the SDXL
    ``*_vit-h`` adapters live under ``sdxl_models/`` but need the ViT-H encoder). A local adapter file takes
    the first of ``image_encoder/`` beside it and the repository's encoder folders around it whose
    config gives the feature dim the adapter needs.
    """
    source = str(adapter_source)
    local = Path(source).expanduser()
    if spec.host != "unet":
        return _dit_encoder(local, spec, source)
    feature, feature_dim = spec.clip_feature or (spec.feature, spec.feature_dim)
    need = (
        f"a {spec.encoder} encoder, e.g. h94/IP-Adapter/{spec.encoder_subfolder}"
        if spec.encoder
        else (f"a CLIP vision model whose {feature} features have {feature_dim} dims")
    )
    if local.is_file():
        repo = local.parent.parent
        candidates = [
            local.parent / "image_encoder",
            repo / "models/image_encoder",
            repo / "sdxl_models/image_encoder",
        ]
        if spec.encoder_subfolder:
            candidates.insert(0, repo / spec.encoder_subfolder)
        found = {c: _encoder_dim(c, feature) for c in candidates if (c / "config.json").is_file()}
        for folder, dim in found.items():
            if dim == feature_dim:
                return str(folder)
        seen = "; ".join(f"{f} gives {d}" for f, d in found.items()) or "none found"
        raise InputError(
            f"no image encoder for adapter '{source}': it needs {feature_dim}-dim {feature} features "
            f"(looked beside it and in the h94 layout around it: {seen}); pass --image-encoder with {need}"
        )
    hub = split_hub_path(source)
    if hub is None:
        raise InputError(f"no image encoder known for adapter '{source}'; pass --image-encoder with {need}")
    repo_id, filename = hub
    sub = spec.encoder_subfolder or str(Path(filename).parent / "image_encoder")
    return f"{repo_id}/{sub}"


def _dit_encoder(local: Path, spec: AdapterSpec, source: str) -> str:
    """A Flux / SD3 adapter's encoder: an ``image_encoder/`` folder beside a local file with the dims it needs,
    else the one its authors name (DESIGN.md §3.5: CLIP ViT-L/14 for XLabs, SigLIP so400m for InstantX)."""
    beside = local.parent / "image_encoder"
    if local.is_file() and _encoder_dim(beside, spec.feature) == spec.feature_dim:
        return str(beside)
    if spec.encoder_repo is None:
        raise InputError(
            f"no image encoder known for adapter '{source}': it needs {spec.feature_dim}-dim {spec.feature} "
            f"features of a {spec.encoder_kind.upper()} vision model; pass --image-encoder with one"
        )
    return spec.encoder_repo


def load_image_encoder(
    spec: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> CLIPVisionModelWithProjection | SiglipVisionModel:
    """A CLIP or SigLIP vision model from a local folder, a hub repo, or ``owner/repo/sub/folder`` on the hub.

    The kind comes from config.json (:func:`encoder_config_kind`): SigLIP loads a ``SiglipVisionModel``, CLIP a
    ``CLIPVisionModelWithProjection``; any other model is refused before its weights load. A SigLIP model from the
    hub remembers the local folder of its ``preprocessor_config.json`` (if the repo has one) for ImageEncoder.
    """
    folder = Path(spec).expanduser()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if folder.is_dir():
        where, sub = str(folder), None
    else:
        hub = split_hub_path(str(spec))
        where, sub = hub if hub else (str(spec), None)
    place = {"subfolder": sub} if sub else {}
    try:
        config, _ = PreTrainedConfig.get_config_dict(where, **place)
        kind = encoder_config_kind(config)
        if kind is None:
            model_type = config.get("model_type") if isinstance(config, dict) else type(config).__name__
            raise IncompatibleModelError(
                f"image encoder '{spec}': config.json describes a '{model_type}' model, not a "
                "vision tower this library reads; expected a CLIP (clip_vision_model / clip) or SigLIP "
                "(siglip_vision_model / siglip) vision model; pass one with --image-encoder"
            )
        model = ENCODER_CLASSES[kind].from_pretrained(where, **place, **kwargs)
    except NETWORK_ERRORS as e:
        if folder.is_dir():
            raise IncompatibleModelError(
                f"image encoder '{spec}': not a CLIP or SigLIP vision model folder "
                f"({str(e).splitlines()[0][:160]}); expected config.json and weights of a "
                "CLIPVisionModelWithProjection or SiglipVisionModel"
            ) from None
        raise _unavailable(
            "image encoder",
            str(spec),
            "download it (for the official ones: `hf download h94/IP-Adapter "
            "--include 'models/image_encoder/*'`) or pass a local folder with --image-encoder",
            e,
        ) from None
    if kind == "siglip" and not folder.is_dir():
        setattr(model, PREPROCESSOR_FOLDER, _hub_preprocessor_folder(where, sub))
    return model.to(device) if device is not None else model


def _hub_preprocessor_folder(repo: str, sub: str | None) -> str | None:
    """The local folder holding a hub encoder's ``preprocessor_config.json``; None when the repo has none."""
    try:
        return str(Path(hf_hub_download(repo, "preprocessor_config.json", subfolder=sub)).parent)
    except NETWORK_ERRORS:
        return None
