"""File I/O: atomic writes (a crash mid-write never leaves a truncated file behind), and reading back
the project's torch files (``{"format": ..., "version": ..., ...}`` dicts) with one set of checks."""
from __future__ import annotations

import os
import tempfile
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["atomic_write", "atomic_torch_save", "read_torch_file", "check_format"]


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


def read_torch_file(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path)`` of plain tensors and containers (``weights_only``; tensors to ``map_location``).

    A missing file stays ``FileNotFoundError``; an unreadable one (truncated, corrupt, not a torch
    file) is a ``ValueError`` naming ``what`` (e.g. ``"an MPO"``) and the path.
    """
    path = os.fspath(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on corrupt files
        raise ValueError(f"cannot read {what} from {path!r} (corrupt or unreadable): {exc}") from exc


def check_format(obj: Any, fmt: str, version: int, what: str, where: str | None = None) -> dict:
    """``obj`` if it is a dict with ``"format" == fmt`` and ``"version" == version``, else a ``ValueError``
    saying it is not ``what`` (e.g. ``"an MPOBERT weights file"``) or has another version; ``where``
    (a path) starts the message when given."""
    head = f"{where!r} is " if where else ""
    found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    if not isinstance(obj, dict) or found != fmt:
        raise ValueError(f"{head}not {what} (format {fmt!r} expected, found {found!r})")
    if obj.get("version") != version:
        raise ValueError(f"{head}{what} of version {obj.get('version')!r}; this code reads version {version}")
    return obj
