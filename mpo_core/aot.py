"""Ahead-of-time compile of every registered Triton kernel for sm_80 / sm_90, without a GPU.

For each :class:`~mpo_core.kernels.registry.KernelSpec` and target, Triton builds PTX
and a cubin (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``);
``cuobjdump --dump-resource-usage`` from Triton's wheel reads the cubin's registers,
stack / local memory (spills) and static shared memory; the PTX is searched for
tensor-core instructions (``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90). A
result is a problem (:func:`problems`) on a compile error, any spill, shared memory over
the device's per-block limit, a ``tl.dot`` kernel without ``mma`` on sm_80, or a config
meant for Hopper without ``wgmma`` on sm_90.

The occupancy estimate (:func:`occupancy`) is the CUDA occupancy calculation from
registers, shared memory and warps per block against the SM limits of the A100 / H100
in :data:`mpo_core.roofline.DEVICES` (a model, not a measurement).

Compiles run in ``spawn`` worker processes with ``TRITON_INTERPRET`` removed (the
kernels must be imported as real ``JITFunction``\\ s, whatever the calling process set).

    python -m mpo_core.aot                       # table of every kernel, sm_80 and sm_90
    python -m mpo_core.aot --json results/aot.json --jobs 2
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from mpo_core.kernels.registry import KernelSpec, Ptr
from mpo_core.roofline import DEVICES, Device, format_rows

ARCHS = (80, 90)
"""Compute capabilities compiled for: A100 (sm_80) and H100 (sm_90)."""
ARCH_DEVICE = {80: "A100-80GB", 90: "H100-SXM"}
"""The device of :data:`mpo_core.roofline.DEVICES` whose limits apply to each target."""

_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


@dataclass
class CompileResult:
    """What one compile of one spec for one target gave (resources from the cubin, flags from the PTX)."""

    name: str
    family: str
    arch: int
    num_warps: int
    uses_dot: bool
    hopper: bool
    error: str = ""
    registers: int = 0
    stack: int = 0
    local: int = 0
    static_smem: int = 0
    dynamic_smem: int = 0
    mma: bool = False
    wgmma: bool = False
    seconds: float = 0.0

    @property
    def smem(self) -> int:
        """Shared memory per block in bytes: static (cubin) + dynamic (Triton's request)."""
        return self.static_smem + self.dynamic_smem

    @property
    def spills(self) -> int:
        """Bytes of stack + local memory per thread (ptxas spills and stack frames)."""
        return self.stack + self.local


def triton_bin(tool: str) -> str:
    """Path of a CUDA tool shipped in Triton's wheel (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} is not in Triton's wheel at {path}")
    return path


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """Parse ``cuobjdump --dump-resource-usage`` output.

    Parameters
    ----------
    text : str
        The tool's stdout.

    Returns
    -------
    dict
        ``{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}`` for every
        ``Function <name>:`` block (the line after it holds ``KEY:value`` pairs).
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            current = m.group(1)
            out[current] = {}
        elif current is not None and (fields := _FIELD.findall(line)):
            out[current].update({k: int(v) for k, v in fields})
            current = None
    return out


def _signature(fn, spec: KernelSpec) -> tuple[dict, dict, dict]:
    """Triton signature, constexprs and attributes of ``spec``, by the JIT's own specialization rule."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    names = list(fn.arg_names)
    given = set(spec.args) | set(spec.constexprs)
    if given != set(names) or set(spec.args) & set(spec.constexprs):
        raise ValueError(f"{spec.name}: args + constexprs must name each argument of {spec.function} once: "
                         f"missing {sorted(set(names) - given)}, unknown {sorted(given - set(names))}, "
                         f"both {sorted(set(spec.args) & set(spec.constexprs))}")
    signature, constexprs, attrs = {}, dict(spec.constexprs), {}
    for index, name in enumerate(names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
            continue
        value = spec.args[name]
        if isinstance(value, Ptr):
            signature[name], key = f"*{value.dtype}", "D"
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
            continue
        else:
            param = fn.params[index]
            ty, key = native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                             not param.do_not_specialize_on_alignment)
            if ty == "constexpr":
                signature[name], constexprs[name] = "constexpr", key
                continue
            signature[name] = ty
        if key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def _worker_init() -> None:
    """Worker processes compile real kernels: no interpreter, Triton's FP-fusion default made explicit."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def compile_spec(spec: KernelSpec, arch: int) -> CompileResult:
    """Compile ``spec`` for ``sm_<arch>`` in this process and read its resources.

    Parameters
    ----------
    spec : KernelSpec
        What to compile.
    arch : int
        Compute capability as an int (80, 90).

    Returns
    -------
    CompileResult
        With ``error`` set (and no resources) when Triton or ptxas fails.

    Raises
    ------
    RuntimeError
        The kernel was imported under ``TRITON_INTERPRET=1`` (use :func:`compile_all`).
    ValueError
        ``spec`` does not name each kernel argument exactly once.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    result = CompileResult(spec.name, spec.family, arch, spec.num_warps, spec.uses_dot, spec.hopper)
    fn = spec.kernel()
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{spec.module}.{spec.function} is a {type(fn).__name__}: it was imported under "
                           "TRITON_INTERPRET=1; compile through mpo_core.aot.compile_all (worker processes)")
    signature, constexprs, attrs = _signature(fn, spec)
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as exc:  # a compile error is a result to report, not a crash of the whole run
        result.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        result.seconds = time.perf_counter() - start
        return result
    result.seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        dump = subprocess.run([triton_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    usage = parse_resource_usage(dump)
    if kernel.metadata.name not in usage:
        raise RuntimeError(f"cuobjdump reported no function {kernel.metadata.name!r}: {dump}")
    res = usage[kernel.metadata.name]
    result.registers, result.stack, result.local = res["REG"], res["STACK"], res["LOCAL"]
    result.static_smem, result.dynamic_smem = res["SHARED"], int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    result.mma = "mma.sync" in ptx or "wgmma.mma_async" in ptx
    result.wgmma = "wgmma.mma_async" in ptx
    return result


def compile_all(specs: Sequence[KernelSpec], archs: Iterable[int] = ARCHS, jobs: int | None = None
                ) -> list[CompileResult]:
    """Compile every ``spec`` for every arch in ``spawn`` worker processes (no ``TRITON_INTERPRET``).

    Parameters
    ----------
    specs : sequence of KernelSpec
        What to compile (:func:`mpo_core.kernels.registry.kernel_specs`).
    archs : iterable of int
        Compute capabilities (subset of :data:`ARCHS`).
    jobs : int, optional
        Worker processes (default: the CPU count).

    Returns
    -------
    list of CompileResult
        In the order spec-major, arch-minor.
    """
    archs = tuple(archs)
    if not archs or any(a not in ARCHS for a in archs):
        raise ValueError(f"archs must be a non-empty subset of {ARCHS}, got {archs}")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"jobs must be None or an int >= 1, got {jobs!r}")
    work = [(spec, arch) for spec in specs for arch in archs]
    # heavy (tl.dot) compiles first, so the pool does not end on a long tail
    order = sorted(range(len(work)), key=lambda i: not work[i][0].uses_dot)
    results: list[CompileResult | None] = [None] * len(work)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1, mp_context=ctx,
                             initializer=_worker_init) as pool:
        futures = {i: pool.submit(compile_spec, *work[i]) for i in order}
        for i, future in futures.items():
            results[i] = future.result()
    return results  # type: ignore[return-value]


def occupancy(registers: int, smem: int, num_warps: int, device: Device) -> dict:
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
    device : Device
        SM limits (:data:`mpo_core.roofline.DEVICES`).

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


def problems(result: CompileResult) -> list[str]:
    """Why ``result`` fails the checks (empty when it passes).

    Fails on: a compile error; any stack or local memory (spills); shared memory over the
    per-block limit of the target's device; a ``tl.dot`` kernel without tensor-core
    ``mma`` on sm_80; a config meant for Hopper without ``wgmma`` on sm_90.
    """
    if result.error:
        return [f"compile error: {result.error.splitlines()[0]}"]
    out = []
    if result.spills:
        out.append(f"spills: {result.stack} B stack, {result.local} B local memory per thread")
    device = DEVICES[ARCH_DEVICE[result.arch]]
    if result.smem > device.smem_per_block:
        out.append(f"shared memory {result.smem} B over the {device.name} per-block limit {device.smem_per_block} B")
    if result.uses_dot and result.arch == 80 and not result.mma:
        out.append("tl.dot kernel without mma in its sm_80 PTX")
    if result.hopper and result.arch == 90 and not result.wgmma:
        out.append("config meant for Hopper without wgmma in its sm_90 PTX")
    return out


def report_rows(results: Sequence[CompileResult]) -> list[dict]:
    """One row per result: resources, tensor-core flags, modelled occupancy and problems."""
    rows = []
    for r in results:
        row = {"kernel": r.name, "arch": f"sm_{r.arch}", "warps": r.num_warps, "regs": r.registers,
               "spill_B": r.spills, "smem_B": r.smem, "mma": r.mma, "wgmma": r.wgmma,
               "compile_s": round(r.seconds, 2)}
        if not r.error:
            occ = occupancy(r.registers, r.smem, r.num_warps, DEVICES[ARCH_DEVICE[r.arch]])
            row.update({"model_blocks/SM": occ["blocks_per_sm"], "model_occupancy": occ["occupancy"],
                        "model_limiter": occ["limiter"]})
        row["problems"] = "; ".join(problems(r)) or "ok"
        rows.append(row)
    return rows


COLUMNS = ("kernel", "arch", "warps", "regs", "spill_B", "smem_B", "mma", "wgmma", "model_blocks/SM",
           "model_occupancy", "model_limiter", "compile_s", "problems")


def main(argv: list[str] | None = None) -> int:
    """CLI: compile the registry, print the resource table, write JSON; exit 1 on any problem."""
    import torch

    from mpo_core.kernels.registry import kernel_specs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    ap.add_argument("--json", default=os.path.join("results", "aot.json"))
    args = ap.parse_args(argv)
    specs = kernel_specs(tuple(getattr(torch, d) for d in args.dtype))
    start = time.perf_counter()
    results = compile_all(specs, args.arch, args.jobs)
    rows = report_rows(results)
    print(f"# Triton {__import__('triton').__version__}: {len(specs)} kernel configs x {len(args.arch)} targets "
          f"compiled in {time.perf_counter() - start:.0f} s (occupancy: model, from the cubin's registers/smem)")
    print(format_rows(rows, COLUMNS))
    bad = [r for r in rows if r["problems"] != "ok"]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"kind": "compiled resources (measured by ptxas) + occupancy (model)", "rows": rows,
                   "results": [asdict(r) for r in results]}, fh, indent=1)
    print(f"# {len(bad)} problem(s); wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
