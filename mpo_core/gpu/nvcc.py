"""Compile every ``csrc/cuda/*.cu`` standalone with nvcc and judge ptxas' resource report, without a GPU.

Each file is compiled with ``nvcc -c -O3 -std=c++17 -Xptxas -v`` (plus the macros torch's
extension build adds) for each architecture (``-gencode arch=compute_XX,code=sm_XX``;
default sm_75, sm_80, sm_90). ptxas' report becomes one
:class:`~mpo_core.gpu.compiled.CompiledKernel` per function (registers, spill stores /
loads, stack frame, shared memory, barriers), judged by
:func:`~mpo_core.gpu.compiled.problems` as the Triton kernels are. Exit status 1 on any
compile error or problem (a spill), 2 when nvcc cannot be found.

    python -m mpo_core.gpu.nvcc [--arch 75 80 90] [--json results/nvcc_check.json] [FILES...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mpo_core.gpu.compiled import CompiledKernel, report

__all__ = ["BASE_FLAGS", "COLUMNS", "DEFAULT_ARCHS", "ROOT", "TORCH_NVCC_FLAGS", "compile_all", "compile_file",
           "cuda_include_dirs", "find_nvcc", "main", "parse_ptxas", "short_names"]

ROOT = Path(__file__).resolve().parents[2]
"""The checkout whose ``csrc/cuda`` is compiled by default."""
DEFAULT_ARCHS = (75, 80, 90)
# What torch.utils.cpp_extension adds to every nvcc call (COMMON_NVCC_FLAGS), so that the
# standalone compile sees the same half/bfloat16 API as the real extension build.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)
BASE_FLAGS = ("-c", "-O3", "-std=c++17", "-Xptxas", "-v")
COLUMNS = ("source", "arch", "kernel", "regs", "spill_B", "smem_B", "compile_s", "problems")
"""Columns of the nvcc table (:func:`mpo_core.gpu.compiled.report_rows`)."""

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+a?'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


def find_nvcc(explicit: str | None = None) -> str | None:
    """The nvcc to use: ``explicit``, ``$NVCC``, ``nvcc`` on PATH, or ``$CUDA_HOME/bin/nvcc``."""
    for cand in (explicit, os.environ.get("NVCC"), shutil.which("nvcc")):
        if cand and Path(cand).exists():
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def cuda_include_dirs(nvcc: str) -> list[str]:
    """The include directories nvcc itself uses (from ``nvcc --dryrun``), for host compilers.

    Parameters
    ----------
    nvcc : str
        The nvcc executable (wrapper scripts are fine: nvcc reports its real paths).

    Returns
    -------
    list of str
        Existing directories, ``-I`` ones first, then ``-isystem`` ones.
    """
    with tempfile.TemporaryDirectory(prefix="nvcc_inc_") as tmp:
        src = Path(tmp) / "empty.cu"
        src.write_text("")
        out = subprocess.run([nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "empty.o")],
                             capture_output=True, text=True, check=False)
    dirs: list[str] = []
    for line in (out.stdout + out.stderr).splitlines():
        if m := re.match(r'#\$ (?:SYSTEM_)?INCLUDES=(.*)', line.strip()):
            for tok in re.findall(r'"([^"]*)"|(\S+)', m.group(1)):
                path = (tok[0] or tok[1]).strip('"')
                path = path[2:] if path.startswith("-I") else path
                if path and path != "-isystem" and Path(path).is_dir():
                    dirs.append(str(Path(path).resolve()))
    return list(dict.fromkeys(dirs))


def parse_ptxas(text: str, arch: int, source: str) -> list[CompiledKernel]:
    """Parse ``-Xptxas -v`` output of one compile into one :class:`CompiledKernel` per function it reports.

    Parameters
    ----------
    text : str
        nvcc's output for a single architecture.
    arch : int
        The architecture it was compiled for.
    source : str
        What was compiled (the file).

    Returns
    -------
    list of CompiledKernel
        Entry functions (``entry=True``) and any non-inlined device functions, in order;
        ``name`` and ``symbol`` are the mangled name (:func:`short_names` makes it readable).
    """
    kernels: dict[str, CompiledKernel] = {}

    def function(symbol: str) -> CompiledKernel:
        return kernels.setdefault(symbol, CompiledKernel(symbol, arch, source, symbol=symbol, entry=False))

    props: CompiledKernel | None = None  # the function the next "bytes stack frame" line describes
    entry: CompiledKernel | None = None  # the entry function the next "Used N registers" line describes
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = function(m.group(1))
            entry.entry = True
        elif m := _PROPS.search(line):
            props = function(m.group(1))
        elif (m := _FRAME.search(line)) and props is not None:
            props.stack, props.spill_stores, props.spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and entry is not None:
            entry.registers = int(m.group(1))
            entry.static_smem = int(s.group(1)) if (s := _SMEM.search(line)) else 0
            entry.barriers = int(b.group(1)) if (b := _BARRIERS.search(line)) else 0
    return list(kernels.values())


def short_names(mangled: list[str]) -> dict[str, str]:
    """Demangle with c++filt when available and drop namespaces and parameter lists."""
    names = {m: m for m in mangled}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and mangled:
        out = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True, check=False)
        demangled = out.stdout.splitlines()
        if out.returncode == 0 and len(demangled) == len(mangled):
            for m, d in zip(mangled, demangled):
                d = re.sub(r"^void ", "", d)
                d = d.replace("(anonymous namespace)::", "").replace("mpo_core::cuda::", "")
                d = d.replace("mpo_core::", "")
                depth, cut = 0, len(d)
                for i, ch in enumerate(d):  # cut the parameter list: first '(' outside <...>
                    depth += ch == "<"
                    depth -= ch == ">"
                    if ch == "(" and depth == 0:
                        cut = i
                        break
                names[m] = d[:cut]
    return names


def compile_file(nvcc: str, src: Path, arch: int, outdir: Path, extra: list[str]) -> list[CompiledKernel]:
    """Compile ``src`` for ``sm_<arch>``: its kernels, or one entry holding the compile error."""
    obj = outdir / f"{src.stem}.sm_{arch}.o"
    cmd = [nvcc, *BASE_FLAGS, *TORCH_NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           f"-I{src.parent}", *extra, str(src), "-o", str(obj)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    rel = str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        error = f"{output[-4000:]}\n{' '.join(cmd)}"
        return [CompiledKernel(src.name, arch, rel, error=error, seconds=seconds)]
    kernels = parse_ptxas(output, arch, rel)
    for k in kernels:
        k.seconds = seconds / max(len(kernels), 1)
    return kernels


def compile_all(files: list[Path], archs: list[int], nvcc: str, jobs: int, extra: list[str]) -> list[CompiledKernel]:
    """Compile every (file, arch) pair, ``jobs`` at a time; kernels get readable names."""
    with tempfile.TemporaryDirectory(prefix="nvcc_check_") as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_file, nvcc, f, a, Path(tmp), extra) for f in files for a in archs]
        kernels = [k for f in futures for k in f.result()]
    names = short_names(sorted({k.symbol for k in kernels if k.symbol}))
    for k in kernels:
        if k.symbol:
            k.name = names[k.symbol]
    return kernels


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="CUDA sources (default: csrc/cuda/*.cu)")
    ap.add_argument("--arch", nargs="+", type=int, default=list(DEFAULT_ARCHS),
                    help="compute capabilities without the dot (default: 75 80 90)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "nvcc_check.json", help="JSON report path")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    ap.add_argument("--nvcc", default=None, help="nvcc executable (default: $NVCC, PATH, $CUDA_HOME/bin)")
    ap.add_argument("--extra", nargs="*", default=[], help="extra nvcc flags")
    args = ap.parse_args(argv)

    if any(not 10 <= a <= 999 for a in args.arch):
        ap.error(f"--arch expects compute capabilities like 75 80 90, got {args.arch}")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("nvcc_check: nvcc not found (set $NVCC or $CUDA_HOME, or put nvcc on PATH)", file=sys.stderr)
        return 2
    files = [f.resolve() for f in args.files] or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not files:
        print("nvcc_check: no .cu files to compile", file=sys.stderr)
        return 1
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        ap.error(f"files not found: {missing}")

    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    t0 = time.perf_counter()
    kernels = compile_all(files, args.arch, nvcc, args.jobs, args.extra)
    wall = time.perf_counter() - t0
    for k in kernels:
        if k.error:
            print(f"\n--- compile error: {k.source} for sm_{k.arch} ---\n{k.error}", file=sys.stderr)
    entries = sum(1 for k in kernels if k.entry and not k.error)
    print(f"# {len(files)} files x {len(args.arch)} archs, {entries} kernel builds, {wall:.1f}s wall")
    return report(kernels, COLUMNS, args.json, compiler=version.strip().splitlines()[-1] if version.strip() else nvcc,
                  flags=[*BASE_FLAGS, *TORCH_NVCC_FLAGS, *args.extra], archs=[f"sm_{a}" for a in args.arch],
                  wall_seconds=round(wall, 2))


if __name__ == "__main__":
    sys.exit(main())
