"""Read and write the official IP-Adapter checkpoint formats, safely.

Formats (DESIGN.md §3.1):
- ``.bin`` / ``.pt`` / ``.pth``: a pickled ``{"image_proj": {...}, "ip_adapter": {...}}``. Read with
  ``torch.load(weights_only=True)`` only: a file that needs code to unpickle is refused.
- ``.safetensors``: the same tensors, flat, with the prefixes ``image_proj.`` and ``ip_adapter.``.
- XLabs' Flux ``.safetensors`` (DESIGN.md §3.5): ``ip_adapter_proj_model.*`` is the image projection and
  ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`` the layers; read as
  ``image_proj.*`` and ``ip_adapter.{i}.to_{k,v}_ip.*``, as diffusers' Flux loader does.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_path

SECTIONS = ("image_proj", "ip_adapter")
KV_PARTS = ("to_k_ip", "to_v_ip")  # each layer's image key / value projections


def ip_key(layer_id: int, part: str) -> str:
    """The ``ip_adapter`` key of one layer's image projection: ``"{layer_id}.{part}.weight"`` (DESIGN.md §3.1)."""
    return f"{layer_id}.{part}.weight"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Checkpoint:
    """The two halves of an IP-Adapter checkpoint, as plain state dicts."""

    image_proj: dict[str, torch.Tensor]
    ip_adapter: dict[str, torch.Tensor]
    source: str = "<memory>"
    metadata: dict[str, str] = field(default_factory=dict)

    def flat(self) -> dict[str, torch.Tensor]:
        """The ``.safetensors`` layout: one flat dict with section prefixes."""
        out = {f"image_proj.{k}": v for k, v in self.image_proj.items()}
        out.update({f"ip_adapter.{k}": v for k, v in self.ip_adapter.items()})
        return out

    def nested(self) -> dict[str, dict[str, torch.Tensor]]:
        """The ``.bin`` layout: ``{"image_proj": ..., "ip_adapter": ...}``."""
        return {"image_proj": dict(self.image_proj), "ip_adapter": dict(self.ip_adapter)}


def _describe_keys(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} entries ({shown}{more})" if keys else "no tensors"


def split_sections(state: dict, source: str) -> Checkpoint:
    """Turn either layout (nested or flat-prefixed) into a :class:`Checkpoint`, or explain why not."""
    expected = "expected the official IP-Adapter layout: 'image_proj.*' and 'ip_adapter.*' tensors"
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: holds a {type(state).__name__}, not a dict of tensors; {expected}")
    if all(isinstance(state.get(s), dict) for s in SECTIONS):
        sections = {s: dict(state[s]) for s in SECTIONS}
    elif any(str(k).startswith(XLABS_PREFIXES) for k in state):
        sections = _xlabs_sections(state)
    else:
        sections = {s: {} for s in SECTIONS}
        for key, value in state.items():
            head, _, rest = str(key).partition(".")
            if head in sections and rest:
                sections[head][rest] = value
    for name, part in sections.items():
        if not part:
            found = _describe_keys([str(k) for k in state])
            hint = _guess_kind(list(map(str, state)))
            raise CheckpointError(
                f"{source}: is not an IP-Adapter checkpoint: no '{name}' tensors among {found}{hint}; {expected}"
            )
        for key, value in part.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{source}: '{name}.{key}' is a {type(value).__name__}, not a tensor; {expected}"
                )
    return Checkpoint(sections["image_proj"], sections["ip_adapter"], source=source)


XLABS_PREFIXES = ("ip_adapter_proj_model.", "double_blocks.")
_XLABS_PARTS = {"ip_adapter_double_stream_k_proj": "to_k_ip", "ip_adapter_double_stream_v_proj": "to_v_ip"}


def _xlabs_sections(state: dict) -> dict[str, dict]:
    """XLabs' flat Flux layout as our two sections (keys the pattern does not cover stay unplaced)."""
    sections: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, value in state.items():
        key = str(key)
        if key.startswith("ip_adapter_proj_model."):
            sections["image_proj"][key.removeprefix("ip_adapter_proj_model.")] = value
            continue
        parts = key.split(".")  # double_blocks.{i}.processor.{part}.{weight|bias}
        if len(parts) == 5 and parts[0] == "double_blocks" and parts[3] in _XLABS_PARTS:
            sections["ip_adapter"][f"{parts[1]}.{_XLABS_PARTS[parts[3]]}.{parts[4]}"] = value
    return sections


def _guess_kind(keys: list[str]) -> str:
    """A short hint about what a non-adapter file probably is, for the error message."""
    if any("lora" in k.lower() for k in keys):
        return " (it looks like a LoRA)"
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in keys):
        return " (it looks like a full Stable Diffusion checkpoint; pass it as --base)"
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in keys):
        return " (it looks like diffusers UNet weights)"
    return ""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read an official IP-Adapter checkpoint from ``.safetensors`` or a pickled ``.bin``.

    Raises :class:`CheckpointError` naming the file for anything unreadable: missing, empty, truncated,
    a pickle that needs code, or tensors that are not the IP-Adapter layout.
    """
    path = Path(path)
    head = _head(path)
    if path.suffix.lower() == ".safetensors":
        state, metadata = _read_safetensors(path, head)
    else:
        state, metadata = _read_pickle(path, head), {}
    ckpt = split_sections(state, str(path))
    ckpt.metadata = metadata
    return ckpt


def _head(path: Path) -> bytes:
    """The file's first bytes, after refusing what cannot be a checkpoint file at all."""
    source = str(path)
    if path.is_dir():
        raise CheckpointError(
            f"{source}: is a folder; pass the path of an IP-Adapter .safetensors or .bin file in it"
        )
    if not path.is_file():
        raise CheckpointError(f"{source}: no such file; pass the path of an IP-Adapter .safetensors or .bin")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{source}: the file is empty (0 bytes); download it again")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{source}: unknown file type '{suffix or '(none)'}'; expected .safetensors or .bin"
        )
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError as e:
        raise CheckpointError(
            f"{source}: cannot be read ({e.strerror or e}); check its permissions"
        ) from None


def _read_safetensors(path: Path, head: bytes) -> tuple[dict, dict[str, str]]:
    try:
        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            return state, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        what = _sniff(head)
        if what.startswith("it looks like a .safetensors"):  # it is one, and damaged: not a naming problem
            what = ""
        if what or head.startswith((_ZIP, _TORCH_LEGACY)):
            what = what or "it is a PyTorch checkpoint (a zip archive or a pickle): rename it to .bin"
            raise CheckpointError(f"{path}: is not a .safetensors file ({what})") from e
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({_first_line(e)}); it may be truncated: download it again"
        ) from e


def _read_pickle(path: Path, head: bytes) -> dict:
    if not (head.startswith(_ZIP) or head[:1] == _PICKLE):
        what = "; " + _sniff(head) if _sniff(head) else ""
        raise CheckpointError(
            f"{path}: is not a PyTorch checkpoint (neither a zip archive nor a pickle: it starts with "
            f"{_preview(head)}{what}); expected an IP-Adapter .bin or .safetensors file"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: unpickling it would run code ({_first_line(e)}); only plain tensor "
            "checkpoints are loaded. Use a .safetensors file instead"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated: download it again"
        ) from e
    except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways (KeyError, IndexError...)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); it is "
            "damaged or truncated: download it again"
        ) from e


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` in the format named by the suffix (``.safetensors`` flat, ``.bin`` nested)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a file name ending in .safetensors or .bin")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown output type '{suffix}'; use .safetensors or .bin")
    with atomic_path(path) as temp:  # an existing file stays whole until the new one is
        if suffix == ".safetensors":
            tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.flat().items()}
            save_file(tensors, str(temp), metadata={"format": "pt", **ckpt.metadata})
        else:
            torch.save(ckpt.nested(), str(temp))
    return path


_ZIP = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE = b"\x80"  # pickle protocol 2+ (torch.save's legacy format starts with one)
_TORCH_LEGACY = b"\x80\x02\x8a\x0a"  # the legacy format's magic number, pickled


def _preview(head: bytes, size: int = 8) -> str:
    """The first bytes of a file, quoted: 'hello wo...'."""
    shown = repr(head[:size])[1:]
    return f"{shown[:-1]}...{shown[-1]}" if len(head) > size else shown


def _sniff(head: bytes) -> str:
    """What a file that is no checkpoint probably is, from its first bytes ("" when nothing is recognised)."""
    start = head.lstrip().lower()
    if start.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself: fetch the file with `git lfs pull`"
    if start.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "it is a web page, not the file: download it again (a failed or redirected download?)"
    if start.startswith((b"{", b"[")):
        return "it is JSON text: a config or a recipe, not the adapter's weights"
    if len(head) > 9 and head[8:10] in (b'{"', b"{'") and int.from_bytes(head[:8], "little") < 1 << 30:
        return "it looks like a .safetensors file: rename it to .safetensors"
    return ""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
