"""Influence maps: where each adapter (and each reference) acted on the picture.

At every cross-attention layer and denoising step, the image branch adds ``to_out(w * Attn(Q, K_ip, V_ip))`` to
the layer's output (``w``: the scale, block weight, step window, mask and reference weight that actually ran).
An :class:`~ipadapter.prompt.recording.InfluenceRecorder` passed with a call records the norm of that
contribution at every query position, and the norm of the text branch's at the same positions, for the
positive (conditional) rows of the batch. They are averaged over each transformer block's layers and over the
run's steps, and upsampled to the output: :class:`InfluenceMaps` (numpy only: front ends read it without torch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class InfluenceMaps:
    """Recorded influence of every adapter / reference on each output picture.

    ``norms``: ``(images, panels, blocks, H, W)`` float32 at the output's size: per block, the mean over the
    block's layers and over every denoising step (steps where the branch did not act count as 0) of
    ``||to_out(contribution)||`` at each pixel. ``ratios``: the same shape, the image branch's norm divided by the
    text branch's at the same place (0 where the text branch is 0). ``panels``: a label per panel (an adapter, or
    one reference of an adapter), ``blocks``: a label per transformer block (e.g. ``"t3 down_blocks.2.attentions.1"``).
    ``images``: one per output picture (a video's frames are averaged into one).
    """

    norms: np.ndarray
    ratios: np.ndarray
    panels: list[str]
    blocks: list[str]

    def total(self) -> np.ndarray:
        """``(images, panels, H, W)``: the norm summed over blocks (the whole denoiser's influence)."""
        return self.norms.sum(axis=2)

    @staticmethod
    def join(parts: list[InfluenceMaps]) -> InfluenceMaps:
        """The maps of several calls of one job (its chunks of images), pictures in order."""
        first = parts[0]
        norms = np.concatenate([part.norms for part in parts])
        return InfluenceMaps(
            norms, np.concatenate([part.ratios for part in parts]), first.panels, first.blocks
        )
