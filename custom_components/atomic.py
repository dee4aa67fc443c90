"""Atomic writes, the partial files of interrupted ones, and the check that an output folder can be written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)
_PARTIAL_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path`` and move it over ``path`` only when the block ends without error.

    A reader never sees a half-written file, and an interrupted write leaves the previous version intact.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary); the parent folder is created when missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX, dir=path.parent)
    # mkstemp creates the file 0600; give it the mode a plain open() would, so outputs stay readable by others
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def partial_writes(folder: str | os.PathLike) -> list[Path]:
    """The temporary files (``.<name>.*.tmp``) that :func:`atomic_write` calls killed mid-write left in ``folder``."""
    return sorted(Path(folder).glob(f".*{_PARTIAL_SUFFIX}"))


def writable_folder(folder: str | os.PathLike, what: str, create: bool = True) -> Path:
    """Check a file can be written in ``folder`` (creating it, unless ``create`` is false: then its nearest existing
    ancestor is checked and nothing is made), so that a run refuses at its start, not after an epoch's work. Raises
    :class:`InputError` naming the folder, ``what`` goes there and the OS's reason."""
    from custom_components.errors import InputError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: cannot write {what} there (a file, not a folder)")
    probe = folder
    if not create:
        probe = next(p for p in (folder, *folder.parents) if p.exists())
        if not probe.is_dir():
            raise InputError(f"{folder}: cannot write {what} there ({probe} is a file, not a folder)")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise InputError(f"{folder}: cannot write {what} there ({err.strerror or err})") from err
    return folder
