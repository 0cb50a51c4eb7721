"""The modelled GPUs: their rates (a :class:`~mpo_core.cost.DeviceModel`) and per-SM limits, and occupancy.

:data:`A100` and :data:`H100` hold the public peaks and SM limits of the A100-80GB (SXM) and
the H100 SXM: HBM bandwidth 2.0 / 3.35 TB/s, dense bf16/fp16 tensor-core 312 / 989 TFLOP/s
(tf32 half that, fp64 tensor cores 19.5 / 67), fp32 FMA 19.5 / 67 TFLOP/s, 108 / 132 SMs,
64 K registers, 64 warps and 32 blocks per SM, 164 / 228 KB shared memory per SM
(163 / 227 KB per block, 1 KB reserved per block). No per-launch overhead is modelled.

The tooling models bf16 training: :func:`roofline_seconds` prices matmul FLOPs at the
bf16 tensor-core peak (:data:`MODEL_DTYPE`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mpo_core.cost import Cost, DeviceModel

__all__ = ["A100", "DEVICES", "Gpu", "H100", "MODEL_DTYPE", "device_for_arch", "model_for", "model_of_device", "occupancy", "roofline_seconds",
           "sequence_seconds"]

MODEL_DTYPE = torch.bfloat16
"""The dtype the GPU model tables price matmuls in (the training dtype)."""


@dataclass(frozen=True)
class Gpu:
    """One GPU: its rates (``model``) and per-SM limits (public spec sheets; the latency is an assumption)."""

    name: str
    arch: int
    model: DeviceModel
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


def _model(name: str, tensor: float, fma: float, bandwidth: float) -> DeviceModel:
    return DeviceModel(name, matmul_flops={"bfloat16": tensor, "float16": tensor, "float32": tensor / 2,
                                           "float64": fma}, vector_flops=fma, bandwidth=bandwidth)


A100 = Gpu("A100-80GB", 80, _model("A100-80GB", 312e12, 19.5e12, 2.0e12), sm_count=108,
           smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
H100 = Gpu("H100-SXM", 90, _model("H100-SXM", 989e12, 67e12, 3.35e12), sm_count=132,
           smem_per_sm=228 * 1024, smem_per_block=227 * 1024)
DEVICES = {d.name: d for d in (A100, H100)}
"""The modelled GPUs by name."""
NAME_RULES = {"A100-80GB": ("A100", ("40GB",)), "H100-SXM": ("H100", ("PCIE", "NVL"))}
"""Per modelled GPU: the word its device name must contain, and words of variants it does not model."""


def device_for_arch(arch: int) -> Gpu | None:
    """The modelled GPU of compute capability ``arch`` (80: A100, 90: H100), ``None`` for others."""
    return next((d for d in DEVICES.values() if d.arch == arch), None)


def model_for(name: str, capability: tuple[int, int]) -> Gpu | None:
    """The modelled GPU a device reporting ``name`` (``torch.cuda.get_device_name``) and ``capability``
    is, or ``None`` ("no model") for any other GPU.

    Matched on both, and on the variant the entry's rates are for (:data:`NAME_RULES`): an H200 or
    GH200 (9.0) is not an H100, nor is an H100 PCIe or NVL (2.0 / 3.9 TB/s, not SXM's 3.35); an
    A100 40GB (1.6 TB/s) is not the 80GB; an L4 or RTX 4090 (8.9) has no entry.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if len(capability) != 2 or not all(isinstance(v, int) for v in capability):
        raise ValueError(f"capability must be (major, minor) ints, got {capability!r}")
    arch = 10 * capability[0] + capability[1]
    words = name.upper().replace("-", " ").split()
    for gpu in DEVICES.values():
        word, excluded = NAME_RULES[gpu.name]
        if gpu.arch == arch and word in words and not any(w.startswith(x) for w in words for x in excluded):
            return gpu
    return None


def model_of_device(device: torch.device | str) -> Gpu | None:
    """:func:`model_for` of a torch device: its modelled GPU, ``None`` for a CPU or a GPU without a model."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return model_for(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)))


def roofline_seconds(cost: Cost, device: Gpu) -> float:
    """``max((R + W) / BW, F_tc / P_tc + F_fma / P_fma)``: the roofline time of ``cost`` on ``device`` (model)."""
    if not isinstance(device, Gpu):
        raise TypeError(f"device must be a Gpu, got {type(device).__name__}")
    return device.model.seconds(cost, MODEL_DTYPE)


def sequence_seconds(costs: Sequence[Cost], device: Gpu) -> float:
    """Sum of the roofline times of kernels run one after another (model)."""
    return sum(roofline_seconds(c, device) for c in costs)


def occupancy(registers: int, smem: int, num_warps: int, device: Gpu) -> dict:
    """Resident blocks and warps per SM (the CUDA occupancy calculation; a model).

    Registers are allocated per warp in units of ``device.reg_alloc_unit`` (256):
    ``ceil(32 * registers / 256) * 256`` per warp; every block also holds
    ``device.smem_reserved_per_block`` bytes of shared memory. Blocks per SM is the
    minimum of the register, shared-memory, warp and block limits.

    Parameters
    ----------
    registers : int
        Registers per thread (from the cubin).
    smem : int
        Shared memory per block in bytes.
    num_warps : int
        Warps per block.
    device : Gpu
        SM limits.

    Returns
    -------
    dict
        ``blocks_per_sm``, ``warps_per_sm``, ``occupancy`` (resident / maximum warps) and
        ``limiter`` (``"registers"``, ``"smem"``, ``"warps"`` or ``"blocks"``); zero blocks
        when one block does not fit.
    """
    if registers < 1 or smem < 0 or num_warps < 1:
        raise ValueError(f"need registers >= 1, smem >= 0, num_warps >= 1; got {registers}, {smem}, {num_warps}")
    per_warp = math.ceil(32 * registers / device.reg_alloc_unit) * device.reg_alloc_unit
    limits = {  # on a tie the first one is named
        "warps": device.max_warps_per_sm // num_warps,
        "blocks": device.max_blocks_per_sm,
        "registers": (device.regs_per_sm // per_warp) // num_warps if registers <= device.max_regs_per_thread else 0,
        "smem": device.smem_per_sm // (smem + device.smem_reserved_per_block) if smem <= device.smem_per_block else 0,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                occupancy=blocks * num_warps / device.max_warps_per_sm, limiter=limiter)
