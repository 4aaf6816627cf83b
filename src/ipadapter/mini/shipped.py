"""The shipped miniature family: ``--base mini`` and ``--adapter mini`` / ``mini-plus`` resolve here.

The folder is the output of the mini build (``build.py``): ``pipeline/`` (the base), ``models/`` (adapters and
the image encoder in the h94 layout), ``clip/`` (the scorer), ``data/eval`` is not shipped.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotAvailableError

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
