"""Reference images -> vision features (CLIP or SigLIP), with the reference's preprocessing and a content cache.

Two kinds of vision tower (``ImageEncoder.kind``):

- ``clip`` (``CLIPVisionModelWithProjection``; the UNet adapters, XLabs Flux). Preprocessing as the reference:
  resize the shortest side to the encoder's image size (bicubic), centre crop, scale to [0, 1], normalise with the
  CLIP mean/std. ``pooled`` = the projected ``image_embeds`` (B, F); ``hidden`` = the penultimate hidden states
  (B, S, F), S = patches + 1.
- ``siglip`` (``SiglipVisionModel``; the InstantX Flux and SD3.5 adapters). Preprocessing as the reference
  pipelines' ``SiglipImageProcessor``: the folder's ``preprocessor_config.json`` when the model came from a folder
  that has one, else SigLIP's defaults (resize to image_size x image_size bicubic, no crop, scale to [0, 1],
  normalise with mean = std = 0.5). ``pooled`` = ``pooler_output`` (B, hidden_size), the attention-pooling head;
  ``hidden`` = ``hidden_states[-2]`` (B, S, F), S = patches (729 for so400m-patch14-384).

``crop`` fits a non-square reference to the square input: ``center`` leaves it to the encoder's own processor,
as the reference pipelines do (CLIP: centre crop; SigLIP: a squash resize to the square, so for SigLIP ``center``
and ``stretch`` give the same pixels); ``pad`` letterboxes the whole image onto a square of its average edge
colour; ``stretch`` resizes it to a square, ignoring its aspect ratio.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionModelWithProjection,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)

from ..errors import IncompatibleModelError, InputError
from .images import fit_square, image_key

EncoderModel = CLIPVisionModelWithProjection | SiglipVisionModel
# Set by sources.load_image_encoder on a model loaded from the hub: the local folder holding its
# preprocessor_config.json (a hub model's ``name_or_path`` is the repo id, without its subfolder).
PREPROCESSOR_FOLDER = "ipadapter_preprocessor_folder"
NEGATIVE_POLICIES = ("default", "zeros", "black")


def encoder_kind(model: EncoderModel) -> str:
    """``"clip"`` or ``"siglip"``: which kind of vision tower ``model`` is."""
    return "siglip" if getattr(model.config, "model_type", None) == "siglip_vision_model" else "clip"


def _siglip_processor(model: SiglipVisionModel) -> SiglipImageProcessorPil:
    """The model folder's SigLIP processor when it has a ``preprocessor_config.json``, else SigLIP's defaults."""
    folder = getattr(model, PREPROCESSOR_FOLDER, None) or getattr(model, "name_or_path", "")
    if folder and (Path(folder) / "preprocessor_config.json").is_file():
        try:
            return SiglipImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise IncompatibleModelError(
                f"image encoder '{folder}': its preprocessor_config.json is not a SigLIP image processor "
                f"({str(e).strip().splitlines()[0][:160]}); expected one SiglipImageProcessor reads; fix or "
                "remove the file (SigLIP's defaults are used without one)"
            ) from None
    size = int(model.config.image_size)
    return SiglipImageProcessorPil(size={"height": size, "width": size})  # bicubic, 1/255, mean = std = 0.5


class ImageEncoder:
    """A CLIP or SigLIP vision model plus its preprocessing, its negative features, and a small feature cache."""

    def __init__(self, model: EncoderModel, cache_size: int = 32) -> None:
        self.model = model.eval()
        self._kind = encoder_kind(model)
        size = int(model.config.image_size)
        self.image_size = size
        if self._kind == "siglip":
            self.processor = _siglip_processor(model)
        else:
            self.processor = CLIPImageProcessorPil(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @property
    def kind(self) -> str:
        """``"clip"`` or ``"siglip"``."""
        return self._kind

    @property
    def pooled_dim(self) -> int:
        if self._kind == "siglip":
            return int(self.model.config.hidden_size)  # the pooling head keeps the width
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

    def _tower(self) -> torch.nn.Module:
        """The module holding embeddings / encoder / post-layernorm (CLIP nests it; SigLIP is it)."""
        return getattr(self.model, "vision_model", self.model)

    def _sequence_length(self) -> int:
        """S of the ``hidden`` features: patches (+ 1 class token for CLIP)."""
        return int(self._tower().embeddings.num_positions)

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The encoder's preprocessing: (B, 3, size, size), normalised."""
        return self.processor(images=images, return_tensors="pt").pixel_values

    @torch.no_grad()
    def _run(self, pixels: torch.Tensor, feature: str) -> torch.Tensor:
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if feature != "pooled":
            return self.model(pixels, output_hidden_states=True).hidden_states[-2]  # (B, S, F)
        if self._kind == "clip":
            return self.model(pixels).image_embeds  # (B, F)
        pooled = self.model(pixels).pooler_output  # (B, F)
        if pooled is None:
            raise IncompatibleModelError(
                "image encoder: this SigLIP vision model has no pooling head (vision_use_head is false), so it "
                "gives no pooled features; expected a SigLIP tower with its head (e.g. so400m-patch14-384); use "
                "an adapter that reads hidden states or another encoder"
            )
        return pooled

    def features(
        self,
        images: list[Image.Image],
        feature: str,
        crop: str | list[str] = "center",
        batch_size: int = 0,
    ) -> torch.Tensor:
        """Features of several RGB images; repeated images come from the cache.

        ``crop``: how each image is fitted to the square input (one mode for all, or one per image; ``center``
        = the encoder's own processor, see the module docstring). By default (``batch_size`` 0) each image is
        encoded on its own: a batched matmul may round differently for another batch size, and a cached value
        must be the one any job would compute (the same job gives the same pixels whatever ran before).
        ``batch_size`` > 0 encodes that many images per call (faster on a GPU for long lists and videos); the
        features equal the one-at-a-time ones within float rounding, and each batch is cached as a whole, so a
        job still gives the same pixels whatever ran before it.
        """
        crops = [crop] * len(images) if isinstance(crop, str) else list(crop)
        keys = [
            (image_key(img), c, feature, self.dtype, str(self.device))
            for img, c in zip(images, crops, strict=True)
        ]
        if batch_size > 0:
            return self._batched(images, crops, keys, feature, batch_size)
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

    def _batched(
        self, images: list[Image.Image], crops: list[str], keys: list[tuple], feature: str, size: int
    ) -> torch.Tensor:
        """:meth:`features` ``size`` images per encoder call; a batch's rows are cached under the whole batch."""
        rows = []
        for start in range(0, len(images), size):
            chunk = range(start, min(start + size, len(images)))
            key = ("<batch>", tuple(keys[i] for i in chunk))
            if key not in self._cache:
                fitted = [fit_square(images[i], crops[i], self.image_size) for i in chunk]
                self._remember(key, self._run(self.pixels(fitted), feature))
            else:
                self._cache.move_to_end(key)
            rows.extend(self._cache[key])
        return torch.stack(rows)

    def negative_features(self, feature: str, how: str = "default") -> torch.Tensor:
        """The unconditional features for one reference, computed once per policy: (F,) or (S, F).

        ``how``:
        - ``default`` (the UNet adapters, DESIGN.md §3.1): pooled -> an all-zero embedding; hidden -> the
          encoder's hidden states for an all-zero *normalised* input.
        - ``zeros``: a zero tensor of the feature's shape (hidden: (S, F)); diffusers' SD3 pipeline uses
          ``torch.zeros_like(image_embeds)``.
        - ``black``: the features of an all-black RGB image through the normal preprocessing; diffusers' Flux
          pipeline encodes ``np.zeros((w, h, 3), uint8)`` as the missing negative (any size: black stays black).
        """
        if how not in NEGATIVE_POLICIES:
            raise InputError(
                f"negative features policy '{how}' is unknown; expected one of {', '.join(NEGATIVE_POLICIES)}"
            )
        key = ("<negative>", feature, how, self.dtype, str(self.device))
        if key not in self._cache:
            self._remember(key, self._negative(feature, how))
        return self._cache[key]

    def _negative(self, feature: str, how: str) -> torch.Tensor:
        if how == "black":
            black = Image.new("RGB", (self.image_size, self.image_size))
            return self._run(self.pixels([black]), feature)[0]
        if feature == "pooled":  # default and zeros agree
            return torch.zeros(self.pooled_dim, device=self.device, dtype=self.dtype)
        if how == "zeros":
            shape = (self._sequence_length(), self.hidden_dim)  # (S, F)
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        zeros = torch.zeros(1, 3, self.image_size, self.image_size)
        return self._run(zeros, feature)[0]

    def probe(self) -> torch.Tensor:
        """A few of the model's weights (float32): tells encoders apart whatever dtype they were loaded in."""
        if self._kind == "clip":
            weight = self.model.visual_projection.weight
        else:  # the pooling head's output layer, or the last encoder layer's when there is no head
            head = getattr(self._tower(), "head", None)
            weight = (
                head.mlp.fc2.weight if head is not None else self._tower().encoder.layers[-1].mlp.fc2.weight
            )
        return weight.detach().flatten()[:64].float().cpu()

    def _remember(self, key: tuple, value: torch.Tensor) -> None:
        self._cache[key] = value
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
