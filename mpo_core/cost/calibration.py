"""Calibrate the runtime cost model on this machine: per-op overhead, GEMM FLOP/s, bandwidth.

The built-in :data:`~mpo_core.cost.devices.DEFAULT_MODELS` are round numbers. A calibration
measures, once, on the machine that runs the model:

* ``overhead``: the time per operation of a core-by-core contraction of one token through
  tiny cores (what each planned operation pays before any arithmetic, planner checks included);
* ``matmul_flops``: the best GEMM rate over BERT-sized products, per dtype;
* ``bandwidth``: the rate at which a matrix-vector product streams a BERT-sized weight
  (the regime where the cached dense ``W`` competes with the cores at few tokens);
* ``vector_flops``: an elementwise multiply-add over a few million entries.

On CPU the timer is this process's CPU time (``time.process_time``), so a loaded, shared
machine still gives this machine's rates (per CPU-second of this process's threads).

It is cached as JSON (``$MPO_CORE_CACHE`` or ``~/.cache/mpo_core``, one file per device type
and thread count) and installed with :func:`use_calibration`. Re-measure with::

    python -m mpo_core.cost.calibration            # measure (a few seconds), cache, print
    python -m mpo_core.cost.calibration --show     # print the cached one
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from mpo_core.cost.devices import set_device_model
from mpo_core.cost.model import DeviceModel
from mpo_core.io import atomic_write

__all__ = ["cache_path", "measure_device_model", "load_calibration", "use_calibration"]

_GEMMS = ((256, 768, 768), (1024, 768, 3072), (2048, 1024, 4096))
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def cache_path(device_type: str = "cpu") -> Path:
    """Where the calibration of ``device_type`` is cached (per thread count on CPU)."""
    root = Path(os.environ.get("MPO_CORE_CACHE", Path.home() / ".cache" / "mpo_core"))
    suffix = f"_{torch.get_num_threads()}threads" if device_type == "cpu" else ""
    return root / f"device_model_{device_type}{suffix}.json"


def _seconds(fn: Callable[[], object], sync: Callable[[], None], clock: Callable[[], float],
             min_time: float = 0.05, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time per call over at least ``min_time`` seconds of ``clock``."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        calls, t0 = 0, clock()
        while True:
            fn()
            calls += 1
            sync()
            elapsed = clock() - t0
            if elapsed >= min_time:
                break
        out.append(elapsed / calls)
    return statistics.median(out)


def _step_overhead(timed: Callable[[Callable[[], object]], float], device: torch.device) -> float:
    """Seconds per planned operation when there is no arithmetic to speak of: a core-by-core
    contraction of one token through five rank-2 cores (the planner's checks, reshapes and
    products included), divided by its number of operations."""
    from mpo_core.contract import contract, explain

    cores = [torch.randn(1 if k == 0 else 2, 2, 2, 1 if k == 4 else 2, device=device) for k in range(5)]
    x = torch.randn(1, 32, device=device)
    steps = max(1, len(explain(x, cores, strategy="sequential").chosen.steps))
    return timed(lambda: contract(x, cores, strategy="sequential")) / steps


def measure_device_model(device: torch.device | str = "cpu") -> DeviceModel:
    """Measure the rates of ``device`` (see the module docstring) and return them as a :class:`DeviceModel`."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    # CPU: this process's CPU time, so other processes on a shared machine do not count
    clock = time.perf_counter if cuda else time.process_time
    timed = lambda fn: _seconds(fn, sync, clock)  # noqa: E731
    with torch.no_grad():
        overhead = _step_overhead(timed, device)
        rates = {}
        for dtype in _DTYPES:
            best = 0.0
            for m, k, n in _GEMMS:
                x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
                best = max(best, 2 * m * k * n / timed(lambda: x @ w))
            rates[str(dtype).removeprefix("torch.")] = best
        w = torch.randn(768, 3072, device=device)
        v = torch.randn(1, 768, device=device)
        stream = timed(lambda: v @ w)
        bandwidth = w.numel() * w.element_size() / max(stream - overhead, stream / 10)
        big = torch.randn(4 * 2**20, device=device)
        vector = 2 * big.numel() / timed(lambda: big * 1.5 + big)
    return DeviceModel(f"{device.type} (calibrated, {torch.get_num_threads()} threads)", rates, vector, bandwidth, overhead)


def load_calibration(device_type: str = "cpu") -> DeviceModel | None:
    """The cached calibration of ``device_type``, or ``None`` (absent, or written by another format)."""
    path = cache_path(device_type)
    try:
        data = json.loads(path.read_text())
        return DeviceModel(data["name"], data["matmul_flops"], data["vector_flops"], data["bandwidth"], data["overhead"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def use_calibration(device: torch.device | str = "cpu", remeasure: bool = False) -> DeviceModel:
    """Install the calibration of ``device``'s type for planning (measured and cached when missing).

    Cached contraction plans are dropped, so the next contraction plans with the measured rates.
    """
    from mpo_core.contract import clear_plan_cache

    device = torch.device(device)
    model = None if remeasure else load_calibration(device.type)
    if model is None:
        model = measure_device_model(device)
        path = cache_path(device.type)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(str(path), json.dumps({"name": model.name, "matmul_flops": dict(model.matmul_flops),
                                            "vector_flops": model.vector_flops, "bandwidth": model.bandwidth,
                                            "overhead": model.overhead}, indent=2).encode())
    set_device_model(device.type, model)
    clear_plan_cache()
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Measure (or show) this machine's cost-model calibration.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--show", action="store_true", help="print the cached calibration without measuring")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model = load_calibration(device.type) if args.show else use_calibration(device, remeasure=True)
    if model is None:
        raise SystemExit(f"no calibration cached at {cache_path(device.type)}")
    print(f"{model.name}: overhead {model.overhead * 1e6:.1f} us/op, bandwidth {model.bandwidth / 1e9:.1f} GB/s, "
          f"vector {model.vector_flops / 1e9:.1f} GFLOP/s, matmul "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in model.matmul_flops.items())
          + f"  ({cache_path(device.type)})")


if __name__ == "__main__":
    main()
