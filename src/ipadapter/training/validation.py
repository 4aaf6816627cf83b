"""Validation images: the adapter's output for a fixed reference and prompt, rendered as training goes.

Saved as ``validation/step-N.png`` in the run folder, and to TensorBoard when the run logs there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_path
from .config import TrainConfig


def render_validation(
    handle: Any, reference: Any, config: TrainConfig, device: torch.device, weight_dtype: torch.dtype
) -> Any:
    """The validation image (PIL) from the adapter's current weights (``handle``: the attached adapter)."""
    c = config
    handle.projection.eval()
    # the UNet may be in fp16/bf16 beside a float32 VAE (DeepSpeed casts the whole wrapped module)
    mixed = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with torch.no_grad(), mixed:
        image = handle(
            reference,
            prompt=c.validation_prompt,
            num_inference_steps=30 if c.resolution >= 256 else 4,
            height=c.resolution,
            width=c.resolution,
            generator=torch.Generator("cpu").manual_seed(c.seed),
        ).images[0]
    handle.projection.train()
    return image


def save_validation(image: Any, output: Path, step: int, trackers: list[Any]) -> Path:
    """``output/validation/step-N.png``, also given to a TensorBoard tracker among ``trackers``."""
    folder = output / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    with atomic_path(path) as temp:
        image.save(temp)
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(image), step, dataformats="HWC")
    return path
