"""One generation described as data (:class:`Job`), and what it made (:class:`Result`).

The command line, ``ipadapter batch`` and the server all describe a generation as a :class:`Job` (made by
:func:`ipadapter.jobs.options.job_from_options`) and run it with an :class:`~ipadapter.jobs.engine.Engine`, so
the same settings give the same pixels everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..errors import InputError
from ..modes import MODES
from ..prompt.influence import InfluenceMaps
from ..prompt.recipe import Recipe


class Cancelled(Exception):
    """Raised from a progress callback to stop a running job between two denoising steps."""


@dataclass(kw_only=True)
class Job:
    """Everything one generation needs; images are decoded PIL images, models are names or paths.

    ``recipe``: the image prompt (one or more adapters, their references and options); None runs the plain
    base model, without image prompt (to compare with and without it). ``per_frame``: for a
    video, the recipe's single adapter lists one reference per frame (or one for all) instead of references
    to combine. ``control_images``: one per ControlNet (for a video: one image or a list of frames each).
    ``seed`` None: the engine picks one and reports it. ``fps``: a video's frames per second (for the file).
    ``influence``: record influence maps (where each adapter and reference acted; the result's ``influence``).
    ``record``: what the result's parameters record besides the engine's (the inputs as the user named them;
    :func:`~ipadapter.jobs.options.job_from_options` fills it).
    """

    base: str
    recipe: Recipe | None = None
    mode: str = "t2i"
    per_frame: bool = False
    base_config: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    scheduler: str | None = None
    init: Image.Image | None = None
    strength: float | None = None
    mask: Image.Image | None = None
    controlnets: list[str] = field(default_factory=list)
    control_images: list[Any] = field(default_factory=list)
    control_scale: float | list[float] = 1.0
    motion_adapter: str | None = None
    frames: int = 16
    fps: float = 8.0
    vae_slicing: bool = False
    cpu_offload: bool = False
    influence: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"unknown mode '{self.mode}'; expected one of: {', '.join(MODES)}")
        if self.mode in ("img2img", "inpaint") and self.init is None:
            raise InputError(f"{self.mode} needs an init image")
        if self.mode == "inpaint" and self.mask is None:
            raise InputError("inpaint needs a mask (white = repaint)")
        if self.mode == "video" and not self.motion_adapter:
            raise InputError("video needs a motion adapter, e.g. guoyww/animatediff-motion-adapter-v1-5-2")
        if len(self.control_images) != len(self.controlnets):
            raise InputError(
                f"{len(self.controlnets)} ControlNets but {len(self.control_images)} control images; give one "
                "control image per ControlNet, in the same order"
            )
        if self.influence and self.recipe is None:
            raise InputError(
                "influence maps show where an image prompt acted, and this job has none (no adapter or recipe); "
                "give an adapter and a reference, or drop the influence map"
            )
        if self.per_frame and (self.mode != "video" or self.recipe is None or len(self.recipe.adapters) != 1):
            raise InputError("one reference per frame needs a video and a single adapter")


@dataclass
class Result:
    """What a job made: images (or one video's frames), its parameters (as stored in the files), timings."""

    images: list[Image.Image]
    params: dict[str, Any]
    seed: int
    seconds: dict[str, float]
    video: bool = False
    influence: InfluenceMaps | None = None  # when the job asked for influence maps


ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all); may raise Cancelled
