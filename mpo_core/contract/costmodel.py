"""Roofline cost model used to rank contraction strategies (a *model*, not a measurement).

Each operation is charged ``max(flops / peak_flops, bytes / bandwidth) + launch_overhead``.
The peaks below are round numbers for the hardware class (a few-core AVX-512 CPU; an
A100/H100-class GPU); they only need to rank candidates correctly, not predict absolute times.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DeviceModel", "device_model", "op_seconds"]


@dataclass(frozen=True)
class DeviceModel:
    """Peak arithmetic rate per dtype (FLOP/s), memory bandwidth (B/s) and per-op overhead (s)."""

    peak_flops: dict
    bandwidth: float
    overhead: float

    def flops_rate(self, dtype: torch.dtype) -> float:
        return self.peak_flops.get(dtype, self.peak_flops[torch.float32])


_MODELS = {
    "cpu": DeviceModel(
        peak_flops={torch.float64: 1e11, torch.float32: 2e11, torch.bfloat16: 1e11, torch.float16: 5e10},
        bandwidth=1e10,
        overhead=4e-6,
    ),
    "cuda": DeviceModel(
        peak_flops={torch.float64: 1e13, torch.float32: 2e13, torch.bfloat16: 3e14, torch.float16: 3e14},
        bandwidth=2e12,
        overhead=6e-6,
    ),
}


def device_model(device_type: str) -> DeviceModel:
    """The :class:`DeviceModel` for ``device_type`` (unknown types use the CUDA model)."""
    return _MODELS.get(device_type, _MODELS["cuda"])


def op_seconds(flops: float, nbytes: float, model: DeviceModel, dtype: torch.dtype) -> float:
    """Modelled time of one operation: roofline plus launch overhead."""
    return max(flops / model.flops_rate(dtype), nbytes / model.bandwidth) + model.overhead
