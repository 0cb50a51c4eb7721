"""The one backend choice for every fused op: device, dtype and what this installation has.

Order for ``backend=None``: on CUDA tensors the CUDA extension (where it has the op), then
Triton, then the torch reference; on CPU tensors the C++ extension where it has the op and
the dtype is one of ``CPU_CPP_DTYPES``, else the torch reference. A forced backend that cannot run raises
:class:`BackendUnavailableError` saying why. "Can Triton run here?" is answered only by
:func:`triton_supported` (also for the contraction planner's ``fused`` strategy), and every
look at the GPU's compute capability goes through :func:`device_capability`, so tests can mock it.
"""
from __future__ import annotations

import os

import torch

from mpo_core._backends import extension, triton_importable

BACKENDS = ("torch", "triton", "cuda", "cpp")

CPU_CPP_DTYPES = (torch.bfloat16, torch.float16)
"""Dtypes for which the C++ extension is the CPU default where it has the op (LayerNorm,
residual + LayerNorm without dropout): bf16 measured faster than torch eager
(``benchmarks/cpp_residual_layernorm.py``, 1 thread: fwd 1.55x, bwd 2.63x). float32/float64
use torch: called as MPOBERT calls them (autograd, 64-8192 rows of 128/768/1024),
``benchmarks/op_overhead.py`` measured torch eager 1.1-2.9x faster forward+backward at every
size up to 2048 rows (residual + LayerNorm 64 x 768: 130 us vs 257 us; 1 thread, CPU clock)."""

TRITON_MIN_CAPABILITY = (7, 0)
"""Triton elementwise / norm kernels run from Volta on."""

TRITON_DOT_MIN_CAPABILITY = (8, 0)
"""Triton ``tl.dot`` (matmul) kernels need tensor cores as Triton uses them: Ampere on."""

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPP_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# extension functions each op needs, for "cuda" (on CUDA tensors) and "cpp" (on CPU tensors); () = none
_EXT_FUNCTIONS = {
    "layer_norm": ("residual_layernorm_forward", "residual_layernorm_backward"),
    "residual_layer_norm": ("residual_layernorm_forward", "residual_layernorm_backward"),
    "residual_dropout_layer_norm": ("residual_dropout_layernorm_forward", "residual_dropout_layernorm_backward"),
    "bias_gelu": ("bias_gelu_forward", "bias_gelu_backward"),
    "mpo_linear": (),
}
OPS = tuple(_EXT_FUNCTIONS)
"""Every op :func:`resolve_backend` knows."""
_CPP_OPS = ("layer_norm", "residual_layer_norm")
_DOT_OPS = ("mpo_linear",)  # Triton kernels built on tl.dot


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot run this op on these inputs here."""


def device_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability ``(major, minor)`` of a CUDA device (the one place that asks)."""
    return torch.cuda.get_device_capability(device)


def triton_supported(device: torch.device, uses_dot: bool = False) -> bool:
    """Whether Triton kernels can run on ``device``.

    CUDA devices need compute capability 7.0 (8.0 when the kernel uses ``tl.dot``); CPU
    tensors need the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels
    are imported).
    """
    if not triton_importable():
        return False
    if device.type == "cuda":
        need = TRITON_DOT_MIN_CAPABILITY if uses_dot else TRITON_MIN_CAPABILITY
        return device_capability(device) >= need
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _kernel_interpreted(op: str) -> bool:
    """Whether ``op``'s Triton kernel was built for the CPU interpreter (the MPO kernel decides at import)."""
    if op != "mpo_linear":
        return True  # the other kernels are imported at their first call
    from mpo_core.kernels import mpo_matmul

    return mpo_matmul.INTERPRETED


def why_unavailable(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` when ``backend`` can run ``op`` on tensors of ``dtype`` on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if dtype not in _TRITON_DTYPES:
            return f"the Triton kernels take float32/float16/bfloat16, got {dtype}"
        uses_dot = op in _DOT_OPS
        if triton_supported(device, uses_dot):
            if device.type == "cpu" and not _kernel_interpreted(op):
                return ("the kernel was not built for Triton's interpreter: set TRITON_INTERPRET=1 before "
                        "mpo_core kernels are first imported")
            return None
        if not triton_importable():
            return "Triton is not installed"
        if device.type == "cuda":
            need = TRITON_DOT_MIN_CAPABILITY if uses_dot else TRITON_MIN_CAPABILITY
            return f"compute capability {device_capability(device)} < {need}"
        if device.type != "cpu":
            return f"Triton does not run on {device.type} tensors here"
        return f"Triton on {device.type} tensors needs TRITON_INTERPRET=1 set before mpo_core kernels are imported"
    ext = extension()
    if ext is None:
        return "the extension mpo_core._C was not built"
    if not _EXT_FUNCTIONS[op]:
        return f"mpo_core._C has no {op}"
    missing = [name for name in _EXT_FUNCTIONS[op] if not hasattr(ext, name)]
    if missing:
        return f"mpo_core._C has no {', '.join(missing)}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels need CUDA tensors, got {device.type}"
        if not getattr(ext, "WITH_CUDA", False):
            return "mpo_core._C was built without CUDA"
        if dtype not in _TRITON_DTYPES:
            return f"the CUDA kernels take float32/float16/bfloat16, got {dtype}"
        return None
    if op not in _CPP_OPS:
        return f"the C++ CPU extension has no {op} (it has residual + LayerNorm without dropout)"
    if device.type != "cpu":
        return f"backend 'cpp' runs on CPU tensors, got {device.type} (use backend='cuda')"
    if dtype not in _CPP_DTYPES:
        return f"the C++ LayerNorm takes float32/float64/bfloat16/float16, got {dtype}"
    return None


def default_backend(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """What ``backend=None`` picks for ``op`` on tensors of ``dtype`` on ``device`` (see the module docstring)."""
    if op not in _EXT_FUNCTIONS:
        raise ValueError(f"op must be one of {sorted(_EXT_FUNCTIONS)}, got {op!r}")
    if device.type == "cuda":
        candidates = ("cuda", "triton", "torch")
    else:
        candidates = ("cpp", "torch") if dtype in CPU_CPP_DTYPES else ("torch",)
    return next(b for b in candidates if why_unavailable(op, b, device, dtype) is None)


def resolve_backend(op: str, x: torch.Tensor, backend: str | None) -> str:
    """The backend that runs ``op`` on input ``x``.

    Parameters
    ----------
    op : str
        One of :data:`OPS`: ``"layer_norm"``, ``"residual_layer_norm"``,
        ``"residual_dropout_layer_norm"``, ``"bias_gelu"`` or ``"mpo_linear"``.
    x : torch.Tensor
        The op's main input (its device and dtype decide).
    backend : str or None
        ``None`` picks (:func:`default_backend`); one of :data:`BACKENDS` forces it.

    Returns
    -------
    str
        One of :data:`BACKENDS`.

    Raises
    ------
    ValueError
        ``backend`` is not ``None`` or one of :data:`BACKENDS`.
    BackendUnavailableError
        The forced backend cannot run here; the message says why.
    """
    if backend is None:
        return default_backend(op, x.device, x.dtype)
    if op not in _EXT_FUNCTIONS:
        raise ValueError(f"op must be one of {sorted(_EXT_FUNCTIONS)}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    reason = why_unavailable(op, backend, x.device, x.dtype)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op} here: {reason}")
    return backend
