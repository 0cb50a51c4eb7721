"""Compile checks of the CUDA sources, for machines (and CI) without a GPU.

* ``scripts/nvcc_check.py`` (:mod:`mpo_core.gpu.nvcc`) compiles every ``csrc/cuda/*.cu`` for
  sm_75, sm_80 and sm_90: every file must compile, every kernel instantiation must be there,
  and nothing may spill (the verdict of :func:`mpo_core.gpu.compiled.problems`).
* The checker itself fails on a compile error and on a spill (forced with -maxrregcount).
* ``csrc/cuda/philox.cuh`` compiled as host C++ reproduces the Random123 known answers, so
  the dropout masks of the kernels have a bit-exact reference.
* The torch glue (``csrc/cuda/glue.cpp``) and the bindings compile (syntax and types) with
  ``MPO_CORE_WITH_CUDA`` against this torch's headers, although this torch has no CUDA.

Skipped only where nvcc is genuinely absent (it is present here and in CI).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mpo_core.gpu import nvcc
from mpo_core.gpu.compiled import problems

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "nvcc_check.py"
NVCC = nvcc.find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set $NVCC or $CUDA_HOME)")
ARCHS = ["sm_75", "sm_80", "sm_90"]
DTYPES = ["float", "__half", "__nv_bfloat16"]
# Every kernel template instance the launchers can pick: (name, vector widths per dtype).
EXPECTED = {
    "layernorm_forward_kernel": {"float": (1, 4), "__half": (1, 8), "__nv_bfloat16": (1, 8)},
    "layernorm_backward_kernel": {"float": (1, 4), "__half": (1, 8), "__nv_bfloat16": (1, 8)},
    "bias_gelu_forward_kernel": {"float": (1, 4), "__half": (1, 8), "__nv_bfloat16": (1, 8)},
    "bias_gelu_backward_kernel": {"float": (1, 4), "__half": (1, 8), "__nv_bfloat16": (1, 8)},
}


def _run_check(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args],
                          capture_output=True, text=True, check=False, timeout=600)
    return proc, json.loads(out.read_text()) if out.exists() else {}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    proc, rep = _run_check(tmp_path_factory.mktemp("nvcc"))
    return proc, rep


def test_all_sources_compile_for_every_arch_without_spills(report):
    proc, rep = report
    assert proc.returncode == 0, f"nvcc_check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert rep["ok"] and rep["problems"] == 0
    assert sorted(rep["archs"]) == ARCHS
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert not [k for k in rep["kernels"] if k["error"]]
    compiled = sorted({(k["source"], f"sm_{k['arch']}") for k in rep["kernels"]})
    assert compiled == sorted((s, a) for s in sources for a in ARCHS)
    for k in rep["kernels"]:
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["stack"] == 0, (k["source"], k["arch"], k["name"])
        if k["entry"]:
            assert 0 < k["registers"] <= 255, k


def test_every_kernel_instantiation_is_built_for_every_arch(report):
    _, rep = report
    for arch in ARCHS:
        names = {k["name"] for k in rep["kernels"] if f"sm_{k['arch']}" == arch and k["entry"]}
        for kernel, widths in EXPECTED.items():
            for dtype, vecs in widths.items():
                for vec in vecs:
                    assert f"{kernel}<{dtype}, {vec}>" in names, (arch, kernel, dtype, vec, sorted(names))
        assert "column_sums_kernel" in names


def test_checker_fails_on_compile_error_and_on_spills(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = undefined_symbol; }\n")
    proc, rep = _run_check(tmp_path, str(bad), "--arch", "80")
    assert proc.returncode == 1 and rep["problems"] == 1 and not rep["ok"]
    assert "compile error" in proc.stdout and "undefined_symbol" in proc.stderr
    assert "undefined_symbol" in rep["kernels"][0]["error"]

    # 64 live values in 16 registers: ptxas must spill, and the checker must say so.
    heavy = tmp_path / "heavy.cu"
    heavy.write_text("""__global__ void heavy(const float* __restrict__ in, float* __restrict__ out) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = in[threadIdx.x + i * 32];
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += v[i] * v[63 - i] * (float)i;
  out[threadIdx.x] = s;
}
""")
    proc, rep = _run_check(tmp_path, str(heavy), "--arch", "80", "--extra=-maxrregcount=16")
    assert proc.returncode == 1 and rep["problems"] == 1 and not rep["ok"]
    heavy_kernel, = rep["kernels"]
    assert not heavy_kernel["error"] and heavy_kernel["spill_stores"] > 0 and heavy_kernel["name"].startswith("heavy")
    assert "spills: " in proc.stdout and "heavy" in proc.stdout


def test_parse_ptxas_reads_registers_spills_and_smem():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2112 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 356 bytes cmem[0]
"""
    foo, bar = nvcc.parse_ptxas(text, 80, "x.cu")
    assert (foo.symbol, foo.entry, foo.registers, foo.spill_stores, foo.spill_loads, foo.stack, foo.smem,
            foo.barriers, foo.arch, foo.source) == ("_Z3fooPf", True, 40, 12, 16, 8, 2112, 1, 80, "x.cu")
    assert (bar.registers, bar.spill_stores, bar.spill_loads, bar.smem, bar.spills) == (8, 0, 0, 0, 0)
    assert problems(foo) == ["spills: 8 B stack, 0 B local, 12 B spill stores, 16 B spill loads per thread"]
    assert problems(bar) == []
    assert nvcc.short_names(["_Z3fooPf"])["_Z3fooPf"] in ("foo", "_Z3fooPf")


# Random123 tests/kat_vectors, "philox4x32 10" lines: counter words, key words, output words.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a host C++ compiler is needed (the extension build needs one too)"
    return cxx


def test_philox_header_matches_random123_known_answers(tmp_path):
    harness = tmp_path / "kat.cpp"
    calls = "\n".join(
        f"  print(philox4x32_10(Philox4{{{c[0]}u, {c[1]}u, {c[2]}u, {c[3]}u}}, {k[0]}u, {k[1]}u));"
        for c, k, _ in PHILOX_KAT)
    harness.write_text(f"""#include <cstdio>
#include "philox.cuh"
using namespace mpo_core::cuda;
static void print(Philox4 r) {{ std::printf("%08x %08x %08x %08x\\n", r.x, r.y, r.z, r.w); }}
int main() {{
{calls}
  // dropout_block splits (block, offset, seed) into counter and key words, low word first.
  const Philox4 d = dropout_block(0x0000000100000002ull, 0x0000000300000004ull, 0x0000000500000006ull);
  const Philox4 e = philox4x32_10(Philox4{{2u, 1u, 6u, 5u}}, 4u, 3u);
  std::printf("%d %a %a\\n", d.x == e.x && d.y == e.y && d.z == e.z && d.w == e.w,
              unit_float(0xffffffffu), unit_float(0x00000100u));
}}
""")
    exe = tmp_path / "kat"
    subprocess.run([_cxx(), "-std=c++17", "-O2", f"-I{ROOT / 'csrc' / 'cuda'}", str(harness), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    for line, (_, _, want) in zip(lines, PHILOX_KAT):
        assert line == " ".join(f"{w:08x}" for w in want)
    same, top, small = lines[len(PHILOX_KAT)].split()
    assert same == "1"
    assert float.fromhex(top) == 1 - 2.0**-24 and float.fromhex(small) == 2.0**-24


def _syntax_check(src: Path, tmp: Path) -> subprocess.CompletedProcess:
    import torch.utils.cpp_extension as ce

    includes = [*ce.include_paths(), sysconfig.get_paths()["include"], *nvcc.cuda_include_dirs(NVCC)]
    # A CPU wheel ships c10/cuda headers but not the CMake-generated one they include.
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in includes):
        stub = tmp / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp / "stub"))
    cmd = [_cxx(), "-fsyntax-only", "-std=c++20", "-DMPO_CORE_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{ROOT / 'csrc'}", *(f"-isystem{p}" for p in includes), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_cuda_glue_and_bindings_compile_with_cuda_enabled(tmp_path):
    assert any((Path(d) / "cuda_runtime_api.h").exists() for d in nvcc.cuda_include_dirs(NVCC)), (
        f"{NVCC} reports no include directory with cuda_runtime_api.h"
    )
    sources = [ROOT / "csrc" / "cuda" / "glue.cpp", ROOT / "csrc" / "bindings.cpp"]
    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        results = list(pool.map(lambda s: _syntax_check(s, tmp_path), sources))
    for src, proc in zip(sources, results):
        assert proc.returncode == 0, f"{src.name} with MPO_CORE_WITH_CUDA:\n{proc.stderr[-4000:]}"
