"""`ipadapter face-embed` (issue 19): detect faces, write the face-embeddings file FaceID adapters read.

insightface is optional (and its weights cannot be downloaded here), so a stand-in ``insightface.app``
module goes into ``sys.modules``: it follows insightface's documented interface (``FaceAnalysis(name=,
root=, allowed_modules=, providers=)``, ``prepare(ctx_id=, det_size=)``, ``get(bgr)`` -> ``Face`` objects:
dict-like with attributes ``bbox``, ``kps`` (5, 2), ``det_score``, ``embedding``, ``normed_embedding``). The
real ``open_analyser`` runs on it, model-folder check included (a temp root with dummy ``.onnx`` files).
Each photo is told apart by its size, which picks the faces the stand-in reports for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import fails
from PIL import Image
from safetensors import safe_open

from ipadapter.cli import main
from ipadapter.errors import InputError
from ipadapter.prompt import faces as fc

ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


class StandInFace(dict):
    """insightface ``Face``: a dict whose keys read as attributes too (a missing one reads None)."""

    def __getattr__(self, name: str):
        return self.get(name)


def make_face(x1: float, y1: float, width: float, score: float, seed: int) -> StandInFace:
    embedding = np.random.default_rng(seed).normal(size=512).astype(np.float32) * 3.0  # raw norm ~ 68
    kps = (ARCFACE_112 / 112.0 * width + [x1, y1]).astype(np.float32)
    return StandInFace(
        bbox=np.array([x1, y1, x1 + width, y1 + width], np.float32),
        kps=kps,
        det_score=np.float32(score),
        embedding=embedding,
        normed_embedding=embedding / np.linalg.norm(embedding),
    )


LEFT = make_face(20, 60, 60, score=0.95, seed=1)  # small, best score
RIGHT = make_face(110, 40, 120, score=0.80, seed=2)  # large
SOLO = make_face(30, 20, 100, score=0.9, seed=3)
# the stand-in's answer for an image of (height, width); insightface lists faces by score, not left to right
FACES_BY_SIZE = {(256, 256): [RIGHT, LEFT], (160, 200): [SOLO], (64, 64): []}


def fake_insightface(monkeypatch: pytest.MonkeyPatch) -> list:
    """A stand-in ``insightface.app.FaceAnalysis`` in sys.modules; returns the list of its calls."""
    calls: list = []

    class FaceAnalysis:
        def __init__(self, name="buffalo_l", root="~/.insightface", allowed_modules=None, **kwargs):
            print("find model: ...")  # insightface prints on stdout
            calls.append(("init", name, root, allowed_modules, kwargs))
            self.models = {"detection": object(), "recognition": object()}

        def prepare(self, ctx_id, det_thresh=0.5, det_size=None):
            print("set det-size:", det_size)
            calls.append(("prepare", ctx_id, det_size))

        def get(self, img, max_num=0):
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            calls.append(("get", img.shape[:2]))
            return list(FACES_BY_SIZE[img.shape[:2]])

    package, app = types.ModuleType("insightface"), types.ModuleType("insightface.app")
    app.FaceAnalysis, package.app = FaceAnalysis, app
    monkeypatch.setitem(sys.modules, "insightface", package)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    return calls


def model_root(tmp_path: Path, name: str = "buffalo_l") -> Path:
    folder = tmp_path / "insightface" / "models" / name
    folder.mkdir(parents=True)
    for file in ("det_10g.onnx", "w600k_r50.onnx"):
        (folder / file).write_bytes(b"onnx")
    return tmp_path / "insightface"


def photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A noisy RGB photo of ``size`` (height, width)."""
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    calls = fake_insightface(monkeypatch)
    return {
        "calls": calls,
        "root": model_root(tmp_path),
        "two": photo(tmp_path / "two.png", (256, 256), 1),
        "one": photo(tmp_path / "one.png", (160, 200), 2),
        "none": photo(tmp_path / "none.png", (64, 64), 3),
        "out": tmp_path / "face.safetensors",
    }


def embed(setup: dict, *args: str, images: tuple[str, ...] = ("two",)) -> list[str]:
    return [
        "face-embed", *(str(setup[i]) for i in images), "--output", str(setup["out"]),
        "--face-model-root", str(setup["root"]), *args,
    ]  # fmt: skip


def normed(face: StandInFace) -> np.ndarray:
    return (face.embedding / np.linalg.norm(face.embedding)).astype(np.float32)


# ---- what is written -------------------------------------------------------------------------------------


def test_writes_the_largest_face_with_its_crop(setup: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(embed(setup)) == 0
    out = capsys.readouterr().out
    assert out.strip() == (
        f"wrote {setup['out']} (1 face from 1 image, normalised buffalo_l embeddings, with 224 px crops)"
    )
    loaded = fc.load_face_file(setup["out"])
    assert len(loaded) == 1 and loaded.embeds.dtype == np.float32
    np.testing.assert_allclose(loaded.embeds[0], normed(RIGHT), atol=1e-6)  # the largest box, not the first
    assert len(loaded.crops) == 1 and loaded.crops[0].size == (224, 224)
    want = fc.align_face(Image.open(setup["two"]).convert("RGB"), RIGHT.kps)
    assert np.array_equal(np.asarray(loaded.crops[0]), np.asarray(want))
    with safe_open(str(setup["out"]), framework="np") as f:
        assert f.metadata()["format"] == "ipadapter-face-embeds"
        assert f.metadata()["source"] == str(setup["two"])
    calls = setup["calls"]  # insightface opened once, on its default providers, with ctx_id 0 (auto)
    assert calls[0] == ("init", "buffalo_l", str(setup["root"]), ["detection", "recognition"], {})
    assert calls[1] == ("prepare", 0, (640, 640)) and calls[-1] == ("get", (256, 256))


def test_all_faces_of_two_images_left_to_right_with_json_report(
    setup: dict, capsys: pytest.CaptureFixture
) -> None:
    assert main(embed(setup, "--face-index", "all", "--json", images=("two", "one"))) == 0
    # stdout holds the report only (insightface's prints go to stderr)
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(setup["out"]) and report["count"] == 3
    assert report["embedding"] == "normalised" and report["crops"] is True
    assert report["face_model"] == "buffalo_l"
    assert report["face_model_folder"] == str(setup["root"] / "models" / "buffalo_l")
    two, one = str(setup["two"]), str(setup["one"])
    assert [(f["source"], f["index"]) for f in report["faces"]] == [(two, 0), (two, 1), (one, 0)]
    assert [f["bbox"] for f in report["faces"]] == [
        [20.0, 60.0, 80.0, 120.0],
        [110.0, 40.0, 230.0, 160.0],
        [30.0, 20.0, 130.0, 120.0],
    ]
    assert [f["det_score"] for f in report["faces"]] == pytest.approx([0.95, 0.80, 0.9])
    loaded = fc.load_face_file(setup["out"])
    assert len(loaded) == 3 and len(loaded.crops) == 3
    for row, face in zip(loaded.embeds, (LEFT, RIGHT, SOLO), strict=True):
        np.testing.assert_allclose(row, normed(face), atol=1e-6)


@pytest.mark.parametrize(("pick", "face", "index"), [("score", LEFT, 0), ("0", LEFT, 0), ("1", RIGHT, 1)])
def test_face_index_picks_per_image(setup: dict, capsys: pytest.CaptureFixture, pick, face, index) -> None:
    assert main(embed(setup, "--face-index", pick, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert [f["index"] for f in report["faces"]] == [index]
    np.testing.assert_allclose(fc.load_face_file(setup["out"]).embeds[0], normed(face), atol=1e-6)


def test_raw_embedding_and_no_crops(setup: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(embed(setup, "--raw", "--no-crops")) == 0
    assert "raw buffalo_l embeddings, no crops" in capsys.readouterr().out
    loaded = fc.load_face_file(setup["out"])
    np.testing.assert_array_equal(loaded.embeds[0], RIGHT.embedding)  # unnormalised: norm ~ 68
    assert np.linalg.norm(loaded.embeds[0]) > 10 and loaded.crops == []
    with safe_open(str(setup["out"]), framework="np") as f:
        assert sorted(f.keys()) == ["face_embeds"]


def test_force_overwrites(setup: dict, capsys: pytest.CaptureFixture) -> None:
    assert main(embed(setup)) == 0
    capsys.readouterr()  # insightface's prints (on stderr)
    fails(capsys, embed(setup, "--face-index", "all"), f"output '{setup['out']}' exists", "--force")
    assert len(fc.load_face_file(setup["out"])) == 1  # untouched
    assert main(embed(setup, "--face-index", "all", "--force")) == 0
    assert len(fc.load_face_file(setup["out"])) == 2


def test_device_sets_ctx_id_and_providers(
    setup: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = setup["calls"]
    assert main(embed(setup, "--device", "cpu")) == 0
    assert calls[0][4] == {"providers": ["CPUExecutionProvider"]}
    assert {c[1] for c in calls if c[0] == "prepare"} == {-1}  # ctx_id -1: insightface's CPU
    runtime = types.ModuleType("onnxruntime")
    runtime.get_available_providers = lambda: ["CPUExecutionProvider"]
    monkeypatch.setitem(sys.modules, "onnxruntime", runtime)
    calls.clear()
    capsys.readouterr()
    fails(capsys, embed(setup, "--device", "cuda", "--force"), "CUDA provider", "onnxruntime-gpu")
    assert calls == []  # refused before insightface opened anything
    runtime.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert main(embed(setup, "--device", "cuda", "--force")) == 0
    assert calls[0][4] == {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert {c[1] for c in calls if c[0] == "prepare"} == {0}


# ---- one line for every bad input ------------------------------------------------------------------------


def test_no_face_found(setup: dict, capsys: pytest.CaptureFixture) -> None:
    fails(capsys, embed(setup, images=("two", "none")), f"no face found in {setup['none']}", "640..320")
    assert not setup["out"].exists()  # nothing half-written


def test_bad_face_index(setup: dict, capsys: pytest.CaptureFixture) -> None:
    fails(
        capsys,
        embed(setup, "--face-index", "1", images=("two", "one")),
        f"face index 1 asked but {setup['one']} has 1 face",
    )
    assert not setup["out"].exists()
    for bad in ("-1", "first", "1.5"):
        fails(
            capsys, embed(setup, "--face-index", bad), "--face-index", f"'{bad}' is not largest, score, all"
        )


def test_missing_model_folder(setup: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    empty = tmp_path / "empty-root"
    argv = ["face-embed", str(setup["two"]), "--output", str(setup["out"]), "--face-model-root", str(empty)]
    line = fails(capsys, argv, "InsightFace model 'buffalo_l' not found", "non-commercial", "buffalo_l.zip")
    assert str(empty / "models" / "buffalo_l") in line
    fails(capsys, embed(setup, "--face-model", "antelopev2"), "'antelopev2' not found", "non-commercial")
    assert setup["calls"] == []  # FaceAnalysis (which would try to download) never constructed


def test_insightface_not_installed(setup: dict, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "insightface", None)  # `import insightface` now fails
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    fails(capsys, embed(setup), "needs insightface", "pip install 'ipadapter[face]'")
    assert not setup["out"].exists()


def test_bad_images_and_outputs_refused_before_insightface_opens(
    setup: dict, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    base = ["--face-model-root", str(setup["root"])]
    fails(capsys, ["face-embed", str(text), "--output", str(setup["out"]), *base], f"face image '{text}'")
    missing = tmp_path / "missing.jpg"
    fails(capsys, ["face-embed", str(missing), "--output", str(setup["out"]), *base], "no such file")
    two = str(setup["two"])
    fails(capsys, ["face-embed", two, "--output", str(tmp_path / "f.npy"), *base], "must end in .safetensors")
    fails(
        capsys,
        ["face-embed", two, "--output", str(tmp_path / "nope" / "f.safetensors"), *base],
        "does not exist",
    )
    fails(capsys, ["face-embed", "--output", str(setup["out"]), *base], "IMAGE")  # no image at all
    assert setup["calls"] == []


def test_debug_shows_the_traceback_and_insightface_output(setup: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(InputError, match="no face found"):
        main(["--debug", *embed(setup, images=("none",))])
    err = capsys.readouterr().err  # without --debug this chatter is dropped (one error line only)
    assert "find model" in err and err.count("set det-size") == 1 + len(fc.DET_SIZES)  # open, then each try


def test_a_whole_run_imports_no_torch(tmp_path: Path) -> None:
    """face-embed needs numpy, PIL, safetensors and insightface only: no torch / diffusers / transformers."""
    root = model_root(tmp_path)
    image = photo(tmp_path / "one.png", (160, 200))
    code = f"""
import sys, types
import numpy as np
class FaceAnalysis:
    def __init__(self, name, root, allowed_modules=None, **kwargs):
        self.models = {{"detection": 1, "recognition": 1}}
    def prepare(self, ctx_id, det_thresh=0.5, det_size=None):
        pass
    def get(self, img, max_num=0):
        kps = np.array({ARCFACE_112.tolist()}) + 20
        e = np.ones(512, np.float32)
        return [dict(bbox=np.array([20, 20, 132, 132.0]), kps=kps, det_score=0.9, embedding=e,
                     normed_embedding=e / np.linalg.norm(e))]
package, app = types.ModuleType("insightface"), types.ModuleType("insightface.app")
app.FaceAnalysis, package.app = FaceAnalysis, app
sys.modules.update({{"insightface": package, "insightface.app": app}})
from ipadapter.cli import main
assert main(["face-embed", {str(image)!r}, "--output", "f.safetensors", "--face-model-root", {str(root)!r}]) == 0
print(sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules))
"""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
    assert len(fc.load_face_file(tmp_path / "f.safetensors")) == 1
