"""``face-embed``: detect faces with InsightFace and store their embeddings for the FaceID adapters."""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

from ..embedding import check_embed_output
from ..prompt import faces
from ..prompt.images import load_image

PICK_HELP = "largest (biggest box, the default), score (highest detection score), all, or a face index"


def face_index(text: str) -> str | int:
    """An argparse type for ``--face-index``: one of ``faces.PICKS`` or a face index (0 = leftmost)."""
    if text in faces.PICKS:
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not {', '.join(faces.PICKS)} or a face index (0 = leftmost, 1 = next, ...)"
        )
    return value


def _add_face_embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="photos with the face (faces kept in this order)"
    )
    p.add_argument("--output", required=True, help="the .safetensors file to write (for --face-embeds FILE)")
    p.add_argument(
        "--face-model",
        default="buffalo_l",
        help="InsightFace model pack (default buffalo_l, what the FaceID adapters were trained with; or antelopev2)",
    )
    p.add_argument(
        "--face-model-root",
        help=f"folder holding models/<face-model>/*.onnx (default {faces.DEFAULT_ROOT}, insightface's own)",
    )
    p.add_argument(
        "--face-index",
        type=face_index,
        default="largest",
        help=f"which face of each image: {PICK_HELP}, counted left to right from 0",
    )
    p.add_argument(
        "--raw",
        action="store_true",
        help="store the raw (unnormalised) embedding, what the portrait-unnorm adapter reads "
        "(default: the normalised one, what the other FaceID adapters read)",
    )
    p.add_argument(
        "--crops",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store the aligned 224 px face crops, which the FaceID-Plus adapters encode (default: --crops)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where InsightFace runs (default auto: onnxruntime's providers, CUDA first when it has it)",
    )
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.add_argument(
        "--json", action="store_true", help="print what was written as JSON (faces with source and box)"
    )


def _quiet(quiet: bool) -> contextlib.AbstractContextManager:
    """insightface prints progress ("find model" per model, "set det-size" per detection try); the library sends
    it to stderr, where it would bury our one-line messages: dropped unless --debug."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


def cmd_face_embed(args: argparse.Namespace) -> dict[str, Any]:
    """Detect the chosen face of each image and write the embeddings (and crops) file."""
    # cheap checks first (output, images, model folder, device); only then insightface opens its models
    output = check_embed_output(args.output, force=args.force)
    images = [load_image(path, "face image") for path in args.images]
    folder = faces.face_model_folder(args.face_model, args.face_model_root)
    ctx_id, providers = faces.face_device(args.device)
    with _quiet(getattr(args, "quiet", False)):
        analyser = faces.open_analyser(args.face_model, args.face_model_root, providers, ctx_id=ctx_id)
        found, where = faces.locate_faces(
            images, analyser, pick=args.face_index, sources=args.images, normed=not args.raw
        )
    faces.save_face_embeds(output, found.embeds, found.crops if args.crops else None, source=found.source)
    kind = "raw" if args.raw else "normalised"
    if not args.json:
        crops = f", with {faces.CROP_SIZE} px crops" if args.crops else ", no crops"
        print(
            f"wrote {output} ({len(found)} face{'s' * (len(found) != 1)} from {len(images)} "
            f"image{'s' * (len(images) != 1)}, {kind} {args.face_model} embeddings{crops})"
        )
    return {
        "output": str(output),
        "count": len(found),
        "faces": [face.to_dict() for face in where],
        "embedding": kind,
        "crops": bool(args.crops),
        "face_model": args.face_model,
        "face_model_folder": str(folder),
    }


def register(sub: Any) -> None:
    """Add ``face-embed`` to the subcommands ``sub``."""
    p = sub.add_parser(
        "face-embed",
        help="detect faces (InsightFace) and store their embeddings for FaceID adapters (--face-embeds FILE)",
    )
    _add_face_embed_options(p)
    p.set_defaults(run=cmd_face_embed)
