"""Atomic file writes: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import os
import tempfile
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["atomic_write", "atomic_torch_save"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None] | bytes) -> None:
    """Write to ``path`` through a temporary file in the same folder, fsync, then rename.

    Parameters
    ----------
    path : path-like
        Destination; its folder is created if missing. An existing file is replaced only
        once the new content is complete on disk.
    write : callable or bytes
        Either the bytes to write, or a function that writes into the open binary file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(write, (bytes, bytearray)):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))
