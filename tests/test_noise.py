"""Noise images against ComfyUI_IPAdapter_plus's IPAdapterNoise.make_noise, written out with the same draws.

ComfyUI seeds the global generator from the image sum; ours draws from a ``torch.Generator`` seeded with the job's
seed, so the references below take the same generator and draw in ComfyUI's order, layout (1, H, W, 3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.errors import InputError
from ipadapter.prompt.noise import NOISE_KINDS, noise_image

# ---------------------------------------------------------------------------------------------- ComfyUI, written out


def to_image(x: torch.Tensor) -> np.ndarray:
    """(1, H, W, 3) in [0, 1] -> (H, W, 3) uint8, rounded."""
    return np.round(x[0].numpy() * 255.0).astype(np.uint8)


def comfy_simple(kind: str, image: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """make_noise's fade / dissolve / gaussian branches, torch.rand_like -> torch.rand(shape, generator)."""
    if kind == "fade":
        noise = torch.rand(image.shape, generator=gen)
        noise = image * (1 - strength) + noise * strength
    elif kind == "dissolve":
        mask = (torch.rand(image.shape, generator=gen) < strength).float()
        noise = torch.rand(image.shape, generator=gen)
        noise = image * (1 - mask) + noise * mask
    else:
        noise = torch.randn(image.shape, generator=gen) * strength
        noise = image + noise
    return torch.clamp(noise, 0, 1)


def tv_blur(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """torchvision's gaussian_blur on (N, C, H, W): 2-D kernel from the 1-D pdf, reflect padding."""
    half = (k - 1) * 0.5
    pdf = torch.exp(-0.5 * (torch.linspace(-half, half, steps=k) / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(x.shape[-3], 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), k2, groups=x.shape[-3])


def tv_elastic(image: torch.Tensor, alpha: float, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """torchvision v2 ElasticTransform(alpha, sigma) (fill 0, bilinear) on (1, C, H, W)."""
    size = list(image.shape[-2:])
    dx = torch.rand([1, 1] + size, generator=gen) * 2 - 1
    if sigma > 0.0:
        kx = int(8 * sigma + 1)
        kx += 1 if kx % 2 == 0 else 0
        dx = tv_blur(dx, kx, sigma)
    dx = dx * alpha / size[0]
    dy = torch.rand([1, 1] + size, generator=gen) * 2 - 1
    if sigma > 0.0:
        ky = int(8 * sigma + 1)
        ky += 1 if ky % 2 == 0 else 0
        dy = tv_blur(dy, ky, sigma)
    dy = dy * alpha / size[1]
    displacement = torch.concat([dx, dy], 1).permute([0, 2, 3, 1])
    sy, sx = size
    grid = torch.empty(1, sy, sx, 2)
    grid[..., 0].copy_(torch.linspace((-sx + 1) / sx, (sx - 1) / sx, sx))
    grid[..., 1].copy_(torch.linspace((-sy + 1) / sy, (sy - 1) / sy, sy).unsqueeze_(-1))
    grid = grid.add_(displacement)
    img = torch.cat((image, torch.ones_like(image[:, :1])), dim=1)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = img[:, :-1], img[:, -1:].expand_as(img[:, :-1])
    return (img - 0.0) * mask + 0.0


def comfy_shuffle(image: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    x = tv_elastic(image.permute([0, 3, 1, 2]), 75.0, (1 - strength) * 3.5, gen)
    if torch.rand(1, generator=gen) < 1.0:  # RandomVerticalFlip(p=1.0)
        x = x.flip(-2)
    if torch.rand(1, generator=gen) < 1.0:  # RandomHorizontalFlip(p=1.0)
        x = x.flip(-1)
    image = x.permute([0, 2, 3, 1])
    noise = torch.randn(image.shape, generator=gen) * (strength * 0.75)
    return torch.clamp(image * (1 - noise) + noise, 0, 1)


# ---------------------------------------------------------------------------------------------- helpers


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def gradient(size: int) -> Image.Image:
    """Red grows left to right, green grows top to bottom."""
    ramp = np.linspace(0, 255, size)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0] = np.round(ramp)[None, :]
    pixels[..., 1] = np.round(ramp)[:, None]
    return Image.fromarray(pixels, "RGB")


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


# ---------------------------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("kind", ["fade", "dissolve", "gaussian"])
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_simple_kinds_match_comfy_from_black(kind: str, strength: float) -> None:
    ours = np.asarray(noise_image(kind, strength, seed=7, size=64))
    ref = comfy_simple(kind, torch.zeros(1, 64, 64, 3), strength, torch.Generator().manual_seed(7))
    np.testing.assert_array_equal(ours, to_image(ref))


@pytest.mark.parametrize("kind", ["fade", "dissolve", "gaussian"])
def test_simple_kinds_match_comfy_on_an_image(kind: str) -> None:
    image = picture(48, 48, seed=1)  # already size x size: no crop, no resize
    ours = np.asarray(noise_image(kind, 0.4, seed=123, image=image, size=48))
    ref = comfy_simple(kind, as_tensor(image), 0.4, torch.Generator().manual_seed(123))
    np.testing.assert_array_equal(ours, to_image(ref))
    assert not np.array_equal(ours, np.asarray(image))


@pytest.mark.parametrize("width,height", [(103, 60), (60, 103)])
def test_image_is_center_cropped_and_resized_bicubic(width: int, height: int) -> None:
    image = picture(width, height, seed=2)  # the crop starts at round(43 / 2) = round(21.5) = 22
    ours = np.asarray(noise_image("fade", 0.0, seed=0, image=image, size=32)).astype(np.float32) / 255

    def comfy(start: int) -> np.ndarray:
        x = as_tensor(image).permute(0, 3, 1, 2)
        x = x[..., :, start : start + 60] if width > height else x[..., start : start + 60, :]
        x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
        return x.clamp(0, 1).permute(0, 2, 3, 1)[0].numpy()

    np.testing.assert_allclose(ours, comfy(22), atol=1 / 255 + 1e-4)
    assert np.abs(comfy(21) - ours).max() > 2 / 255  # the test sees a one-pixel shift


@pytest.mark.parametrize("blur", [1, 2, 5])
def test_blur_matches_torchvision_gaussian_blur(blur: int) -> None:
    ours = np.asarray(noise_image("fade", 0.8, seed=3, size=40, blur=blur))
    noise = comfy_simple("fade", torch.zeros(1, 40, 40, 3), 0.8, torch.Generator().manual_seed(3))
    k = blur + 1 if blur % 2 == 0 else blur
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    ref = tv_blur(noise.permute(0, 3, 1, 2), k, sigma).permute(0, 2, 3, 1)
    np.testing.assert_allclose(ours.astype(np.int16), to_image(ref).astype(np.int16), atol=1)
    if blur > 1:
        assert np.asarray(noise_image("fade", 0.8, seed=3, size=40)).std() > ours.std() + 10


# ---------------------------------------------------------------------------------------------- shuffle


@pytest.mark.parametrize("strength", [0.0, 0.4, 1.0])
def test_shuffle_matches_torchvision_algorithm(strength: float) -> None:
    image = gradient(40)
    ours = np.asarray(noise_image("shuffle", strength, seed=11, image=image, size=40)).astype(np.int16)
    ref = comfy_shuffle(as_tensor(image), strength, torch.Generator().manual_seed(11))
    np.testing.assert_allclose(ours, to_image(ref).astype(np.int16), atol=1)


def test_shuffle_is_deterministic_and_seeded() -> None:
    image = picture(64, 64, seed=5)
    a = np.asarray(noise_image("shuffle", 0.6, seed=1, image=image, size=64))
    b = np.asarray(noise_image("shuffle", 0.6, seed=1, image=image, size=64))
    c = np.asarray(noise_image("shuffle", 0.6, seed=2, image=image, size=64))
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_shuffle_turns_the_picture_around() -> None:
    out = np.asarray(noise_image("shuffle", 0.2, seed=4, image=gradient(96), size=96)).astype(np.float32)
    inner = out[8:-8, 8:-8]  # away from the black fill the warp pulls in at the edges
    red, green = inner[..., 0], inner[..., 1]
    assert red[:, :20].mean() > red[:, -20:].mean() + 100  # red now grows right to left
    assert green[:20].mean() > green[-20:].mean() + 100  # green now grows bottom to top
    assert 0 <= out.min() and out.max() <= 255


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_shuffle_stays_in_range_and_changes_the_image(strength: float) -> None:
    image = picture(32, 32, seed=9)
    out = noise_image("shuffle", strength, seed=0, image=image, size=32)
    assert out.mode == "RGB" and out.size == (32, 32)
    assert not np.array_equal(np.asarray(out), np.asarray(image))


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_every_kind_gives_rgb_of_the_size(kind: str) -> None:
    out = noise_image(kind, 0.5, seed=0, size=24)
    assert out.mode == "RGB" and out.size == (24, 24)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "salt"}, "noise kind 'salt'"),
        ({"strength": 1.5}, "noise strength"),
        ({"strength": -0.1}, "noise strength"),
        ({"strength": float("nan")}, "noise strength"),
        ({"size": 8}, "noise size"),
        ({"seed": -1}, "noise seed"),
        ({"seed": 1.5}, "noise seed"),
        ({"blur": -1}, "noise blur"),
        ({"blur": 64}, "noise blur"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, match: str) -> None:
    args = {"kind": "fade", "strength": 0.5, "seed": 0, "size": 32, "blur": 0} | kwargs
    with pytest.raises(InputError, match=match):
        noise_image(**args)
