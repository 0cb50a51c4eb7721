"""Acceptance check: run it first on any machine. ``python -m mpo_core.check [--tiny] [--json PATH]``

Every kernel this machine can run against its torch reference, then each benchmark's quick mode;
a verdict table and JSON, non-zero exit on any failure (what it checks and how: :mod:`.cli`).
One job per module:

* :mod:`.tolerances`: the dtypes and the per-op tolerances in ULPs, each with its reasoning;
* :mod:`.verdict`: a row of the verdict (``Result``), the ``Checker`` that collects them with the
  GPU policy (missing backends, timing, the roofline model), the table they print as;
* :mod:`.fused`: the fused ops and dropout against the float64 reference and the seed's mask;
* :mod:`.linear`: the fused MPO linear at every tile config the autotuner may pick;
* :mod:`.runs`: each benchmark's quick and tiny run (``BENCHMARK_RUNS``);
* :mod:`.cli`: the sizes, what cannot be checked here, and ``main``.
"""
from mpo_core.check.cli import KERNEL_BACKENDS, main, not_checked_here, require_a_kernel, sizes
from mpo_core.check.fused import (DROPOUT_P, DROPOUT_SEED, check_dropout_determinism, check_fused_op, check_fused_ops,
                                  dropout_reference_mask)
from mpo_core.check.linear import check_mpo_linear
from mpo_core.check.runs import BENCHMARK_RUNS, INTERPRETED_TINY_RUNS, benchmarks_dir, run_benchmarks
from mpo_core.check.tolerances import (DTYPES, FP32_FLOOR, MPO_FP32_FLOOR, MPO_ROUNDINGS, NORM_OPS, ROUNDINGS, ULP,
                                       tolerance)
from mpo_core.check.verdict import (INSTALL_LINES, KERNEL_MIN_CAPABILITY, Checker, Result, dtype_name, install_line,
                                    rel_err, verdict_table)

__all__ = ["BENCHMARK_RUNS", "DROPOUT_P", "DROPOUT_SEED", "DTYPES", "FP32_FLOOR", "INSTALL_LINES", "INTERPRETED_TINY_RUNS",
           "KERNEL_BACKENDS", "KERNEL_MIN_CAPABILITY", "MPO_FP32_FLOOR", "MPO_ROUNDINGS", "NORM_OPS", "ROUNDINGS", "ULP",
           "Checker", "Result", "benchmarks_dir", "check_dropout_determinism", "check_fused_op", "check_fused_ops",
           "check_mpo_linear", "dropout_reference_mask", "dtype_name", "install_line", "main", "not_checked_here",
           "rel_err", "require_a_kernel", "run_benchmarks", "sizes", "tolerance", "verdict_table"]
