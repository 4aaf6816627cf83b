"""Face detection glue, alignment and face-embedding files (issue 19), without insightface.

A stand-in analyser follows insightface's documented interface (``prepare(ctx_id=, det_size=)``, ``get(bgr)``
-> ``Face`` objects: dict-like with attributes ``bbox``, ``kps``, ``det_score``, ``embedding``,
``normed_embedding``); ``open_analyser`` is exercised with a fake ``insightface`` module in ``sys.modules``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from ipadapter.errors import InputError, ModelNotAvailableError  # noqa: E402
from ipadapter.prompt import faces as fc  # noqa: E402

ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text, text
    return text


class StandInFace(dict):
    """insightface ``Face``: a dict whose keys read as attributes too (a missing one reads None)."""

    def __getattr__(self, name: str):
        return self.get(name)


def make_face(x1: float, y1: float, width: float, score: float = 0.9, seed: int = 0) -> StandInFace:
    """A face whose box starts at (x1, y1); landmarks at the ArcFace template scaled to the box."""
    embedding = np.random.default_rng(seed).normal(size=512).astype(np.float32) * 3.0  # raw norm ~ 68
    normed = (
        (embedding / np.linalg.norm(embedding) * 1.003).astype(np.float16).astype(np.float32)
    )  # a bit off
    kps = (ARCFACE_112 / 112.0 * width + [x1, y1]).astype(np.float32)
    bbox = np.array([x1, y1, x1 + width, y1 + width], np.float32)
    return StandInFace(
        bbox=bbox, kps=kps, det_score=np.float32(score), embedding=embedding, normed_embedding=normed
    )


class StandInAnalyser:
    """Returns ``faces_at[det_size]`` from ``get``; records every call; prints like insightface does."""

    def __init__(self, faces_at: dict[int, list], ctx_id: int | None = None) -> None:
        self.faces_at, self.calls, self.images, self.det_size = faces_at, [], [], None
        if ctx_id is not None:
            self.ctx_id = ctx_id

    def prepare(self, ctx_id, det_thresh=0.5, det_size=None):
        print("set det-size:", det_size)
        self.det_size = det_size
        self.calls.append(("prepare", ctx_id, det_size))

    def get(self, img, max_num=0):
        self.calls.append(("get", self.det_size))
        self.images.append(img)
        return list(self.faces_at.get(self.det_size[0], []))


LEFT = make_face(20, 60, 60, score=0.95, seed=1)  # small, best score
RIGHT = make_face(110, 40, 120, score=0.80, seed=2)  # large


def photo() -> Image.Image:
    array = np.zeros((256, 256, 3), np.uint8)
    array[:, :128] = (215, 0, 0)  # red left half
    array[:, 128:] = (0, 0, 215)  # blue right half
    array += np.random.default_rng(3).integers(0, 40, array.shape, dtype=np.uint8)  # no wrap-around
    return Image.fromarray(array)


def two_faces_at_512() -> StandInAnalyser:
    return StandInAnalyser({512: [RIGHT, LEFT]})  # detector order (by score) is not left to right


# ---- detection ---------------------------------------------------------------------------------------------


def test_detection_sizes_follow_comfyui() -> None:
    assert fc.DET_SIZES == (640, 576, 512, 448, 384, 320)


def test_retries_smaller_sizes_pinning_det_size_each_time(capsys: pytest.CaptureFixture) -> None:
    analyser = two_faces_at_512()
    fc.detect_faces(photo(), analyser)
    tries = [(640, 640), (576, 576), (512, 512)]
    assert analyser.calls == [c for size in tries for c in (("prepare", 0, size), ("get", size))]
    image = analyser.images[0]  # what insightface expects: BGR uint8 (H, W, 3)
    assert image.dtype == np.uint8 and image.shape == (256, 256, 3) and image.flags.c_contiguous
    assert image[5, 5, 2] >= 215 and image[5, 5, 0] < 40  # red shows in the last channel
    assert image[5, 200, 0] >= 215 and image[5, 200, 2] < 40
    assert capsys.readouterr().out == ""  # the detector's prints stay off stdout (--json)

    analyser.calls.clear()  # a second call starts at 640 again: no state carried from the first
    fc.detect_faces(photo(), analyser)
    assert analyser.calls[0] == ("prepare", 0, (640, 640))
    stand_in = StandInAnalyser({640: [LEFT]}, ctx_id=-1)
    fc.detect_faces(photo(), stand_in)
    assert stand_in.calls == [("prepare", -1, (640, 640)), ("get", (640, 640))]


def test_no_face_message_lists_sizes_tried() -> None:
    analyser = StandInAnalyser({})
    with pytest.raises(InputError) as err:
        fc.detect_faces(photo(), analyser, source="me.png")
    assert one_line(err) == (
        "no face found in me.png (tried detection sizes 640..320); use a clearer, frontal photo or pass --face-embeds"
    )
    assert [c[2] for c in analyser.calls if c[0] == "prepare"] == [
        (s, s) for s in (640, 576, 512, 448, 384, 320)
    ]
    with pytest.raises(InputError, match="multiples of 32"):
        fc.detect_faces(photo(), analyser, sizes=(600,))
    with pytest.raises(InputError, match=r"sizes 320\)"):
        fc.detect_faces(photo(), analyser, sizes=(320,))


def test_pick_largest_score_index_all() -> None:
    def embeds(pick):
        return fc.detect_faces(photo(), two_faces_at_512(), pick=pick).embeds

    left, right = (f["normed_embedding"] / np.linalg.norm(f["normed_embedding"]) for f in (LEFT, RIGHT))
    np.testing.assert_allclose(embeds("largest"), [right], atol=1e-6)
    np.testing.assert_allclose(embeds("score"), [left], atol=1e-6)
    np.testing.assert_allclose(embeds(0), [left], atol=1e-6)  # numbered left to right
    np.testing.assert_allclose(embeds(np.int64(1)), [right], atol=1e-6)
    found = fc.detect_faces(photo(), two_faces_at_512(), pick="all", source="group.png")
    np.testing.assert_allclose(found.embeds, [left, right], atol=1e-6)
    assert len(found) == 2 and len(found.crops) == 2 and found.source == "group.png"
    assert found.embeds.dtype == np.float32


def test_face_index_out_of_range_and_bad_picks() -> None:
    with pytest.raises(InputError) as err:
        fc.detect_faces(photo(), two_faces_at_512(), pick=3, source="group.png")
    assert one_line(err) == "face index 3 asked but group.png has 2 faces (left to right: 0..1)"
    with pytest.raises(InputError) as err:
        fc.detect_faces(photo(), StandInAnalyser({640: [LEFT]}), pick=-1, source="me.png")
    assert one_line(err) == "face index -1 asked but me.png has 1 face (left to right: 0)"
    for pick in ("middle", True, 1.5):
        with pytest.raises(InputError, match="is not one of largest, score, all"):
            fc.detect_faces(photo(), two_faces_at_512(), pick=pick)


def test_embedding_renormalised_or_raw() -> None:
    found = fc.detect_faces(photo(), StandInAnalyser({640: [LEFT]}))
    assert abs(float(np.linalg.norm(found.embeds[0])) - 1.0) < 1e-6  # the stand-in's is 1.003 and fp16
    raw = fc.detect_faces(photo(), StandInAnalyser({640: [LEFT]}), normed=False)
    np.testing.assert_array_equal(raw.embeds[0], LEFT["embedding"])
    broken = StandInFace(LEFT, normed_embedding=np.zeros(512, np.float32))
    with pytest.raises(InputError, match="all-zero") as err:
        fc.detect_faces(photo(), StandInAnalyser({640: [broken]}))
    one_line(err)
    no_kps = StandInFace(LEFT, kps=None)
    with pytest.raises(InputError, match="face landmarks") as err:
        fc.detect_faces(photo(), StandInAnalyser({640: [no_kps]}))
    one_line(err)


def test_crops_are_the_aligned_faces() -> None:
    image = photo()
    found = fc.detect_faces(image, two_faces_at_512(), pick="all")
    for crop, face in zip(found.crops, (LEFT, RIGHT), strict=True):
        assert crop.size == (224, 224) and crop.mode == "RGB"
        assert np.array_equal(np.asarray(crop), np.asarray(fc.align_face(image, face["kps"])))
    assert np.asarray(found.crops[0])[112, 112, 0] > 200  # the left face lies in the red half
    assert np.asarray(found.crops[1])[112, 112, 2] > 200  # the right one in the blue half


def test_faces_from_images_concatenates_in_order() -> None:
    analyser = two_faces_at_512()
    found = fc.faces_from_images([photo(), photo()], analyser, pick="all", sources=["a.png", "b.png"])
    assert found.embeds.shape == (4, 512) and len(found.crops) == 4 and found.source == "a.png, b.png"
    largest = fc.faces_from_images([photo(), photo()], analyser, sources=["a.png", "b.png"])
    np.testing.assert_allclose(largest.embeds[0], largest.embeds[1])
    with pytest.raises(InputError, match="no face images"):
        fc.faces_from_images([], analyser)


# ---- alignment ---------------------------------------------------------------------------------------------


def test_template_scaling_follows_insightface() -> None:
    np.testing.assert_allclose(fc.face_template(112), ARCFACE_112, atol=1e-4)
    np.testing.assert_allclose(fc.face_template(224), ARCFACE_112 * 2, atol=1e-4)
    np.testing.assert_allclose(fc.face_template(256), ARCFACE_112 * 2 + [16, 0], atol=1e-4)  # 128-multiple
    np.testing.assert_allclose(fc.face_template(128), ARCFACE_112 + [8, 0], atol=1e-4)
    with pytest.raises(InputError, match="multiple of 112 or 128"):
        fc.face_template(200)


def test_similarity_is_the_least_squares_one() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, (5, 2))
    angle, scale, shift = 0.7, 1.8, np.array([12.0, -40.0])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    exact = src @ linear.T + shift
    np.testing.assert_allclose(
        fc.similarity_transform(src, exact), np.hstack([linear, shift[:, None]]), atol=1e-9
    )
    # noisy points: compare with the linear least-squares fit over [[a, -b], [b, a]] + t (no reflections)
    noisy = exact + rng.normal(0, 5, exact.shape)
    rows = np.zeros((10, 4))
    rows[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)]
    rows[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]
    a, b, tx, ty = np.linalg.lstsq(rows, noisy.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(fc.similarity_transform(src, noisy), [[a, -b, tx], [b, a, ty]], atol=1e-7)
    mirrored = src * [-1, 1]  # the best orthogonal fit would be a reflection: still a rotation
    assert np.linalg.det(fc.similarity_transform(src, mirrored)[:, :2]) > 0
    with pytest.raises(InputError, match="one point"):
        fc.similarity_transform(np.ones((5, 2)), src)


def test_landmarks_on_the_template_give_the_identity_crop() -> None:
    array = np.random.default_rng(4).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    crop = np.asarray(fc.align_face(Image.fromarray(array), fc.face_template(224)))
    assert crop.shape == (224, 224, 3)
    assert np.abs(crop[:-1, :-1].astype(int) - array[:-1, :-1]).max() <= 1


def cv2_rule_warp(src: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """cv2.warpAffine(src, matrix, (size, size)) bilinear, black outside: dst(x, y) = src(matrix^-1 (x, y))
    with pixel centres on integer coordinates (float result)."""
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = src.shape[:2]
    padded = np.zeros((h + 4, w + 4, 3))
    padded[2:-2, 2:-2] = src

    def at(y, x):
        return padded[np.clip(y + 2, 0, h + 3), np.clip(x + 2, 0, w + 3)]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def test_alignment_matches_warp_affine_pixel_rule() -> None:
    source = np.random.default_rng(5).integers(0, 256, (300, 280, 3), dtype=np.uint8)
    kps = np.array([[100.0, 120.0], [160.0, 110.0], [135.0, 150.0], [110.0, 185.0], [165.0, 178.0]])
    crop = np.asarray(fc.align_face(Image.fromarray(source), kps)).astype(float)
    expected = cv2_rule_warp(source, fc.similarity_transform(kps, fc.face_template(224)), 224)
    inner = (slice(4, -4), slice(4, -4))
    assert np.abs(crop[inner] - expected[inner]).max() <= 1.0  # off by half a pixel this would be ~100


def test_rotated_scaled_face_maps_back_onto_the_template() -> None:
    # landmarks as bright dots in a 500 x 420 photo, placed by a known rotation + scale + shift of the template
    angle, scale, shift = np.deg2rad(25.0), 1.6, np.array([150.0, 20.0])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = fc.face_template(224) @ linear.T + shift
    ys, xs = np.mgrid[:420, :500].astype(np.float64)
    field = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.0**2)) for x, y in points)
    photo_array = np.repeat((field * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    crop = np.asarray(fc.align_face(Image.fromarray(photo_array), points))[..., 0].astype(float)
    cy, cx = np.mgrid[:224, :224]
    for x, y in fc.face_template(224):  # each dot's centre of mass, in a window around its template place
        window = (np.abs(cx - x) < 6) & (np.abs(cy - y) < 6)
        weights = crop * window
        found = np.array([(weights * cx).sum(), (weights * cy).sum()]) / weights.sum()
        assert np.hypot(*(found - [x, y])) < 1.0, (found, (x, y))


def test_align_rejects_bad_landmarks() -> None:
    with pytest.raises(InputError, match="5 finite"):
        fc.align_face(photo(), np.zeros((4, 2)))
    with pytest.raises(InputError, match="5 finite"):
        fc.align_face(photo(), np.full((5, 2), np.nan))


# ---- files -------------------------------------------------------------------------------------------------


def test_npy_round_trip_one_and_several_faces(tmp_path: Path) -> None:
    one = np.random.default_rng(6).normal(size=512)
    np.save(tmp_path / "one.npy", one)
    loaded = fc.load_face_embeds(tmp_path / "one.npy")
    assert loaded.shape == (1, 512) and loaded.dtype == np.float32
    np.testing.assert_allclose(loaded[0], one, rtol=1e-6)
    several = np.random.default_rng(7).normal(size=(3, 512)).astype(np.float16)
    np.save(tmp_path / "several.npy", several)
    np.testing.assert_array_equal(fc.load_face_embeds(tmp_path / "several.npy"), several.astype(np.float32))


def test_safetensors_round_trip_with_and_without_crops(tmp_path: Path) -> None:
    found = fc.detect_faces(photo(), two_faces_at_512(), pick="all", source="group.png")
    path = fc.save_face_embeds(tmp_path / "faces.safetensors", found.embeds, found.crops, source="group.png")
    back = fc.load_face_file(path)
    np.testing.assert_array_equal(back.embeds, found.embeds)
    assert [np.asarray(c).tolist() for c in back.crops] == [np.asarray(c).tolist() for c in found.crops]
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "ipadapter-face-embeds", "version": "1", "source": "group.png"}
        assert f.get_tensor("face_crops").shape == (2, 224, 224, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces.safetensors"]  # no temporary left

    fc.save_face_embeds(tmp_path / "one.safetensors", found.embeds[0])
    assert fc.load_face_file(tmp_path / "one.safetensors").crops == []
    assert fc.load_face_embeds(tmp_path / "one.safetensors").shape == (1, 512)


def test_safetensors_single_tensor_any_name_and_bfloat16(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    embeds = torch.randn(2, 512)
    save_file({"id_embeds": embeds}, str(tmp_path / "single.safetensors"))
    np.testing.assert_array_equal(fc.load_face_embeds(tmp_path / "single.safetensors"), embeds.numpy())
    save_file({"face_embeds": embeds.bfloat16()}, str(tmp_path / "bf16.safetensors"))
    np.testing.assert_array_equal(
        fc.load_face_embeds(tmp_path / "bf16.safetensors"), embeds.bfloat16().float().numpy()
    )
    fc.save_face_embeds(tmp_path / "from_torch.safetensors", embeds)  # a torch tensor is accepted too
    np.testing.assert_array_equal(fc.load_face_embeds(tmp_path / "from_torch.safetensors"), embeds.numpy())


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (
            np.zeros((2, 128), np.float32),
            "has 128 values per face; expected 512 (an InsightFace buffalo_l/antelopev2 embedding, face.normed_embedding)",
        ),
        (np.full((1, 512), np.nan, np.float32), "holds NaN or infinite values"),
        (np.zeros((0, 512), np.float32), "holds no face embedding"),
        (np.zeros((1, 1, 512), np.float32), "holds an array of shape (1, 1, 512)"),
        (np.zeros(512, np.int64), "holds int64 values"),
    ],
)
def test_unusable_embeddings_are_refused(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InputError) as err:
        fc.load_face_embeds(tmp_path / "bad.npy")
    assert message in one_line(err) and str(tmp_path / "bad.npy") in str(err.value)
    with pytest.raises(InputError) as err:
        fc.save_face_embeds(tmp_path / "out.safetensors", array)
    assert message in one_line(err)
    assert not (tmp_path / "out.safetensors").exists()


def test_unusable_files_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "face.pt").write_bytes(b"x")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    save_file(
        {"a": np.zeros((1, 512), np.float32), "b": np.zeros(3, np.float32)}, str(tmp_path / "two.safetensors")
    )
    save_file(
        {"features": np.zeros(1024, np.float32), "negative": np.zeros(1024, np.float32)},
        str(tmp_path / "image.safetensors"),
    )
    save_file(
        {"face_embeds": np.zeros((1, 512), np.float32), "face_crops": np.zeros((1, 64, 64, 3), np.uint8)},
        str(tmp_path / "crops.safetensors"),
    )
    cases = {
        "face.pt": "must be a .npy or .safetensors file (got '.pt')",
        "missing.npy": "not found",
        "broken.npy": "is not a readable .npy file",
        "two.safetensors": "holds tensors ['a', 'b']; expected 'face_embeds' or a single tensor",
        "image.safetensors": "an `ipadapter embed` file holds image features",
        "crops.safetensors": "expected uint8 (1, 224, 224, 3)",
    }
    for name, message in cases.items():
        with pytest.raises(InputError) as err:
            fc.load_face_embeds(tmp_path / name)
        assert message in one_line(err), name
    with pytest.raises(InputError, match="saved as .safetensors"):
        fc.save_face_embeds(tmp_path / "out.npy", np.zeros(512, np.float32))
    with pytest.raises(InputError, match="does not exist"):
        fc.save_face_embeds(tmp_path / "no" / "out.safetensors", np.zeros(512, np.float32))
    with pytest.raises(InputError, match="1 face embeddings but 2 face crops"):
        fc.save_face_embeds(
            tmp_path / "out.safetensors", np.ones(512, np.float32), [Image.new("RGB", (224, 224))] * 2
        )


# ---- opening insightface -----------------------------------------------------------------------------------


def fake_insightface(monkeypatch: pytest.MonkeyPatch, models=("detection", "recognition")) -> list:
    """Put a stand-in ``insightface.app.FaceAnalysis`` in sys.modules; returns the list of its calls."""
    calls: list = []

    class FaceAnalysis:
        def __init__(self, name="buffalo_l", root="~/.insightface", allowed_modules=None, **kwargs):
            print("find model: ...")
            calls.append(("init", name, root, allowed_modules, kwargs))
            assert "detection" in models
            self.models = dict.fromkeys(models)

        def prepare(self, ctx_id, det_thresh=0.5, det_size=None):
            print("set det-size:", det_size)
            calls.append(("prepare", ctx_id, det_size))

        def get(self, img, max_num=0):
            print("detecting")
            return [LEFT]

    package, app = types.ModuleType("insightface"), types.ModuleType("insightface.app")
    app.FaceAnalysis, package.app = FaceAnalysis, app
    monkeypatch.setitem(sys.modules, "insightface", package)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    return calls


def model_root(tmp_path: Path, name: str = "buffalo_l", nested: bool = False) -> Path:
    folder = tmp_path / "models" / name / (name if nested else "")
    folder.mkdir(parents=True)
    for file in ("det_10g.onnx", "w600k_r50.onnx"):
        (folder / file).write_bytes(b"onnx")
    return tmp_path


def test_missing_insightface_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ModelNotAvailableError) as err:
        fc.open_analyser(root=model_root(tmp_path))
    text = one_line(err)
    assert "needs insightface" in text and "pip install 'ipadapter[face]'" in text and "--face-embeds" in text


def test_missing_model_is_reported_before_insightface_downloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_insightface(monkeypatch)
    with pytest.raises(ModelNotAvailableError) as err:
        fc.open_analyser("antelopev2", root=tmp_path)
    text = one_line(err)
    folder = tmp_path / "models" / "antelopev2"
    for part in (
        f"no .onnx files in {folder}",
        "download antelopev2.zip",
        "https://github.com/deepinsight/insightface/releases",
        "--face-model-root",
        "~/.insightface",
        "non-commercial research use only",
    ):
        assert part in text, part
    assert calls == []  # FaceAnalysis, which would download, was never constructed
    model_root(tmp_path, "antelopev2", nested=True)
    with pytest.raises(ModelNotAvailableError) as err:
        fc.open_analyser("antelopev2", root=tmp_path)
    assert f"are in {folder / 'antelopev2'}, one folder too deep" in one_line(err)
    with pytest.raises(InputError, match="must be a folder name"):
        fc.face_model_folder("../x", tmp_path)


def test_default_root_is_insightface_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    model_root(tmp_path / ".insightface")
    assert fc.face_model_folder() == tmp_path / ".insightface" / "models" / "buffalo_l"


def test_open_analyser_loads_detection_and_recognition_quietly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    calls = fake_insightface(monkeypatch)
    analyser = fc.open_analyser(root=model_root(tmp_path), providers=["CPUExecutionProvider"], ctx_id=-1)
    assert calls == [
        (
            "init",
            "buffalo_l",
            str(tmp_path),
            ["detection", "recognition"],
            {"providers": ["CPUExecutionProvider"]},
        ),
        ("prepare", -1, (640, 640)),
    ]
    found = fc.detect_faces(photo(), analyser)
    assert calls[2] == ("prepare", -1, (640, 640)) and found.embeds.shape == (1, 512)
    assert capsys.readouterr().out == ""  # insightface's prints go to stderr
    fc.open_analyser(root=tmp_path)
    assert calls[-2][4] == {}  # no providers given: insightface's default


@pytest.mark.parametrize(
    ("models", "missing"), [(("recognition",), "detection"), (("detection",), "recognition")]
)
def test_incomplete_model_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models, missing) -> None:
    fake_insightface(monkeypatch, models=models)
    with pytest.raises(ModelNotAvailableError) as err:
        fc.open_analyser(root=model_root(tmp_path))
    assert f"has no face {missing} model" in one_line(err) and "buffalo_l.zip" in str(err.value)


def test_module_imports_no_torch_and_no_insightface() -> None:
    code = "import sys, ipadapter.prompt.faces; print(sorted(m for m in ('torch', 'insightface') if m in sys.modules))"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
