"""Noise images for negative image prompts, after ComfyUI_IPAdapter_plus's *IPAdapter Noise* node (cubiq).

A noisy picture (or a noisy version of the reference) used as the negative image prompt instead of a black one.
Four kinds: "fade" (blend towards uniform noise), "dissolve" (replace a random share of the values by uniform
noise), "gaussian" (add Gaussian noise) and "shuffle" (an elastic warp, a 180-degree turn, then multiplicative
Gaussian noise).

torchvision is not a dependency: the elastic warp and the Gaussian blurs are written here following
torchvision's ``ElasticTransform`` and ``gaussian_blur`` (reflect padding, separable normalised Gaussian kernel).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError

NOISE_KINDS = ("fade", "dissolve", "gaussian", "shuffle")
SHUFFLE_ALPHA = 75.0  # ComfyUI's elastic displacement magnitude
SHUFFLE_SIGMA = 3.5  # ComfyUI's elastic smoothness at strength 0 (times 1 - strength)
MIN_SIZE = 16


def noise_image(
    kind: str, strength: float, seed: int, image: Image.Image | None = None, size: int = 224, blur: int = 0
) -> Image.Image:
    """A ``size`` x ``size`` noise picture of ``kind`` (one of :data:`NOISE_KINDS`) at ``strength`` in [0, 1].

    The start is black, or ``image`` centre-cropped to a square (torchvision ``CenterCrop`` rounding) and resized
    to ``size`` x ``size`` (bicubic), as float32 values in [0, 1] laid out (1, size, size, 3) like ComfyUI's
    tensors. Then, with ``s`` the strength:

    - fade: ``image * (1 - s) + U * s``;
    - dissolve: where ``U1 < s`` the value becomes ``U2``;
    - gaussian: ``image + N * s``;
    - shuffle: an elastic warp (torchvision's ``ElasticTransform``, alpha 75, sigma ``(1 - s) * 3.5``), a vertical
      then a horizontal flip, then ``image * (1 - n) + n`` with ``n = N * (0.75 s)``;

    (``U``: uniform in [0, 1), ``N``: standard normal), clamped to [0, 1], then blurred when ``blur > 0`` (Gaussian,
    kernel ``blur`` made odd, sigma ``0.15 k + 0.35`` as torchvision's default) and rounded to 8-bit RGB.

    Randomness is deterministic from ``seed``: one ``torch.Generator`` seeded with it, drawn in the order of
    ComfyUI's code (including the two draws with which torchvision's random flips decide to flip). ComfyUI seeds
    the global generator with the sum of the image instead; here a job's seed decides, so the same job gives the
    same pixels and another seed another noise.
    """
    _check(kind, strength, seed, size, blur)
    strength = float(strength)
    gen = torch.Generator().manual_seed(seed)
    base = _start(image, size)  # (1, S, S, 3)
    shape = base.shape
    if kind == "fade":
        out = base * (1 - strength) + torch.rand(shape, generator=gen) * strength
    elif kind == "dissolve":
        chosen = (torch.rand(shape, generator=gen) < strength).float()
        out = base * (1 - chosen) + torch.rand(shape, generator=gen) * chosen
    elif kind == "gaussian":
        out = base + torch.randn(shape, generator=gen) * strength
    else:  # shuffle
        warped = _elastic(base.permute(0, 3, 1, 2), SHUFFLE_ALPHA, (1 - strength) * SHUFFLE_SIGMA, gen)
        torch.rand(1, generator=gen)  # torchvision's RandomVerticalFlip(p=1) draws before flipping
        torch.rand(1, generator=gen)  # and so does RandomHorizontalFlip(p=1)
        warped = warped.flip(-2).flip(-1).permute(0, 2, 3, 1)
        mult = torch.randn(warped.shape, generator=gen) * (strength * 0.75)
        out = warped * (1 - mult) + mult
    out = out.clamp(0, 1)
    if blur > 0:
        k = blur + 1 if blur % 2 == 0 else blur
        out = _gaussian_blur(out.permute(0, 3, 1, 2), k, _blur_sigma(k)).permute(0, 2, 3, 1)
    pixels = np.round(out[0].numpy() * 255.0).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _check(kind: str, strength: float, seed: int, size: int, blur: int) -> None:
    if kind not in NOISE_KINDS:
        raise InputError(f"noise kind '{kind}' is not one of {', '.join(NOISE_KINDS)}")
    if (
        isinstance(strength, bool)
        or not isinstance(strength, int | float)
        or not 0.0 <= float(strength) <= 1.0
    ):
        raise InputError(f"noise strength is {strength!r}; expected a number from 0 to 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise InputError(f"noise seed is {seed!r}; expected a whole number from 0 to 2**64 - 1")
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise InputError(f"noise size is {size!r}; expected a whole number of pixels, at least {MIN_SIZE}")
    if isinstance(blur, bool) or not isinstance(blur, int) or not 0 <= blur < size:
        raise InputError(f"noise blur is {blur!r}; expected a whole number from 0 to {size - 1} (0 for none)")


def _start(image: Image.Image | None, size: int) -> torch.Tensor:
    """The picture to make noisy, (1, size, size, 3) float32 in [0, 1] (bicubic may overshoot slightly)."""
    if image is None:
        return torch.zeros(1, size, size, 3)
    rgb = image.convert("RGB")
    side = min(rgb.size)
    if side < 1:
        raise InputError(f"noise image is {rgb.width}x{rgb.height} pixels; expected a non-empty image")
    top = int(round((rgb.height - side) / 2.0))  # torchvision CenterCrop rounding
    left = int(round((rgb.width - side) / 2.0))
    square = np.asarray(rgb.crop((left, top, left + side, top + side)), dtype=np.float32) / np.float32(255.0)
    channels = []
    for c in range(3):  # resized in float ("F") so no 8-bit rounding sits between crop and noise
        plane = Image.fromarray(np.ascontiguousarray(square[:, :, c]), "F")
        channels.append(np.asarray(plane.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32))
    return torch.from_numpy(np.stack(channels, axis=-1))[None]


def _gaussian_kernel1d(k: int, sigma: float) -> torch.Tensor:
    """torchvision's normalised 1-D Gaussian over ``k`` taps centred on the middle one."""
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, steps=k)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    return weights / weights.sum()


def _gaussian_blur(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """Blur a (N, C, H, W) float tensor with a ``k`` x ``k`` Gaussian (odd ``k``), reflect-padded, as torchvision."""
    kernel1d = _gaussian_kernel1d(k, sigma).to(x.dtype)
    kernel = torch.outer(kernel1d, kernel1d).expand(x.shape[1], 1, k, k)
    pad = k // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])


def _elastic(x: torch.Tensor, alpha: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision's ``ElasticTransform`` (bilinear, fill 0) of a (1, C, H, W) float tensor.

    Displacements: uniform noise in [-1, 1), (1, 1, H, W) for x then for y, each Gaussian-blurred (kernel
    ``int(8 sigma + 1)`` made odd; none when sigma is 0) and scaled by ``alpha / H`` (x) and ``alpha / W`` (y),
    added to the identity sampling grid of ``grid_sample`` (align_corners False). As torchvision with a fill value,
    a ones channel is sampled alongside and the result multiplied by it (fill 0 fades the edges to black).
    """
    _, _, height, width = x.shape
    fields = []
    for extent in (height, width):  # torchvision scales dx by size[0] (H) and dy by size[1] (W)
        d = torch.rand((1, 1, height, width), generator=gen) * 2 - 1
        if sigma > 0.0:
            k = int(8 * sigma + 1)
            k = k + 1 if k % 2 == 0 else k
            d = _gaussian_blur(d, k, sigma)
        fields.append(d * alpha / extent)
    displacement = torch.cat(fields, dim=1).permute(0, 2, 3, 1)  # (1, H, W, 2): x then y
    xs = torch.linspace((1 - width) / width, (width - 1) / width, width)
    ys = torch.linspace((1 - height) / height, (height - 1) / height, height)
    identity = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]  # (1, H, W, 2)
    grid = identity + displacement
    with_ones = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    sampled = F.grid_sample(with_ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled[:, :-1] * sampled[:, -1:]


def _blur_sigma(kernel: int) -> float:
    """torchvision's default Gaussian sigma for a kernel of ``kernel`` taps: ``0.3 ((k - 1) / 2 - 1) + 0.8``."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
