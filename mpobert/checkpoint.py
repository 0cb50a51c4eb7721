"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the model, optimizer, LR scheduler and gradient-scaler states,
the random-number-generator states of every rank (Python, NumPy, torch CPU and
CUDA), the data position, the step and counters, and a *fingerprint* (the model
config and the training settings that must not change across a resume). It is
written to a temporary file in the same directory, flushed and fsynced, then
renamed over the target, so a crash never leaves a half-written checkpoint
under the real name. Reading checks the format, version and fingerprint and
raises ``ValueError`` with the reason on any corruption or mismatch.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpo_core.io import atomic_torch_save, check_format, read_torch_file

FORMAT = "mpobert.train_checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
REQUIRED_KEYS = ("format", "version", "step", "model", "optimizer", "scheduler", "scaler", "rng", "data", "counters", "fingerprint")


def rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU, torch CUDA if present), ``weights_only``-loadable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by :func:`rng_state`."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"checkpoint RNG state is malformed: {exc!r}") from exc


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (the keys of :data:`REQUIRED_KEYS` except format/version) atomically to ``path``.

    Returns
    -------
    Path
        ``path``.
    """
    missing = [k for k in REQUIRED_KEYS if k not in ("format", "version") and k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    path = Path(path)
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)
    return path


def load_checkpoint(path: str | os.PathLike, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and check it.

    Parameters
    ----------
    path : path-like
        The checkpoint file.
    fingerprint : dict, optional
        The current run's fingerprint; every key must match the stored one.

    Raises
    ------
    ValueError
        If the file is missing, unreadable (truncated, corrupt), of another format or
        version, lacks a required entry, or its fingerprint differs (the message lists the
        differing settings).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    ckpt = check_format(read_torch_file(path, "a training checkpoint"), FORMAT, VERSION,
                        "an MPOBERT training checkpoint", str(path))
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {missing}")
    if fingerprint is not None:
        stored = ckpt["fingerprint"]
        diff = {k: (stored.get(k), fingerprint.get(k)) for k in sorted(set(stored) | set(fingerprint)) if stored.get(k) != fingerprint.get(k)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {str(path)!r} was written by a different run ({lines})")
    return ckpt
