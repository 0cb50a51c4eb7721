#!/usr/bin/env python3
"""Compile every ``csrc/cuda/*.cu`` standalone with nvcc and report ptxas resource usage.

CI has no GPU, so this is how the CUDA kernels are checked there: each file is compiled with
``nvcc -c -O3 -std=c++17 -Xptxas -v`` (plus the macros torch's extension build adds) for each
architecture (``-gencode arch=compute_XX,code=sm_XX``; default sm_75, sm_80, sm_90), the
ptxas report is parsed into registers, spill stores/loads, stack frame and shared memory per
kernel, a table is printed and JSON written. The exit status is 1 on any compile error or any
spill, 2 when nvcc cannot be found.

Usage::

    python scripts/nvcc_check.py [--arch 75 80 90] [--json results/nvcc_check.json] [FILES...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = ("75", "80", "90")
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

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_BARRIERS = re.compile(r"used (\d+) barriers")


@dataclass
class Kernel:
    """ptxas resource usage of one function for one architecture."""

    mangled: str
    name: str = ""
    entry: bool = False
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    barriers: int = 0


@dataclass
class Compile:
    """One nvcc invocation: a file for an architecture."""

    file: str
    arch: str
    ok: bool
    seconds: float
    command: list[str]
    error: str = ""
    kernels: list[Kernel] = field(default_factory=list)


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


def parse_ptxas(text: str) -> list[Kernel]:
    """Parse ``-Xptxas -v`` output into one :class:`Kernel` per function it reports.

    Parameters
    ----------
    text : str
        nvcc's stderr for a single architecture.

    Returns
    -------
    list of Kernel
        Entry functions (``entry=True``) and any non-inlined device functions, in order.
    """
    kernels: dict[str, Kernel] = {}
    props: Kernel | None = None  # the function the next "bytes stack frame" line describes
    entry: Kernel | None = None  # the entry function the next "Used N registers" line describes
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry = kernels.setdefault(m.group(1), Kernel(mangled=m.group(1)))
            entry.entry = True
        elif m := _PROPS.search(line):
            props = kernels.setdefault(m.group(1), Kernel(mangled=m.group(1)))
        elif (m := _FRAME.search(line)) and props is not None:
            props.stack, props.spill_stores, props.spill_loads = map(int, m.groups())
        elif (m := _USED.search(line)) and entry is not None:
            entry.registers = int(m.group(1))
            entry.smem = int(s.group(1)) if (s := _SMEM.search(line)) else 0
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


def compile_one(nvcc: str, src: Path, arch: str, outdir: Path, extra: list[str]) -> Compile:
    """Compile ``src`` for ``sm_<arch>`` and parse its ptxas report."""
    obj = outdir / f"{src.stem}.sm_{arch}.o"
    cmd = [nvcc, *BASE_FLAGS, *TORCH_NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}",
           f"-I{src.parent}", *extra, str(src), "-o", str(obj)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    rel = str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src)
    result = Compile(file=rel, arch=f"sm_{arch}", ok=proc.returncode == 0, seconds=round(seconds, 2),
                     command=cmd)
    output = proc.stdout + proc.stderr
    if not result.ok:
        result.error = output[-4000:]
        return result
    result.kernels = parse_ptxas(output)
    return result


def run(files: list[Path], archs: list[str], nvcc: str, jobs: int, extra: list[str]) -> list[Compile]:
    """Compile every (file, arch) pair, ``jobs`` at a time."""
    with tempfile.TemporaryDirectory(prefix="nvcc_check_") as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(compile_one, nvcc, f, a, Path(tmp), extra) for f in files for a in archs]
        results = [f.result() for f in futures]
    names = short_names(sorted({k.mangled for r in results for k in r.kernels}))
    for r in results:
        for k in r.kernels:
            k.name = names[k.mangled]
    return results


def table(results: list[Compile]) -> str:
    """A fixed-width table: one line per kernel and architecture, compile errors included."""
    head = f"{'file':<24} {'arch':<6} {'kernel':<58} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6} {'smem':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        if not r.ok:
            lines.append(f"{r.file:<24} {r.arch:<6} COMPILE ERROR ({r.seconds:.1f}s)")
            continue
        for k in r.kernels:
            name = k.name if len(k.name) <= 58 else k.name[:55] + "..."
            lines.append(f"{r.file:<24} {r.arch:<6} {name:<58} {k.registers:>5} {k.spill_stores:>9} "
                         f"{k.spill_loads:>9} {k.stack:>6} {k.smem:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="CUDA sources (default: csrc/cuda/*.cu)")
    ap.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                    help="compute capabilities without the dot (default: 75 80 90)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "nvcc_check.json", help="JSON report path")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    ap.add_argument("--nvcc", default=None, help="nvcc executable (default: $NVCC, PATH, $CUDA_HOME/bin)")
    ap.add_argument("--extra", nargs="*", default=[], help="extra nvcc flags")
    args = ap.parse_args(argv)

    for a in args.arch:
        if not re.fullmatch(r"\d{2,3}a?", a):
            ap.error(f"--arch expects compute capabilities like 75 80 90, got {a!r}")
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
    results = run(files, args.arch, nvcc, args.jobs, args.extra)
    wall = time.perf_counter() - t0

    print(table(results))
    errors = [r for r in results if not r.ok]
    spilled = [(r.file, r.arch, k.name) for r in results for k in r.kernels if k.spill_stores or k.spill_loads]
    for r in errors:
        print(f"\n--- compile error: {r.file} for {r.arch} ---\n{' '.join(r.command)}\n{r.error}", file=sys.stderr)
    for f, a, k in spilled:
        print(f"spill: {f} {a} {k}", file=sys.stderr)
    n_kernels = sum(1 for r in results for k in r.kernels if k.entry)
    print(f"\n{len(results)} compiles ({len(files)} files x {len(args.arch)} archs), {n_kernels} kernel builds, "
          f"{len(errors)} errors, {len(spilled)} with spills, {wall:.1f}s wall")

    report = {
        "nvcc": version.strip().splitlines()[-1] if version.strip() else nvcc,
        "flags": [*BASE_FLAGS, *TORCH_NVCC_FLAGS, *args.extra],
        "archs": [f"sm_{a}" for a in args.arch],
        "wall_seconds": round(wall, 2),
        "ok": not errors and not spilled,
        "errors": len(errors),
        "spills": len(spilled),
        "compiles": [asdict(r) for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
