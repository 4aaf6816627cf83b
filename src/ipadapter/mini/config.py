"""The miniature build's settings: one :class:`BuildConfig`, checked when it is made.

Its defaults are the shipped family's (a test compares them with the shipped ``build_record.json``);
``python -m ipadapter.mini.build --set name=value`` overrides any field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class BuildConfig:
    """Sizes and budgets of the build. The defaults are the shipped model's; tests shrink them."""

    out: str
    seed: int = 0
    size: int = 32  # image side
    train_images: int = 12000
    eval_images: int = 300
    width: int = 64  # CLIP hidden size = UNet cross-attention dim
    clip_layers: int = 3
    patch: int = 4  # CLIP vision patch side
    clip_group: int = 4  # CLIP batches are groups this big sharing colour + background (shape hard negatives)
    vae_channels: tuple[int, ...] = (16, 32)  # len - 1 = downsamplings (latent side = size / 2**that)
    vae_attention: bool = False  # self-attention in the VAE's mid block (costly, little use at this size)
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_attention: tuple[int, ...] = (0, 1, 0)  # per UNet level: 1 = cross-attention (where prompts act)
    clip_steps: int = 1200
    clip_batch: int = 128
    drawn_images: int = 300  # held-out references drawn differently (data/drawn)
    vision_steps: int = 12000  # vision tower retrained against the frozen text tower (0: keep the joint one)
    vision_batch: int = 128
    vision_lr: float = 2e-3
    vision_aux: float = 2.0  # weight of the attribute heads' loss
    vision_drawn: int = 12000  # extra training pictures drawn turned / resized / moved (training pairings)
    vision_unnamed: int = 0  # ... and drawn in colours no caption names (recolouring does this more cheaply)
    vision_patch: int = 8  # > 0: a new vision tower with this patch side (0: retrain the joint one)
    vision_width: int = 128  # ... its hidden size (0: the joint tower's)
    vision_layers: int = 4  # ... its depth (0: the joint tower's)
    vision_recolour: float = 0.5  # share of each batch recoloured (channels reordered / inverted): shape only
    vision_text: str = ""  # a CLIPModel folder whose text tower is the target ("": this build's clip stage)
    vae_steps: int = 2000
    vae_batch: int = 32
    unet_steps: int = 4000
    unet_partial: float = (
        0.15  # share of UNet examples conditioned on the scene phrase only (and again: object only)
    )
    unet_batch: int = 64
    unet_noise_offset: float = 0.15  # offset noise: std of a per-channel constant in the UNet's noise
    adapter_steps: int = 3000
    adapter_batch: int = 32
    adapter_lr: float = 1e-3  # the basic adapter's learning rate
    adapter_plus_lr: float = 2e-3  # the plus adapter's (2e-3 beat 1e-3 on every score)
    adapter_drop_text: float = 0.05  # captions the trainer empties at random (classifier-free guidance)
    adapter_scene_only: float = 0.5  # share of adapter captions cut to their background phrase
    adapter_swap: float = 0.3  # share of adapter examples whose reference shows another background
    adapter_empty: float = 0.8  # share of the other examples given an empty caption (in the manifest)
    adapter_drawn: float = 0.0  # share of the other examples whose reference is the same scene drawn anew
    lr: float = 1e-3
    threads: int = 2
    log: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        rates = {"lr": self.lr, "vision_lr": self.vision_lr, "adapter_lr": self.adapter_lr,
                 "adapter_plus_lr": self.adapter_plus_lr}  # fmt: skip
        for name, value in rates.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}: expected a learning rate, a finite number > 0")
        if not (math.isfinite(self.unet_noise_offset) and self.unet_noise_offset >= 0):
            raise ValueError(
                f"unet_noise_offset={self.unet_noise_offset!r}: expected a finite number >= 0 (0: plain noise)"
            )
        levels, flags = len(self.unet_channels), tuple(self.unet_attention)
        if len(flags) != levels or not set(flags) <= {0, 1} or 1 not in flags:
            raise ValueError(
                f"unet_attention={flags!r} does not fit unet_channels={tuple(self.unet_channels)!r}: expected "
                f"one 0 or 1 per UNet level ({levels}), at least one 1 (the prompts act through cross-attention)"
            )
