"""Writing files whole or not at all: every file this tool writes goes through :func:`atomic_path`.

The writer gets a temporary name in the final file's folder (``.ipadapter-partial-<pid>.<name>``, a name only
this tool makes); when it is done the file is flushed to disk (fsync), given the permissions of any new file
(``0o666 & ~umask``: safetensors alone would make it 0600) and renamed over the final name (``os.replace``).
A writer that fails, or a process that is killed, never leaves a half file under the final name, and an old
file there stays until the new one is complete. The temporary name keeps the final suffix (writers pick the
format from it) and numbers like the final name (:func:`ipadapter.media.numbered` of a temporary name gives
the temporary names of the numbered finals).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".ipadapter-partial-"
_TEMP = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)\.(.+)", re.DOTALL)


def temp_path(final: str | Path, pid: int | None = None) -> Path:
    """The temporary name :func:`atomic_path` writes ``final`` under: ``.ipadapter-partial-<pid>.<name>``."""
    final = Path(final)
    return final.with_name(f"{TEMP_PREFIX}{os.getpid() if pid is None else pid}.{final.name}")


def temp_target(name: str) -> str | None:
    """The final file name a temporary name of this tool stands for (any process), else None."""
    match = _TEMP.fullmatch(name)
    return match.group(2) if match else None


def _own_temp(path: Path) -> bool:
    match = _TEMP.fullmatch(path.name)
    return match is not None and int(match.group(1)) == os.getpid()


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield the temporary path to write ``final`` to: renamed into place after the block, removed on failure.

    ``final``'s folder must exist. A ``final`` that is already one of this process's temporary names (a caller
    that writes several files and renames them itself, e.g. ``ipadapter batch``) is yielded as it is.
    """
    with atomic_paths([final]) as temps:
        yield temps[0]


@contextmanager
def atomic_paths(finals: Sequence[str | Path]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several files written together: all of them are renamed after the block."""
    finals = [Path(f) for f in finals]
    own = [_own_temp(f) for f in finals]
    temps = [f if mine else temp_path(f) for f, mine in zip(finals, own, strict=True)]
    try:
        modes = [None if mine else _reserve(t) for t, mine in zip(temps, own, strict=True)]
        yield temps
        for temp, final, mode in zip(temps, finals, modes, strict=True):
            if mode is None:
                continue  # an outer atomic_path renames it
            _sync(temp)
            os.chmod(temp, mode)
            os.replace(temp, final)
        for folder in {final.parent for final, mine in zip(finals, own, strict=True) if not mine}:
            _sync_folder(folder)
    finally:
        for temp, mine in zip(temps, own, strict=True):
            if not mine:
                temp.unlink(missing_ok=True)


def _reserve(temp: Path) -> int:
    """Create ``temp`` empty (a stale one of a killed process with the same pid is replaced) and return the
    permission bits a new file gets here (the process's umask and the folder's default ACL applied)."""
    temp.unlink(missing_ok=True)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)


def _sync(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """The rename itself on disk (POSIX); not possible everywhere (Windows), where it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
