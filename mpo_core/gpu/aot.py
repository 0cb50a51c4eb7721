"""Ahead-of-time compile of every registered Triton kernel for sm_80 / sm_90, without a GPU.

For each :class:`~mpo_core.gpu.registry.KernelSpec` and target, Triton builds PTX
and a cubin (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``);
``cuobjdump --dump-resource-usage`` from Triton's wheel reads the cubin's registers,
stack / local memory (spills) and static shared memory; the PTX is searched for
tensor-core instructions (``mma.sync`` on sm_80, ``wgmma.mma_async`` on sm_90). Each
result is a :class:`~mpo_core.gpu.compiled.CompiledKernel`, judged by
:func:`~mpo_core.gpu.compiled.problems` (as the nvcc compile of the CUDA sources is).

Compiles run in ``spawn`` worker processes with ``TRITON_INTERPRET`` removed (the
kernels must be imported as real ``JITFunction``\\ s, whatever the calling process set).

    python -m mpo_core.gpu.aot                       # table of every kernel, sm_80 and sm_90
    python -m mpo_core.gpu.aot --json results/aot.json --jobs 2
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Sequence

from mpo_core.gpu.compiled import COLUMNS, CompiledKernel, report
from mpo_core.gpu.registry import KernelSpec, Ptr

ARCHS = (80, 90)
"""Compute capabilities compiled for: A100 (sm_80) and H100 (sm_90)."""

_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_FIELD = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


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


def compile_spec(spec: KernelSpec, arch: int) -> CompiledKernel:
    """Compile ``spec`` for ``sm_<arch>`` in this process and read its resources.

    Parameters
    ----------
    spec : KernelSpec
        What to compile.
    arch : int
        Compute capability as an int (80, 90).

    Returns
    -------
    CompiledKernel
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

    result = CompiledKernel(spec.name, arch, spec.family, num_warps=spec.num_warps, uses_dot=spec.uses_dot,
                            hopper=spec.hopper)
    fn = spec.kernel()
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{spec.module}.{spec.function} is a {type(fn).__name__}: it was imported under "
                           "TRITON_INTERPRET=1; compile through mpo_core.gpu.aot.compile_all (worker processes)")
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
    result.symbol = kernel.metadata.name
    result.registers, result.stack, result.local = res["REG"], res["STACK"], res["LOCAL"]
    result.static_smem, result.dynamic_smem = res["SHARED"], int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    result.mma = "mma.sync" in ptx or "wgmma.mma_async" in ptx
    result.wgmma = "wgmma.mma_async" in ptx
    return result


def compile_all(specs: Sequence[KernelSpec], archs: Iterable[int] = ARCHS, jobs: int | None = None
                ) -> list[CompiledKernel]:
    """Compile every ``spec`` for every arch in ``spawn`` worker processes (no ``TRITON_INTERPRET``).

    Parameters
    ----------
    specs : sequence of KernelSpec
        What to compile (:func:`mpo_core.gpu.registry.kernel_specs`).
    archs : iterable of int
        Compute capabilities (subset of :data:`ARCHS`).
    jobs : int, optional
        Worker processes (default: the CPU count).

    Returns
    -------
    list of CompiledKernel
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
    results: list[CompiledKernel | None] = [None] * len(work)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1, mp_context=ctx,
                             initializer=_worker_init) as pool:
        futures = {i: pool.submit(compile_spec, *work[i]) for i in order}
        for i, future in futures.items():
            results[i] = future.result()
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """CLI: compile the registry, print the resource table, write JSON; exit 1 on any problem."""
    import torch

    from mpo_core.gpu.registry import kernel_specs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    ap.add_argument("--json", default=os.path.join("results", "aot.json"))
    args = ap.parse_args(argv)
    specs = kernel_specs(tuple(getattr(torch, d) for d in args.dtype))
    start = time.perf_counter()
    results = compile_all(specs, args.arch, args.jobs)
    triton_version = __import__("triton").__version__
    print(f"# Triton {triton_version}: {len(specs)} kernel configs x {len(args.arch)} targets "
          f"compiled in {time.perf_counter() - start:.0f} s (occupancy: model, from the cubin's registers/smem)")
    return report(results, COLUMNS, args.json, kind="compiled resources (measured by ptxas) + occupancy (model)",
                  compiler=f"triton {triton_version}")


if __name__ == "__main__":
    sys.exit(main())
