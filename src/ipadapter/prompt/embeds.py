"""Reusable image embeddings: a reference's encoder features stored in a ``.safetensors`` file.

``ipadapter embed`` writes one; ``--embeds FILE`` (or ``embeds =`` in a recipe) uses it instead of running
the image encoder, and gives the same pixels as the image did. The file holds, as tensors:

    features       the reference's encoder features: (F,) pooled image_embeds or (S, F) hidden states
    negative       the encoder's unconditional features of the same kind (so no encoder run is needed)
    encoder_probe  64 weights of the encoder's projection (float32), to recognise the encoder later

and as string metadata: ``format`` = "ipadapter-embeds", ``version``, ``feature`` (pooled | hidden),
``feature_dim``, ``encoder`` (where it was loaded from), ``image_size``, ``crop``, ``variant`` (the adapter
it was made for), ``image_sha1``, ``dtype``. Features are shared by every adapter that reads the same kind
of features from the same encoder (plus, plus-face and full-face all read ViT-H hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from ..errors import IncompatibleModelError, InputError
from ..files import atomic_path
from .encoder import ImageEncoder

FORMAT = "ipadapter-embeds"
VERSION = "1"
_TENSORS = ("features", "negative", "encoder_probe")


@dataclass
class Embeds:
    """The contents of an embeddings file."""

    features: torch.Tensor
    negative: torch.Tensor
    probe: torch.Tensor
    feature: str
    encoder: str
    crop: str
    variant: str
    image_sha1: str
    source: str


def save_embeds(
    path: str | Path,
    features: torch.Tensor,
    negative: torch.Tensor,
    *,
    feature: str,
    encoder: ImageEncoder,
    encoder_name: str,
    crop: str,
    variant: str,
    image_sha1: str,
) -> Path:
    """Write one reference's features (in the dtype they were computed in: bit-exact reuse)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise InputError(f"embeddings output '{path}' must end in .safetensors")
    if path.is_dir():
        raise InputError(f"embeddings output '{path}' is a folder; give a file name ending in .safetensors")
    tensors = {
        "features": features.detach().cpu().contiguous(),
        "negative": negative.detach().cpu().contiguous(),
        "encoder_probe": encoder.probe().contiguous(),
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "feature": feature,
        "feature_dim": str(features.shape[-1]),
        "encoder": encoder_name,
        "image_size": str(encoder.image_size),
        "crop": crop,
        "variant": variant,
        "image_sha1": image_sha1,
        "dtype": str(features.dtype).removeprefix("torch."),
    }
    with atomic_path(path) as temp:  # an existing file stays whole until the new one is
        save_file(tensors, str(temp), metadata=meta)
    return path


def load_embeds(path: str | Path) -> Embeds:
    """Read an embeddings file, refusing anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"embeddings '{path}': no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != FORMAT or not set(_TENSORS) <= names:
                raise InputError(
                    f"embeddings '{path}' is not an ipadapter embeddings file (no '{FORMAT}' metadata); "
                    "make one with `ipadapter embed`"
                )
            tensors = {name: f.get_tensor(name) for name in _TENSORS}
    except (SafetensorError, OSError) as e:
        raise InputError(
            f"embeddings '{path}' could not be read ({e}); expected a .safetensors file"
        ) from None
    if meta.get("version") != VERSION:
        raise InputError(
            f"embeddings '{path}' has format version {meta.get('version')!r}; this version reads {VERSION}: "
            "make it again with `ipadapter embed`"
        )
    return Embeds(
        features=tensors["features"],
        negative=tensors["negative"],
        probe=tensors["encoder_probe"],
        feature=meta.get("feature", ""),
        encoder=meta.get("encoder", "unknown"),
        crop=meta.get("crop", "center"),
        variant=meta.get("variant", ""),
        image_sha1=meta.get("image_sha1", ""),
        source=str(path),
    )


def check_embeds(embeds: Embeds, feature: str, feature_dim: int, encoder: ImageEncoder, adapter: str) -> None:
    """Refuse embeddings made for another kind of features or another encoder, saying which."""
    kinds = {"pooled": "pooled image_embeds (basic adapters)", "hidden": "hidden states (plus / full-face)"}
    if embeds.feature != feature:
        raise IncompatibleModelError(
            f"embeddings '{embeds.source}' hold {kinds.get(embeds.feature, embeds.feature)}, made for "
            f"'{embeds.variant}', but adapter '{adapter}' reads {kinds.get(feature, feature)}; make them again "
            "with `ipadapter embed --adapter` naming this adapter"
        )
    have = embeds.features.shape[-1]
    probe = encoder.probe()
    same = have == feature_dim and probe.shape == embeds.probe.shape
    if same:
        same = torch.allclose(probe, embeds.probe.float(), rtol=1e-2, atol=1e-3)
    if not same:
        raise IncompatibleModelError(
            f"embeddings '{embeds.source}' were made with image encoder '{embeds.encoder}' ({have}-dim), "
            f"which is not the encoder adapter '{adapter}' uses; make them again with `ipadapter embed` and "
            "the same --image-encoder"
        )
