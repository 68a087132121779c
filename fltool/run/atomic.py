"""Atomic file writes: write a temp file beside the target, fsync, rename over it.

A crash or Ctrl-C at any point leaves either the old file or the new one, never a
half-written one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from fltool.errors import FltoolError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; the files of a run get the mode any other new file would
FILE_MODE = 0o666 & ~_read_umask()


class WriteFailed(FltoolError):
    """The OS refused a write (a full disk, a quota, an I/O error); the target file is
    the last complete version, or absent."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"{path}: cannot write: {exc.strerror or exc}; the file on disk is the last complete one")
        self.path = path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        _write(path, data)
    except OSError as exc:
        raise WriteFailed(path, exc) from None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable: without it, a power cut can bring back the old file."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: directories cannot be opened for fsync
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: object, path: str | Path) -> None:
    buf = io.BytesIO()
    import torch  # here, not at the top: the CLI imports this module and starts without torch

    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())
