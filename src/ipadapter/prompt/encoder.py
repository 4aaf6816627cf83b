"""Reference images -> CLIP vision features, with the reference's preprocessing and a content cache.

Preprocessing (as the reference): resize the shortest side to the encoder's configured image size (bicubic),
centre crop, scale to [0, 1], normalise with the CLIP mean/std. Two other ways to fit a non-square reference
(``crop``): ``pad`` letterboxes the whole image onto a square of its average edge colour; ``stretch`` resizes
it to a square, ignoring its aspect ratio. Features: ``pooled`` = the projected
``image_embeds`` (B, F); ``hidden`` = the penultimate hidden states (B, S, F).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from .images import fit_square, image_key


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

    def features(
        self, images: list[Image.Image], feature: str, crop: str | list[str] = "center"
    ) -> torch.Tensor:
        """Features of several RGB images; repeated images come from the cache.

        ``crop``: how each image is fitted to the square input (one mode for all, or one per image). Each image
        is encoded on its own: a batched matmul may round differently for another batch size, and a cached
        value must be the one any job would compute (the same job gives the same pixels whatever ran before).
        """
        crops = [crop] * len(images) if isinstance(crop, str) else list(crop)
        keys = [
            (image_key(img), c, feature, self.dtype, str(self.device))
            for img, c in zip(images, crops, strict=True)
        ]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        fresh: dict[tuple, torch.Tensor] = {}
        for i in todo:
            if keys[i] not in fresh:
                fitted = fit_square(images[i], crops[i], self.image_size)
                fresh[keys[i]] = self._run(self.pixels([fitted]), feature)[0]
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

    def probe(self) -> torch.Tensor:
        """A few of the model's weights (float32): tells encoders apart whatever dtype they were loaded in."""
        weight = self.model.visual_projection.weight
        return weight.detach().flatten()[:64].float().cpu()

    def _remember(self, key: tuple, value: torch.Tensor) -> None:
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
