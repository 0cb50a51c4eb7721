"""The fused MPO kernel's on-chip tile rule, without Triton: which end core ``(d, i, j)`` it can keep on
chip and how it pads it. The kernel (:mod:`mpo_core.kernels.mpo_matmul`) and its price
(:mod:`mpo_core.cost.fused`) both read it from here, so pricing the fused path needs no Triton.
"""
from __future__ import annotations

__all__ = ["MAX_BOND", "MAX_SMALL_BLOCK", "next_power_of_2", "padded_small_shape"]

#: Largest padded on-chip block ``IP*JP`` and padded bond ``DP`` the kernel takes.
MAX_SMALL_BLOCK = 64
MAX_BOND = 64


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (``triton.next_power_of_2``'s bit rule, for ``n`` below 2**64)."""
    n -= 1
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1


def padded_small_shape(d: int, i: int, j: int) -> tuple[int, int, int] | None:
    """Padded ``(DP, IP, JP)`` the kernel uses for the on-chip factor ``(d, i, j)``, or ``None`` if unsupported.

    ``IP``/``JP`` are powers of two (``IP*JP >= 16`` for ``tl.dot``), ``DP >= 16``;
    supported when ``IP*JP <= MAX_SMALL_BLOCK``, ``IP, JP <= 32`` and ``DP <= MAX_BOND``.
    """
    ip = next_power_of_2(i)
    jp = max(next_power_of_2(j), -(-16 // ip))
    dp = max(16, next_power_of_2(d))
    if ip * jp > MAX_SMALL_BLOCK or ip > 32 or jp > 32 or dp > MAX_BOND:
        return None
    return dp, ip, jp
