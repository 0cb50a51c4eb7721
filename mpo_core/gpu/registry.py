"""Every Triton kernel that :mod:`mpo_core.ops` launches, with the arguments and block configs it uses.

One :class:`KernelSpec` is one compilation: a ``@triton.jit`` function, its runtime
arguments (pointer dtypes, example scalar values from which Triton's own specialization
rule derives the signature), its ``tl.constexpr`` values and ``num_warps`` /
``num_stages``. Nothing here is copied from the launchers: the block sizes and warps come
from the same helpers the launch helpers call (:func:`~mpo_core.kernels.layer_norm.block_and_warps`,
:func:`~mpo_core.kernels.bias_gelu.blocks`, :func:`~mpo_core.kernels.reduce.column_sum_blocks`,
:func:`~mpo_core.kernels.mpo_matmul.launch_constexprs`), and the matmul's tile configs are
read from its autotuner (every config it may pick, pruned exactly as at launch).

Shapes are those of MPOBERT / BERT training and inference (:mod:`mpo_core.gpu.shapes`):
``BERT_TOKENS`` rows (batch 32 x 512), hidden sizes ``HIDDEN`` for the normalizations,
feed-forward sizes ``FFN`` for bias + GELU, and every BERT-base/large weight matrix
(``LINEAR_SHAPES``, ``n = 5`` MPOBERT factorizations, full rank) for the fused MPO matmul, with the end core that
:func:`~mpo_core.cost.choose_split` picks. Every op is registered in each of
its launch variants that changes the generated code (dropout or not, erf or tanh GELU,
forward / training forward / ``dx``), in bf16 by default (the training dtype).

Importing this module imports the kernel modules: import it after ``TRITON_INTERPRET`` is
set or cleared as wanted (:mod:`mpo_core.gpu.aot` compiles in worker processes without it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mpo_core.cost import choose_split
from mpo_core.gpu.devices import H100
from mpo_core.gpu.shapes import BERT_TOKENS, FFN, HIDDEN, LINEAR_SHAPES, MPO_MODES
from mpo_core.shapes import full_ranks

SEED = 1234567
"""An example dropout seed (not divisible by 16, as 15 in 16 seeds are)."""

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Ptr:
    """A pointer argument to ``dtype`` elements (16-byte aligned, as torch allocates)."""

    dtype: str


@dataclass(frozen=True)
class KernelSpec:
    """One compilation of one Triton kernel, as ``ops`` launches it.

    Attributes
    ----------
    name : str
        Unique, readable: ``family[variant]`` (e.g. ``"layer_norm_bwd[N=1024,dropout,bf16]"``).
    family : str
        The launch helper's op (``"layer_norm_fwd"``, ``"mpo_matmul"`` ...).
    module, function : str
        Where the ``@triton.jit`` function lives (``getattr(import_module(module), function)``).
    args : dict
        Every non-constexpr argument by name: :class:`Ptr` for pointers, ``None`` for an
        absent optional pointer, else an example scalar (int or float) from the launch.
    constexprs : dict
        Every ``tl.constexpr`` argument by name.
    num_warps, num_stages : int
        Launch options (``num_stages`` matters for the pipelined matmul only).
    uses_dot : bool
        The kernel calls ``tl.dot``: its PTX must use tensor cores (``mma``) on sm_80.
    hopper : bool
        A config meant for Hopper: its sm_90 PTX must use ``wgmma``.
    problem : tuple of int
        The launch's problem size: ``(rows, row length)``, or ``(M, K, N)`` for the matmul.
    """

    name: str
    family: str
    module: str
    function: str
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    uses_dot: bool = False
    hopper: bool = False
    problem: tuple[int, ...] = ()

    def kernel(self):
        """The ``@triton.jit`` function (a ``JITFunction`` unless ``TRITON_INTERPRET=1`` was set at import)."""
        import importlib

        return getattr(importlib.import_module(self.module), self.function)


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _TRITON_DTYPE:
        raise TypeError(f"dtype must be one of {sorted(map(str, _TRITON_DTYPE))}, got {dtype}")
    return _TRITON_DTYPE[dtype]


def _norm_specs(dtype: torch.dtype) -> list[KernelSpec]:
    from mpo_core.kernels import layer_norm as ln
    from mpo_core.kernels import reduce as red

    t, f = Ptr(_dtype_name(dtype)), Ptr("fp32")
    size = torch.empty((), dtype=dtype).element_size()
    specs: dict[tuple, KernelSpec] = {}
    g = red.gpu_partials(BERT_TOKENS, H100.sm_count)
    for n in HIDDEN:
        block, warps = ln.block_and_warps(n, size)
        affine = {"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_N": block}
        tag = f"BLOCK_N={block},{t.dtype}"
        specs["lnf", block] = KernelSpec(
            f"layer_norm_fwd[{tag}]", "layer_norm_fwd", ln.__name__, "_layer_norm_fwd_kernel",
            dict(X=t, Y=t, W=t, B=t, Mean=f, Rstd=f, N=n, eps=1e-12), affine, warps, problem=(BERT_TOKENS, n))
        for dropout in (False, True):
            drop = ",dropout" if dropout else ""
            specs["rlnf", block, dropout] = KernelSpec(
                f"residual_layer_norm_fwd[{tag}{drop}]", "residual_layer_norm_fwd",
                "mpo_core.kernels.residual_layer_norm", "_residual_layer_norm_fwd_kernel",
                dict(X=t, R=t, Y=t, H=t, W=t, B=t, Mean=f, Rstd=f, N=n, eps=1e-12, p=0.1 if dropout else 0.0,
                     scale=ln.dropout_scale(0.1 if dropout else 0.0), seed=SEED, offset=0),
                {**affine, "HAS_DROPOUT": dropout}, warps, problem=(BERT_TOKENS, n))
            bwd_block, bwd_warps = ln.block_and_warps(n, size, backward=True)
            specs["lnb", bwd_block, dropout] = KernelSpec(
                f"layer_norm_bwd[BLOCK_N={bwd_block},{t.dtype}{drop}]", "layer_norm_bwd", ln.__name__,
                "_layer_norm_bwd_kernel",
                dict(DY=t, H=t, W=t, Mean=f, Rstd=f, DH=t, DR=t if dropout else None, DW=f, DB=f, M=BERT_TOKENS, N=n,
                     rows_per_program=math.ceil(BERT_TOKENS / g), p=0.1 if dropout else 0.0,
                     scale=ln.dropout_scale(0.1 if dropout else 0.0), seed=SEED, offset=0),
                {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_DROPOUT": dropout, "BLOCK_N": bwd_block}, bwd_warps,
                problem=(BERT_TOKENS, n))
        block_g, block_n = red.column_sum_blocks(g, n)
        specs["colsum", block_g, block_n] = KernelSpec(
            f"column_sum[BLOCK_G={block_g},BLOCK_N={block_n},{t.dtype}]", "column_sum", red.__name__,
            "_column_sum_kernel", dict(P=f, OUT=t, G=g, N=n), {"BLOCK_G": block_g, "BLOCK_N": block_n}, 4,
            problem=(g, n))
    return list(specs.values())


def _gelu_specs(dtype: torch.dtype) -> list[KernelSpec]:
    from mpo_core.kernels import bias_gelu as bg
    from mpo_core.kernels import reduce as red

    t, f = Ptr(_dtype_name(dtype)), Ptr("fp32")
    specs: dict[tuple, KernelSpec] = {}
    for n in FFN:
        block_m, block_n = bg.blocks(n)
        for tanh in (False, True):
            const = {"HAS_BIAS": True, "APPROX_TANH": tanh, "BLOCK_M": block_m, "BLOCK_N": block_n}
            tag = f"{block_m}x{block_n},{'tanh' if tanh else 'erf'},{t.dtype}"
            specs["f", block_m, block_n, tanh] = KernelSpec(
                f"bias_gelu_fwd[{tag}]", "bias_gelu_fwd", bg.__name__, "_bias_gelu_fwd_kernel",
                dict(X=t, B=t, Y=t, M=BERT_TOKENS, N=n), const, bg.WARPS, problem=(BERT_TOKENS, n))
            g = red.gpu_partials(math.ceil(BERT_TOKENS / block_m), H100.sm_count)
            specs["b", block_m, block_n, tanh] = KernelSpec(
                f"bias_gelu_bwd[{tag}]", "bias_gelu_bwd", bg.__name__, "_bias_gelu_bwd_kernel",
                dict(DY=t, X=t, B=t, DX=t, DB=f, M=BERT_TOKENS, N=n,
                     rows_per_program=bg.bwd_rows_per_program(BERT_TOKENS, g, block_m)), const, bg.WARPS,
                problem=(BERT_TOKENS, n))
    return list(specs.values())


def hopper_config(config) -> bool:
    """Whether a matmul tile config is meant for Hopper's ``wgmma``.

    ``wgmma`` is issued by a warp group (4 warps) on an ``M >= 64`` tile: Triton picks it
    when ``num_warps`` is a multiple of 4 and ``BLOCK_M >= 64`` (and the operands suit).
    """
    return config.num_warps % 4 == 0 and config.kwargs["BLOCK_M"] >= 64


def _matmul_specs(dtype: torch.dtype) -> list[KernelSpec]:
    from mpo_core.kernels import mpo_matmul as mm

    t = Ptr(_dtype_name(dtype))
    specs: dict[tuple, KernelSpec] = {}
    for k_dim, n_dim in LINEAR_SHAPES:
        in_shape, out_shape = MPO_MODES[k_dim], MPO_MODES[n_dim]
        ranks = full_ranks(in_shape, out_shape)
        small_left = choose_split(in_shape, out_shape, ranks)
        end = 0 if small_left else len(in_shape) - 1
        d = ranks[1] if small_left else ranks[-2]
        i_s, j_s = in_shape[end], out_shape[end]
        # forward (inference), forward storing the pre-activation (training), and dx on the transposed factors
        launches = (("fwd", i_s, j_s, k_dim, n_dim, True, "gelu", False),
                    ("fwd", i_s, j_s, k_dim, n_dim, True, "none", False),
                    ("fwd_train", i_s, j_s, k_dim, n_dim, True, "gelu", True),
                    ("dx", j_s, i_s, n_dim, k_dim, False, "none", False))
        for kind, i, j, kk, nn, has_bias, act, store_pre in launches:
            padded = mm.padded_small_shape(d, i, j)
            flags = mm.launch_constexprs(dtype, has_bias, act, store_pre, small_left, padded)
            args = dict(x_ptr=t, big_ptr=t, small_ptr=t, bias_ptr=t, y_ptr=t, pre_ptr=t, M=BERT_TOKENS, N=nn, K=kk,
                        IB=kk // i, JB=nn // j, IS=i, JS=j, D=d, stride_xm=kk, stride_xk=1)
            for config in mm.launch_configs(store_pre):
                divisible = tuple(v % 16 == 0 for v in args.values() if isinstance(v, int))  # Triton specializes on it
                key = (tuple(sorted(flags.items())), divisible, tuple(sorted(config.kwargs.items())),
                       config.num_warps, config.num_stages)
                if key in specs:
                    continue
                tile = "x".join(str(config.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                specs[key] = KernelSpec(
                    f"mpo_matmul[{kind},{act},{'left' if small_left else 'right'} {i}x{j} D{padded[0]},{tile},"
                    f"w{config.num_warps}s{config.num_stages},{t.dtype}]",
                    "mpo_matmul", mm.__name__, "_mpo_matmul_kernel", args, {**flags, **config.kwargs},
                    config.num_warps, config.num_stages, uses_dot=True, hopper=hopper_config(config),
                    problem=(BERT_TOKENS, kk, nn))
    return list(specs.values())


def kernel_specs(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> list[KernelSpec]:
    """Every registered kernel compilation, for each of ``dtypes``.

    Parameters
    ----------
    dtypes : tuple of torch.dtype
        Element types of the activations (fp32/fp16/bf16); statistics and partial sums
        are always fp32.

    Returns
    -------
    list of KernelSpec
        Unique names; order: normalizations, bias + GELU, matmul.

    Raises
    ------
    TypeError
        ``dtypes`` holds something other than fp32/fp16/bf16.
    """
    if isinstance(dtypes, torch.dtype) or not isinstance(dtypes, (tuple, list)) or not dtypes:
        raise TypeError(f"dtypes must be a non-empty tuple of torch dtypes, got {dtypes!r}")
    for dt in dtypes:
        _dtype_name(dt)
    specs = [s for dt in dtypes for s in (*_norm_specs(dt), *_gelu_specs(dt), *_matmul_specs(dt))]
    names = [s.name for s in specs]
    assert len(set(names)) == len(names), "registry names must be unique"
    return specs
