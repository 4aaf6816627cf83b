"""What the build's stages share (build.py, vision.py): the minibatch training loop, batches, CLIP's pixel
normalisation, logging, records."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# CLIP's pixel normalisation (what a CLIPImageProcessor applies), for stages that feed towers tensors directly
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def uniform(n: int, batch: int) -> Callable[[torch.Generator], torch.Tensor]:
    """Batches of ``batch`` indices drawn uniformly from ``range(n)``."""
    return lambda gen: torch.randint(0, n, (min(batch, n),), generator=gen)


def train_loop(
    steps: int,
    optimizer: Any,
    gen: torch.Generator,
    sample: Callable[[torch.Generator], torch.Tensor],
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    log: Callable[[str], None] | None = None,
    name: str = "",
) -> list[float]:
    """Minibatch AdamW over ``sample(gen)`` index batches with a cosine learning-rate decay; returns the losses."""
    base = [g["lr"] for g in optimizer.param_groups]
    history = []
    started = time.perf_counter()
    for step in range(steps):
        if log and step and step % max(1, steps // 10) == 0:
            recent = float(np.mean(history[-max(1, steps // 10) :]))
            log(f"  {name} step {step}/{steps}: loss {recent:.4f}, {time.perf_counter() - started:.0f} s")
        for g, lr in zip(optimizer.param_groups, base, strict=True):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        loss = loss_fn(sample(gen))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        history.append(loss.item())
    return history


def say(config: Any, text: str) -> None:
    """Tell the build's log (``config.log``), or print."""
    (config.log or print)(text)


def loss_curve(history: list[float], points: int = 20) -> list[float]:
    """A short loss curve for the record: means over ``points`` equal spans."""
    if not history:
        return []
    spans = np.array_split(np.asarray(history, dtype=np.float64), min(points, len(history)))
    return [round(float(s.mean()), 5) for s in spans]


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """A shapes folder's metadata rows."""
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
