#!/usr/bin/env python
"""Kernel mutation check: do the tests catch small deliberate bugs in every kernel?

Each mutation below replaces one snippet of a kernel source (Triton, CUDA, or the C++ CPU
kernel) with a buggy variant -- a flipped sign, an off-by-one mask or offset, a dropped scale
or accumulation, a wrong program order, a missing barrier, an uninitialised shared-memory
read -- and runs the tests that guard that kernel. A mutation is *caught* when those tests
fail. The check fails (exit 1) unless every mutation is caught and the unmutated tests pass.

It never touches the working tree: the repository (tracked and untracked, non-ignored files,
plus the built ``mpo_core/_C*.so``) is copied to a temporary directory, mutated there, and
pytest runs there with that copy first on ``PYTHONPATH``. CUDA mutations take effect through
the host emulation, which tests/test_cpp_ext.py compiles from the copy's ``csrc/cuda``; C++
CPU mutations rebuild the extension in the copy (``setup.py build_ext --inplace``).

    python scripts/mutation_check.py                 # everything (about 30-60 min on 2 cores)
    python scripts/mutation_check.py --list          # the mutations and their tests
    python scripts/mutation_check.py -k mpo_matmul   # those whose name contains a string
    python scripts/mutation_check.py --json results/mutations.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Test selections per kernel family (pytest arguments, relative to the repository root).
MPO_MATMUL_TESTS = ("tests/test_mpo_matmul.py",)
FUSED_OPS_TESTS = ("tests/test_fused_ops.py",)
EMULATED_TESTS = ("tests/test_cpp_ext.py", "-k", "emulated")
EMULATED_LAYERNORM = ("tests/test_cpp_ext.py", "-k", "emulated and layernorm")
EMULATED_DROPOUT = ("tests/test_cpp_ext.py", "-k", "emulated and dropout")
EMULATED_BIAS_GELU = ("tests/test_cpp_ext.py", "-k", "emulated and bias_gelu")
CPU_EXT_TESTS = ("tests/test_cpp_ext.py", "-k", "cpu")


@dataclasses.dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once in ``path``) by ``new``."""

    name: str
    kind: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]

    @property
    def rebuild_extension(self) -> bool:
        return self.path.startswith("csrc/") and not self.path.startswith("csrc/cuda/")


def _m(name, kind, path, old, new, tests):
    return Mutation(name, kind, path, old, new, tests)


MM, LN, RLN, BG, RED = (f"mpo_core/kernels/{f}.py" for f in ("mpo_matmul", "layer_norm", "residual_layer_norm",
                                                              "bias_gelu", "reduce"))
MUTATIONS: list[Mutation] = [
    # ---- Triton: fused MPO matmul
    _m("mpo_matmul/program-order", "wrong program order", MM,
       "first_m = (pid // group_size) * GROUP_M", "first_m = 0", MPO_MATMUL_TESTS),
    _m("mpo_matmul/k-offset", "offset off by one", MM,
       "offs_k = k_ib * IS + k_r\n", "offs_k = k_ib * IS + k_r + 1\n", MPO_MATMUL_TESTS),
    _m("mpo_matmul/n-mask", "mask off by one", MM,
       "n_mask = (jb_c < JB) & (js_c < JS)", "n_mask = (jb_c < JB) & (js_c <= JS)", MPO_MATMUL_TESTS),
    _m("mpo_matmul/m-tile", "offset off by one", MM,
       "row0 = (pid_m * BLOCK_M).to(tl.int64) * N", "row0 = (pid_m * BLOCK_M + 1).to(tl.int64) * N", MPO_MATMUL_TESTS),
    _m("mpo_matmul/gelu-sign", "sign", MM,
       "acc = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))", "acc = 0.5 * acc * (1.0 - tl.erf(acc * _SQRT1_2))",
       MPO_MATMUL_TESTS),
    _m("mpo_matmul/bias-dropped", "dropped term", MM,
       "        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]\n",
       "        acc += 0.0 * tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]\n",
       MPO_MATMUL_TESTS),
    _m("tiles/mode-padding", "off by one", "mpo_core/kernels/tiles.py",
       "ip = next_power_of_2(i)\n", "ip = next_power_of_2(i - 1)\n", MPO_MATMUL_TESTS),
    # ---- Triton: LayerNorm, residual + dropout + LayerNorm, bias + GELU, column sum
    _m("layer_norm/variance-mask", "mask dropped", LN,
       "centered = tl.where(mask, h - mean, 0.0)", "centered = h - mean", FUSED_OPS_TESTS),
    _m("layer_norm/backward-sign", "sign", LN,
       "dh = (wdy - (xhat * c1 + c2)) * rstd", "dh = (wdy + (xhat * c1 + c2)) * rstd", FUSED_OPS_TESTS),
    _m("layer_norm/backward-last-row", "range off by one", LN,
       "row_end = tl.minimum(row_start + rows_per_program, M)", "row_end = tl.minimum(row_start + rows_per_program, M - 1)",
       FUSED_OPS_TESTS),
    _m("layer_norm/dropout-backward-scale", "dropped scale", LN,
       "dr = tl.where(keep, dh * scale, 0.0)", "dr = tl.where(keep, dh, 0.0)", FUSED_OPS_TESTS),
    _m("residual_layer_norm/dropout-scale", "dropped scale", RLN,
       "r = tl.where(keep, r * scale, 0.0)", "r = tl.where(keep, r, 0.0)", FUSED_OPS_TESTS),
    _m("bias_gelu/tanh-grad-sign", "sign", BG,
       "0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI", "0.5 * u * (1.0 + t * t) * _SQRT_2_OVER_PI", FUSED_OPS_TESTS),
    _m("bias_gelu/dbias-accumulation", "dropped accumulation", BG,
       "db += tl.sum(dx, axis=0)", "db = tl.sum(dx, axis=0)", FUSED_OPS_TESTS),
    _m("bias_gelu/backward-row-mask", "mask off by one", BG,
       "mask = (rows[:, None] < row_end) & col_mask[None, :]", "mask = (rows[:, None] < row_end - 1) & col_mask[None, :]",
       FUSED_OPS_TESTS),
    _m("reduce/last-partial-row", "mask off by one", RED,
       "mask = (rows[:, None] < G) & col_mask[None, :]", "mask = (rows[:, None] < G - 1) & col_mask[None, :]",
       FUSED_OPS_TESTS),
    # ---- CUDA (host emulation)
    _m("cuda/row_sum-first-barrier", "missing barrier", "csrc/cuda/common.cuh",
       "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();\n", "  if (lane == 0) scratch[warp] = v;\n",
       EMULATED_TESTS),
    _m("cuda/row_sum-reuse-barrier", "missing barrier", "csrc/cuda/common.cuh",
       "  __syncthreads();  // scratch is reused by the next call\n", "", EMULATED_TESTS),
    _m("cuda/row_sum-uninitialised-read", "mask off by one (uninitialised shared read)", "csrc/cuda/common.cuh",
       "v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0f;",
       "v = lane <= static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0f;", EMULATED_TESTS),
    _m("cuda/dropout-scale", "dropped scale", "csrc/cuda/common.cuh",
       "v[4 * q + 1] = unit_float(b.y) < keep_prob ? v[4 * q + 1] * scale : 0.0f;",
       "v[4 * q + 1] = unit_float(b.y) < keep_prob ? v[4 * q + 1] : 0.0f;", EMULATED_DROPOUT),
    _m("cuda/layernorm-forward-centering-sign", "sign", "csrc/cuda/layernorm.cu",
       "const float d = v[c][j] - mean;", "const float d = v[c][j] + mean;", EMULATED_LAYERNORM),
    _m("cuda/layernorm-backward-sign", "sign", "csrc/cuda/layernorm.cu",
       "out[j] = rstd * (g[c][j] - (sum_g + xhat[c][j] * sum_gx) * inv_n);",
       "out[j] = rstd * (g[c][j] + (sum_g + xhat[c][j] * sum_gx) * inv_n);", EMULATED_LAYERNORM),
    _m("cuda/layernorm-backward-barrier", "missing barrier", "csrc/cuda/layernorm.cu",
       "  __syncthreads();\n  for (int col = threadIdx.y * blockDim.x + threadIdx.x;",
       "  for (int col = threadIdx.y * blockDim.x + threadIdx.x;", EMULATED_LAYERNORM),
    _m("cuda/layernorm-backward-program-order", "wrong program order", "csrc/cuda/layernorm.cu",
       "for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;",
       "for (int64_t row = static_cast<int64_t>(threadIdx.y); row < a.rows;", EMULATED_TESTS),
    _m("cuda/bias_gelu-dbias-accumulation", "dropped accumulation", "csrc/cuda/bias_gelu.cu",
       "      acc[j] += g[j];", "      acc[j] = g[j];", EMULATED_BIAS_GELU),
    _m("cuda/bias_gelu-erf-grad-sign", "sign", "csrc/cuda/bias_gelu.cu",
       "u * kInvSqrt2Pi * expf(-0.5f * u * u)", "u * kInvSqrt2Pi * expf(0.5f * u * u)", EMULATED_BIAS_GELU),
    _m("cuda/column_sums-barrier", "missing barrier", "csrc/cuda/util.cu",
       "  partial[threadIdx.y][threadIdx.x] = s;\n  __syncthreads();\n", "  partial[threadIdx.y][threadIdx.x] = s;\n",
       EMULATED_BIAS_GELU),
    _m("cuda/column_sums-last-lane", "loop bound off by one", "csrc/cuda/util.cu",
       "for (int y = 0; y < kLanesPerColumn; ++y)", "for (int y = 0; y < kLanesPerColumn - 1; ++y)", EMULATED_BIAS_GELU),
    # ---- C++ CPU kernel (extension rebuilt in the copy)
    _m("cpu/layernorm-backward-sign", "sign", "csrc/residual_layernorm_cpu.cpp",
       "dhr[j] = narrow<T>(rs * (g - (sum_g + xhat * sum_gx) * inv_n));",
       "dhr[j] = narrow<T>(rs * (g + (sum_g + xhat * sum_gx) * inv_n));", CPU_EXT_TESTS),
    _m("cpu/layernorm-variance-range", "loop bound off by one", "csrc/residual_layernorm_cpu.cpp",
       "  for (int64_t j = 0; j < n; ++j) {\n    const Acc d = widen<Acc>(hr[j]) - mu;",
       "  for (int64_t j = 1; j < n; ++j) {\n    const Acc d = widen<Acc>(hr[j]) - mu;", CPU_EXT_TESTS),
]


def check_applicable(mutations: list[Mutation], root: Path = ROOT) -> list[str]:
    """Problems with the mutation list against the sources under ``root`` (each ``old`` exactly once)."""
    problems = []
    for m in mutations:
        path = root / m.path
        if not path.is_file():
            problems.append(f"{m.name}: {m.path} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1:
            problems.append(f"{m.name}: the snippet occurs {count} times in {m.path}, expected once: {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.name}: old and new are the same")
    return problems


def copy_repository(dest: Path) -> None:
    """Copy the working tree's tracked and untracked, non-ignored files plus the built extension."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    extras = [str(p.relative_to(ROOT)) for p in (ROOT / "mpo_core").glob("_C*.so")]
    for rel in sorted(set(filter(None, listed)) | set(extras)):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("CI", None)  # a skip here is not a failure of the mutation
    return env


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """pytest in the copy, stopping at the first failure: (exit code, seconds, output tail)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = -9, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return code, time.perf_counter() - start, out[-3000:]


def rebuild_extension(copy: Path) -> None:
    """Rebuild mpo_core._C (its C++ CPU part) in place in the copy."""
    env = _env(copy) | {"MPO_CORE_FORCE_CPU_EXT": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"extension rebuild failed in {copy}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def verdict(code: int, out: str) -> str:
    """caught (tests failed or crashed), survived (passed), or invalid (the mutant did not build)."""
    if code == 0:
        return "survived"
    if re.search(r":\d+:\d+: error: ", out):
        return "invalid"  # a compiler error: the mutant itself does not build
    if code == 5:
        return "invalid"  # no tests collected
    return "caught"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="only", action="append", default=[],
                        help="run only mutations whose name contains this string (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutations, check they apply, and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated test runs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run (default 1800)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)

    selected = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    problems = check_applicable(selected)
    if args.list or problems:
        for m in selected:
            print(f"{m.name:42s} {m.kind:45s} {m.path:36s} {' '.join(m.tests)}")
        for p in problems:
            print(f"NOT APPLICABLE: {p}", file=sys.stderr)
        return 1 if problems else 0
    if not selected:
        print("no mutation matches", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="mpo_mutation_"))
    copy = tmp / "repo"
    copy.mkdir()
    results, failures = [], []
    try:
        copy_repository(copy)
        where = subprocess.run([sys.executable, "-c", "import mpo_core; print(mpo_core.__file__)"], cwd=copy,
                               env=_env(copy), capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(copy.resolve()):
            raise RuntimeError(f"the copy's tests would import mpo_core from {where}, not from {copy}")
        print(f"[mutation] copy in {copy}; {len(selected)} mutations", flush=True)
        if not args.no_baseline:
            for tests in sorted({m.tests for m in selected}):
                code, secs, out = run_tests(copy, tests, args.timeout)
                print(f"[baseline] {' '.join(tests)}: exit {code} in {secs:.0f} s", flush=True)
                if code != 0:
                    print(out, file=sys.stderr)
                    failures.append(f"baseline {' '.join(tests)} failed (exit {code})")
            if failures:
                raise SystemExit(f"unmutated tests fail: {failures}")
        for m in selected:
            path = copy / m.path
            original = path.read_text()
            built = {so: so.read_bytes() for so in (copy / "mpo_core").glob("_C*.so")} if m.rebuild_extension else {}
            path.write_text(original.replace(m.old, m.new))
            try:
                if m.rebuild_extension:
                    rebuild_extension(copy)
                code, secs, out = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
                for so, data in built.items():
                    so.write_bytes(data)
            v = verdict(code, out)
            first_failure = next((line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
            results.append(dict(name=m.name, kind=m.kind, path=m.path, verdict=v, exit_code=code, seconds=round(secs, 1),
                                failed_test=first_failure))
            print(f"[mutation] {m.name:42s} {v:8s} {secs:6.0f} s  {first_failure[:110]}", flush=True)
            if v != "caught":
                failures.append(m.name)
                if v == "invalid":
                    print(out, file=sys.stderr)
    finally:
        if args.keep:
            print(f"[mutation] kept {copy}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    caught = sum(r["verdict"] == "caught" for r in results)
    print(f"\nmutation score: {caught}/{len(results)} caught")
    families: dict[str, list[dict]] = {}
    for r in results:
        families.setdefault(r["path"], []).append(r)
    for family, rs in families.items():
        print(f"  {family:40s} {sum(r['verdict'] == 'caught' for r in rs)}/{len(rs)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(caught=caught, total=len(results), results=results), indent=2))
    if failures:
        print(f"NOT CAUGHT or invalid: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
