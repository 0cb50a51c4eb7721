"""GPU tooling, proven without a GPU: models, tables and compile checks (the runtime never imports it).

=================  ==========================================================================
``devices``        the modelled GPUs (A100, H100): rates, SM limits, roofline time, occupancy
``shapes``         the BERT / MPOBERT shapes modelled and compiled for (``BertShape``, modes)
``kernel_model``   bytes / FLOPs of each normalization / elementwise kernel and the fused ops
``linear``         one MPO linear layer per strategy (dense, sequential, fused), fwd and bwd
``step``           one MPOBERT training step, kernel by kernel, and its totals
``tables``         the model tables the benchmarks print, and the table formatter
``registry``       every Triton kernel compilation ``ops`` launches (``KernelSpec``)
``compiled``       a compiled kernel and its resources (``CompiledKernel``), the verdict, the report
``aot``            Triton AOT compile of the registry for sm_80 / sm_90 (``python -m mpo_core.gpu.aot``)
``nvcc``           nvcc compile of ``csrc/cuda/*.cu`` (``python -m mpo_core.gpu.nvcc``)
``timing``         the one timer of the benchmarks and the acceptance check (CUDA events / ``perf_counter``)
=================  ==========================================================================

The model names are re-exported here (``from mpo_core import gpu; gpu.linear_rows()``);
every figure is a model, labelled ``"model"``. Costs come from :mod:`mpo_core.cost`.
"""
from mpo_core.gpu.devices import A100, DEVICES, H100, MODEL_DTYPE, Gpu, occupancy, roofline_seconds, sequence_seconds
from mpo_core.gpu.kernel_model import (
    FUSED_OPS, fused_op_cost, fused_op_kernels, kernel_cost, kernel_fraction, spec_model,
)
from mpo_core.gpu.linear import LINEAR_STRATEGIES, linear_cost
from mpo_core.gpu.shapes import BERT_TOKENS, LINEAR_SHAPES, MPO_MODES, OP_HIDDEN, BertShape
from mpo_core.gpu.step import MODEL, mpobert_step, step_summary
from mpo_core.gpu.tables import FUSED_OP_COLUMNS, LINEAR_COLUMNS, format_rows, fused_op_rows, linear_rows

__all__ = ["A100", "BERT_TOKENS", "BertShape", "DEVICES", "FUSED_OPS", "FUSED_OP_COLUMNS", "Gpu", "H100",
           "LINEAR_COLUMNS", "LINEAR_SHAPES", "LINEAR_STRATEGIES", "MODEL", "MODEL_DTYPE", "MPO_MODES", "OP_HIDDEN",
           "format_rows", "fused_op_cost", "fused_op_kernels", "fused_op_rows", "kernel_cost", "kernel_fraction",
           "linear_cost", "linear_rows", "mpobert_step", "occupancy", "roofline_seconds", "sequence_seconds",
           "spec_model", "step_summary"]
