"""The fused MPO linear (Triton) at every tile config the autotuner may pick, each forced, against the
float64 reference; below compute capability 8.0 the path ``mpo_linear`` takes there."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mpo_core.check.tolerances import DTYPES, tolerance
from mpo_core.check.verdict import Checker


def _mpo_cores(in_shape, out_shape, ranks, dtype, device, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ranks[q], i, j, ranks[q + 1], generator=g, dtype=torch.float64) / math.sqrt(ranks[q] * i))
            .to(device, dtype) for q, (i, j) in enumerate(zip(in_shape, out_shape))]


def check_mpo_linear(c: Checker, tokens: int, shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
                     max_bond: int) -> None:
    """Every tile config the autotuner may pick, forced: inference forward, dx, training forward."""
    from mpo_core.ops.dispatch import why_unavailable
    from mpo_core.ops.mpo_linear import mpo_linear, mpo_linear_reference
    from mpo_core.shapes import capped_ranks

    dev = torch.device(c.device)
    dtypes = DTYPES if c.device == "cuda" else (torch.float32, torch.float16)
    for in_shape, out_shape in shapes:
        ranks = capped_ranks(in_shape, out_shape, max_bond)
        shape = f"{tokens}x{math.prod(in_shape)}->{math.prod(out_shape)}"
        for dtype in dtypes:
            reason = why_unavailable("mpo_linear", "triton", dev, dtype)
            cores = _mpo_cores(in_shape, out_shape, ranks, dtype, c.device)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(tokens, math.prod(in_shape), generator=g).to(c.device, dtype)
            bias = torch.randn(math.prod(out_shape), generator=g).to(c.device, dtype)
            gy = torch.randn(tokens, math.prod(out_shape), generator=g).to(c.device, dtype)
            f64 = [t.double() for t in cores]
            ref_y = mpo_linear_reference(x.double(), f64, bias.double(), "gelu")
            xr = x.double().requires_grad_()
            (ref_dx,) = torch.autograd.grad(mpo_linear_reference(xr, f64, None, None), xr, gy.double())
            tol, tol_dx = tolerance("mpo_linear", "y", dtype), tolerance("mpo_linear", "dx", dtype)
            if reason is not None:
                c.unavailable("mpo_linear", "triton", dtype, reason)
                y = mpo_linear(x, cores, bias, "gelu")  # the path this device takes instead (torch reference)
                c.compare("mpo_linear (default path)", "torch", dtype, shape, [("y", y, ref_y, tol)])
                continue
            from mpo_core.kernels import mpo_matmul as kernel

            for store_pre in (False, True):
                for config in kernel.launch_configs(store_pre):
                    name = "M{BLOCK_M}N{BLOCK_N}K{BLOCK_K}G{GROUP_M}".format(**config.kwargs) + \
                        f"w{config.num_warps}s{config.num_stages}"
                    with kernel.forced_config(config):
                        if store_pre:  # the training forward: GELU with the pre-activation stored, then dx from it
                            xg = x.clone().requires_grad_()
                            y = mpo_linear(xg, cores, bias, "gelu", backend="triton")
                            (dx,) = torch.autograd.grad(y, xg, gy)
                            xr2 = x.double().requires_grad_()
                            ref_y2 = mpo_linear_reference(xr2, f64, bias.double(), "gelu")
                            (ref_dx2,) = torch.autograd.grad(ref_y2, xr2, gy.double())
                            pairs = [("y (training fwd)", y, ref_y2, tol), ("dx (from stored pre)", dx, ref_dx2,
                                                                             tol_dx)]
                            c.compare(f"mpo_linear {name}", "triton", dtype, shape, pairs)
                            continue
                        with torch.no_grad():
                            y = mpo_linear(x, cores, bias, "gelu", backend="triton")
                            t_fwd = c.time(lambda: mpo_linear(x, cores, bias, "gelu", backend="triton"))
                        xg = x.clone().requires_grad_()
                        (dx,) = torch.autograd.grad(mpo_linear(xg, cores, None, None, backend="triton"), xg, gy)
                    model = None
                    if c.timed:
                        from mpo_core.gpu.linear import linear_cost

                        b = torch.tensor([], dtype=dtype).element_size()
                        model = c.model(linear_cost("fused", tokens, in_shape, out_shape, ranks, b, training=False)["fwd"])
                    c.compare(f"mpo_linear {name}", "triton", dtype, shape,
                              [("y (inference)", y, ref_y, tol), ("dx", dx, ref_dx, tol_dx)],
                              {"y (inference)": (t_fwd, model)})
