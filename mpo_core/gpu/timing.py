"""The one timer of the benchmarks and the acceptance check, and what they report about the device.

On a GPU each call is bracketed by CUDA events after warm-up calls; elsewhere it is
``time.perf_counter``. Contenders are interleaved call by call, so that load from other
processes falls on all of them alike, each with the same warm-up and repeat count.
"""
from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time
from typing import Any, Callable, ContextManager, Mapping

import torch


def device_description(device: torch.device | str) -> str:
    """A short human-readable name for ``device`` (GPU model or CPU architecture and threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def device_info(device: torch.device | str) -> dict[str, Any]:
    """What a benchmark reports about where it ran: name, and on a GPU the compute capability,
    SM count, memory, and the clocks where the driver reports them (``torch.cuda.clock_rate``:
    the current SM clock in MHz, through pynvml when it is installed)."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": device_description(device), "type": device.type}
    if device.type != "cuda":
        info["threads"] = torch.get_num_threads()
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                memory_GiB=round(props.total_memory / 2**30, 1))
    try:
        info["sm_clock_MHz"] = torch.cuda.clock_rate(device)
    except Exception as exc:  # pynvml missing or the driver does not say: report why, measure anyway
        info["sm_clock_MHz"] = f"not readable ({type(exc).__name__})"
    return info


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""CPU clocks: ``wall`` (``perf_counter``) or ``cpu`` (``process_time``: this process's CPU time, for a
loaded shared machine with one thread). On a GPU the clock is always CUDA events."""


def time_calls(fns: Mapping[str, Callable[[], Any]], device: torch.device | str, *, warmup: int = 3,
               repeat: int = 15, clock: str = "wall",
               around: Callable[[str], ContextManager[Any]] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of every function in ``fns``, ``repeat`` rounds interleaved call by call
    after ``warmup`` rounds.

    On a CUDA device each call is bracketed by CUDA events on the current stream (the
    device's time, launch overhead included), and the stream is synchronized before reading
    them; on a CPU it is the ``clock`` of :data:`CLOCKS` around the call. ``around(name)``, when
    given, is a context manager entered around each timed call of ``name``, outside the timed
    span (e.g. a peak-memory probe).
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(f"warmup must be >= 0 and repeat >= 1, got {warmup} and {repeat}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    cuda = torch.device(device).type == "cuda"
    if cuda and clock != "wall":
        raise ValueError(f"clock {clock!r} is for CPU runs: on a GPU calls are timed with CUDA events")
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            with contextlib.nullcontext() if around is None else around(name):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize(device)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) * 1e-3)
                else:
                    t0 = now()
                    fn()
                    times[name].append(now() - t0)
    return times


def time_call(fn: Callable[[], Any], device: torch.device | str, *, warmup: int = 3, repeat: int = 15,
              clock: str = "wall") -> float:
    """Median seconds per call of ``fn`` (:func:`time_calls` with one contender)."""
    return statistics.median(time_calls({"fn": fn}, device, warmup=warmup, repeat=repeat, clock=clock)["fn"])


def median_seconds(fns: Mapping[str, Callable[[], Any]], device: torch.device | str, **kwargs: Any) -> dict[str, float]:
    """The median of :func:`time_calls` per contender (same arguments)."""
    return {name: statistics.median(ts) for name, ts in time_calls(fns, device, **kwargs).items()}


def median_for(fns: Mapping[str, Callable[[], Any]], device: torch.device | str, min_time: float, *,
               min_reps: int = 3, max_reps: int = 50, clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each contender, interleaved, the repeat count sized to the calls.

    One timed round warms up (plans, caches, allocator) and sizes the rest: enough rounds for
    ``min_time`` seconds per contender, within ``[min_reps, max_reps]``.
    """
    if min_time < 0 or min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need min_time >= 0 and 1 <= min_reps <= max_reps, got {min_time}, {min_reps}, {max_reps}")
    first = time_calls(fns, device, warmup=0, repeat=1, clock=clock)
    round_s = sum(ts[0] for ts in first.values())
    reps = max(min_reps, min(max_reps, math.ceil(min_time * len(fns) / max(round_s, 1e-9))))
    return median_seconds(fns, device, warmup=0, repeat=reps, clock=clock)
