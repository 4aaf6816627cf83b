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
from transformers import CLIPVisionModelWithProjection

from .adapters.variants import AdapterSpec
from .errors import IncompatibleModelError, InputError, ModelNotAvailableError
from .mini.shipped import ADAPTER_FILES, adapter_file

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


def _encoder_dim(folder: Path, feature: str) -> int | None:
    """The feature dim a CLIP vision model folder would give, read from its config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("vision_config", config)
    return config.get("projection_dim" if feature == "pooled" else "hidden_size")


def default_encoder(adapter_source: str | Path, spec: AdapterSpec) -> str:
    """Where the image encoder for an adapter lives, following the h94/IP-Adapter repository layout.

    ViT-H adapters use ``models/image_encoder``, bigG ones ``sdxl_models/image_encoder`` (the SDXL
    ``*_vit-h`` adapters live under ``sdxl_models/`` but need the ViT-H encoder). A local adapter file takes
    the first of ``image_encoder/`` beside it and the repository's encoder folders around it whose
    config gives the feature dim the adapter needs.
    """
    source = str(adapter_source)
    local = Path(source).expanduser()
    need = (
        f"a {spec.encoder} encoder, e.g. h94/IP-Adapter/{spec.encoder_subfolder}"
        if spec.encoder
        else (f"a CLIP vision model whose {spec.feature} features have {spec.feature_dim} dims")
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
        found = {c: _encoder_dim(c, spec.feature) for c in candidates if (c / "config.json").is_file()}
        for folder, dim in found.items():
            if dim == spec.feature_dim:
                return str(folder)
        seen = "; ".join(f"{f} gives {d}" for f, d in found.items()) or "none found"
        raise InputError(
            f"no image encoder for adapter '{source}': it needs {spec.feature_dim}-dim {spec.feature} features "
            f"(looked beside it and in the h94 layout around it: {seen}); pass --image-encoder with {need}"
        )
    hub = split_hub_path(source)
    if hub is None:
        raise InputError(f"no image encoder known for adapter '{source}'; pass --image-encoder with {need}")
    repo_id, filename = hub
    sub = spec.encoder_subfolder or str(Path(filename).parent / "image_encoder")
    return f"{repo_id}/{sub}"


def load_image_encoder(
    spec: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> CLIPVisionModelWithProjection:
    """A CLIP vision model from a local folder, a hub repo, or ``owner/repo/sub/folder`` on the hub."""
    folder = Path(spec).expanduser()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        if folder.is_dir():
            model = CLIPVisionModelWithProjection.from_pretrained(str(folder), **kwargs)
        else:
            hub = split_hub_path(str(spec))
            repo, sub = hub if hub else (str(spec), None)
            if sub is None:
                model = CLIPVisionModelWithProjection.from_pretrained(repo, **kwargs)
            else:
                model = CLIPVisionModelWithProjection.from_pretrained(repo, subfolder=sub, **kwargs)
    except NETWORK_ERRORS as e:
        if folder.is_dir():
            raise IncompatibleModelError(
                f"image encoder '{spec}': not a CLIP vision model folder ({str(e).splitlines()[0][:160]}); "
                "expected config.json and weights of a CLIPVisionModelWithProjection"
            ) from None
        raise _unavailable(
            "image encoder",
            str(spec),
            "download it (for the official ones: `hf download h94/IP-Adapter "
            "--include 'models/image_encoder/*'`) or pass a local folder with --image-encoder",
            e,
        ) from None
    return model.to(device) if device is not None else model
