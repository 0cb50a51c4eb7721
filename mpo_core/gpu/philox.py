"""The dropout masks of the kernels, regenerated from ``(seed, offset)`` with an independent Philox4x32-10.

Philox4x32-10 (Salmon et al., SC'11; Random123) is written here in numpy, apart from the
kernels, and checked on Random123's known-answer vectors (:data:`KNOWN_ANSWERS`). Two
mask conventions use it:

* :func:`triton_keep_mask`: the Triton kernels' ``tl.rand(seed, offset + row * N + col) >= p``
  (``triton.language.random``: counter ``(off_lo, off_hi, 0, 0)``, key ``(seed_lo, seed_hi)``,
  the first output word read as int32, negative values folded by ``~x``, times
  ``4.6566127342e-10`` in float32);
* :func:`cuda_keep_mask`: the CUDA extension's mask (``csrc/cuda/philox.cuh``,
  ``LayerNormForwardArgs`` in ``kernels.h``): element ``e`` takes word ``e % 4`` of the draw at
  counter ``(e // 4, offset)``, key ``(seed_lo, seed_hi)``, uniform ``(bits >> 8) * 2^-24``, kept
  when ``u < 1 - p``.

The acceptance check holds each kernel's dropout to these masks, so a mask that is
self-consistent (forward and backward agree) but not the one the seed defines fails.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["KNOWN_ANSWERS", "cuda_keep_mask", "philox4x32_10", "triton_keep_mask"]

_M32 = np.uint64(0xFFFFFFFF)

KNOWN_ANSWERS = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)
"""Random123's ``kat_vectors`` for philox4x32_10: (counter, key, output)."""


def philox4x32_10(counter, key) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32-10 of 4 counter words and 2 key words (ints or numpy arrays of uint32 values)."""
    if len(counter) != 4 or len(key) != 2:
        raise ValueError(f"counter must have 4 words and key 2, got {len(counter)} and {len(key)}")
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + w0) & _M32, (k1 + w1) & _M32
    return c0, c1, c2, c3


def _check(p: float, seed: int, offset: int) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise TypeError(f"offset must be a non-negative int, got {offset!r}")


def _key(seed: int) -> tuple[int, int]:
    seed %= 2**64
    return seed & 0xFFFFFFFF, seed >> 32


def triton_keep_mask(rows: int, n: int, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """Boolean ``(rows, n)`` keep mask of the Triton kernels: ``tl.rand(seed, offset + row * n + col) >= p``."""
    _check(p, seed, offset)
    if rows < 0 or n < 1:
        raise ValueError(f"rows must be >= 0 and n >= 1, got {rows} and {n}")
    idx = np.arange(rows * n, dtype=np.uint64) + np.uint64(offset)
    zero = np.zeros_like(idx)
    word = philox4x32_10((idx & _M32, idx >> np.uint64(32), zero, zero), _key(seed))[0]
    x = word.astype(np.uint32).view(np.int32)
    x = np.where(x < 0, ~x, x)
    u = x.astype(np.float32) * np.float32(4.6566127342e-10)
    return torch.from_numpy(u >= np.float32(p)).view(rows, n)


def cuda_keep_mask(rows: int, n: int, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """Boolean ``(rows, n)`` keep mask of the CUDA extension's kernels (``csrc/cuda/philox.cuh``)."""
    _check(p, seed, offset)
    if rows < 0 or n < 1:
        raise ValueError(f"rows must be >= 0 and n >= 1, got {rows} and {n}")
    e = np.arange(rows * n, dtype=np.uint64)
    block = e >> np.uint64(2)
    offset %= 2**64
    words = philox4x32_10((block & _M32, block >> np.uint64(32), offset & 0xFFFFFFFF, offset >> 32), _key(seed))
    bits = np.choose((e & np.uint64(3)).astype(np.int64), [np.broadcast_to(w, e.shape) for w in words])
    u = (bits >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    return torch.from_numpy(u < np.float32(1.0 - float(np.float32(p)))).view(rows, n)
