"""What makes an adapter file unusable though its layout was recognised.

:func:`problems` lists them: ``image_proj`` tensors missing, unexpected or of the wrong shape for the detected
layout (so attaching would fail), and weights that are not finite (NaN or inf: every image would come out
black). ``ipadapter inspect`` reports them and :func:`ipadapter.attach` refuses such a file before it touches
the pipeline.
"""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .projection import build_projection
from .variants import AdapterSpec

LISTED = 4  # names shown per kind of problem; the rest are counted


def problems(ckpt: Checkpoint, spec: AdapterSpec) -> list[str]:
    """Every reason ``ckpt`` (detected as ``spec``) cannot be used, one phrase each; empty when it is fine."""
    found = _projection_problems(ckpt, spec)
    bad = [f"image_proj.{k}" for k, t in ckpt.image_proj.items() if not _finite(t)]
    bad += [f"ip_adapter.{k}" for k, t in ckpt.ip_adapter.items() if not _finite(t)]
    if bad:
        found.append(f"non-finite weights (NaN or inf) in {_names(bad)}")
    return found


def _projection_problems(ckpt: Checkpoint, spec: AdapterSpec) -> list[str]:
    with torch.device("meta"):  # the layout's shapes without allocating its weights
        want = {k: tuple(t.shape) for k, t in build_projection(spec).state_dict().items()}
    have = {k: tuple(t.shape) for k, t in ckpt.image_proj.items()}
    found = []
    missing = sorted(set(want) - set(have))
    if missing:
        found.append(f"image_proj is missing {_names(missing)} (the {spec.layout} layout needs them)")
    extra = sorted(set(have) - set(want))
    if extra:
        found.append(f"image_proj has unexpected {_names(extra)} (not part of the {spec.layout} layout)")
    common = sorted(set(want) & set(have))
    shapes = [f"{k} {list(have[k])} (expected {list(want[k])})" for k in common if want[k] != have[k]]
    if shapes:
        found.append(f"image_proj shapes do not fit the {spec.layout} layout: {_names(shapes)}")
    return found


def _finite(t: torch.Tensor) -> bool:
    # meta tensors (shapes only, e.g. a layout check without weights) have no values to judge
    return not t.is_floating_point() or t.is_meta or bool(torch.isfinite(t).all())


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")
