"""Tiled references, CAS sharpening and the ClipVision enhancer against ComfyUI_IPAdapter_plus's computations.

Each reference below is ComfyUI's computation written out in its own layout ((B, H, W, C) images, (B, H, W)
masks, torchvision-style (B, C, H, W) transforms done with torch) and order of operations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.errors import InputError
from ipadapter.prompt.tiles import (
    TILE_SIZE,
    enhance_features,
    enhance_rows,
    sharpen,
    split_grid,
    tile_reference,
)

# ---------------------------------------------------------------------------------------------- ComfyUI, written out


def comfy_cas(image: torch.Tensor, amount: float) -> torch.Tensor:
    """ComfyUI's contrast_adaptive_sharpening on a (B, C, H, W) tensor."""
    img = F.pad(image, (1, 1, 1, 1))
    a, b, c = img[..., :-2, :-2], img[..., :-2, 1:-1], img[..., :-2, 2:]
    d, e, f = img[..., 1:-1, :-2], img[..., 1:-1, 1:-1], img[..., 1:-1, 2:]
    g, h, i = img[..., 2:, :-2], img[..., 2:, 1:-1], img[..., 2:, 2:]
    mn = torch.clamp(torch.stack((b, d, e, f, h)).min(axis=0)[0], min=0)
    mx = torch.clamp(torch.stack((b, d, e, f, h)).max(axis=0)[0], max=1)
    mn2 = torch.clamp(torch.stack((a, c, g, i)).min(axis=0)[0], min=0)
    mx2 = torch.clamp(torch.stack((a, c, g, i)).max(axis=0)[0], max=1)
    mx = mx + mx2
    mn = mn + mn2
    amp = torch.reciprocal(mx) * torch.minimum(mn, (2 - mx))
    amp = torch.sqrt(amp)
    w = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    div = torch.reciprocal(1 + 4 * w)
    output = ((b + d + f + h) * w + e) * div
    return torch.nan_to_num(output).clamp(0, 1)


def center_crop(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """torchvision's CenterCrop on (..., H, W)."""
    height, width = x.shape[-2:]
    top = int(round((height - th) / 2.0))
    left = int(round((width - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's Resize(size, BICUBIC, antialias=True) on a (B, C, H, W) tensor."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(1, H, W, 3) float in [0, 1], as ComfyUI's IMAGE."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def comfy_tiled(image: torch.Tensor, attn_mask: torch.Tensor | None, sharpening: float = 0.0):
    """IPAdapterTiled.apply_tiled's tiles and masks, (1, 256, 256, 3) and (1, h, w) each."""
    tile_size = 256
    _, oh, ow, _ = image.shape
    if attn_mask is None:
        attn_mask = torch.ones([1, oh, ow])
    image = image.permute([0, 3, 1, 2])
    attn_mask = bicubic(attn_mask.unsqueeze(1), (oh, ow))
    if oh / ow > 0.75 and oh / ow < 1.33:
        image = center_crop(image, min(oh, ow), min(oh, ow))
        resize = (tile_size * 2, tile_size * 2)
        attn_mask = center_crop(attn_mask, min(oh, ow), min(oh, ow))
    else:
        resize = (int(tile_size * ow / oh), tile_size) if oh < ow else (tile_size, int(tile_size * oh / ow))
    pixels = np.round(image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    pil = Image.fromarray(pixels).resize(resize, resample=Image.Resampling.LANCZOS)
    image = to_tensor(pil).permute([0, 3, 1, 2])
    attn_mask = bicubic(attn_mask, resize[::-1])
    if oh / ow > 4 or oh / ow < 0.25:
        crop = (tile_size, tile_size * 4) if oh < ow else (tile_size * 4, tile_size)
        image = center_crop(image, *crop)
        attn_mask = center_crop(attn_mask, *crop)
    attn_mask = attn_mask.squeeze(1)
    if sharpening > 0:
        image = comfy_cas(image, sharpening)
    image = image.permute([0, 2, 3, 1])
    _, oh, ow, _ = image.shape
    tiles_x = math.ceil(ow / tile_size)
    tiles_y = math.ceil(oh / tile_size)
    overlap_x = max(0, (tiles_x * tile_size - ow) / (tiles_x - 1 if tiles_x > 1 else 1))
    overlap_y = max(0, (tiles_y * tile_size - oh) / (tiles_y - 1 if tiles_y > 1 else 1))
    base_mask = torch.zeros([attn_mask.shape[0], oh, ow])
    tiles, masks, starts = [], [], []
    for y in range(tiles_y):
        for x in range(tiles_x):
            start_x = int(x * (tile_size - overlap_x))
            start_y = int(y * (tile_size - overlap_y))
            tiles.append(image[:, start_y : start_y + tile_size, start_x : start_x + tile_size, :])
            mask = base_mask.clone()
            mask[:, start_y : start_y + tile_size, start_x : start_x + tile_size] = attn_mask[
                :, start_y : start_y + tile_size, start_x : start_x + tile_size
            ]
            masks.append(mask)
            starts.append((start_x, start_y))
    return tiles, masks, starts


def comfy_merge_hidden(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """ComfyUI's merge_hiddenstates."""
    out = []
    for embeds in x.split(tiles * tiles):
        tile_size = int((embeds.shape[1] - 1) ** 0.5)
        grid_size = int(embeds.shape[0] ** 0.5)
        avg_class_token = embeds[:, 0, :].mean(dim=0, keepdim=True).unsqueeze(0)
        reshaped = embeds[:, 1:, :].reshape(grid_size, grid_size, tile_size, tile_size, embeds.shape[-1])
        merged = torch.cat(
            [torch.cat([reshaped[i, j] for j in range(grid_size)], dim=1) for i in range(grid_size)], dim=0
        ).unsqueeze(0)
        pooled = F.adaptive_avg_pool2d(merged.permute(0, 3, 1, 2), (tile_size, tile_size)).permute(0, 2, 3, 1)
        flattened = pooled.reshape(1, tile_size * tile_size, embeds.shape[-1])
        out.append(torch.cat([avg_class_token, flattened], dim=1))
    return torch.cat(out, dim=0)


def comfy_merge_pooled(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """ComfyUI's merge_embeddings."""
    out = []
    for embeds in x.split(tiles * tiles):
        grid_size = int(embeds.shape[0] ** 0.5)
        tile_size = int(embeds.shape[1] ** 0.5)
        reshaped = embeds.reshape(grid_size, grid_size, tile_size, tile_size)
        merged = torch.cat(
            [torch.cat([reshaped[i, j] for j in range(grid_size)], dim=1) for i in range(grid_size)], dim=0
        ).unsqueeze(0)
        out.append(F.adaptive_avg_pool2d(merged, (tile_size, tile_size)).flatten(1))
    return torch.cat(out, dim=0)


def comfy_split_tiles(embeds: torch.Tensor, num_split: int) -> torch.Tensor:
    """ComfyUI's split_tiles on (B, H, W, C)."""
    _, H, W, _ = embeds.shape
    out = []
    for x in embeds:
        x = x.unsqueeze(0)
        h, w = H // num_split, W // num_split
        out.append(
            torch.cat(
                [
                    x[:, i * h : (i + 1) * h, j * w : (j + 1) * w, :]
                    for i in range(num_split)
                    for j in range(num_split)
                ],
                dim=0,
            )
        )
    return torch.stack(out, dim=0)


# ---------------------------------------------------------------------------------------------- helpers


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth shapes plus fine noise: LANCZOS, crops and CAS all leave a trace."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            0.5 + 0.4 * np.sin(xx / 17.0),
            0.5 + 0.4 * np.cos(yy / 11.0),
            (xx + yy) / (width + height),
        ],
        axis=-1,
    )
    base += rng.normal(0, 0.05, base.shape)
    return Image.fromarray(np.round(np.clip(base, 0, 1) * 255).astype(np.uint8), "RGB")


def as_float(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def check_against_comfy(image: Image.Image, mask: Image.Image | None = None, sharpening: float = 0.0):
    ours = tile_reference(image, mask, sharpening)
    comfy_mask = None if mask is None else to_tensor(mask.convert("RGB"))[..., 0]
    tiles, masks, starts = comfy_tiled(to_tensor(image), comfy_mask, sharpening)
    assert len(ours) == len(tiles)
    for (tile, tile_mask), ref_tile, ref_mask in zip(ours, tiles, masks, strict=True):
        assert tile.mode == "RGB" and tile.size == (TILE_SIZE, TILE_SIZE)
        assert tile_mask.mode == "L" and tile_mask.size == (ref_mask.shape[2], ref_mask.shape[1])
        np.testing.assert_allclose(as_float(tile), ref_tile[0].numpy(), atol=1 / 255 + 1e-6)
        # an "L" mask holds 0..255: bicubic overshoot of the user mask is clipped
        np.testing.assert_allclose(as_float(tile_mask), ref_mask[0].clamp(0, 1).numpy(), atol=1 / 255 + 1e-4)
    return ours, starts


def rectangle(mask: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the mask's non-zero pixels."""
    ys, xs = np.nonzero(np.asarray(mask))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------------------------------------- sharpening


@pytest.mark.parametrize("amount", [0.05, 0.5, 1.0])
def test_sharpen_matches_comfy_cas(amount: float) -> None:
    img = picture(37, 29)
    img.putpixel((0, 0), (0, 0, 0))  # a black corner: 0/0 in the formula, NaN -> 0
    ours = as_float(sharpen(img, amount))
    ref = comfy_cas(to_tensor(img).permute(0, 3, 1, 2), amount)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1 / 255 + 1e-6)
    assert np.abs(ours - as_float(img)).max() > 3 / 255  # it did sharpen


def test_sharpen_black_image_stays_black_and_zero_is_identity() -> None:
    black = Image.new("RGB", (8, 8))
    assert np.asarray(sharpen(black, 0.7)).max() == 0
    img = picture(12, 9)
    assert np.array_equal(np.asarray(sharpen(img, 0)), np.asarray(img))


@pytest.mark.parametrize("amount", [-0.1, 1.5, float("nan"), "0.5"])
def test_sharpen_refuses_bad_amount(amount) -> None:
    with pytest.raises(InputError, match="sharpening"):
        sharpen(picture(8, 8), amount)


# ---------------------------------------------------------------------------------------------- tile geometry


def test_wide_image_four_overlapping_tiles() -> None:
    # 1000x300: 853x256 after resizing, 4 tiles overlapping by (1024 - 853) / 3 = 57 pixels
    ours, starts = check_against_comfy(picture(1000, 300))
    assert len(ours) == 4 and [s[0] for s in starts] == [0, 199, 398, 597]
    assert all(m.size == (853, 256) for _, m in ours)
    for (_, m), (x, y) in zip(ours, starts, strict=True):
        assert rectangle(m) == (x, y, x + 256, y + 256)
        assert np.asarray(m).max() == 255 and set(np.unique(np.asarray(m))) == {0, 255}


def test_exact_multiple_has_no_overlap() -> None:
    ours, starts = check_against_comfy(picture(900, 300))  # 768x256: 3 tiles side by side
    assert [s[0] for s in starts] == [0, 256, 512]
    union = np.maximum.reduce([np.asarray(m) for _, m in ours])
    assert union.min() == 255  # the masks cover the whole prepared reference


def test_near_square_image_is_cropped_to_512_and_cut_2x2() -> None:
    ours, starts = check_against_comfy(picture(603, 500))  # odd difference: left = round(51.5) = 52
    assert len(ours) == 4 and starts == [(0, 0), (256, 0), (0, 256), (256, 256)]
    assert all(m.size == (512, 512) for _, m in ours)
    assert [rectangle(m) for _, m in ours] == [
        (0, 0, 256, 256),
        (256, 0, 512, 256),
        (0, 256, 256, 512),
        (256, 256, 512, 512),
    ]


def test_tall_near_square_image_is_cropped_to_512() -> None:
    # h / w = 1.206 is still "almost square"; top = round(103 / 2) = round(51.5) = 52
    ours, starts = check_against_comfy(picture(500, 603))
    assert len(ours) == 4 and all(m.size == (512, 512) for _, m in ours)


def test_very_wide_image_is_cropped_to_four_tiles() -> None:
    ours, starts = check_against_comfy(picture(1500, 300))  # 1280x256, then the centred 1024x256
    assert len(ours) == 4 and starts == [(0, 0), (256, 0), (512, 0), (768, 0)]
    assert all(m.size == (1024, 256) for _, m in ours)


@pytest.mark.parametrize(
    "size,count,mask_size",
    [((300, 700), 3, (256, 597)), ((200, 1000), 4, (256, 1024)), ((150, 260), 2, (256, 443))],
)
def test_tall_images(size: tuple[int, int], count: int, mask_size: tuple[int, int]) -> None:
    ours, starts = check_against_comfy(picture(*size))
    assert len(ours) == count and all(m.size == mask_size for _, m in ours)
    assert all(x == 0 for x, _ in starts) and starts[-1][1] == mask_size[1] - 256


def test_sharpening_applies_before_cutting() -> None:
    image = picture(700, 300)
    check_against_comfy(image, sharpening=0.8)
    plain = tile_reference(image)
    sharp = tile_reference(image, sharpening=0.8)
    assert not np.array_equal(np.asarray(plain[0][0]), np.asarray(sharp[0][0]))


def test_user_mask_carried_into_tile_masks() -> None:
    mask = np.zeros((30, 100), np.uint8)
    mask[:, :50] = 255  # left half of a small mask, stretched over the 1000x300 reference
    mask[10:20, 70:90] = 180  # a grey patch: 597..768 x 85..171 of the 853x256 prepared reference
    ours, starts = check_against_comfy(picture(1000, 300), Image.fromarray(mask, "L"))
    first, last = np.asarray(ours[0][1]), np.asarray(ours[-1][1])
    assert first[:, :256].min() == 255 and first[:, 256:].max() == 0  # first tile: inside the white half
    assert starts[-1][0] == 597
    assert last[:, :597].max() == 0 and last[:, 800:].max() == 0 and last[:70].max() == 0  # grey patch only
    assert abs(int(last[128, 680]) - 180) <= 2


def test_user_mask_follows_the_square_crop() -> None:
    mask = np.zeros((500, 600), np.uint8)
    mask[:, 400:] = 255  # the square crop keeps columns 50..549: the edge lands at 350 / 500 * 512 = 358.4
    ours, _ = check_against_comfy(picture(600, 500), Image.fromarray(mask, "L"))
    assert len(ours) == 4 and ours[0][1].size == (512, 512)
    top_left, top_right = np.asarray(ours[0][1]), np.asarray(ours[1][1])
    assert top_left.max() == 0
    assert top_right[:256, :340].max() == 0 and top_right[:256, 376:].min() == 255


def test_tile_reference_refuses_bad_sharpening() -> None:
    with pytest.raises(InputError, match="sharpening"):
        tile_reference(picture(300, 300), sharpening=2)


# ---------------------------------------------------------------------------------------------- enhancer


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_hidden_merge_matches_comfy(grid: int) -> None:
    gen = torch.Generator().manual_seed(grid)
    full = torch.randn(1 + 16, 8, generator=gen)  # class token + 4x4 patches
    tiles = torch.randn(grid * grid, 1 + 16, 8, generator=gen)
    ours = enhance_features(full, tiles, grid, "hidden")
    ref = comfy_merge_hidden(tiles, grid)[0]
    assert ours.shape == full.shape
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("grid", [1, 2, 3])
def test_pooled_merge_matches_comfy(grid: int) -> None:
    gen = torch.Generator().manual_seed(10 + grid)
    full = torch.randn(16, generator=gen)
    tiles = torch.randn(grid * grid, 16, generator=gen)
    ours = enhance_features(full, tiles, grid, "pooled")
    ref = comfy_merge_pooled(tiles, grid)[0]
    assert ours.shape == full.shape
    torch.testing.assert_close(ours, ref)


def test_merges_are_not_trivial() -> None:
    # a tile layout mistake (column-major, transposed squares) must show: tiles differ from each other
    tiles = torch.arange(4 * 17 * 2, dtype=torch.float32).reshape(4, 17, 2) ** 1.5
    merged = enhance_features(torch.zeros(17, 2), tiles, 2, "hidden")
    assert not torch.allclose(merged[1:], tiles[:, 1:].mean(0))
    torch.testing.assert_close(merged[0], tiles[:, 0].mean(0))
    # top-left output patch = mean of the top-left 2x2 patches of the top-left tile
    patches = tiles[0, 1:].reshape(4, 4, 2)
    torch.testing.assert_close(merged[1], patches[:2, :2].reshape(4, 2).mean(0))


def test_merge_keeps_dtype() -> None:
    full = torch.zeros(16, dtype=torch.float16)
    assert enhance_features(full, torch.ones(4, 16, dtype=torch.float16), 2, "pooled").dtype == torch.float16


def test_pooled_merge_needs_square_size() -> None:
    with pytest.raises(InputError, match=r"square feature size.*\(1280 given\).*enhance_tiles 1"):
        enhance_features(torch.zeros(1280), torch.zeros(4, 1280), 2, "pooled")


def test_enhance_features_refuses_bad_input() -> None:
    with pytest.raises(InputError, match="enhance_tiles"):
        enhance_features(torch.zeros(16), torch.zeros(4, 16), 0, "pooled")
    with pytest.raises(InputError, match="enhance_tiles"):
        enhance_features(torch.zeros(16), torch.zeros(17 * 17, 16), 17, "pooled")
    with pytest.raises(InputError, match="feature"):
        enhance_features(torch.zeros(16), torch.zeros(4, 16), 2, "last")
    with pytest.raises(InputError, match="expected"):
        enhance_features(torch.zeros(16), torch.zeros(9, 16), 2, "pooled")
    with pytest.raises(InputError, match="square patch grid"):
        enhance_features(torch.zeros(729, 8), torch.zeros(4, 729, 8), 2, "hidden")


@pytest.mark.parametrize("grid", [1, 2, 3, 5])
def test_split_grid_matches_comfy(grid: int) -> None:
    image = picture(101, 77)
    ours = split_grid(image, grid)
    ref = comfy_split_tiles(to_tensor(image), grid)[0]
    assert len(ours) == grid * grid
    for tile, expected in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(as_float(tile), expected.numpy())


@pytest.mark.parametrize("grid", [0, 17, 2.0, True])
def test_split_grid_refuses_bad_grid(grid) -> None:
    with pytest.raises(InputError, match="enhance_tiles"):
        split_grid(picture(64, 64), grid)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.0])
def test_enhance_rows_matches_encode_image_masked(ratio: float) -> None:
    gen = torch.Generator().manual_seed(3)
    # ComfyUI's two cases: one reference (concatenate) and a batch of two (blend row by row)
    embeds1, split1 = torch.randn(1, 5, 4, generator=gen), torch.randn(1, 5, 4, generator=gen)
    ref1 = torch.cat([embeds1 * ratio, split1])
    torch.testing.assert_close(enhance_rows(embeds1[0], split1[0], ratio, 1), ref1)

    embeds2, split2 = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 4, generator=gen)
    ref2 = embeds2 * ratio + split2 * (1 - ratio)
    for row in range(2):
        out = enhance_rows(embeds2[row], split2[row], ratio, 2)
        assert out.shape == (1, 5, 4)
        torch.testing.assert_close(out[0], ref2[row])


def test_enhance_rows_refuses_bad_ratio_and_shapes() -> None:
    with pytest.raises(InputError, match="enhance_ratio"):
        enhance_rows(torch.zeros(4), torch.zeros(4), 1.2, 1)
    with pytest.raises(InputError, match="references"):
        enhance_rows(torch.zeros(4), torch.zeros(4), 0.5, 0)
    with pytest.raises(InputError, match="differ in shape"):
        enhance_rows(torch.zeros(4), torch.zeros(5), 0.5, 1)
