"""The shipped miniature family: ``--base mini`` and ``--adapter mini`` / ``mini-plus`` resolve here.

The folder is the output of the mini build (``build.py``): ``pipeline/`` (the base), ``models/`` (adapters and
the image encoder in the h94 layout), ``clip/`` (the scorer), ``data/eval`` (held-out references with
``metadata.jsonl``; not shipped).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, ModelNotAvailableError

MODEL_DIR = Path(__file__).resolve().parent / "model"
BASE_NAMES = ("mini",)
ADAPTER_FILES = {"mini": "ip-adapter_mini.safetensors", "mini-plus": "ip-adapter-plus_mini.safetensors"}


def _missing(what: str, path: Path) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"the miniature {what} is not in this installation ({path} is missing); rebuild it with "
        "`python -m ipadapter.mini.build` or reinstall the package"
    )


def base_folder(root: Path = MODEL_DIR) -> Path:
    folder = root / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise _missing("base model", folder)
    return folder


def adapter_file(name: str, root: Path = MODEL_DIR) -> Path:
    path = root / "models" / ADAPTER_FILES[name]
    if not path.is_file():
        raise _missing(f"adapter '{name}'", path)
    return path


def resolve_base(base: str | Path) -> str | Path:
    """``mini`` (when no such local path exists) -> the shipped pipeline folder; anything else unchanged."""
    if str(base) in BASE_NAMES and not Path(base).exists():
        return base_folder()
    return base


def eval_folders(
    base: str | Path, scorer: str | None = None, references: str | Path | None = None
) -> tuple[str, str | None]:
    """The CLIP scorer (CLIPModel folder or hub id) and the references folder for evaluating ``base``.

    Unless given, both come from the mini build ``base`` belongs to (a pipeline folder whose parent holds
    ``clip/`` and ``data/eval/metadata.jsonl``). The references are None when neither is given nor built: the
    caller generates held-out shapes. Raises InputError without a scorer, or for references without
    ``metadata.jsonl``.
    """
    folder = Path(resolve_base(base))
    build_root = folder.parent if (folder / "model_index.json").is_file() else None
    if not scorer and build_root is not None and (build_root / "clip").is_dir():
        scorer = str(build_root / "clip")
    if not scorer:
        raise InputError(
            "no CLIP scorer: pass --scorer with a CLIPModel folder or hub id (a mini build has clip/)"
        )
    refs = None if references is None else str(references)
    if refs is None and build_root and (build_root / "data" / "eval" / "metadata.jsonl").is_file():
        refs = str(build_root / "data" / "eval")
    if refs is not None and not (Path(refs) / "metadata.jsonl").is_file():
        raise InputError(f"--references '{refs}' has no metadata.jsonl; expected a shapes folder")
    return scorer, refs
