"""One data model for "a kernel compiled for one GPU architecture, and its resources", with the verdict.

Both compile paths fill :class:`CompiledKernel`: the Triton AOT compile of the registry
(:mod:`mpo_core.gpu.aot`: resources from ``cuobjdump --dump-resource-usage`` of the cubin,
tensor-core flags from the PTX) and the nvcc compile of ``csrc/cuda/*.cu``
(:mod:`mpo_core.gpu.nvcc`: resources from ptxas' ``-v`` report). :func:`problems` is the
one verdict, :func:`report_rows` the one table (with modelled occupancy where warps are known).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Sequence

from mpo_core.gpu.devices import device_for_arch, occupancy
from mpo_core.gpu.tables import format_rows
from mpo_core.io import atomic_write

__all__ = ["COLUMNS", "CompiledKernel", "problems", "report", "report_rows"]


@dataclass
class CompiledKernel:
    """One kernel function compiled for ``sm_<arch>``: its resources per thread / block and what was expected.

    Attributes
    ----------
    name : str
        Readable name (registry name, or demangled C++ name).
    arch : int
        Compute capability as an int (75, 80, 90).
    source : str
        What was compiled: the registry family (``"mpo_matmul"``) or the CUDA file.
    symbol : str
        The function's symbol in the cubin (mangled for C++).
    error : str
        The compiler's error (no resources then).
    registers, stack, local : int
        Registers per thread; stack frame and local memory bytes per thread.
    spill_stores, spill_loads : int
        Spill bytes per thread (ptxas' report; the cubin's resource dump folds spills into ``stack``).
    static_smem, dynamic_smem : int
        Shared memory per block: in the cubin, and requested at launch (Triton).
    barriers : int
        Named barriers (ptxas' report).
    num_warps : int
        Warps per block when the compile fixes it (Triton); 0 when the launch decides.
    entry : bool
        A ``__global__`` entry (False: a non-inlined device function, whose frame counts for spills).
    uses_dot, hopper : bool
        Expectations: a ``tl.dot`` kernel (must use ``mma`` on sm_80); a Hopper config (must use ``wgmma`` on sm_90).
    mma, wgmma : bool
        Tensor-core instructions found in the PTX.
    seconds : float
        Compile time.
    """

    name: str
    arch: int
    source: str
    symbol: str = ""
    error: str = ""
    registers: int = 0
    stack: int = 0
    local: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    dynamic_smem: int = 0
    barriers: int = 0
    num_warps: int = 0
    entry: bool = True
    uses_dot: bool = False
    hopper: bool = False
    mma: bool = False
    wgmma: bool = False
    seconds: float = 0.0

    @property
    def smem(self) -> int:
        """Shared memory per block in bytes: static (cubin) + dynamic (launch)."""
        return self.static_smem + self.dynamic_smem

    @property
    def spills(self) -> int:
        """Bytes per thread that live off chip: stack frame, local memory and spill traffic."""
        return self.stack + self.local + self.spill_stores + self.spill_loads


def problems(kernel: CompiledKernel) -> list[str]:
    """Why ``kernel`` fails the checks (empty when it passes).

    Fails on: a compile error; any stack, local memory or spill (none of our kernels needs
    a stack frame); shared memory over the per-block limit of the target's modelled GPU; a
    ``tl.dot`` kernel without tensor-core ``mma`` on sm_80; a config meant for Hopper without
    ``wgmma`` on sm_90.
    """
    if kernel.error:
        return [f"compile error: {kernel.error.strip().splitlines()[0] if kernel.error.strip() else '?'}"]
    out = []
    if kernel.spills:
        out.append(f"spills: {kernel.stack} B stack, {kernel.local} B local, {kernel.spill_stores} B spill stores, "
                   f"{kernel.spill_loads} B spill loads per thread")
    device = device_for_arch(kernel.arch)
    if device is not None and kernel.smem > device.smem_per_block:
        out.append(f"shared memory {kernel.smem} B over the {device.name} per-block limit {device.smem_per_block} B")
    if kernel.uses_dot and kernel.arch == 80 and not kernel.mma:
        out.append("tl.dot kernel without mma in its sm_80 PTX")
    if kernel.hopper and kernel.arch == 90 and not kernel.wgmma:
        out.append("config meant for Hopper without wgmma in its sm_90 PTX")
    return out


def report_rows(kernels: Sequence[CompiledKernel]) -> list[dict]:
    """One row per kernel: resources, tensor-core flags, modelled occupancy (warps known) and problems."""
    rows = []
    for k in kernels:
        row = {"kernel": k.name, "source": k.source, "arch": f"sm_{k.arch}", "warps": k.num_warps or "",
               "regs": k.registers, "spill_B": k.spills, "smem_B": k.smem, "mma": k.mma, "wgmma": k.wgmma,
               "compile_s": round(k.seconds, 2)}
        device = device_for_arch(k.arch)
        if not k.error and k.num_warps and device is not None:
            occ = occupancy(k.registers, k.smem, k.num_warps, device)
            row.update({"model_blocks/SM": occ["blocks_per_sm"], "model_occupancy": occ["occupancy"],
                        "model_limiter": occ["limiter"]})
        row["problems"] = "; ".join(problems(k)) or "ok"
        rows.append(row)
    return rows


COLUMNS = ("kernel", "arch", "warps", "regs", "spill_B", "smem_B", "mma", "wgmma", "model_blocks/SM",
           "model_occupancy", "model_limiter", "compile_s", "problems")
"""Columns of the Triton table (:func:`mpo_core.gpu.tables.format_rows`); the nvcc table drops the Triton ones."""


def report(kernels: Sequence[CompiledKernel], columns: Sequence[str], json_path: str | os.PathLike,
           **header) -> int:
    """Print the table of ``kernels`` and every problem, write the JSON report; the exit status (1: a problem).

    The JSON holds ``header``, ``ok``, ``problems`` (count), ``rows`` (the table) and
    ``kernels`` (every :class:`CompiledKernel` field).
    """
    rows = report_rows(kernels)
    print(format_rows(rows, columns))
    bad = [r for r in rows if r["problems"] != "ok"]
    for r in bad:
        print(f"problem: {r['source']} {r['arch']} {r['kernel']}: {r['problems']}")
    payload = {**header, "ok": not bad, "problems": len(bad), "rows": rows, "kernels": [asdict(k) for k in kernels]}
    atomic_write(json_path, json.dumps(payload, indent=1).encode())
    print(f"# {len(bad)} problem(s); wrote {json_path}")
    return 1 if bad else 0
