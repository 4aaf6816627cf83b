"""Faces for the FaceID adapters: detection (InsightFace, optional), alignment, face-embedding files.

The FaceID adapters (DESIGN.md §3.6) read an InsightFace identity embedding, ``face.normed_embedding``
(512 values, L2-normalised), and the Plus variants also the CLIP encoder's features of the ALIGNED face crop
(insightface ``face_align.norm_crop(img, landmark=face.kps, image_size=224)``). InsightFace is an optional extra
(``pip install 'ipadapter[face]'``) and ships no weights; this module imports it only in :func:`open_analyser`.
Everything else (alignment, choosing faces, files) is plain numpy + PIL and works on any detector that follows
insightface's return format: ``analyser.prepare(ctx_id=..., det_size=(s, s))`` then ``analyser.get(bgr_uint8)``
-> faces, dict-like with attributes ``bbox`` (4,) x1 y1 x2 y2, ``kps`` (5, 2) (left eye, right eye, nose, left
and right mouth corner), ``det_score``, ``embedding`` (512,), ``normed_embedding`` (512,).

Faces of one image are numbered left to right (by the bbox's left edge, then its top edge); ``pick`` chooses
``"largest"`` (bbox area, the default), ``"score"`` (highest detection score: insightface's first face, what
the tencent reference and ComfyUI take), ``"all"`` (every face, left to right), or an index in that order.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError, ModelNotAvailableError
from ..files import atomic_path
from .images import load_image

EMBED_DIM = 512  # InsightFace recognition models (buffalo_l w600k_r50, antelopev2 glintr100)
CROP_SIZE = 224  # the aligned crop the Plus variants encode (tencent ip_adapter_faceid, diffusers docs)
# ComfyUI_IPAdapter_plus IPAdapterPlus.py: `for size in range(640, 256, -64)` until a face is found
DET_SIZES = tuple(range(640, 256, -64))  # 640, 576, 512, 448, 384, 320
DEFAULT_ROOT = "~/.insightface"  # insightface's own default `root`
FORMAT = "ipadapter-face-embeds"
VERSION = "1"
PICKS = ("largest", "score", "all")
# insightface utils/face_align.py `arcface_dst`: the five landmarks of a 112 x 112 ArcFace crop
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


@dataclass
class FaceEmbeds:
    """Identity embeddings of one or more faces, with their aligned crops when they came from images.

    ``embeds``: (F, 512) float32 (numpy, or a torch tensor); ``crops``: F aligned RGB crops (224 x 224) or
    empty (embeddings read from a file without crops); ``source``: where they came from, for messages.
    """

    embeds: Any
    crops: list[Image.Image] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        shape = tuple(self.embeds.shape)
        if len(shape) != 2 or shape[1] != EMBED_DIM:
            raise ValueError(f"FaceEmbeds.embeds must be (faces, {EMBED_DIM}), got {shape}")
        if self.crops and len(self.crops) != shape[0]:
            raise ValueError(f"FaceEmbeds has {shape[0]} embeddings but {len(self.crops)} crops")

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


# ---- alignment -------------------------------------------------------------------------------------------


def face_template(image_size: int = CROP_SIZE) -> np.ndarray:
    """The five ArcFace landmark positions in an ``image_size`` crop, as insightface's ``estimate_norm``
    places them: sizes that are multiples of 112 scale the 112 template; multiples of 128 scale it by
    size/128 and shift x by 8 * size/128 (the 112 template centred in 128). 224 -> ``ARCFACE_DST * 2``."""
    if image_size > 0 and image_size % 112 == 0:
        ratio, shift_x = image_size / 112.0, 0.0
    elif image_size > 0 and image_size % 128 == 0:
        ratio = image_size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise InputError(f"aligned face size {image_size} is not a multiple of 112 or 128 (e.g. 224, 256)")
    dst = ARCFACE_DST.astype(np.float64) * ratio
    dst[:, 0] += shift_x
    return dst


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection) taking points
    ``src`` (N, 2) to ``dst`` (N, 2), as a (2, 3) matrix: the closed form of Umeyama 1991 ("Least-squares
    estimation of transformation parameters between two point patterns"), the estimate skimage's
    ``SimilarityTransform.estimate`` makes for insightface."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    x_src, x_dst = src - mu_src, dst - mu_dst
    var_src = (x_src**2).sum(axis=1).mean()  # sigma_x^2
    if not var_src > 1e-12:
        raise InputError("face landmarks all lie on one point; cannot align the face")
    cov = x_dst.T @ x_src / len(src)  # Sigma_xy (2, 2)
    u, d, vt = np.linalg.svd(cov)
    s = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[-1] = -1.0  # the best orthogonal map is a reflection: take the best rotation instead
    rotation = u @ np.diag(s) @ vt
    scale = float(d @ s) / var_src
    translation = mu_dst - scale * rotation @ mu_src
    return np.hstack([scale * rotation, translation[:, None]])


def align_face(image: Image.Image, kps: Any, size: int = CROP_SIZE) -> Image.Image:
    """The ``size`` x ``size`` RGB crop with the five landmarks ``kps`` (5, 2) moved onto the ArcFace
    template: insightface's ``norm_crop`` (similarity estimate, then ``cv2.warpAffine`` bilinear, black
    outside), done with PIL. Pixel coordinates follow OpenCV (pixel centres on integers)."""
    kps = np.asarray(kps, np.float64)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise InputError(f"face landmarks must be 5 finite (x, y) points, got shape {kps.shape}")
    forward = np.vstack([similarity_transform(kps, face_template(size)), [0.0, 0.0, 1.0]])
    (a, b, c), (d, e, f) = np.linalg.inv(forward)[:2]  # crop pixel -> image pixel
    # PIL maps output pixel centres (x + 0.5) to input coordinates whose pixel centres are at + 0.5: shift
    # the offsets so that integer pixel (x, y) samples image point (a x + b y + c, d x + e y + f) as cv2 does.
    c, f = c + 0.5 - 0.5 * (a + b), f + 0.5 - 0.5 * (d + e)
    return image.convert("RGB").transform(
        (size, size), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )


# ---- detection -------------------------------------------------------------------------------------------


def _prints_to_stderr() -> contextlib.AbstractContextManager:
    """insightface prints progress ("find model", "set det-size") on stdout; keep stdout for --json."""
    return contextlib.redirect_stdout(sys.stderr)


class FaceAnalyser:
    """An opened InsightFace ``FaceAnalysis`` app (detection + recognition only), quiet on stdout.

    Follows the app's interface (``prepare(ctx_id=, det_size=)``, ``get(bgr)``), so :func:`detect_faces`
    takes it or any stand-in with that interface."""

    def __init__(self, app: Any, *, name: str, root: Path, ctx_id: int = 0) -> None:
        self.app, self.name, self.root, self.ctx_id = app, name, root, ctx_id

    def prepare(self, ctx_id: int, det_size: tuple[int, int], det_thresh: float = 0.5) -> None:
        with _prints_to_stderr():
            self.app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=det_size)

    def get(self, image: np.ndarray) -> list:
        with _prints_to_stderr():
            return list(self.app.get(image))


def face_model_folder(model: str = "buffalo_l", root: str | Path | None = None) -> Path:
    """``<root>/models/<model>`` (root defaults to ``~/.insightface``) after checking that it holds the
    model's ``.onnx`` files; a one-line ``ModelNotAvailableError`` says where to put them otherwise. Needs no
    insightface, so a front end can check early."""
    if not model or Path(model).name != model or model in (".", ".."):
        raise InputError(f"face model name {model!r} must be a folder name such as buffalo_l or antelopev2")
    folder = Path(root or DEFAULT_ROOT).expanduser() / "models" / model
    if any(folder.glob("*.onnx")):
        return folder
    if any((folder / model).glob("*.onnx")):
        raise ModelNotAvailableError(
            f"InsightFace model {model!r}: its .onnx files are in {folder / model}, one folder too deep (its zip unpacks that way); move them up into {folder}"
        )
    raise ModelNotAvailableError(
        f"InsightFace model {model!r} not found: no .onnx files in {folder}; download {model}.zip (buffalo_l or antelopev2) from the deepinsight/insightface GitHub releases (https://github.com/deepinsight/insightface/releases, v0.7) and unzip it so the .onnx files sit in {folder} (default root ~/.insightface, or point --face-model-root at a folder holding models/{model}/); these models are licensed for non-commercial research use only"
    )


def open_analyser(
    model: str = "buffalo_l",
    root: str | Path | None = None,
    providers: Sequence[str] | None = None,
    *,
    ctx_id: int = 0,
) -> FaceAnalyser:
    """Open InsightFace's ``FaceAnalysis(name=model, root=root)`` with its detection and recognition models
    (``providers``: onnxruntime execution providers; None = insightface's default). The model folder is
    checked first: ``FaceAnalysis`` would otherwise try to download into it."""
    try:
        from insightface.app import FaceAnalysis  # the optional `face` extra, needed only to detect faces
    except ImportError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelNotAvailableError(
            f"face detection needs insightface, which could not be imported ({reason}); pip install 'ipadapter[face]', or pass --face-embeds FILE with a saved face embedding"
        ) from None
    folder = face_model_folder(model, root)
    home, extra = folder.parent.parent, {} if providers is None else {"providers": list(providers)}
    try:
        with _prints_to_stderr():
            app = FaceAnalysis(
                name=model, root=str(home), allowed_modules=["detection", "recognition"], **extra
            )
    except AssertionError:  # FaceAnalysis asserts that a detection model was found
        raise ModelNotAvailableError(
            f"InsightFace model {model!r} in {folder} has no face detection model among its .onnx files; unzip the complete {model}.zip there"
        ) from None
    if "recognition" not in getattr(app, "models", {}):
        raise ModelNotAvailableError(
            f"InsightFace model {model!r} in {folder} has no face recognition model among its .onnx files; unzip the complete {model}.zip there"
        )
    analyser = FaceAnalyser(app, name=model, root=home, ctx_id=ctx_id)
    analyser.prepare(ctx_id, (DET_SIZES[0], DET_SIZES[0]))
    return analyser


def _field(face: Any, name: str) -> Any:
    value = getattr(face, name, None)
    if value is None and isinstance(face, dict):
        value = face.get(name)
    return value


def _vector(face: Any, name: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    value = _field(face, name)
    array = None if value is None else np.asarray(value, np.float64)
    if array is None or array.shape != shape or not np.isfinite(array).all():
        got = "nothing" if array is None else f"shape {array.shape}"
        raise InputError(f"the face detector gave no usable {what} (`{name}`: {got}; expected {shape})")
    return array


def _embedding(face: Any, normed: bool) -> np.ndarray:
    """The face's identity embedding (512,) float32: L2-normalised (again, defensively) unless ``normed``
    is False (the raw ``embedding``, which portrait_unnorm reads)."""
    if not normed:
        return _vector(face, "embedding", (EMBED_DIM,), "face embedding").astype(np.float32)
    name = "normed_embedding" if _field(face, "normed_embedding") is not None else "embedding"
    vector = _vector(face, name, (EMBED_DIM,), "face embedding")
    norm = float(np.linalg.norm(vector))
    if not norm > 0:
        raise InputError("the face detector gave an all-zero face embedding")
    return (vector / norm).astype(np.float32)


def _choose(faces: list, pick: str | int, source: str) -> list:
    """``faces`` sorted left to right; the ones ``pick`` asks for."""
    if pick == "all":
        return faces
    if pick == "largest":
        box = [_vector(f, "bbox", (4,), "face box") for f in faces]
        return [faces[int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in box]))]]
    if pick == "score":
        return [faces[int(np.argmax([float(_field(f, "det_score") or 0.0) for f in faces]))]]
    if not 0 <= pick < len(faces):
        n = len(faces)
        numbers = "0" if n == 1 else f"0..{n - 1}"
        raise InputError(
            f"face index {pick} asked but {source} has {n} face{'s' * (n != 1)} (left to right: {numbers})"
        )
    return [faces[pick]]


def _check_pick(pick: Any) -> None:
    if isinstance(pick, bool) or not (pick in PICKS or isinstance(pick, (int, np.integer))):
        raise InputError(
            f"face pick {pick!r} is not one of {', '.join(PICKS)} or a face index (0 = leftmost)"
        )


def detect_faces(
    image: Image.Image,
    analyser: Any,
    *,
    pick: str | int = "largest",
    sizes: Sequence[int] = DET_SIZES,
    source: str | None = None,
    ctx_id: int | None = None,
    normed: bool = True,
    crop_size: int = CROP_SIZE,
) -> FaceEmbeds:
    """Detect the faces of ``image`` and return the chosen ones' embeddings and aligned crops.

    Detection runs at each size of ``sizes`` in turn (``analyser.prepare(ctx_id=, det_size=(s, s))`` before
    every try, so the result never depends on an earlier call) until some face is found; the detector gets
    the image as a BGR uint8 array, as insightface expects. ``pick``: see the module doc. ``ctx_id``: the
    analyser's own ``ctx_id`` when None (0 if it has none)."""
    source = source or getattr(image, "filename", "") or "the image"
    _check_pick(pick)
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s <= 0 or s % 32 for s in sizes):
        raise InputError(f"face detection sizes {sizes} must be positive multiples of 32 (e.g. 640..320)")
    ctx_id = getattr(analyser, "ctx_id", 0) if ctx_id is None else ctx_id
    rgb = image.convert("RGB")
    bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])  # (H, W, 3) uint8, channels B, G, R
    faces: list = []
    for size in sizes:
        with _prints_to_stderr():
            analyser.prepare(ctx_id=ctx_id, det_size=(size, size))
            faces = list(analyser.get(bgr) or [])
        if faces:
            break
    if not faces:
        tried = f"{sizes[0]}..{sizes[-1]}" if len(sizes) > 1 else f"{sizes[0]}"
        raise InputError(
            f"no face found in {source} (tried detection sizes {tried}); use a clearer, frontal photo or pass --face-embeds"
        )
    boxes = [_vector(f, "bbox", (4,), "face box") for f in faces]
    order = sorted(range(len(faces)), key=lambda i: (boxes[i][0], boxes[i][1]))
    chosen = _choose([faces[i] for i in order], pick, source)
    embeds = np.stack([_embedding(f, normed) for f in chosen])
    crops = [align_face(rgb, _vector(f, "kps", (5, 2), "face landmarks"), crop_size) for f in chosen]
    return FaceEmbeds(embeds, crops, source)


def faces_from_images(
    images: Sequence[Image.Image],
    analyser: Any,
    *,
    pick: str | int = "largest",
    sources: Sequence[str] | None = None,
    **options: Any,
) -> FaceEmbeds:
    """:func:`detect_faces` on each image (``pick`` applies per image), faces concatenated in image order."""
    if not images:
        raise InputError("no face images given")
    sources = list(sources) if sources is not None else [None] * len(images)
    if len(sources) != len(images):
        raise ValueError(f"{len(images)} images but {len(sources)} sources")
    found = [
        detect_faces(im, analyser, pick=pick, source=s, **options)
        for im, s in zip(images, sources, strict=True)
    ]
    return FaceEmbeds(
        np.concatenate([f.embeds for f in found]),
        [c for f in found for c in f.crops],
        ", ".join(f.source for f in found),
    )


@dataclass(frozen=True)
class FoundFace:
    """Where a chosen face was found: its image (``source``), its position there left to right (``index``, 0 =
    leftmost), its box ``bbox`` (x1, y1, x2, y2 in pixels of the upright image) and detection score."""

    source: str
    index: int
    bbox: tuple[float, float, float, float]
    det_score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "index": self.index,
            "bbox": list(self.bbox),
            "det_score": self.det_score,
        }


class _Recorder:
    """An analyser that keeps what its last ``get`` returned (every face of the last try), for :func:`locate_faces`."""

    def __init__(self, analyser: Any) -> None:
        self._analyser, self.found = analyser, []

    def __getattr__(self, name: str) -> Any:  # ctx_id, name, ... as the analyser has them (or not)
        return getattr(self._analyser, name)

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        return self._analyser.prepare(*args, **kwargs)

    def get(self, image: np.ndarray) -> list:
        self.found = list(self._analyser.get(image) or [])
        return self.found


def locate_faces(
    images: Sequence[Image.Image],
    analyser: Any,
    *,
    pick: str | int = "largest",
    sources: Sequence[str] | None = None,
    **options: Any,
) -> tuple[FaceEmbeds, list[FoundFace]]:
    """:func:`faces_from_images`, and where each face it returns was found (same order: image by image, left
    to right within an image), for reports. The faces are exactly :func:`detect_faces`'s choice."""
    if not images:
        raise InputError("no face images given")
    sources = list(sources) if sources is not None else [None] * len(images)
    if len(sources) != len(images):
        raise ValueError(f"{len(images)} images but {len(sources)} sources")
    found, where = [], []
    for image, source in zip(images, sources, strict=True):
        recorder = _Recorder(analyser)
        faces = detect_faces(image, recorder, pick=pick, source=source, **options)
        boxes = [_vector(f, "bbox", (4,), "face box") for f in recorder.found]
        order = sorted(range(len(boxes)), key=lambda i: (boxes[i][0], boxes[i][1]))  # as detect_faces
        ordered = [recorder.found[i] for i in order]
        for face in _choose(ordered, pick, faces.source):
            index = next(i for i, f in enumerate(ordered) if f is face)
            box = tuple(float(v) for v in boxes[order[index]])
            score = float(_field(face, "det_score") or 0.0)
            where.append(FoundFace(faces.source, index, box, score))
        found.append(faces)
    embeds = FaceEmbeds(
        np.concatenate([f.embeds for f in found]),
        [c for f in found for c in f.crops],
        ", ".join(f.source for f in found),
    )
    return embeds, where


def face_device(device: str = "auto") -> tuple[int, list[str] | None]:
    """InsightFace's ``ctx_id`` and the onnxruntime ``providers`` for ``device`` (for :func:`open_analyser`):
    ``auto`` -> (0, None), insightface's default (every provider onnxruntime has, CUDA first when it has it);
    ``cpu`` -> (-1, CPU only); ``cuda`` -> (0, CUDA then CPU), refused when onnxruntime has no CUDA provider
    (onnxruntime would otherwise fall back to the CPU with only a warning). Imports onnxruntime only for cuda."""
    if device == "auto":
        return 0, None
    if device == "cpu":
        return -1, ["CPUExecutionProvider"]
    if device != "cuda":
        raise InputError(f"face detection device {device!r} is not one of auto, cpu, cuda")
    try:
        import onnxruntime  # the optional `face` extra (insightface runs its models with it)
    except ImportError:
        return 0, ["CUDAExecutionProvider", "CPUExecutionProvider"]  # open_analyser reports the missing extra
    available = list(onnxruntime.get_available_providers())
    if "CUDAExecutionProvider" not in available:
        raise ModelNotAvailableError(
            f"face detection on cuda needs onnxruntime with its CUDA provider, but it has only {', '.join(available) or 'none'}; pip install onnxruntime-gpu in place of onnxruntime, or use device cpu"
        )
    return 0, ["CUDAExecutionProvider", "CPUExecutionProvider"]


# ---- files -----------------------------------------------------------------------------------------------


def _check_embeds(array: Any, source: str) -> np.ndarray:
    """``array`` as (F, 512) float32 after checking it is a usable face embedding; one-line InputErrors."""
    if hasattr(array, "detach"):  # a torch tensor: no torch import needed to convert it
        array = array.detach().cpu().float().numpy()
    array = np.asarray(array)
    if array.ndim not in (1, 2):
        raise InputError(
            f"{source} holds an array of shape {array.shape}; expected ({EMBED_DIM},) for one face or (faces, {EMBED_DIM})"
        )
    if array.size == 0:
        raise InputError(
            f"{source} holds no face embedding (shape {array.shape}); expected ({EMBED_DIM},) or (faces, {EMBED_DIM})"
        )
    if array.shape[-1] != EMBED_DIM:
        raise InputError(
            f"{source} has {array.shape[-1]} values per face; expected {EMBED_DIM} (an InsightFace buffalo_l/antelopev2 embedding, face.normed_embedding)"
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"{source} holds {array.dtype} values; expected floating-point face embeddings")
    if not np.isfinite(array).all():
        raise InputError(f"{source} holds NaN or infinite values; expected a finite face embedding")
    return array.reshape(-1, EMBED_DIM).astype(np.float32)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except TypeError:  # bfloat16 has no numpy dtype: read through torch (only for such files)
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).float().numpy() for k in f.keys()}


def load_face_file(path: str | Path) -> FaceEmbeds:
    """A face-embeddings file: ``.npy`` ((512,) or (F, 512)) or ``.safetensors`` (``face_embeds``, or its
    single tensor; optional ``face_crops`` uint8 (F, 224, 224, 3)). One-line ``InputError`` on anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        raise InputError(
            f"face embeddings file {path} must be a .npy or .safetensors file (got '{suffix or 'no suffix'}')"
        )
    if not path.is_file():
        raise InputError(f"face embeddings file {path} not found")
    try:
        tensors = (
            {"face_embeds": np.load(path, allow_pickle=False)}
            if suffix == ".npy"
            else _read_safetensors(path)
        )
    except Exception as err:  # any unreadable content (truncated, not that format, pickled objects)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise InputError(f"face embeddings file {path} is not a readable {suffix} file ({reason})") from None
    if "face_embeds" not in tensors and len(tensors) != 1:
        hint = (
            " (an `ipadapter embed` file holds image features, not a face embedding)"
            if "features" in tensors
            else ""
        )
        raise InputError(
            f"face embeddings file {path} holds tensors {sorted(tensors)}; expected 'face_embeds' or a single tensor{hint}"
        )
    embeds = _check_embeds(
        tensors.get("face_embeds", next(iter(tensors.values()))), f"face embeddings file {path}"
    )
    crops = tensors.get("face_crops")
    if crops is None:
        return FaceEmbeds(embeds, [], str(path))
    if (
        crops.dtype != np.uint8
        or crops.shape[0] != len(embeds)
        or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3)
    ):
        raise InputError(
            f"face embeddings file {path} has face_crops {crops.dtype} {crops.shape}; expected uint8 ({len(embeds)}, {CROP_SIZE}, {CROP_SIZE}, 3)"
        )
    return FaceEmbeds(embeds, [Image.fromarray(c) for c in crops], str(path))


def load_face_embeds(path: str | Path) -> np.ndarray:
    """The (F, 512) float32 face embeddings of a ``.npy`` or ``.safetensors`` file (see :func:`load_face_file`)."""
    return load_face_file(path).embeds


def save_face_embeds(
    path: str | Path, embeds: Any, crops: Sequence[Image.Image] | None = None, *, source: str = ""
) -> Path:
    """Write ``embeds`` ((512,) or (F, 512)) and optional aligned ``crops`` (F images, 224 x 224) to a
    ``.safetensors`` file as ``face_embeds`` float32 and ``face_crops`` uint8 (F, 224, 224, 3), whole or not
    at all; metadata ``format`` = "ipadapter-face-embeds", ``version``, ``source``."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"face embeddings are saved as .safetensors, not {path.name!r}")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist")
    tensors = {"face_embeds": np.ascontiguousarray(_check_embeds(embeds, "the face embeddings to save"))}
    if crops:
        if len(crops) != len(tensors["face_embeds"]):
            raise InputError(f"{len(tensors['face_embeds'])} face embeddings but {len(crops)} face crops")
        arrays = [np.asarray(c.convert("RGB")) for c in crops]
        if any(a.shape != (CROP_SIZE, CROP_SIZE, 3) for a in arrays):
            raise InputError(f"face crops must be {CROP_SIZE} x {CROP_SIZE} (aligned by align_face)")
        tensors["face_crops"] = np.ascontiguousarray(np.stack(arrays))
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={"format": FORMAT, "version": VERSION, "source": source})
    return path


__all__ = [
    "CROP_SIZE",
    "DET_SIZES",
    "EMBED_DIM",
    "FaceAnalyser",
    "FaceEmbeds",
    "FoundFace",
    "align_face",
    "detect_faces",
    "face_device",
    "face_model_folder",
    "face_template",
    "faces_from_images",
    "load_face_embeds",
    "load_face_file",
    "locate_faces",
    "open_analyser",
    "save_face_embeds",
    "similarity_transform",
]


def as_faces(
    value: Any, *, normed: bool = True, pick: str | int = "largest", root: str | Path | None = None
) -> FaceEmbeds:
    """What a FaceID adapter's reference can be, as :class:`FaceEmbeds`: FaceEmbeds; an array or tensor (512,)
    or (F, 512); a face-embeddings file (``.npy`` / ``.safetensors``); or a face image (file or PIL image),
    detected with InsightFace's ``buffalo_l`` under ``root`` (default: insightface's own, ``~/.insightface``);
    ``pick``: which face (:func:`detect_faces`); ``normed=False``: the raw embedding, what portrait-unnorm
    reads."""
    if isinstance(value, FaceEmbeds):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy array or torch tensor
        array = value.detach().cpu().float().numpy() if hasattr(value, "detach") else np.asarray(value)
        return FaceEmbeds(
            _check_embeds(array, "the face embeddings given"), source="the face embeddings given"
        )
    if isinstance(value, str | Path) and Path(value).suffix.lower() in (".npy", ".safetensors"):
        return load_face_file(value)
    if isinstance(value, str | Path | Image.Image):
        image = value if isinstance(value, Image.Image) else _open_image(Path(value))
        source = "the face image" if isinstance(value, Image.Image) else str(value)
        return detect_faces(image, open_analyser(root=root), pick=pick, source=source, normed=normed)
    raise InputError(
        f"a FaceID adapter's reference is a face: face embeddings (an array of 512 values per face, a .npy or "
        f".safetensors file from `ipadapter face-embed`) or a face image; got {type(value).__name__}"
    )


def _open_image(path: Path) -> Image.Image:
    return load_image(path, "face image")  # safe decoding, with the project's limits and messages
