"""Traffic / FLOP model of every GPU kernel and of an MPOBERT training step (every figure is a *model*).

Devices
-------
:data:`DEVICES` holds the public peaks and SM limits of the A100-80GB (SXM) and the
H100 SXM: HBM bandwidth 2.0 / 3.35 TB/s, dense bf16 tensor-core 312 / 989 TFLOP/s,
fp32 FMA 19.5 / 67 TFLOP/s, 108 / 132 SMs, 64 K registers, 64 warps and 32 blocks per
SM, 164 / 228 KB shared memory per SM (163 / 227 KB per block, 1 KB reserved per block).

Roofline
--------
A :class:`Cost` counts tensor-core FLOPs ``F_tc``, other (FMA-unit) FLOPs ``F_fma``, and
compulsory HBM bytes read ``R`` and written ``W`` (each tensor crosses HBM once: tile
re-reads are assumed to hit L2). Its predicted time on a device is

    t = max((R + W) / BW, F_tc / P_tc + F_fma / P_fma)

(:func:`roofline_seconds`). Element sizes: ``s`` bytes per activation element (2 for
bf16), fp32 (4 bytes) for row statistics and partial sums.

Counting conventions (``M`` rows/tokens, ``N`` hidden, ``s`` element size, ``G`` partial rows
of a row-reducing backward = ``2 * SMs``): see each ``*_cost`` function's docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

MODEL = "model"
"""The label of every figure this module produces (tables and JSON never mix it with measurements)."""


@dataclass(frozen=True)
class Device:
    """Peaks and per-SM limits of one GPU (public spec sheets; the latency is an assumption)."""

    name: str
    arch: int
    hbm_bw: float
    tc_flops: float
    fma_flops: float
    sm_count: int
    smem_per_sm: int
    smem_per_block: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256
    smem_reserved_per_block: int = 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    hbm_latency_s: float = 600e-9


A100 = Device("A100-80GB", 80, hbm_bw=2.0e12, tc_flops=312e12, fma_flops=19.5e12, sm_count=108,
              smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
H100 = Device("H100-SXM", 90, hbm_bw=3.35e12, tc_flops=989e12, fma_flops=67e12, sm_count=132,
              smem_per_sm=228 * 1024, smem_per_block=227 * 1024)
DEVICES = {d.name: d for d in (A100, H100)}
"""The modelled devices by name."""
