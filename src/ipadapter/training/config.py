"""What a training run depends on: :class:`TrainConfig`, its validation, and the config of a resumed run.

A run folder keeps its config as ``train_config.json``; :func:`resumed_config` merges it with the options
given for a relaunch (what ``ipadapter train --resume`` does).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InputError

VARIANTS = ("basic", "plus", "faceid", "faceid-plus")
FACEID = ("faceid", "faceid-plus")  # read a precomputed face embedding per example (DESIGN.md §3.6)
LORA_RANK = 128  # the FaceID UNet LoRA's rank in the official files
PLUS_VERSIONS = ("v1", "v2")
CONFIG = "train_config.json"

# Fields that may change when a run is resumed (they do not change what the finished run computes).
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_image",
                     "validation_face", "validation_prompt", "num_workers", "report_to", "log_every", "resume",
                     "export_dtype", "output", "base_config", "cache_dir", "deterministic"}  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``output`` is the run folder."""

    base: str
    data: str
    output: str
    variant: str = "plus"
    image_encoder: str | None = None
    base_config: str | None = None
    init_adapter: str | None = None
    resolution: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_steps: int = 1000
    num_tokens: int | None = None  # default: 4 (basic, FaceID), 16 (plus)
    lora_rank: int | None = None  # FaceID: the UNet LoRA's rank (default 128; 0: no LoRA)
    plus_version: str = "v1"  # faceid-plus: v2 trains the shortcut (tokens = face tokens + resampler)
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    noise_offset: float = 0.0  # std of a per-example, per-channel constant added to the noise (offset noise)
    seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = None
    random_crop: bool = False
    random_flip: bool = False
    cache_dir: str | None = None  # precomputed latents/features (centre crops only)
    image_column: str = "image"
    text_column: str = "text"
    face_column: str = "face"  # FaceID: a face-embeddings file per example
    reference_column: str = "reference"  # manifests: the picture the encoder sees instead of the image
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0
    validation_image: str | None = None
    validation_face: str | None = None  # FaceID: the face-embeddings file validation images use
    validation_prompt: str = ""
    export_dtype: str = "float16"
    num_workers: int = 0
    log_every: int = 10
    report_to: str = "auto"  # auto (tensorboard when installed) | tensorboard | none
    deterministic: bool = False  # deterministic CUDA kernels: a rerun or a resumed run repeats bit for bit
    resume: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(
                f"variant '{self.variant}' is not trainable; expected one of {', '.join(VARIANTS)}"
            )
        if self.resolution <= 0 or self.resolution % 8:
            problems.append(
                f"resolution {self.resolution} is not a positive multiple of 8 (try "
                f"{max(8, self.resolution // 8 * 8)})"
            )
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)} must be at least 1")
        if self.num_tokens is not None and self.num_tokens < 1:
            problems.append(f"num_tokens {self.num_tokens} must be at least 1")
        for name in ("warmup_steps", "validate_every", "num_workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} {getattr(self, name)} must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr {self.lr} must be a positive number")
        drops = (self.drop_text, self.drop_image, self.drop_both)
        if any(not 0 <= d <= 1 for d in drops) or sum(drops) > 1:
            problems.append(
                f"drop rates text {self.drop_text}, image {self.drop_image}, both {self.drop_both} "
                "must each be in [0, 1] and sum to at most 1"
            )
        if not (math.isfinite(self.noise_offset) and self.noise_offset >= 0):
            problems.append(
                f"noise_offset {self.noise_offset} must be a number >= 0 (0: plain noise; the base model's own "
                "training offset, often 0.1, when it had one)"
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed precision '{self.mixed_precision}' is not one of no, fp16, bf16")
        if self.export_dtype not in ("float16", "float32", "bfloat16"):
            problems.append(f"export dtype '{self.export_dtype}' is not one of float16, float32, bfloat16")
        if self.report_to not in ("auto", "tensorboard", "none"):
            problems.append(f"report_to '{self.report_to}' is not one of auto, tensorboard, none")
        if self.cache_dir and (self.random_crop or self.random_flip):
            problems.append(
                "a feature cache stores centre crops; it cannot be used with random crops or flips"
            )
        problems += self._face_problems()
        if self.validate_every and not (self.validation_face if self.faceid else self.validation_image):
            given = (
                "face file is given (--validation-face)"
                if self.faceid
                else "image is given (--validation-image)"
            )
            problems.append(f"validate_every is set but no validation {given}")
        if problems:
            raise InputError("; ".join(problems))

    def _face_problems(self) -> list[str]:
        """What only the FaceID variants take, given to another variant (or the other way round)."""
        problems = []
        if self.lora_rank is not None and not self.faceid:
            problems.append(
                f"--lora-rank applies to the FaceID variants (faceid, faceid-plus), not {self.variant}; drop it"
            )
        if self.lora_rank is not None and self.lora_rank < 0:
            problems.append(f"lora_rank {self.lora_rank} must be >= 0 (0: no LoRA)")
        if self.plus_version not in PLUS_VERSIONS:
            problems.append(f"plus_version '{self.plus_version}' is not one of {', '.join(PLUS_VERSIONS)}")
        elif self.plus_version != "v1" and self.variant != "faceid-plus":
            problems.append(f"--plus-version applies to faceid-plus, not {self.variant}; drop it")
        if self.faceid and self.validation_image:
            problems.append(
                f"a {self.variant} adapter validates with a face (--validation-face FILE), not --validation-image"
            )
        if not self.faceid and self.validation_face:
            problems.append(f"--validation-face is for the FaceID variants; a {self.variant} adapter takes "
                            "--validation-image")  # fmt: skip
        if self.variant == "faceid" and self.image_encoder:
            problems.append(
                "a faceid adapter reads the face embedding only, no image features; drop --image-encoder"
            )
        return problems

    @property
    def faceid(self) -> bool:
        """Whether the variant reads a face embedding per example (faceid, faceid-plus)."""
        return self.variant in FACEID

    @property
    def lora(self) -> int:
        """The UNet LoRA's rank (0: none; always 0 outside the FaceID variants)."""
        if not self.faceid:
            return 0
        return LORA_RANK if self.lora_rank is None else self.lora_rank

    @property
    def tokens(self) -> int:
        return self.num_tokens or (16 if self.variant == "plus" else 4)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a saved run's config in a way that would change its result."""
        out = []
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES or f.name not in saved:
                continue
            if saved[f.name] != getattr(self, f.name):
                out.append(f"{f.name}: run has {saved[f.name]!r}, now {getattr(self, f.name)!r}")
        return out


def resumed_config(given: Mapping[str, Any], resume: str | Path | None = None) -> TrainConfig:
    """The config of a new run (``resume`` None) or of the run stored in the folder ``resume``.

    ``given``: the options that are set, as :class:`TrainConfig` field names (leave out the unset ones). When
    resuming, the run's saved ``train_config.json`` fills in everything not given, and ``output`` is the
    run's own folder; a given option that would change the run's result is refused later, by
    :meth:`Trainer.setup <ipadapter.training.trainer.Trainer.setup>`. A new run needs base, data and output.
    """
    given = dict(given)
    saved: dict[str, Any] = {}
    if resume:
        if "output" in given and Path(given["output"]).resolve() != Path(resume).resolve():
            raise InputError(
                f"--resume '{resume}' and --output '{given['output']}' differ; a run resumes in its "
                "own folder: drop --output"
            )
        config_file = Path(resume) / CONFIG
        if not config_file.is_file():
            raise InputError(
                f"--resume: '{resume}' holds no training run ({CONFIG} missing); start a "
                "new run with --output"
            )
        saved = json.loads(config_file.read_text())
        given["output"] = str(resume)
    missing = [f"--{k}" for k in ("base", "data", "output") if k not in given and k not in saved]
    if missing:
        raise InputError(
            f"missing {', '.join(missing)}; a new run needs a base model, data and an output folder"
        )
    return TrainConfig(**{**saved, **given, "resume": bool(resume)})
