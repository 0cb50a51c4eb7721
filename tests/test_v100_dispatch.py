"""Dispatch on a V100 (compute capability 7.0), mocked: no Triton matmul, norm/elementwise kernels allowed.

Triton's ``tl.dot`` compiles for sm_70 without tensor cores, so below 8.0 the MPO linear
layer must take cuBLAS through torch (the reference path for ``mpo_linear``, dense or
sequential for ``contract``), while LayerNorm, residual + dropout + LayerNorm and
bias + GELU may still run their Triton (or CUDA-extension) kernels. Every capability
decision goes through :func:`mpo_core.ops.dispatch.device_capability`: mocking that one
function moves all of them, and torch's own query is never called directly.
"""
from __future__ import annotations

import types

import pytest
import torch

from mpo_core.contract import fused as fused_mod
from mpo_core.ops import dispatch
from mpo_core.ops import mpo_linear as mpo_linear_mod
from mpo_core.ops.dispatch import BackendUnavailableError, resolve_backend

CAPABILITIES = [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (9, 0)]
CUDA0 = torch.device("cuda", 0)


def _cuda_like(dtype: torch.dtype = torch.bfloat16) -> types.SimpleNamespace:
    """What dispatch reads of a CUDA tensor (device, dtype, is_cuda), without a GPU."""
    return types.SimpleNamespace(device=CUDA0, dtype=dtype, is_cuda=True)


@pytest.fixture
def capability(monkeypatch):
    """Set the mocked compute capability; torch's own query must never be reached."""
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda.get_device_capability called around dispatch.device_capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", forbidden)
    monkeypatch.setattr(dispatch, "extension", lambda: None)

    def set_capability(cap: tuple[int, int]) -> None:
        monkeypatch.setattr(dispatch, "device_capability", lambda device: cap)

    return set_capability


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_matmul_kernels_only_from_ampere(capability, cap):
    capability(cap)
    ampere = cap >= (8, 0)
    assert dispatch.triton_supported(CUDA0, uses_dot=True) is ampere
    assert (resolve_backend("mpo_linear", _cuda_like(), None) == "triton") is ampere
    assert fused_mod.fused_available(CUDA0, torch.bfloat16) is ampere
    assert fused_mod.fused_available(CUDA0, torch.float64) is False  # the kernel takes fp32/fp16/bf16


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_norm_and_elementwise_kernels_from_volta(capability, cap):
    capability(cap)
    want = "triton" if cap >= (7, 0) else "torch"
    for op in ("layer_norm", "residual_layer_norm", "residual_dropout_layer_norm", "bias_gelu"):
        assert resolve_backend(op, _cuda_like(), None) == want


def test_v100_prefers_the_cuda_extension_for_norms(capability, monkeypatch):
    capability((7, 0))
    ext = types.SimpleNamespace(WITH_CUDA=True, **{name: None for names in dispatch._EXT_FUNCTIONS.values()
                                                   for name in names})
    monkeypatch.setattr(dispatch, "extension", lambda: ext)
    assert resolve_backend("residual_dropout_layer_norm", _cuda_like(), None) == "cuda"
    assert resolve_backend("bias_gelu", _cuda_like(), None) == "cuda"
    assert resolve_backend("mpo_linear", _cuda_like(), None) == "torch"  # the extension has no matmul either
    with pytest.raises(BackendUnavailableError, match="mpo_core._C has no mpo_linear"):
        resolve_backend("mpo_linear", _cuda_like(), "cuda")


def test_forced_triton_matmul_on_v100_says_why(capability):
    capability((7, 0))
    with pytest.raises(BackendUnavailableError, match=r"cannot run mpo_linear here: compute capability \(7, 0\) < \(8, 0\)"):
        resolve_backend("mpo_linear", _cuda_like(), "triton")


def test_v100_mpo_linear_default_is_the_torch_reference(capability, monkeypatch):
    """``backend=None`` on a 7.0 GPU: the kernel is never launched, the reference (cuBLAS) runs."""
    capability((7, 0))
    class Launched(Exception):
        pass

    def kernel(*args):
        raise Launched

    monkeypatch.setattr(mpo_linear_mod, "_kron_linear_op", kernel)
    # a CPU tensor that reports CUDA: the dispatch decision is all that is exercised
    x = torch.randn(3, 16)
    monkeypatch.setattr(mpo_linear_mod, "resolve_backend",
                        lambda op, t, backend: resolve_backend(op, _cuda_like(t.dtype), backend))
    cores = [torch.randn(1, 4, 4, 2), torch.randn(2, 4, 4, 1)]
    y = mpo_linear_mod.mpo_linear(x, cores, None, "gelu")
    torch.testing.assert_close(y, mpo_linear_mod.mpo_linear_reference(x, cores, None, "gelu"), rtol=0, atol=0)
    capability((8, 0))
    with pytest.raises(Launched):  # the same call on an Ampere GPU takes the kernel
        mpo_linear_mod.mpo_linear(x, cores, None, "gelu")


def test_setup_honours_torch_cuda_arch_list(monkeypatch):
    """``setup.py`` passes no ``-gencode``/``-arch`` of its own, so torch's CUDAExtension takes the
    architectures from ``TORCH_CUDA_ARCH_LIST``: ``7.0`` builds sm_70 (with a CUDA 12 toolkit)."""
    from pathlib import Path

    from torch.utils.cpp_extension import _get_cuda_arch_flags

    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert "gencode" not in text and "-arch" not in text and "CUDAExtension(" in text
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 8.0 9.0")
    flags = _get_cuda_arch_flags()
    assert "-gencode=arch=compute_70,code=sm_70" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
