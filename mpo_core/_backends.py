"""Which compute backends this installation has."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch


def _load_extension() -> ModuleType | None:
    try:
        return importlib.import_module("mpo_core._C")
    except ImportError:
        return None


_EXTENSION = _load_extension()


def extension() -> ModuleType | None:
    """The compiled extension ``mpo_core._C``, or ``None`` when it was not built.

    Loaded once at import, so that ``torch.compile`` can trace code that asks for it.
    """
    return _EXTENSION


_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    """Whether the ``triton`` package is installed (looked up once, at import)."""
    return _TRITON_IMPORTABLE


def backends() -> dict[str, bool]:
    """Report the available backends.

    Returns
    -------
    dict
        ``{"cpp": ..., "cuda": ..., "triton": ...}``: ``cpp`` is the C++ CPU part of
        ``mpo_core._C``; ``cuda`` is its CUDA part *and* a usable GPU; ``triton`` is an
        importable Triton with either a GPU or the CPU interpreter (``TRITON_INTERPRET=1``).
    """
    import os

    ext = extension()
    has_gpu = torch.cuda.is_available()
    return {
        "cpp": ext is not None,
        "cuda": ext is not None and bool(getattr(ext, "WITH_CUDA", False)) and has_gpu,
        "triton": triton_importable() and (has_gpu or os.environ.get("TRITON_INTERPRET") == "1"),
    }
