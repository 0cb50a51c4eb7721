"""Peak memory of a benchmark step: ``max_memory_allocated`` on a GPU, the allocated C heap (glibc
``mallinfo2``, sampled) or the resident set on a CPU."""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from typing import Callable

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_probe() -> Callable[[], int] | None:
    """Bytes the C heap has handed out now (glibc ``mallinfo2``: small blocks + mmapped ones), or ``None``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def probe() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return probe


class PeakHeap:
    """Peak growth of the allocated C heap (torch's CPU tensors live there) over a ``with`` block,
    sampled every ``interval`` seconds; resident-set size where ``mallinfo2`` is missing."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self.probe = _heap_probe() or self.rss

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.probe())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakHeap":
        self.base = self.peak = self.probe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.probe())

    @property
    def growth(self) -> int:
        return self.peak - self.base


@contextlib.contextmanager
def peak_memory(device: torch.device, sink: list[int]):
    """Appends to ``sink`` the peak memory growth over the ``with`` block (CUDA: ``max_memory_allocated``
    over the allocated bytes before it; CPU: :class:`PeakHeap`); entered around each timed step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        sink.append(torch.cuda.max_memory_allocated(device) - base)
    elif not os.path.exists("/proc/self/statm"):
        yield
        sink.append(0)
    else:
        with PeakHeap() as mem:
            yield
        sink.append(mem.growth)
