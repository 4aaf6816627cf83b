"""Recording influence maps inside the denoiser (see :mod:`ipadapter.prompt.influence` for what they are)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .blocks import Block
from .conditioning import layer_grid
from .influence import InfluenceMaps


class Contribution(NamedTuple):
    """Where one image-branch contribution was made: token set ``key`` (an adapter, or a set it serves),
    ``group`` (a masked reference attended on its own; None: the set's references together), the host ``layer``,
    how many leading query positions are ``text`` (a joint sequence), and the layer's output projection
    ``to_out`` (None: the contribution is measured as it is)."""

    key: str
    group: int | None
    layer: int
    text: int
    to_out: Any


def panel_names(sources: dict[str, str]) -> dict[str, str]:
    """How influence maps name each adapter (``sources``: name -> its file): the file's name, and the adapter's
    own name where two share a file."""
    stems = {name: Path(source).stem or name for name, source in sources.items()}
    counts = list(stems.values())
    return {name: stem if counts.count(stem) == 1 else f"{stem} ({name})" for name, stem in stems.items()}


class InfluenceRecorder:
    """Collects influence maps during one pipeline call (see the module docstring); :meth:`maps` gives them.

    Pass one to a call (``ip(image, influence=recorder, ...)``, ``run``, a recipe run); the handle calls
    :meth:`begin`. Recording reads the contributions the branches computed anyway and adds a norm per position
    (and, for several references attended together, their attention weights split per reference): it changes
    nothing in the picture. A compiled denoiser cannot record (side effects): the handle refuses it.
    """

    def __init__(self) -> None:
        self._panels: dict[tuple[str, int | None], int] = {}
        self.panels: list[str] = []
        self._blocks_of: dict[str, list[Block]] = {}
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._text: dict[int, torch.Tensor] = {}
        self._text_seen: set[tuple[int, int]] = set()
        self._layers_per_block: dict[int, int] = {}
        self._blocks: dict[int, Block] = {}
        self.calls = 0
        self.images = 1
        self.frames = 1
        self.output_size: tuple[int, int] | None = None

    def begin(self, prompt: Any, blocks_of: dict[str, list[Block]], names: dict[str, str]) -> None:
        """Get ready for a call with ``prompt``: ``blocks_of``, per adapter, the block of each of its layers (in
        layer order); ``names``: per adapter, how panels name it (e.g. ``"adapter0"``)."""
        self.__init__()
        self._blocks_of = dict(blocks_of)
        for blocks in blocks_of.values():
            counts: dict[int, int] = {}
            for block in blocks:
                counts[block.index] = counts.get(block.index, 0) + 1
                self._blocks[block.index] = block
            for index, count in counts.items():
                self._layers_per_block[index] = max(self._layers_per_block.get(index, 0), count)
        for key in prompt.tokens:
            adapter = prompt.branch_of.get(key, key)
            name = names.get(adapter, adapter)
            if key != adapter:
                name = f"{name} · {key.removeprefix(adapter).strip('/: ')}"
            control = prompt.control(key)
            count = len(control.groups) if control.groups is not None else len(control.references or ())
            labels = control.labels or tuple(f"reference {i}" for i in range(count))
            if count > 1:
                for i in range(count):
                    self._panel((key, i), f"{name} · {labels[i]}")
            else:
                self._panel((key, None), name)
        first = next(iter(prompt.tokens.values()))
        self.frames = max(int(prompt.frames), 1)
        self.images = int(first.shape[0]) * int(prompt.images_per_prompt)
        self.output_size = prompt.output_size

    def _panel(self, where: tuple[str, int | None], label: str) -> None:
        self._panels[where] = len(self.panels)
        self.panels.append(label)

    def count(self, negative: bool | torch.Tensor | None) -> None:
        """A denoiser call began (its pre-hook): the negative call of a split guidance does not count."""
        if negative is None or not bool(negative):
            self.calls += 1

    @torch.no_grad()
    def add(
        self,
        prompt: Any,
        step: Any,
        where: Contribution,
        part: torch.Tensor,
        base: torch.Tensor,
        attention: tuple | None = None,
    ) -> None:
        """Record ``part`` (B, L, inner), the contribution the branch added at ``where``, against the text
        branch's ``base`` (the same shape). ``attention``: ``(query, key, value, after, mask)`` as the branch used
        them, to split several references attended together."""
        batch = part.shape[0]
        rows = prompt.positive_rows(where.key, batch, step)
        blocks = self._blocks_of.get(prompt.branch_of.get(where.key, where.key))
        if rows is None or blocks is None or self.calls == 0:
            return
        block = blocks[where.layer].index
        control = prompt.control(where.key)
        panel = self._panels.get((where.key, where.group), self._panels.get((where.key, None)))
        pieces = [(panel, part)]
        counts = control.references
        if where.group is None and counts is not None and len(counts) > 1 and attention is not None:
            pieces = [
                (self._panels.get((where.key, i)), piece)
                for i, piece in enumerate(_per_reference(attention, counts, batch, part.shape[-1]))
            ]
        for panel, piece in pieces:
            if panel is None:
                continue
            grid = self._norms(piece[rows], where, step)
            self._sums[(panel, block)] = self._sums.get((panel, block), 0) + grid
        seen = (where.layer, self.calls)
        if seen not in self._text_seen:
            self._text_seen.add(seen)
            self._text[block] = self._text.get(block, 0) + self._norms(base[rows], where, step)

    def _norms(self, x: torch.Tensor, where: Contribution, step: Any) -> torch.Tensor:
        """``||to_out(x)||`` per image position, as ``(images, h, w)`` (frames summed)."""
        x = x[:, where.text :]
        if where.to_out is not None:
            x = F.linear(x, where.to_out.weight.to(x.dtype))  # the projection's linear part: no bias
        norm = x.float().norm(dim=-1)  # (R, L)
        h, w = layer_grid(step.latent_size, norm.shape[1])
        frames = self.frames if norm.shape[0] % self.frames == 0 else 1
        return norm.reshape(-1, frames, h, w).sum(1)

    def maps(self) -> InfluenceMaps:
        """The recorded maps at the output size (see :class:`InfluenceMaps`)."""
        if self.output_size is None:
            raise InputError(
                "influence maps: nothing was recorded; pass the recorder to a pipeline call first"
            )
        height, width = self.output_size
        order = sorted(self._blocks)
        norms = np.zeros((self.images, len(self.panels), len(order), height, width), np.float32)
        ratios = np.zeros_like(norms)
        steps = max(self.calls, 1)
        for b, index in enumerate(order):
            text = self._text.get(index)
            for panel in range(len(self.panels)):
                total = self._sums.get((panel, index))
                if total is None:
                    continue
                count = steps * self._layers_per_block.get(index, 1) * self.frames
                norms[:, panel, b] = _upsampled(total / count, (height, width))[: self.images]
                if text is not None:
                    ratio = total / text.clamp_min(1e-12) * (text > 0)
                    ratios[:, panel, b] = _upsampled(ratio, (height, width))[: self.images]
        labels = [f"t{index} {self._blocks[index].name}".strip() for index in order]
        return InfluenceMaps(norms, ratios, list(self.panels), labels)


def _per_reference(attention: tuple, counts: tuple[int, ...], batch: int, inner: int) -> list[torch.Tensor]:
    """Each reference's share of one attention over several references' tokens: the attention weights on its
    tokens times their values (the shares add up to the whole attention's output)."""
    query, key, value, after, mask = attention
    scores = (query.float() @ key.float().transpose(-1, -2)) * query.shape[-1] ** -0.5
    probs = scores.softmax(dim=-1)  # (B, heads, L, N)
    out, start = [], 0
    for count in counts:
        share = probs[..., start : start + count] @ value[:, :, start : start + count].float()
        start += count
        share = share.transpose(1, 2).reshape(batch, -1, inner)
        if mask is not None:
            share = share * mask.float()
        out.append(share * (after.float() if isinstance(after, torch.Tensor) else after))
    return out


def _upsampled(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(images, h, w)`` -> ``(images, H, W)`` float32 numpy (bilinear)."""
    big = F.interpolate(grid[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return big[:, 0].cpu().numpy().astype(np.float32)
