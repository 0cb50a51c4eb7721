"""The one time formula: modelled work (:class:`Cost`) on a device's rates (:class:`DeviceModel`).

A :class:`Cost` counts matmul FLOPs (tensor cores on a GPU) ``F_mm``, other (vector / FMA
unit) FLOPs ``F_vec``, memory bytes read ``R`` and written ``W``, and operations
(kernel launches, dispatched torch ops) ``L``. Its modelled time on a device, for the
dtype the matmuls run in, is

    t = max((R + W) / bandwidth, F_mm / matmul_flops[dtype] + F_vec / vector_flops) + L * overhead

(:meth:`DeviceModel.seconds`). Every figure is a *model*, not a measurement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

__all__ = ["Cost", "DeviceModel", "dtype_name"]


@dataclass(frozen=True)
class Cost:
    """Modelled work of one operation or a sequence of operations.

    Attributes
    ----------
    flops_tensor, flops_fma : float
        FLOPs on the matmul units (tensor cores) and on the vector (FMA) units.
    bytes_read, bytes_written : float
        Compulsory memory traffic (each tensor crosses memory once).
    launches : int
        Operations (kernels / torch ops); each pays the device's per-op overhead.
    """

    flops_tensor: float = 0
    flops_fma: float = 0
    bytes_read: float = 0
    bytes_written: float = 0
    launches: int = 1

    @property
    def flops(self) -> float:
        """All FLOPs."""
        return self.flops_tensor + self.flops_fma

    @property
    def bytes(self) -> float:
        """Bytes read + written."""
        return self.bytes_read + self.bytes_written

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops_tensor + other.flops_tensor, self.flops_fma + other.flops_fma,
                    self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written,
                    self.launches + other.launches)

    def __mul__(self, k: float) -> "Cost":
        return Cost(self.flops_tensor * k, self.flops_fma * k, self.bytes_read * k, self.bytes_written * k,
                    int(self.launches * k))

    __rmul__ = __mul__


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: the key of :attr:`DeviceModel.matmul_flops`."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DeviceModel:
    """Peak rates of one device (round numbers or a calibration; they must rank candidates correctly).

    Attributes
    ----------
    name : str
        What the numbers describe (``"cpu"``, ``"A100-80GB"`` ...).
    matmul_flops : mapping of str to float
        Peak matmul FLOP/s by dtype name (``"float32"``, ``"bfloat16"`` ...: :func:`dtype_name`);
        must hold ``"float32"``, the rate of any dtype not listed.
    vector_flops : float
        Peak FLOP/s of elementwise / reduction work (FMA units).
    bandwidth : float
        Memory bandwidth in bytes/s.
    overhead : float
        Seconds charged per operation (launch / dispatch latency); 0 models none.
    """

    name: str
    matmul_flops: Mapping[str, float] = field(hash=False)
    vector_flops: float
    bandwidth: float
    overhead: float = 0.0

    def __post_init__(self) -> None:
        if "float32" not in self.matmul_flops:
            raise ValueError(f"matmul_flops must hold 'float32', got {sorted(self.matmul_flops)}")
        rates = [*self.matmul_flops.values(), self.vector_flops, self.bandwidth]
        if any(not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 0 for r in rates):
            raise ValueError(f"rates and bandwidth must be numbers > 0, got {self}")
        if not isinstance(self.overhead, (int, float)) or self.overhead < 0:
            raise ValueError(f"overhead must be a number >= 0 (seconds per op), got {self.overhead!r}")

    def matmul_rate(self, dtype: torch.dtype) -> float:
        """Peak matmul FLOP/s in ``dtype`` (the float32 rate when ``dtype`` is not listed)."""
        return self.matmul_flops.get(dtype_name(dtype), self.matmul_flops["float32"])

    def seconds(self, cost: Cost, dtype: torch.dtype) -> float:
        """Modelled time of ``cost`` with its matmuls in ``dtype`` (the module docstring's formula)."""
        if not isinstance(cost, Cost):
            raise TypeError(f"cost must be a Cost, got {type(cost).__name__}")
        compute = cost.flops_tensor / self.matmul_rate(dtype) + cost.flops_fma / self.vector_flops
        return max(cost.bytes / self.bandwidth, compute) + cost.launches * self.overhead

    def op_seconds(self, flops: float, nbytes: float, dtype: torch.dtype) -> float:
        """Modelled time of one operation of ``flops`` matmul FLOPs moving ``nbytes``."""
        return self.seconds(Cost(flops_tensor=flops, bytes_read=nbytes), dtype)
