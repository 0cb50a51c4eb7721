"""One row of the verdict (:class:`Result`), the :class:`Checker` that collects them (with the GPU policy:
what a missing backend means, timing, the roofline model), and the table they print as."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from mpo_core.check.tolerances import DTYPES


@dataclasses.dataclass
class Result:
    """One row of the verdict table."""

    check: str
    backend: str
    dtype: str
    shape: str
    what: str
    ok: bool
    error: float | None = None
    tol: float | None = None
    measured_us: float | None = None
    model_us: float | None = None
    note: str = ""


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref| / max |ref|`` in float64 (NaN anywhere in ``a`` gives inf)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


INSTALL_LINES = {
    "triton": "pip install triton (the version your torch wheel pins: pip show torch lists it)",
    "cuda": "put a CUDA toolkit's nvcc on PATH (or set CUDA_HOME) and rebuild: pip install -e . "
            "(README: Install without the set-up scripts)",
}
"""What to run when a backend a GPU of compute capability >= 8.0 must have is missing."""
KERNEL_MIN_CAPABILITY = (8, 0)
"""From this compute capability on, every Triton kernel (``tl.dot`` included) and the CUDA extension
must run: a missing one fails the check instead of being listed as not checked."""


def install_line(op: str, backend: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> str | None:
    """The command that fixes ``backend`` not running ``op`` in ``dtype`` on a GPU of ``capability``, or
    ``None`` when its absence is not a failure there (no GPU, below cc 8.0, a dtype or op it does not take)."""
    if backend not in ("triton", "cuda", "cpp", "torch"):
        raise ValueError(f"backend must be one of triton, cuda, cpp, torch, got {backend!r}")
    if capability is None or tuple(capability) < KERNEL_MIN_CAPABILITY or dtype not in DTYPES:
        return None
    if backend == "triton" or (backend == "cuda" and op != "mpo_linear"):
        return INSTALL_LINES[backend]
    return None


class Checker:
    """Collects results; ``compare`` adds one row per tensor pair.

    ``gpu_name`` and ``capability`` describe the GPU the check judges for: read from the device
    when ``device`` is ``"cuda"``; given explicitly, they run the GPU policy (its roofline model,
    missing backends as failures) on any device, which is how CI executes it without a GPU.
    """

    def __init__(self, device: str, timed: bool, gpu_name: str | None = None,
                 capability: tuple[int, int] | None = None, warmup: int = 3, repeat: int = 10):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if warmup < 0 or repeat < 1:
            raise ValueError(f"warmup must be >= 0 and repeat >= 1, got {warmup} and {repeat}")
        self.device, self.timed, self.warmup, self.repeat = device, timed, warmup, repeat
        self.results: list[Result] = []
        self.not_checked: list[str] = []
        from mpo_core.gpu.devices import model_for

        if device == "cuda":
            gpu_name = torch.cuda.get_device_name() if gpu_name is None else gpu_name
            capability = torch.cuda.get_device_capability() if capability is None else capability
        if (gpu_name is None) != (capability is None):
            raise ValueError("gpu_name and capability go together (both or neither)")
        self.gpu_name, self.capability = gpu_name, None if capability is None else tuple(capability)
        self.model_gpu = None if capability is None else model_for(gpu_name, self.capability)

    def unavailable(self, op: str, backend: str, dtype: torch.dtype, reason: str) -> None:
        """``backend`` cannot run ``op`` in ``dtype`` here: a failure with its fix on a GPU that must have it,
        else a line of what was not checked."""
        line = install_line(op, backend, dtype, self.capability)
        if line is None:
            self.skip(f"{op} [{backend}, {dtype_name(dtype)}]", reason)
            return
        self.add(Result(op, backend, dtype_name(dtype), "", f"runs on this GPU (cc {self.capability})", False,
                        note=f"{reason}; fix: {line}"))

    def add(self, result: Result) -> None:
        self.results.append(result)
        status = "ok  " if result.ok else "FAIL"
        err = "" if result.error is None else f" err {result.error:.2e} (tol {result.tol:.0e})"
        print(f"  {status} {result.check} [{result.backend}, {result.dtype}, {result.shape}] {result.what}{err} "
              f"{result.note}", flush=True)

    def compare(self, check: str, backend: str, dtype: torch.dtype, shape: str, pairs: Sequence[tuple[str, torch.Tensor,
                torch.Tensor, float]], times: dict[str, tuple[float, float | None]] | None = None) -> None:
        for what, ours, ref, tol in pairs:
            err = rel_err(ours, ref)
            t = (times or {}).get(what, (None, None))
            self.add(Result(check, backend, dtype_name(dtype), shape, what, err <= tol, err, tol,
                            None if t[0] is None else t[0] * 1e6, None if t[1] is None else t[1] * 1e6))

    def skip(self, what: str, reason: str) -> None:
        self.not_checked.append(f"{what}: {reason}")
        print(f"  --   {what}: not checked ({reason})", flush=True)

    def time(self, fn: Callable[[], object]) -> float | None:
        if not self.timed:
            return None
        from mpo_core.gpu.timing import time_call

        return time_call(fn, self.device, warmup=self.warmup, repeat=self.repeat)

    def model(self, cost) -> float | None:
        from mpo_core.gpu.devices import roofline_seconds

        return None if self.model_gpu is None else roofline_seconds(cost, self.model_gpu)



def verdict_table(results: Sequence[Result]) -> str:
    """The verdict table: one row per :class:`Result`; "no model" where a time has no roofline beside it."""
    cols = ["check", "backend", "dtype", "shape", "what", "ok", "error", "tol", "measured_us", "model_us"]

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return "pass" if v else "FAIL"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    def row(r: Result) -> list[str]:
        cells = [cell(getattr(r, k)) for k in cols]
        if r.measured_us is not None and r.model_us is None:
            cells[-1] = "no model"  # a GPU (or a CPU) the roofline tables do not describe
        return cells

    rows = [row(r) for r in results]
    widths = [max([len(k)] + [len(row[i]) for row in rows]) for i, k in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
