"""Precomputed VAE latent moments and image-encoder features, so epochs skip the frozen encoders.

Only centre crops can be cached (a random crop or flip changes the latents every epoch). The cache keeps
the latent *distribution* (its moments), and the step samples from it with the step's own generator, so a
cached run draws the same latents as an uncached one. Features are stored in the dtype the encoder ran in.
FaceID runs also store each example's face embedding (``face``); faceid has no image features (its negative
is the zero face), faceid-plus's are those of the aligned face crop.
Files: ``index.json`` (what the cache was built from), ``negative.safetensors`` (the adapter's negative
features), ``shard-NNNNN.safetensors`` (256 examples each, written whole or not at all).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import InputError
from ..files import atomic_path
from .datasets import collate

SHARD = 256
VERSION = 1


FIELDS = ("moments", "features", "face", "original_size", "crop_top_left")


class FeatureCache:
    """Per-example ``moments``, ``features``, ``face`` (FaceID), ``original_size``, ``crop_top_left`` for a
    map-style source."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.fingerprint = {"version": VERSION, **fingerprint}
        index = self.folder / "index.json"
        if index.is_file():
            saved = json.loads(index.read_text())
            if saved != self.fingerprint:
                diff = [
                    f"{k}: {saved.get(k)!r} vs {v!r}"
                    for k, v in self.fingerprint.items()
                    if saved.get(k) != v
                ]
                raise InputError(
                    f"cache '{self.folder}' was built for other settings ({'; '.join(diff)}); choose another "
                    "--cache-dir or delete that folder"
                )

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def missing_shards(self, n: int) -> list[int]:
        return [s for s in range((n + SHARD - 1) // SHARD) if not self.shard_path(s).is_file()]

    def write_shard(self, shard: int, tensors: dict[str, torch.Tensor], skipped: dict[int, str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.shard_path(shard)
        meta = {"skipped": json.dumps({str(k): v for k, v in skipped.items()})}
        with atomic_path(path) as temp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(temp), metadata=meta)

    def write_index(self, negative: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / "negative.safetensors") as temp:
            save_file({"negative": negative.contiguous().cpu()}, str(temp))
        with atomic_path(self.folder / "index.json") as temp:  # last: the index says the cache is complete
            temp.write_text(json.dumps(self.fingerprint, indent=2))

    def negative(self) -> torch.Tensor:
        with safe_open(str(self.folder / "negative.safetensors"), "pt") as f:
            return f.get_tensor("negative")

    def example(self, i: int) -> dict[str, Any]:
        """The cached tensors of example ``i``, or ``{"skipped": reason}`` if its image was unreadable."""
        with safe_open(str(self.shard_path(i // SHARD)), "pt") as f:
            skipped = json.loads(f.metadata().get("skipped", "{}"))
            if str(i) in skipped:
                return {"skipped": skipped[str(i)]}
            keys = set(f.keys())
            return {name: f.get_tensor(f"{i}.{name}") for name in FIELDS if f"{i}.{name}" in keys}


class CachedExamples(torch.utils.data.Dataset):
    """Map-style examples addressed by (epoch, index), read from a :class:`FeatureCache` (texts from the source)."""

    def __init__(self, cache: FeatureCache, source: Any) -> None:
        self.cache, self.source = cache, source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        _, index = key
        sample = self.source[index]
        return {"key": sample.key, "text": sample.text, **self.cache.example(index)}


def fill_shards(
    cache: FeatureCache,
    source: Any,
    transform: Any,
    encode: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor | None]],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Compute this process's share of the missing shards (every ``world_size``-th, from ``rank``).

    ``encode`` maps a collated batch of ``batch_size`` transformed examples to its latent moments and image
    features (None: the adapter reads none); unreadable examples are recorded in their shard as skipped.
    """
    n = len(source)
    for shard in cache.missing_shards(n)[rank::world_size]:
        tensors: dict[str, torch.Tensor] = {}
        skipped: dict[int, str] = {}
        indices = list(range(shard * SHARD, min(n, (shard + 1) * SHARD)))
        for chunk in range(0, len(indices), batch_size):
            part = indices[chunk : chunk + batch_size]
            examples = [transform(source[i]) for i in part]
            for i, e in zip(part, examples, strict=True):
                if "skipped" in e:
                    skipped[i] = e["skipped"]
            good = [(i, e) for i, e in zip(part, examples, strict=True) if "skipped" not in e]
            if not good:
                continue
            batch = collate([e for _, e in good])
            with torch.no_grad():
                moments, feats = encode(batch)
            for row, (i, _) in enumerate(good):
                tensors[f"{i}.moments"] = moments[row].float()
                if feats is not None:
                    tensors[f"{i}.features"] = feats[row]
                if "face" in batch:
                    tensors[f"{i}.face"] = batch["face"][row]
                tensors[f"{i}.original_size"] = batch["original_size"][row]
                tensors[f"{i}.crop_top_left"] = batch["crop_top_left"][row]
        cache.write_shard(shard, tensors, skipped)
