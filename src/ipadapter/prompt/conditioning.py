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

Compile safety (DESIGN.md §1): the prompt is built before the pipeline runs and is never changed while the
UNet runs. Everything that varies per call (scales, block weights, the step window, group weights, masks) is
held twice: as Python values, which eager mode uses to skip a branch that contributes nothing, and as tensors,
which are what a ``torch.compile``-d UNet reads, so a new value never makes dynamo specialise or recompile.
The per-step facts (denoising progress, latent size) come in a separate :class:`Step` that the UNet's
pre-hook makes at every UNet call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError


class Step(NamedTuple):
    """What one UNet call adds to the prompt: made by the attached UNet's pre-hook, read by the processors.

    ``progress``: ``1 - t / num_train_timesteps`` of the running step, clamped to [0, 1]; a Python float in
    eager mode (one read per UNet call), a 0-d tensor under ``torch.compile`` (no ``.item()`` in the graph).
    ``latent_size``: ``(h, w)`` of the UNet's input (static under compile: it comes from a shape).
    ``negative``: for denoisers that run the negative half of guidance as a call of its own (Flux's true CFG),
    whether this call is that half (eager: a bool; compiled: a 0-d bool tensor); None when the batch holds
    both halves (see :class:`ImagePrompt`). ``tokens``: per adapter, image tokens made for this step (a
    time-conditioned projection), with the projection's own time embedding: ``(tokens, temb)`` in batch rows.
    ``text_tokens``: the prompt's token count, for denoisers whose attention runs text and image as one sequence
    (a Flux single block: text first).
    """

    progress: float | torch.Tensor
    latent_size: tuple[int, int]
    negative: bool | torch.Tensor | None = None
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    text_tokens: int = 0


def compiling() -> bool:
    """True while dynamo traces: then no decision may depend on a per-call value."""
    return torch.compiler.is_compiling()


def progress_of(remaining: torch.Tensor, total: float, *, as_tensor: bool) -> float | torch.Tensor:
    """The denoising progress ``1 - remaining / total`` clamped to [0, 1], from a denoiser call's timestep
    (``total``: the scheduler's training timesteps, or 1 for a flow-matching sigma). ``as_tensor``: for compiled
    code, a 0-d tensor (no ``.item()``); else a Python float, read once per call."""
    if as_tensor:
        return (1.0 - remaining.float() / total).clamp(0.0, 1.0)
    return min(max(1.0 - float(remaining) / total, 0.0), 1.0)


@dataclass(eq=False)
class BranchControl:
    """How one adapter's branch behaves in one call (all optional; defaults = the plain adapter).

    ``scale``: the adapter's strength for the call (None = 1.0; the handle fills in its own scale).
    ``layer_scales``: a multiplier per cross-attention layer (attn_processors order). ``window``: the branch
    acts while the denoising progress ``p = 1 - t / num_train_timesteps`` lies in ``[start, end]`` (both ends
    included). ``groups``: token counts per reference when the references are attended one at a time
    (regional masks); ``masks``: per group, a greyscale mask image (resized to the output size and binarised at
    0.5) or a ready ``(H, W)`` float tensor at the output size, or None (the whole image); ``group_weights``:
    per group, a multiplier of its output. ``value_weights``: ``(N,)`` multipliers of the image values per
    token (weighted references attended together).

    ``embeds_scaling``: how the weight enters the attention (:data:`~ipadapter.prompt.controls.EMBEDS_SCALINGS`).
    ``swaps``: per layer, whether the reference goes to the negative half of guidance and the positive half gets
    zero tokens there (the precise presets). ``boosts``: per layer, an absolute weight replacing
    ``scale x layer_scales`` (None where the scale rules; the adapter still stops at scale 0). ``row_weights`` /
    ``row_masks``: one reference per batch item (unfold): per item, a weight and a mask (None: everywhere), laid
    out like the tokens. ``references``: token counts per reference attended together (influence maps split the
    attention by them); ``labels``: a name per group (masked references) or per reference, for influence maps.
    """

    scale: float | None = None
    layer_scales: tuple[float, ...] | None = None
    window: tuple[float, float] = (0.0, 1.0)
    groups: tuple[int, ...] | None = None
    masks: tuple[Image.Image | torch.Tensor | None, ...] | None = None
    group_weights: tuple[float, ...] | None = None
    value_weights: torch.Tensor | None = None
    embeds_scaling: str = "V only"
    swaps: tuple[bool, ...] | None = None
    boosts: tuple[float | None, ...] | None = None
    row_weights: tuple[float, ...] | None = None
    row_masks: tuple[Image.Image | torch.Tensor | None, ...] | None = None
    references: tuple[int, ...] | None = None
    labels: tuple[str, ...] | None = None

    def layer_scale(self, layer: int) -> float:
        scale = 1.0 if self.scale is None else self.scale
        if self.boosts is not None and self.boosts[layer] is not None and scale != 0:
            return self.boosts[layer]
        return scale if self.layer_scales is None else scale * self.layer_scales[layer]

    def swapped(self, layer: int | torch.Tensor) -> bool:
        """Whether the reference acts through the negative half at ``layer`` (a precise preset's swap)."""
        return self.swaps is not None and not isinstance(layer, torch.Tensor) and self.swaps[layer]

    def active(self, progress: float) -> bool:
        start, end = self.window
        return (start <= 0 and end >= 1) or start <= progress <= end

    def weight(
        self, layer: int, progress: float | torch.Tensor, values: _Tensors
    ) -> float | torch.Tensor | None:
        """The multiplier of this branch's output at ``layer`` and this step; None = skip the branch.

        Eager: a Python float (None when the scale is 0 or the step is outside the window, so the output is
        exactly the model without this adapter). Compiled: a 0-d tensor, the window applied as a 0/1 gate.
        """
        if isinstance(progress, torch.Tensor):
            factor = values.scale if values.layers is None else values.scale * values.layers[layer]
            start, end = values.window[0], values.window[1]
            return factor * ((progress >= start) & (progress <= end)).to(factor.dtype)
        scale = self.layer_scale(layer)
        if scale == 0 or not self.active(progress):
            return None
        return scale

    def tensors(self, device: torch.device) -> _Tensors:
        """The per-call values as float32 tensors on ``device`` (what a compiled UNet reads)."""

        def put(values: Any) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        scale = 1.0 if self.scale is None else self.scale
        layers = self.layer_scales
        if self.boosts is not None:  # scale x (boost / scale) = the boost; nothing at scale 0
            count = len(self.boosts)
            relative = [1.0] * count if layers is None else list(layers)
            layers = tuple(
                (b / scale if scale else 0.0) if b is not None else relative[i]
                for i, b in enumerate(self.boosts)
            )
        return _Tensors(
            scale=put(scale),
            layers=None if layers is None else put(layers),
            window=put(self.window),
            group_weights=None if self.group_weights is None else put(self.group_weights),
            value_weights=None if self.value_weights is None else self.value_weights.to(device),
            row_weights=None if self.row_weights is None else put(self.row_weights),
        )


class _Tensors(NamedTuple):
    scale: torch.Tensor  # ()
    layers: torch.Tensor | None  # (layers,)
    window: torch.Tensor  # (2,) start, end
    group_weights: torch.Tensor | None  # (groups,)
    value_weights: torch.Tensor | None  # (N,)
    row_weights: torch.Tensor | None  # (R,): one reference per batch item


PLAIN = BranchControl()


@dataclass(eq=False)
class ImagePrompt:
    """Image tokens for one pipeline call.

    ``tokens`` and ``negative`` map an attached adapter's name to ``(P, R, N, D)`` tensors (``(P, N, D)``
    means R = 1). ``controls``: per adapter, a :class:`BranchControl` (none = full strength, every layer,
    every step). Facts of the call, which the handle fills in from the pipeline it runs:
    ``guidance`` (whether negatives lead the batch; None = read it from the batch size, which is
    ``(2 or 1) x prompts x images_per_prompt x frames``), ``images_per_prompt``, ``frames`` (1 for images),
    ``train_timesteps`` (the scheduler's ``num_train_timesteps``, for the step window), ``vae_scale`` (pixels
    per latent) and ``output_size`` (the ``(height, width)`` regional masks are prepared for).

    A token set whose key is not an adapter's name is served by the branches of adapter ``branch_of[key]`` (e.g.
    a composition image's tokens, with a control of their own). ``recorder``: an
    :class:`~ipadapter.prompt.influence.InfluenceRecorder` the branches report to (None: nothing is recorded).
    """

    tokens: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]
    guidance: bool | None = None
    controls: dict[str, BranchControl] = field(default_factory=dict)
    images_per_prompt: int = 1
    frames: int = 1
    train_timesteps: int = 1000
    vae_scale: int = 8
    output_size: tuple[int, int] | None = None
    branch_of: dict[str, str] = field(default_factory=dict)
    recorder: Any = None
    _values: dict[str, _Tensors] = field(default_factory=dict, repr=False)
    _sets: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _masks: dict[tuple[str, int, int, int], torch.Tensor] = field(default_factory=dict, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)
    _last_t: float | None = field(default=None, repr=False)
    _seen_t: torch.Tensor | None = field(default=None, repr=False)

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
        self.prepare()

    def prepare(self) -> ImagePrompt:
        """Make the per-call tensors (on the tokens' device) and the masks at ``output_size``.

        Run again after changing ``controls`` or ``output_size``; the handle does before every call.
        """
        self._values = {name: self.control(name).tensors(pos.device) for name, pos in self.tokens.items()}
        self._sets = {}
        for key in self.tokens:
            self._sets.setdefault(self.branch_of.get(key, key), []).append(key)
        self._masks = {}
        if self.output_size is not None:
            for name, pos in self.tokens.items():
                control = self.control(name)
                keyed = list(enumerate(control.masks or ()))  # per group; unfolded: per row, keyed ("row", r)
                keyed += [(("row", r), mask) for r, mask in enumerate(control.row_masks or ())]
                for group, mask in keyed:
                    if isinstance(mask, torch.Tensor) and tuple(mask.shape[-2:]) != tuple(self.output_size):
                        continue  # a ready mask for another size: checked against the size the call makes
                    if mask is not None:
                        full = self._full_mask(mask, self.output_size).to(pos.device)
                        self._masks[(name, group, *self.output_size)] = full
        self._cache = {}
        device = next(iter(self.tokens.values())).device if self.tokens else None
        self._last_t, self._seen_t = None, torch.full((), -1.0, device=device)
        return self

    def negative_call(self, timestep: torch.Tensor) -> bool | torch.Tensor:
        """Whether a denoiser call at ``timestep`` is the negative half of a split guidance.

        Flux pipelines run true classifier-free guidance as two transformer calls per step, the positive prompt
        first, then the negative one, at the same timestep: so the second call at an unchanged timestep is the
        negative one. Eager: a bool; compiled: a 0-d bool tensor (the last timestep is kept in a tensor). The
        memory of the last timestep is cleared by :meth:`prepare`, which the handle runs before every pipeline
        call: an ImagePrompt passed by hand to several calls needs ``prepare()`` before each.
        """
        t = timestep.detach().flatten()[0].float()
        if compiling():
            same = t == self._seen_t
            self._seen_t.copy_(t)
            return same
        value = float(t)
        same = self._last_t is not None and value == self._last_t
        self._last_t = value
        return same

    def values(self, name: str) -> _Tensors:
        return self._values[name]

    def sets(self, name: str) -> list[str]:
        """The token sets adapter ``name``'s branches serve: its own, then any ``branch_of`` names it."""
        return self._sets.get(name, [])

    def rows(
        self, name: str, batch: int, step: Step | None = None, swapped: bool = False
    ) -> torch.Tensor | None:
        """Tokens of adapter ``name`` laid out for a query batch of ``batch`` rows, or None if it has none.

        ``step``: the running call's :class:`Step`; tokens it made for this step win, and when it is the negative
        call of a split guidance, the rows are the negative tokens. ``swapped``: the reference's tokens go to the
        negative rows and the positive rows get zero tokens (a precise preset's swapped layer).
        """
        if step is not None and step.tokens is not None and name in step.tokens:
            return step.tokens[name][0]
        if swapped:
            pos = self.tokens[name]
            return self._laid(name, batch, pos=torch.zeros_like(pos), neg=pos)
        if step is not None and step.negative is not None:
            neg = self._laid(name, batch, self.negative[name])
            if isinstance(step.negative, torch.Tensor):  # compiled: no branching on the value
                return torch.where(step.negative, neg, self._laid(name, batch, self.tokens[name]))
            if step.negative:
                return neg
        return self._laid(name, batch)

    def _laid(
        self,
        name: str,
        batch: int,
        only: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        neg: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``rows`` from the stored tokens; ``only``: lay out this one half (a split guidance's call);
        ``pos`` / ``neg``: other tokens of the same shape in the two halves' places."""
        pos = self.tokens.get(name) if pos is None else pos
        if pos is None:
            return None
        if only is not None:
            prompts, refs, n, d = only.shape
            self._halves(name, batch, prompts, refs)  # refuses a batch these tokens cannot fill
            copies = batch // (prompts * refs)
            return only[:, None].expand(prompts, copies, refs, n, d).reshape(-1, n, d)
        prompts, refs, n, d = pos.shape
        halves = self._halves(name, batch, prompts, refs)
        laid_halves = [self.negative[name] if neg is None else neg, pos] if halves == 2 else [pos]
        copies = batch // (halves * prompts * refs)  # num_images_per_prompt (a frame's references repeat)
        laid = [h[:, None].expand(prompts, copies, refs, n, d).reshape(-1, n, d) for h in laid_halves]
        return torch.cat(laid) if len(laid) > 1 else laid[0]  # (batch, N, D)

    def _halves(self, name: str, batch: int, prompts: int, refs: int) -> int:
        """2 when negatives lead the batch (classifier-free guidance), else 1; any other layout is refused.

        Only shapes are read, so under ``torch.compile`` this is decided once, when the graph is traced.
        """
        if self.guidance is not None:
            halves = 2 if self.guidance else 1
        else:
            unit = prompts * self.images_per_prompt * max(self.frames, 1)
            halves = batch // unit if batch % unit == 0 and batch // unit in (1, 2) else 0
        if halves and batch % (halves * prompts) == 0 and (batch // (halves * prompts)) % refs == 0:
            return halves
        what = {None: "", True: "negative + positive ", False: "positive "}[self.guidance]
        if refs > 1:
            raise InputError(
                f"image prompt for adapter '{name}' has {refs} references per prompt (one per frame) but the "
                f"UNet runs {batch} rows ({what}for {prompts} prompt(s)); give as many references as frames, "
                "or one for all"
            )
        raise InputError(
            f"image prompt for adapter '{name}' serves {prompts} prompt(s) x {self.images_per_prompt} "
            f"image(s) x {self.frames} frame(s) ({what}rows) but the UNet runs a batch of {batch}; expected "
            "that many rows, or twice as many under classifier-free guidance. Give one reference per prompt"
        )

    def control(self, name: str) -> BranchControl:
        return self.controls.get(name, PLAIN)

    def _per_row(self, name: str, batch: int, per_ref: torch.Tensor, step: Step | None) -> torch.Tensor:
        """``per_ref`` (one entry per reference, ``(R, ...)``) laid out like the tokens: ``(batch, ...)``."""
        prompts, refs = self.tokens[name].shape[:2]
        split = step is not None and step.negative is not None
        halves = 1 if split else self._halves(name, batch, prompts, refs)
        copies = batch // (halves * prompts * refs)
        rest = per_ref.shape[1:]
        return per_ref[None, None].expand(halves * prompts, copies, *per_ref.shape).reshape(batch, *rest)

    def row_weights(self, name: str, batch: int, step: Step | None = None) -> torch.Tensor | None:
        """One reference per batch item (unfold): each row's weight, ``(batch, 1, 1)``; None without."""
        weights = self._values[name].row_weights
        if weights is None:
            return None
        return self._per_row(name, batch, weights, step)[:, None, None]

    def row_masks(
        self, name: str, batch: int, queries: int, step: Step, like: torch.Tensor
    ) -> torch.Tensor | None:
        """One reference per batch item (unfold): each row's mask on a layer grid of ``queries`` positions,
        ``(batch, queries, 1)``; None when no reference has a mask."""
        masks = self.control(name).row_masks
        if masks is None or all(m is None for m in masks):
            return None
        size = (step.latent_size[0] * self.vae_scale, step.latent_size[1] * self.vae_scale)

        def compute() -> torch.Tensor:
            grid = layer_grid(step.latent_size, queries)
            rows = []
            for r, mask in enumerate(masks):
                if mask is None:
                    rows.append(torch.ones(queries, device=like.device, dtype=like.dtype))
                    continue
                full = self._masks.get((name, ("row", r), *size))
                if full is None:
                    full = self._mask_now(mask, size)
                small = F.interpolate(full[None, None].to(like.device), size=grid, mode="bicubic")
                rows.append(small.reshape(-1).to(dtype=like.dtype))
            return self._per_row(name, batch, torch.stack(rows), step)[..., None]

        return self.cached(
            ("row-mask", name, batch, queries, size, like.dtype, step.negative is True), compute
        )

    def positive_rows(self, name: str, batch: int, step: Step) -> slice | None:
        """The batch rows of the positive (conditional) half, or None when this call is all negative."""
        if step.negative is not None:
            return None if bool(step.negative) else slice(0, batch)
        prompts, refs = self.tokens[name].shape[:2]
        halves = self._halves(name, batch, prompts, refs)
        return slice(batch // 2, batch) if halves == 2 else slice(0, batch)

    def mask_rows(
        self, name: str, group: int, queries: int, step: Step, like: torch.Tensor
    ) -> torch.Tensor | None:
        """Group ``group``'s mask of adapter ``name`` on a layer grid of ``queries`` positions: ``(1, L, 1)``.

        The mask (binarised at the output size) is resized to the layer's grid with bicubic interpolation, as
        diffusers' ``IPAdapterMaskProcessor.downsample`` does; the grid is found from the UNet input's size
        (each down stage halves it, rounding up), so any aspect ratio maps exactly.
        """
        masks = self.control(name).masks
        if masks is None or masks[group] is None:
            return None
        size = (step.latent_size[0] * self.vae_scale, step.latent_size[1] * self.vae_scale)

        def compute() -> torch.Tensor:
            full = self._masks.get((name, group, *size))
            if full is None:
                full = self._mask_now(masks[group], size)
            grid = layer_grid(step.latent_size, queries)
            small = F.interpolate(full[None, None], size=grid, mode="bicubic")
            return small.reshape(1, -1, 1).to(device=like.device, dtype=like.dtype)

        return self.cached(("mask", name, group, queries, size, like.dtype), compute)

    def _mask_now(self, mask: Image.Image | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A mask for an output size nobody prepared: fine in eager mode, impossible inside a compiled UNet."""
        if compiling():
            raise InputError(
                f"a regional mask was prepared for an output of {self.output_size} but the compiled UNet makes "
                f"{size}; pass the output size when building the image prompt (output_size=(height, width))"
            )
        return self._full_mask(mask, size).to(self.tokens[next(iter(self.tokens))].device)

    @staticmethod
    def _full_mask(mask: Image.Image | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A mask at the output size ``(h, w)``; an image is binarised at 0.5 (diffusers'
        ``IPAdapterMaskProcessor``), a tensor is used as it is."""
        if isinstance(mask, torch.Tensor):
            if tuple(mask.shape[-2:]) != tuple(size):
                raise InputError(
                    f"regional mask tensor is {tuple(mask.shape)}, the output is {size}; give masks at the "
                    "output size or as images (they are resized)"
                )
            return mask.float()
        h, w = size
        resized = mask.convert("L").resize((w, h), Image.Resampling.LANCZOS)
        grey = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
        return (grey >= 0.5).float()

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """Memoise per-call work in eager inference (image keys/values are the same at every step).

        Training needs a graph per step, and a compiled UNet must not mutate Python state: both recompute.
        """
        if torch.is_grad_enabled() or compiling():
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def layer_grid(latent_size: tuple[int, int], queries: int) -> tuple[int, int]:
    """The ``(h, w)`` of the layer grid with ``queries`` positions for a denoiser input of ``latent_size``: each
    down stage halves it, rounding up (a Flux transformer's packed tokens: one halving)."""
    h, w = latent_size
    while h * w > queries and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != queries:
        raise InputError(
            f"cannot map a layer of {queries} positions onto a {latent_size} latent (regional masks and "
            "influence maps need its grid)"
        )
    return h, w
