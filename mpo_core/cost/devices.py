"""The device table the runtime plans with: one :class:`~mpo_core.cost.model.DeviceModel` per device type.

The entries are round numbers for the hardware class (a few-core AVX-512 CPU; an
A100/H100-class GPU); they only need to rank candidates correctly. A calibrated model
(measured GEMM FLOP/s, bandwidth, per-op overhead) replaces an entry with
:func:`set_device_model`; cached contraction plans then need
:func:`mpo_core.contract.clear_plan_cache`.
"""
from __future__ import annotations

from mpo_core.cost.model import DeviceModel

__all__ = ["DEFAULT_MODELS", "device_model", "set_device_model"]

DEFAULT_MODELS = {
    "cpu": DeviceModel(
        "cpu", matmul_flops={"float64": 1e11, "float32": 2e11, "bfloat16": 1e11, "float16": 5e10},
        vector_flops=2e11, bandwidth=3e10, overhead=1.5e-5,  # near this project's calibration:
    ),                                                       # 32-38 GB/s, 23 us per planned op
    "cuda": DeviceModel(
        "cuda", matmul_flops={"float64": 1e13, "float32": 2e13, "bfloat16": 3e14, "float16": 3e14},
        vector_flops=2e13, bandwidth=2e12, overhead=6e-6,
    ),
}
"""The built-in entries by device type (unknown types use ``"cuda"``)."""

_models = dict(DEFAULT_MODELS)


def device_model(device_type: str) -> DeviceModel:
    """The :class:`DeviceModel` in use for ``device_type`` (unknown types use the CUDA entry)."""
    return _models.get(device_type, _models["cuda"])


def set_device_model(device_type: str, model: DeviceModel | None) -> None:
    """Use ``model`` for ``device_type`` from now on (``None``: back to :data:`DEFAULT_MODELS`)."""
    if not isinstance(device_type, str) or not device_type:
        raise TypeError(f"device_type must be a non-empty str, got {device_type!r}")
    if model is None:
        if device_type not in DEFAULT_MODELS:
            _models.pop(device_type, None)
        else:
            _models[device_type] = DEFAULT_MODELS[device_type]
        return
    if not isinstance(model, DeviceModel):
        raise TypeError(f"model must be a DeviceModel or None, got {type(model).__name__}")
    _models[device_type] = model
