"""The per-call image prompt: image tokens per adapter, in the batch layout the UNet will see.

An :class:`ImagePrompt` reaches our attention processors through the pipeline's ``cross_attention_kwargs``
under the name ``image_prompt``. It holds, for each attached adapter, the positive tokens and the negative
(unconditional) tokens, each ``(P, R, N, D)``: P prompts, R references in a row (1, or one per video frame),
N tokens of width D. ``(P, N, D)`` is accepted as R = 1. The batch a processor sees is

    classifier-free guidance:  [negatives..., positives...]
    no guidance:               [positives...]

where each prompt's block holds its rows for num_images_per_prompt copies, and, in AnimateDiff, frames as
consecutive rows inside each copy. Diffusers builds its text batch the same way, so laying each prompt's R
references out as ``(copies, R)`` is always right; any other ratio is an error, never a silent broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError


@dataclass(eq=False)
class BranchControl:
    """How one adapter's branch behaves in one call (all optional; defaults = the plain adapter).

    ``scale``: replaces the adapter's scale for the call. ``layer_scales``: a multiplier per cross-attention
    layer (attn_processors order). ``window``: the branch acts while the denoising progress
    ``p = 1 - t / num_train_timesteps`` lies in ``[start, end]`` (both ends included).
    ``groups``: token counts per reference when the references are attended one at a time (regional masks);
    ``masks``: per group, a greyscale mask image (resized to the output size and binarised at 0.5 when the
    call runs) or a ready ``(H, W)`` float tensor at the output size, or None (the whole image);
    ``group_weights``: per group, a multiplier of its output. ``value_weights``: ``(N,)`` multipliers of the
    image values per token (weighted references attended together).
    """

    scale: float | None = None
    layer_scales: tuple[float, ...] | None = None
    window: tuple[float, float] = (0.0, 1.0)
    groups: tuple[int, ...] | None = None
    masks: tuple[Image.Image | torch.Tensor | None, ...] | None = None
    group_weights: tuple[float, ...] | None = None
    value_weights: torch.Tensor | None = None

    def layer_scale(self, layer: int, adapter_scale: float) -> float:
        scale = adapter_scale if self.scale is None else self.scale
        return scale if self.layer_scales is None else scale * self.layer_scales[layer]

    def active(self, progress: float | None) -> bool:
        start, end = self.window
        if progress is None or (start <= 0 and end >= 1):
            return True
        return start <= progress <= end


PLAIN = BranchControl()


@dataclass(eq=False)
class ImagePrompt:
    """Image tokens for one pipeline call.

    ``tokens`` and ``negative`` map an attached adapter's name to ``(P, R, N, D)`` tensors (``(P, N, D)``
    means R = 1). ``guidance`` says whether the call runs classifier-free guidance (negatives first); an
    attached adapter sets it from the running pipeline at the start of each UNet call.
    """

    tokens: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]
    guidance: bool = True
    controls: dict[str, BranchControl] = field(default_factory=dict)
    # Set by the attached UNet's pre-hook at every UNet call:
    progress: float | None = None  # 1 - t / num_train_timesteps of the running step
    latent_size: tuple[int, int] | None = None  # (h, w) of the UNet's input
    vae_scale: int = 8
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, pos in list(self.tokens.items()):
            neg = self.negative.get(name)
            if pos.ndim not in (3, 4) or neg is None or neg.shape != pos.shape:
                raise InputError(
                    f"image prompt for adapter '{name}': tokens {list(pos.shape)} and negative tokens "
                    f"{None if neg is None else list(neg.shape)}; expected two equal (prompts, [references,] "
                    "tokens, dim) tensors"
                )
            if pos.ndim == 3:
                self.tokens[name], self.negative[name] = pos.unsqueeze(1), neg.unsqueeze(1)

    def rows(self, name: str, batch: int) -> torch.Tensor | None:
        """Tokens of adapter ``name`` laid out for a query batch of ``batch`` rows, or None if it has none."""
        pos = self.tokens.get(name)
        if pos is None:
            return None
        halves = [self.negative[name], pos] if self.guidance else [pos]
        prompts, refs, n, d = pos.shape
        per_prompt, rest = divmod(batch, len(halves) * prompts)
        if rest or per_prompt % refs:
            what = "negative + positive" if self.guidance else "positive"
            if refs > 1:
                raise InputError(
                    f"image prompt for adapter '{name}' has {refs} references per prompt (one per frame) but "
                    f"the UNet runs {batch} rows ({what} for {prompts} prompt(s)); give as many references "
                    "as frames, or one for all"
                )
            raise InputError(
                f"image prompt for adapter '{name}' has {len(halves) * prompts} rows ({what} for {prompts} "
                f"prompt(s)) but the UNet runs a batch of {batch}; expected a whole multiple. Give one "
                "reference per prompt"
            )
        copies = per_prompt // refs  # num_images_per_prompt (a frame's references repeat per copy)
        laid = [h[:, None].expand(prompts, copies, refs, n, d).reshape(-1, n, d) for h in halves]
        return torch.cat(laid) if len(laid) > 1 else laid[0]  # (batch, N, D)

    def control(self, name: str) -> BranchControl:
        return self.controls.get(name, PLAIN)

    def mask_rows(self, name: str, group: int, queries: int, like: torch.Tensor) -> torch.Tensor | None:
        """Group ``group``'s mask of adapter ``name`` on a layer grid of ``queries`` positions: ``(1, L, 1)``.

        The mask (at the output size) is resized to the layer's grid with bicubic interpolation, as
        diffusers' ``IPAdapterMaskProcessor.downsample`` does; the grid is found from the UNet input's size
        (each down stage halves it, rounding up), so any aspect ratio maps exactly.
        """
        masks = self.control(name).masks
        mask = None if masks is None else masks[group]
        if mask is None:
            return None

        def compute() -> torch.Tensor:
            grid = self._grid(queries)
            full = self._at_output_size(mask) if isinstance(mask, Image.Image) else mask.float()
            small = F.interpolate(full[None, None], size=grid, mode="bicubic")
            return small.reshape(1, -1, 1).to(device=like.device, dtype=like.dtype)

        return self.cached(("mask", name, group, queries, like.dtype), compute)

    def _at_output_size(self, mask: Image.Image) -> torch.Tensor:
        """A greyscale mask at the output size, binarised at 0.5 (diffusers' ``IPAdapterMaskProcessor``)."""
        if self.latent_size is None:
            raise InputError("regional masks need the UNet's input size; run them through a pipeline call")
        h, w = (side * self.vae_scale for side in self.latent_size)
        key = ("mask-full", id(mask), h, w)

        def compute() -> torch.Tensor:
            resized = mask.convert("L").resize((w, h), Image.Resampling.LANCZOS)
            grey = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
            return (grey >= 0.5).float()

        return self.cached(key, compute)

    def _grid(self, queries: int) -> tuple[int, int]:
        if self.latent_size is None:
            side = math.isqrt(queries)
            if side * side != queries:
                raise InputError(f"cannot place a regional mask on a {queries}-position layer grid")
            return side, side
        h, w = self.latent_size
        while h * w > queries and (h > 1 or w > 1):
            h, w = -(-h // 2), -(-w // 2)
        if h * w != queries:
            raise InputError(
                f"cannot place a regional mask on a layer of {queries} positions for a {self.latent_size} latent"
            )
        return h, w

    def cached(self, key: tuple, compute):  # noqa: ANN001 - tiny internal memo
        """Memoise per-call work (image keys/values are the same at every denoising step)."""
        if torch.is_grad_enabled():  # training: every step needs its own graph
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]
