"""Column sum of per-program partial sums: the second, race-free stage of a reduction.

Backward kernels that need a reduction over rows (dgamma/dbeta of LayerNorm, dbias
of bias+GELU) write one fp32 partial row per program into a ``(G, N)`` buffer; this
kernel sums it over ``G``. Grid: one program per ``BLOCK_N`` columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _column_sum_kernel(P, OUT, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & col_mask[None, :]
        acc += tl.load(P + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


def column_sum_blocks(g: int, n: int) -> tuple[int, int]:
    """``(BLOCK_G, BLOCK_N)`` of the column sum of a ``(g, n)`` buffer (default 4 warps)."""
    return min(triton.next_power_of_2(g), 32), min(triton.next_power_of_2(n), 128)


def column_sum(partial: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum a contiguous fp32 ``(G, N)`` buffer over its first dim into a new ``(N,)`` tensor."""
    g, n = partial.shape
    out = torch.empty(n, dtype=out_dtype, device=partial.device)
    block_g, block_n = column_sum_blocks(g, n)
    _column_sum_kernel[(triton.cdiv(n, block_n),)](partial, out, g, n, BLOCK_G=block_g, BLOCK_N=block_n)
    return out


PROGRAMS_PER_SM = 2
"""Programs (hence fp32 partial rows) per SM of a row-reducing backward kernel: enough to
fill the GPU, few enough that the ``(G, N)`` partials stay small next to the data."""


def num_partials(rows: int, device: torch.device) -> int:
    """How many partial rows (programs) a row-reducing backward kernel should use.

    :data:`PROGRAMS_PER_SM` per SM on a GPU; on the CPU interpreter, where programs run
    one after another, only a few.
    """
    if device.type == "cuda":
        return gpu_partials(rows, torch.cuda.get_device_properties(device).multi_processor_count)
    return max(1, min(rows, 4))


def gpu_partials(rows: int, sm_count: int) -> int:
    """Partial rows on a GPU with ``sm_count`` SMs: :data:`PROGRAMS_PER_SM` per SM, at most ``rows``, at least 1."""
    return max(1, min(rows, PROGRAMS_PER_SM * sm_count))
