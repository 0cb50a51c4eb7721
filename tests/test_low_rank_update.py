"""MPOLinear with an attached low-rank update, ``W = MPO + U D``, and a bias given per call.

Reference: plain dense float64 math, ``x @ (dense(cores) + U D) + b``, and its autograd gradients.
Every route is checked (the dense plan, the sequential plan, the cached ``W``, the step ``W`` of
``weight_cache``), and so is each way the update or the bias could be silently dropped.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core.accumulate import build_weight_blocks, weight_cache
from mpo_core.contract import explain
from mpo_core.nn import MPOLinear
from mpo_core.rebuild import dense_matrix


class Update(nn.Module):
    def __init__(self, i: int, o: int, r: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.U = nn.Parameter(torch.randn(i, r, generator=g, dtype=torch.float64))
        self.D = nn.Parameter(torch.randn(r, o, generator=g, dtype=torch.float64) * 0.1)


def _layer(i=12, o=20, n=3, strategy="auto", bias=False, seed=0) -> tuple[MPOLinear, Update]:
    torch.manual_seed(seed)
    layer = MPOLinear(i, o, n=n, bias=bias, strategy=strategy).double()
    update = Update(i, o, 3, seed)
    layer.attach_update(update)
    return layer, update


def _reference(layer: MPOLinear, update: Update, x: torch.Tensor, bias: torch.Tensor | None):
    """Output and gradients (x, cores, U, D, bias) by dense autograd math on clones."""
    cores = [c.detach().clone().requires_grad_() for c in layer.cores]
    u, d = update.U.detach().clone().requires_grad_(), update.D.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = xr @ (dense_matrix(cores) + u @ d) + (0 if b is None else b)
    y.sin().sum().backward()
    return y.detach(), [xr.grad, *[c.grad for c in cores], u.grad, d.grad, *([] if b is None else [b.grad])]


def _grads(layer, update, x, bias):
    return [x.grad, *[c.grad for c in layer.cores], update.U.grad, update.D.grad, *([] if bias is None else [bias.grad])]


@pytest.mark.parametrize("strategy", ["dense", "sequential", "auto"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_gradients_match_dense_math(strategy, with_bias):
    layer, update = _layer(strategy=strategy)
    x = torch.randn(5, 4, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True) if with_bias else None
    ref_y, ref_g = _reference(layer, update, x, bias)
    y = layer(x, bias)
    y.sin().sum().backward()
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(layer, update, x, bias), ref_g):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dense_plan_folds_the_update_into_one_gemm():
    layer, update = _layer(strategy="dense")
    x = torch.randn(64, 12, dtype=torch.float64)
    assert explain(x, list(layer.cores), None, "dense").strategy == "dense"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        layer(x)
    token_products = [e for e in prof.events() if e.name in ("aten::mm", "aten::addmm")
                      and any(s and s[0] == 64 for s in e.input_shapes if isinstance(s, list))]
    assert len(token_products) == 1  # x @ (W + U D): the update never touches the 64 tokens


def test_weight_cache_step_weight_includes_the_update_and_its_gradients():
    layer, update = _layer()
    xs = [torch.randn(6, 12, dtype=torch.float64) for _ in range(3)]
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    want_y, want_g = [], None
    for x in xs:  # reference: the per-call path, gradients summed over micro-batches
        want_y.append(layer(x, bias).detach())
        layer(x, bias).sin().sum().backward()
    want_g = [t.grad.clone() for t in (*layer.cores, update.U, update.D, bias)]
    for t in (*layer.cores, update.U, update.D, bias):
        t.grad = None
    with weight_cache(layer):
        for x, yr in zip(xs, want_y):
            y = layer(x, bias)
            torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
            y.sin().sum().backward()
    for t, g in zip((*layer.cores, update.U, update.D, bias), want_g):
        torch.testing.assert_close(t.grad, g, rtol=1e-10, atol=1e-12)


def test_shared_central_block_adds_each_layers_update_mixed_and_all():
    torch.manual_seed(3)
    layers = [MPOLinear(12, 20, n=3, bias=False).double() for _ in range(3)]
    for layer in layers[1:]:
        layer.share_core(1, layers[0].cores[1])
    for attach in ([0, 1, 2], [1]):  # every layer (one batched GEMM) and only some
        for i, layer in enumerate(layers):
            layer.attach_update(Update(12, 20, 2, seed=i) if i in attach else None)
        (block, idx), = build_weight_blocks(layers)
        for pos, i in enumerate(idx):
            want = dense_matrix(list(layers[i].cores))
            if layers[i].update is not None:
                want = want + layers[i].update.U @ layers[i].update.D
            torch.testing.assert_close(block[pos], want, rtol=1e-12, atol=1e-12)


def test_cached_weight_follows_the_update_and_a_trainable_update_gets_gradients():
    layer, update = _layer()
    for core in layer.cores:
        core.requires_grad_(False)
    x = torch.randn(3, 12, dtype=torch.float64)
    with torch.no_grad():
        y0 = layer(x)
        update.D.mul_(2.0)  # an in-place change: the cached W must be rebuilt
        y1 = layer(x)
    torch.testing.assert_close(y1, x @ (dense_matrix(list(layer.cores)) + update.U @ update.D))
    assert not torch.allclose(y0, y1)
    assert layer.explain(x).route == "planned"  # the route itself knows the update needs a gradient
    layer(x).sum().backward()  # frozen cores, trainable update: not the (gradient-free) cached W
    assert update.U.grad is not None and update.D.grad is not None


def test_weight_and_to_linear_include_the_update_and_detach_removes_it():
    layer, update = _layer(bias=True)
    full = dense_matrix(list(layer.cores)) + update.U @ update.D
    torch.testing.assert_close(layer.weight, full.T)
    torch.testing.assert_close(layer.to_linear().weight, full.T)
    layer.attach_update(None)
    assert layer.update is None
    x = torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ dense_matrix(list(layer.cores)) + layer.bias)


def test_bad_updates_are_rejected():
    layer = MPOLinear(12, 20, n=3).double()
    with pytest.raises(TypeError, match="update must have tensors U and D"):
        layer.attach_update(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"U \(12, r\) and D \(r, 20\)"):
        layer.attach_update(Update(20, 12, 2))
    bad = Update(12, 20, 2)
    bad.D = nn.Parameter(torch.zeros(3, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match="U \\(12, r\\)"):
        layer.attach_update(bad)
    with pytest.raises(ValueError, match="like the cores"):
        layer.attach_update(Update(12, 20, 2).float())


@settings(max_examples=15, deadline=None)
@given(i=st.sampled_from([6, 8, 12]), o=st.sampled_from([4, 9, 16]), r=st.integers(1, 5),
       tokens=st.integers(1, 40), strategy=st.sampled_from(["auto", "dense", "sequential"]))
def test_property_any_shape_rank_and_route(i, o, r, tokens, strategy):
    torch.manual_seed(i * 100 + o + r)
    layer = MPOLinear(i, o, n=2, bias=True, strategy=strategy).double()
    update = Update(i, o, r, seed=r)
    layer.attach_update(update)
    x = torch.randn(tokens, i, dtype=torch.float64)
    want = x @ (dense_matrix(list(layer.cores)) + update.U @ update.D) + layer.bias
    torch.testing.assert_close(layer(x), want, rtol=1e-11, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-11, atol=1e-11)
