"""The one cost model: modelled FLOPs, bytes and time of every way ``mpo_core`` computes ``x @ W``.

=====================  =====================================================================
``model``              :class:`Cost` (work) and :class:`DeviceModel` (rates): the one time formula
``devices``            the runtime's device table (``"cpu"``, ``"cuda"``), replaceable by a calibration
``chain``              a GEMM, a left-to-right chain of MPO cores, the epilogue's FLOPs per element (one GELU price)
``dense``              the unfused linear (rebuild ``W``, GEMM, bias, GELU), forward and backward
``fused``              the fused Triton linear, and which end core it keeps on chip
=====================  =====================================================================

The contraction planner (:mod:`mpo_core.contract`), the fused op (:mod:`mpo_core.ops.mpo_linear`)
and the GPU tooling (:mod:`mpo_core.gpu`) all price work here. Every figure is a model.
"""
from mpo_core.cost.chain import BIAS_FLOPS, GELU_FLOPS, CoreShape, chain_cost, core_shapes, elementwise_flops, gemm_cost
from mpo_core.cost.dense import dense_linear_cost, epilogue_cost
from mpo_core.cost.devices import DEFAULT_MODELS, device_model, set_device_model
from mpo_core.cost.fused import (
    MODEL_BLOCK_M, choose_split, epilogue_flops, fused_linear_cost, kernel_flops, mpo_linear_cost,
)
from mpo_core.cost.model import Cost, DeviceModel, dtype_name

__all__ = ["BIAS_FLOPS", "Cost", "CoreShape", "GELU_FLOPS", "elementwise_flops", "DEFAULT_MODELS", "DeviceModel", "MODEL_BLOCK_M", "chain_cost", "choose_split",
           "core_shapes", "dense_linear_cost", "device_model", "dtype_name", "epilogue_cost", "epilogue_flops",
           "fused_linear_cost", "gemm_cost", "kernel_flops", "mpo_linear_cost", "set_device_model"]
