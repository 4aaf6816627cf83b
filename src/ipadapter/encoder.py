"""Reference images -> CLIP vision features, with the reference's preprocessing and a content cache.

Preprocessing (as the reference): resize the shortest side to the encoder's configured image size (bicubic),
centre crop, scale to [0, 1], normalise with the CLIP mean/std. Features: ``pooled`` = the projected
``image_embeds`` (B, F); ``hidden`` = the penultimate hidden states (B, S, F).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from .images import image_key


class ImageEncoder:
    """A CLIP vision model plus its preprocessing, its negative features, and a small feature cache."""

    def __init__(self, model: CLIPVisionModelWithProjection, cache_size: int = 32) -> None:
        self.model = model.eval()
        size = int(model.config.image_size)
        self.image_size = size
        self.processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @property
    def pooled_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def hidden_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def feature_dim(self, feature: str) -> int:
        return self.pooled_dim if feature == "pooled" else self.hidden_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIP preprocessing: (B, 3, size, size), normalised."""
        return self.processor(images=images, return_tensors="pt").pixel_values

    @torch.no_grad()
    def _run(self, pixels: torch.Tensor, feature: str) -> torch.Tensor:
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if feature == "pooled":
            return self.model(pixels).image_embeds  # (B, F)
        return self.model(pixels, output_hidden_states=True).hidden_states[-2]  # (B, S, F)

    def features(self, images: list[Image.Image], feature: str) -> torch.Tensor:
        """Features of several RGB images, encoded in one batch; repeated images come from the cache."""
        keys = [(image_key(img), feature, self.dtype, str(self.device)) for img in images]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh: dict[tuple, torch.Tensor] = {}
        if todo:
            encoded = self._run(self.pixels([images[i] for i in todo]), feature)
            fresh = {keys[i]: encoded[row] for row, i in enumerate(todo)}
        rows = []
        for k in keys:  # read before remembering: a batch larger than the cache must not evict itself
            if k not in fresh:
                self._cache.move_to_end(k)
            rows.append(fresh.get(k, self._cache.get(k)))
        for k, value in fresh.items():
            self._remember(k, value)
        return torch.stack(rows)

    def negative_features(self, feature: str) -> torch.Tensor:
        """The unconditional features, as the reference makes them (DESIGN.md §3.1), computed once.

        pooled: an all-zero embedding. hidden: the encoder's hidden states for an all-zero *normalised* input.
        """
        key = ("<negative>", feature, self.dtype, str(self.device))
        if key not in self._cache:
            if feature == "pooled":
                value = torch.zeros(self.pooled_dim, device=self.device, dtype=self.dtype)
            else:
                zeros = torch.zeros(1, 3, self.image_size, self.image_size)
                value = self._run(zeros, feature)[0]
            self._remember(key, value)
        return self._cache[key]

    def _remember(self, key: tuple, value: torch.Tensor) -> None:
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
