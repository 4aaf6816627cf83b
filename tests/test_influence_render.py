"""Influence figures and files (ipadapter.prompt.influence_render): layout, colours, round trips, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ipadapter.errors import InputError
from ipadapter.prompt.influence import InfluenceMaps
from ipadapter.prompt.influence_render import (
    ALPHA,
    BLOCK_TILE,
    DIM,
    TILE,
    check_influence_path,
    colormap,
    influence_layout,
    overlay,
    render_influence,
    write_influence,
)

H, W = 48, 64  # 4:3, so tiles are 256x192 and 128x96
HOT = (slice(12, 36), slice(32, 56))  # rows 12..35, columns 32..55 of the output


def _maps(images: int = 1, panels: int = 2, blocks: int = 3) -> InfluenceMaps:
    """Panel 0 / block 1 hot in HOT (2.0), a faint block 2 in panel 0 elsewhere; panel 1 all zero."""
    norms = np.zeros((images, panels, blocks, H, W), dtype=np.float32)
    norms[:, 0, 1][:, HOT[0], HOT[1]] = 2.0
    norms[:, 0, 2, 0:8, 0:8] = 0.5
    for i in range(images):
        norms[i] *= i + 1  # pictures differ
    ratios = norms / 4
    labels = [f"adapter0 · reference {p + 1}" for p in range(panels)]
    block_labels = [f"t{b} down_blocks.{b}.attentions.0" for b in range(blocks)]
    return InfluenceMaps(norms=norms, ratios=ratios, panels=labels, blocks=block_labels)


def _picture(width: int = W, height: int = H) -> Image.Image:
    yy, xx = np.mgrid[:height, :width]
    rgb = np.stack([(xx * 4) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _crop(figure: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(figure.crop(box)).astype(int)


def _zeroed(maps: InfluenceMaps) -> InfluenceMaps:
    return InfluenceMaps(np.zeros_like(maps.norms), np.zeros_like(maps.ratios), maps.panels, maps.blocks)


def test_layout_size_rules() -> None:
    maps = _maps(panels=2, blocks=3)
    layout = influence_layout(maps)
    figure = render_influence(maps, 0, _picture())
    assert figure.mode == "RGB" and figure.size == layout.size
    assert len(layout.all_tiles) == 2 and [len(row) for row in layout.block_tiles] == [3, 3]
    for p in range(2):
        left, top, right, bottom = layout.all_tiles[p]
        assert (right - left, bottom - top) == (TILE, TILE * 3 // 4)
        for box in layout.block_tiles[p]:
            assert (box[2] - box[0], box[3] - box[1]) == (BLOCK_TILE, BLOCK_TILE * 3 // 4)
            assert box[0] >= right  # the block tiles come after the "all" tile
        assert layout.label_boxes[p][2] <= left  # the label is on the left
    assert layout.all_tiles[1][1] >= layout.all_tiles[0][3]  # one row per panel, top to bottom
    # portrait and tiny outputs keep their aspect, the long side fixed
    tall = InfluenceMaps(
        np.ones((1, 1, 1, 30, 10), np.float32), np.ones((1, 1, 1, 30, 10), np.float32), ["a"], ["t0"]
    )
    box = influence_layout(tall).all_tiles[0]
    assert (box[2] - box[0], box[3] - box[1]) == (85, 256)
    # many blocks wrap onto further lines instead of one very wide row
    wide = influence_layout(_maps(blocks=20))
    assert wide.size[0] < 2000
    assert len({box[1] for box in wide.block_tiles[0]}) == 3


def test_hot_square_is_coloured_only_where_the_heat_is() -> None:
    maps, picture = _maps(), _picture()
    layout = influence_layout(maps)
    hot = render_influence(maps, 0, picture)
    plain = render_influence(_zeroed(maps), 0, picture)
    sx, sy = BLOCK_TILE / W, (BLOCK_TILE * 3 // 4) / H
    for box, scale_x, scale_y in (
        (layout.block_tiles[0][1], sx, sy),
        (layout.all_tiles[0], TILE / W, sx * 2),
    ):
        a, b = _crop(hot, box), _crop(plain, box)
        inside = (int(24 * scale_y), int(44 * scale_x))  # the square's centre (row, column) in tile pixels
        assert np.abs(a[inside] - b[inside]).sum() > 60, "the hot square is not coloured"
        assert a[inside][0] > 150 and a[inside][1] > 150 and a[inside][2] < 100  # the top of viridis: yellow
        for outside in (
            (5, 5),
            (int(40 * scale_y), int(10 * scale_x)),
            (int(44 * scale_y), int(60 * scale_x)),
        ):
            if box == layout.all_tiles[0] and outside == (5, 5):
                continue  # block 2's faint corner shows in the sum
            np.testing.assert_array_equal(a[outside], b[outside])
    # the same block in the other (all-zero) panel, and a zero block of panel 0, are the plain picture
    for box in (layout.block_tiles[1][1], layout.all_tiles[1], layout.block_tiles[0][0]):
        np.testing.assert_array_equal(_crop(hot, box), _crop(plain, box))


def test_all_zero_maps_leave_the_picture_uncoloured() -> None:
    maps, picture = _zeroed(_maps()), _picture()
    layout = influence_layout(maps)
    figure = render_influence(maps, 0, picture)
    left, top, right, bottom = layout.all_tiles[0]
    tile = _crop(figure, layout.all_tiles[0])
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()  # grey: no colour
    expected = np.asarray(
        picture.convert("L").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    )
    assert np.abs(tile[..., 0] - np.round(expected * DIM)).max() <= 1  # the picture itself, dimmed
    assert tile.std() > 5  # not blank
    # no colour anywhere in the figure (the scales have no bars)
    pixels = np.asarray(figure).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    from ipadapter.prompt.influence_render import _scale_text

    assert (
        _scale_text(0.0) == "0 (no influence)"
        and _scale_text(1234.5) == "1.23e+03"
        and _scale_text(0.5) == "0.5"
    )


def test_without_a_picture_the_heat_is_drawn_on_black() -> None:
    maps = _maps()
    layout = influence_layout(maps)
    tile = _crop(render_influence(maps, 0), layout.block_tiles[0][1])
    assert (tile[5, 5] == 0).all()
    np.testing.assert_array_equal(tile[48, 88], np.round(ALPHA * colormap(np.array(1.0)).astype(float)))


def test_colour_map_endpoints() -> None:
    ends = colormap(np.array([0.0, 1.0]))
    np.testing.assert_array_equal(ends, [[68, 1, 84], [253, 231, 37]])  # viridis: dark purple .. yellow
    np.testing.assert_array_equal(
        colormap(np.array([-3.0, 7.0, np.nan])), [[68, 1, 84], [253, 231, 37], [68, 1, 84]]
    )
    ramp = colormap(np.linspace(0, 1, 50)).astype(int)
    assert ramp.dtype == int and ramp.shape == (50, 3)
    assert (np.diff(ramp.sum(axis=1)) >= -2).all()  # brightness rises along the scale (perceptual)


def test_overlay_puts_colour_where_the_heat_is() -> None:
    picture = Image.new("RGB", (100, 80), (200, 200, 200))
    heat = np.zeros((8, 10), np.float32)
    heat[2:6, 5:9] = 1.0  # pixels 20..59 down, 50..89 across
    out = overlay(picture, heat)
    assert out.size == (100, 80) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    grey = round(200 * DIM)
    assert (pixels[5, 5] == grey).all() and (pixels[75, 20] == grey).all()
    assert pixels[40, 70][0] > pixels[40, 70][2] + 80  # yellow over grey
    weaker = np.asarray(overlay(picture, heat, vmax=4.0)).astype(int)
    assert np.abs(weaker[40, 70] - grey).sum() < np.abs(pixels[40, 70] - grey).sum()
    flat = np.asarray(overlay(picture, np.zeros((8, 10))))
    assert (flat == grey).all()
    with pytest.raises(InputError, match=r"\(H, W\)"):
        overlay(picture, np.zeros((2, 8, 10)))
    with pytest.raises(InputError, match="vmax"):
        overlay(picture, heat, vmax=-1.0)


@pytest.mark.parametrize("images", [1, 2])
def test_write_npy_round_trip(tmp_path, images: int) -> None:
    maps = _maps(images=images)
    target = tmp_path / "new" / "maps.npy"  # the folder does not exist yet
    written = write_influence(target, maps)
    stems = ["maps"] if images == 1 else ["maps-1", "maps-2"]
    assert written == [tmp_path / "new" / f"{s}.npy" for s in stems]
    for i, stem in enumerate(stems):
        norms = np.load(tmp_path / "new" / f"{stem}.npy")
        assert norms.shape == (2, 3, H, W) and norms.dtype == np.float32
        np.testing.assert_array_equal(norms, maps.norms[i])
        np.testing.assert_array_equal(np.load(tmp_path / "new" / f"{stem}.ratio.npy"), maps.ratios[i])
        meta = json.loads((tmp_path / "new" / f"{stem}.json").read_text(encoding="utf-8"))
        assert meta["panels"] == maps.panels and meta["blocks"] == maps.blocks
        assert meta["shape"] == [2, 3, H, W] and "norm" in meta["what"]
    names = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert len(names) == 3 * images and not any(n.startswith(".") for n in names)  # no temporary files left


def test_write_png_numbers_several_pictures(tmp_path) -> None:
    maps = _maps(images=2)
    written = write_influence(tmp_path / "fig.png", maps, [_picture(), _picture(32, 24)])
    assert written == [tmp_path / "fig-1.png", tmp_path / "fig-2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig-1.png", "fig-2.png"]
    for i, path in enumerate(written):
        with Image.open(path) as saved:
            assert saved.size == influence_layout(maps).size
            np.testing.assert_array_equal(
                np.asarray(saved.convert("RGB")),
                np.asarray(render_influence(maps, i, [_picture(), _picture(32, 24)][i])),
            )
    one = write_influence(tmp_path / "one.png", _maps())
    assert one == [tmp_path / "one.png"] and one[0].is_file()
    with pytest.raises(InputError, match="one per output picture"):
        write_influence(tmp_path / "x.png", maps, [_picture()])


def test_bad_suffix_and_bad_input(tmp_path) -> None:
    with pytest.raises(
        InputError, match=r"influence map '.*x\.jpg' must end in \.png \(a picture\) or \.npy"
    ):
        check_influence_path(tmp_path / "x.jpg")
    with pytest.raises(InputError, match="must end in .png"):
        write_influence(tmp_path / "x.jpg", _maps())
    assert not (tmp_path / "x.jpg").exists()
    check_influence_path(tmp_path / "x.png")
    check_influence_path("x.NPY")
    with pytest.raises(InputError, match="out of range"):
        render_influence(_maps(images=2), 2)
    bad = InfluenceMaps(
        np.zeros((1, 2, 3, H, W), np.float32), np.zeros((1, 2, 3, H, W), np.float32), ["a"], ["t0"] * 3
    )
    with pytest.raises(InputError, match="label"):
        render_influence(bad)


def test_rendering_is_deterministic(tmp_path) -> None:
    maps, picture = _maps(images=2), _picture()
    first, second = render_influence(maps, 1, picture), render_influence(maps, 1, picture)
    assert first.tobytes() == second.tobytes()
    a = write_influence(tmp_path / "a.png", maps)
    b = write_influence(tmp_path / "b.png", maps)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert render_influence(maps, 0, picture).tobytes() != first.tobytes()  # the index matters
