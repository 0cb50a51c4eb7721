"""Dispatch of the fused ops (forced / default backends, errors, mocked capability),
``torch.library.opcheck`` on every op, the extension glue (through a torch stand-in
for ``mpo_core._C``, and the real one where it is built), and ``torch.compile``."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import mpo_core
from mpo_core import ops
from mpo_core._backends import extension
from mpo_core.ops import dispatch, gelu, norm, reference
from mpo_core.ops.dispatch import BackendUnavailableError, resolve_backend


def _fake_extension(with_cuda: bool = False) -> types.SimpleNamespace:
    """A torch stand-in with the interface of ``mpo_core._C`` (residual + LayerNorm part)."""

    def forward(x, residual, weight, bias, eps):
        h = x if residual is None else x + residual
        y, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), weight, bias, eps)
        return y, h.clone(), mean.view(-1), rstd.view(-1)

    def backward(dy, h, weight, mean, rstd):
        dh, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, h, (h.shape[-1],), mean.view(-1, 1), rstd.view(-1, 1), weight, weight,
            [True, weight is not None, weight is not None])
        return dh, dw, db

    return types.SimpleNamespace(WITH_CUDA=with_cuda, residual_layernorm_forward=forward,
                                 residual_layernorm_backward=backward)


@pytest.fixture
def fake_ext(monkeypatch):
    ext = _fake_extension()
    for module in (dispatch, norm, gelu):
        monkeypatch.setattr(module, "extension", lambda: ext)
    return ext


def _cuda_like(dtype=torch.float16):
    """What dispatch reads of a CUDA tensor (device and dtype), without a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


# ----------------------------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("op", ["layer_norm", "residual_layer_norm", "residual_dropout_layer_norm", "bias_gelu"])
def test_cpu_default_is_cpp_where_it_has_the_op_and_triton_is_only_forced(op, monkeypatch):
    x = torch.randn(2, 4)
    has_cpp = op in ("layer_norm", "residual_layer_norm") and mpo_core.backends()["cpp"]
    assert resolve_backend(op, x, None) == "torch"  # float32: torch measured faster (op_overhead.py)
    assert resolve_backend(op, x.bfloat16(), None) == ("cpp" if has_cpp else "torch")
    monkeypatch.setattr(dispatch, "extension", lambda: None)  # no extension: torch
    assert resolve_backend(op, x, None) == "torch"
    monkeypatch.undo()
    assert resolve_backend(op, x, "torch") == "torch"
    assert resolve_backend(op, x, "triton") == "triton"  # conftest set TRITON_INTERPRET=1


def test_unknown_backend_and_op_are_value_errors():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        resolve_backend("layer_norm", x, "tpu")
    with pytest.raises(ValueError, match="op must be one of"):
        resolve_backend("softmax", x, None)
    with pytest.raises(ValueError, match="backend must be"):
        ops.layer_norm(x, backend="gpu")


def test_triton_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.layer_norm(torch.randn(2, 4), backend="triton")


def test_triton_rejects_float64():
    with pytest.raises(BackendUnavailableError, match="float32/float16/bfloat16"):
        ops.bias_gelu(torch.randn(2, 4, dtype=torch.float64), backend="triton")


def test_extension_backends_unavailable_without_extension(monkeypatch):
    for module in (dispatch, norm, gelu):
        monkeypatch.setattr(module, "extension", lambda: None)
    x = torch.randn(2, 4)
    for backend in ("cpp", "cuda"):
        with pytest.raises(BackendUnavailableError, match="was not built"):
            ops.residual_layer_norm(x, x, backend=backend)


def test_cpp_backend_limits(fake_ext):
    x = torch.randn(2, 4)
    assert resolve_backend("residual_layer_norm", x, "cpp") == "cpp"
    assert resolve_backend("layer_norm", x.double(), "cpp") == "cpp"
    assert resolve_backend("layer_norm", x.bfloat16(), None) == "cpp"  # the bf16 CPU default where the extension has the op
    assert resolve_backend("layer_norm", x, None) == "torch"  # float32: torch
    assert resolve_backend("layer_norm", x.half(), "cpp") == "cpp"
    assert resolve_backend("residual_dropout_layer_norm", x, None) == "torch"
    with pytest.raises(BackendUnavailableError, match="float32/float64/bfloat16/float16"):
        resolve_backend("layer_norm", x.to(torch.complex64), "cpp")
    with pytest.raises(BackendUnavailableError, match="no bias_gelu_forward"):
        ops.bias_gelu(x, backend="cpp")
    with pytest.raises(BackendUnavailableError, match="no residual_dropout_layernorm_forward"):
        ops.residual_layer_norm(x, x, dropout_p=0.1, backend="cpp")
    with pytest.raises(BackendUnavailableError, match="need CUDA tensors"):
        resolve_backend("layer_norm", x, "cuda")
    with pytest.raises(BackendUnavailableError, match="CPU tensors"):
        resolve_backend("layer_norm", _cuda_like(torch.float32), "cpp")


@pytest.mark.parametrize("capability, expected", [((9, 0), "triton"), ((8, 0), "triton"), ((7, 5), "triton"),
                                                  ((7, 0), "triton"), ((6, 1), "torch")])
def test_cuda_default_by_mocked_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(dispatch, "device_capability", lambda device: capability)
    monkeypatch.setattr(dispatch, "extension", lambda: None)
    x = _cuda_like()
    for op in ("layer_norm", "residual_dropout_layer_norm", "bias_gelu"):
        assert resolve_backend(op, x, None) == expected
    # matmul (tl.dot) kernels need compute capability 8.0; norm/elementwise ones do not
    assert dispatch.triton_supported(x.device, uses_dot=True) == (capability >= (8, 0))
    assert dispatch.triton_supported(x.device) == (capability >= (7, 0))
    assert resolve_backend("layer_norm", _cuda_like(torch.float64), None) == "torch"
    if expected == "torch":
        with pytest.raises(BackendUnavailableError, match="compute capability"):
            resolve_backend("layer_norm", x, "triton")


def test_cuda_default_prefers_the_cuda_extension(monkeypatch):
    ext = _fake_extension(with_cuda=True)
    ext.bias_gelu_forward = ext.bias_gelu_backward = lambda *a: None
    monkeypatch.setattr(dispatch, "extension", lambda: ext)
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (8, 0))
    x = _cuda_like()
    assert resolve_backend("layer_norm", x, None) == "cuda"
    assert resolve_backend("bias_gelu", x, None) == "cuda"
    # this extension lacks the dropout kernels: Triton serves that op
    assert resolve_backend("residual_dropout_layer_norm", x, None) == "triton"
    ext.WITH_CUDA = False
    assert resolve_backend("layer_norm", x, None) == "triton"
    with pytest.raises(BackendUnavailableError, match="built without CUDA"):
        resolve_backend("layer_norm", x, "cuda")


# --------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_rejected_early():
    x = torch.randn(3, 8)
    w = torch.ones(8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.layer_norm([[1.0]])
    with pytest.raises(TypeError, match="x must be float32"):
        ops.layer_norm(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty last dim"):
        ops.bias_gelu(torch.ones(3, 0))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.layer_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        ops.bias_gelu(x, torch.ones(8, 1))
    with pytest.raises(ValueError, match=r"residual must have shape \(3, 8\)"):
        ops.residual_layer_norm(x, torch.ones(8), w)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor, got None"):
        ops.residual_layer_norm(x, None)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        ops.residual_layer_norm(x, x.double())
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        ops.residual_layer_norm(x, x, dropout_p=1.5, training=False)
    with pytest.raises(TypeError, match="dropout_p must be a float"):
        ops.residual_layer_norm(x, x, dropout_p="0.1")
    with pytest.raises(ValueError, match="seed must be None or an int"):
        ops.residual_layer_norm(x, x, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ops.layer_norm(x, eps=-1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.bias_gelu(x, activation="sigmoid")
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.bias_gelu(x, activation="tanh")  # torch's constant is not the API's vocabulary
    with pytest.raises(ValueError, match="must be on meta"):
        ops.layer_norm(torch.empty(3, 8, device="meta"), w)


# ------------------------------------------------------------------------------------------ torch backend
def test_torch_backend_is_the_reference_and_its_dropout_follows_the_seed():
    x, r, w, b = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6), torch.randn(6)
    torch.testing.assert_close(ops.layer_norm(x, w, b), F.layer_norm(x, (6,), w, b), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ops.bias_gelu(x, b, "gelu_tanh"), F.gelu(x + b, approximate="tanh"), atol=1e-6, rtol=1e-6)
    a = ops.residual_layer_norm(x, r, w, b, dropout_p=0.5, seed=3)
    assert torch.equal(a, ops.residual_layer_norm(x, r, w, b, dropout_p=0.5, seed=3))
    assert not torch.equal(a, ops.residual_layer_norm(x, r, w, b, dropout_p=0.5, seed=4))
    assert torch.equal(ops.residual_layer_norm(x, r, w, b, dropout_p=0.5, training=False, backend="torch"),
                       reference.residual_layer_norm(x, r, w, b))


def test_eager_path_bypasses_the_library_op(monkeypatch):
    def refuse(*args):
        raise AssertionError("eager call went through the torch.library op")

    monkeypatch.setattr(norm, "residual_layer_norm_fwd_op", refuse)
    monkeypatch.setattr(gelu, "bias_gelu_fwd_op", refuse)
    x = torch.randn(2, 5, requires_grad=True)
    ops.residual_layer_norm(x, x.detach(), backend="triton").sum().backward()
    ops.bias_gelu(x, backend="triton").sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------------- extension glue
def _grad_check_against_reference(y, y_ref, inputs):
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [t for t in inputs if t is not None], dy)
    want = torch.autograd.grad(y_ref, [t for t in inputs if t is not None], dy)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("affine", ["weight+bias", "bias", "none"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_cpp_glue_through_a_torch_stand_in(fake_ext, affine, with_residual):
    torch.manual_seed(0)
    x, r = torch.randn(5, 2, 12, requires_grad=True), torch.randn(5, 2, 12, requires_grad=True)
    w = torch.randn(12, requires_grad=True) if "weight" in affine else None
    b = torch.randn(12, requires_grad=True) if "bias" in affine else None
    if with_residual:
        y = ops.residual_layer_norm(x, r, w, b, backend="cpp")
        y_ref, inputs = reference.residual_layer_norm(x, r, w, b), [x, r, w, b]
    else:
        y = ops.layer_norm(x, w, b, backend="cpp")
        y_ref, inputs = reference.layer_norm(x, w, b), [x, w, b]
    _grad_check_against_reference(y, y_ref, inputs)


def test_real_extension_if_built():
    """The C++ CPU residual + LayerNorm through mpo_core.ops, when mpo_core._C exists."""
    if extension() is None:  # under CI=true a skip fails (conftest): CI must have built the extension
        pytest.skip("mpo_core._C is not built (MPO_CORE_NO_EXT=1, or the build failed: see pip install -e .)")
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(7, 33, dtype=dtype, requires_grad=True)
        r = torch.randn(7, 33, dtype=dtype, requires_grad=True)
        w = torch.randn(33, dtype=dtype, requires_grad=True)
        b = torch.randn(33, dtype=dtype, requires_grad=True)
        _grad_check_against_reference(ops.residual_layer_norm(x, r, w, b, backend="cpp"),
                                      reference.residual_layer_norm(x, r, w, b), [x, r, w, b])


# ------------------------------------------------------------------------------------------------ opcheck
def _opcheck_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    r = torch.randn(4, 8, generator=g, requires_grad=True)
    w = torch.randn(8, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    return x, r, w, b


@pytest.mark.parametrize("with_residual, dropout_p, affine", [
    (False, 0.0, "weight+bias"), (False, 0.0, "none"), (True, 0.0, "bias"), (True, 0.3, "weight+bias")])
def test_opcheck_residual_layer_norm_op(with_residual, dropout_p, affine):
    x, r, w, b = _opcheck_inputs()
    args = (x, r if with_residual else None, w if "weight" in affine else None, b if "bias" in affine else None,
            1e-5, dropout_p, 7, "triton")
    torch.library.opcheck(torch.ops.mpo_core.residual_layer_norm_fwd.default, args)


def test_opcheck_residual_layer_norm_op_cpp_glue(fake_ext):
    x, r, w, b = _opcheck_inputs()
    torch.library.opcheck(torch.ops.mpo_core.residual_layer_norm_fwd.default, (x, r, w, b, 1e-5, 0.0, 0, "cpp"))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opcheck_bias_gelu_op(with_bias, approximate):
    x, _, _, b = _opcheck_inputs()
    torch.library.opcheck(torch.ops.mpo_core.bias_gelu_fwd.default,
                          (x, b if with_bias else None, approximate, "triton"))


# ------------------------------------------------------------------------------------------ torch.compile
def _block(backend):
    def run(x, r, w, b, b2):
        h = ops.residual_layer_norm(x, r, w, b, dropout_p=0.2, seed=5, backend=backend)
        return ops.bias_gelu(h, b2, activation="gelu_tanh", backend=backend)

    return run


def test_compile_traces_the_library_ops_without_graph_breaks():
    torch._dynamo.reset()
    x, r, w, b = _opcheck_inputs()
    b2 = torch.randn(8, requires_grad=True)
    inputs = [x, r, w, b, b2]
    compiled = torch.compile(_block("triton"), backend="aot_eager", fullgraph=True)
    y = compiled(*inputs)
    y_eager = _block("triton")(*inputs)
    assert torch.equal(y, y_eager)
    dy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_eager, inputs, dy)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_compile_inductor_smoke_torch_backend():
    torch._dynamo.reset()
    x, r, w, b = _opcheck_inputs()
    b2 = torch.randn(8, requires_grad=True)
    block = lambda *t: ops.bias_gelu(ops.residual_layer_norm(*t[:4]), t[4])  # noqa: E731
    y = torch.compile(block, fullgraph=True)(x, r, w, b, b2)
    torch.testing.assert_close(y, block(x, r, w, b, b2), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert x.grad is not None and b2.grad is not None


def test_mpo_linear_goes_through_the_one_dispatcher():
    cpu = torch.device("cpu")
    assert "mpo_linear" in dispatch.OPS
    assert dispatch.default_backend("mpo_linear", cpu, torch.float32) == "torch"  # the interpreter is never a default
    assert resolve_backend("mpo_linear", torch.ones(2, 4), "triton") == "triton"  # conftest: TRITON_INTERPRET=1
    assert "float64" in dispatch.why_unavailable("mpo_linear", "triton", cpu, torch.float64)
    assert dispatch.why_unavailable("mpo_linear", "cpp", cpu, torch.float32) is not None
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run mpo_linear here"):
        resolve_backend("mpo_linear", torch.ones(2, 4), "cuda")
    with pytest.raises(ValueError, match="op must be one of"):
        dispatch.default_backend("matmul", cpu, torch.float32)
