"""LAMB against its update formula computed by hand; AdamW groups; warmup + linear decay."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpobert.optim import LAMB, WarmupLinearSchedule, build_optimizer, param_groups, warmup_linear_scheduler


def lamb_reference(w, grads, lr, b1, b2, eps, wd):
    """LAMB in float64 NumPy, written from You et al. (2019), Algorithm 2."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        u = m_hat / (np.sqrt(v_hat) + eps) + wd * w
        wn, un = np.linalg.norm(w), np.linalg.norm(u)
        r = wn / un if wn > 0 and un > 0 else 1.0
        w = w - lr * r * u
    return w


def test_lamb_one_step_by_hand():
    # A 2-vector worked out on paper: w = (3, 4), g = (1, -2), lr = 0.1, wd = 0.5, eps = 0.
    # Step 1: m_hat = g, v_hat = g^2, so m_hat / sqrt(v_hat) = sign(g) = (1, -1);
    # u = (1, -1) + 0.5 * (3, 4) = (2.5, 1); ||w|| = 5, ||u|| = sqrt(7.25); r = 5 / sqrt(7.25).
    p = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    opt = LAMB([p], lr=0.1, betas=(0.9, 0.999), eps=1e-30, weight_decay=0.5)
    opt.step()
    r = 5.0 / math.sqrt(7.25)
    expected = torch.tensor([3.0 - 0.1 * r * 2.5, 4.0 - 0.1 * r * 1.0], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


@settings(max_examples=25)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    steps=st.integers(1, 4),
    wd=st.sampled_from([0.0, 0.01, 0.3]),
    seed=st.integers(0, 10_000),
)
def test_lamb_matches_reference(shape, steps, wd, seed):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(steps)]
    p = nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    opt = LAMB([p], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
    ref = lamb_reference(w0, grads, 0.01, 0.9, 0.99, 1e-6, wd)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-5, atol=1e-6)


def test_lamb_zero_weight_uses_unit_trust_ratio():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, -1.0])
    LAMB([p], lr=0.5, eps=1e-12).step()
    # trust ratio 1 (||w|| = 0): w = -lr * sign(g)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.5, -0.5, 0.5]))


def test_lamb_state_round_trip_continues_identically():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    oa = LAMB(a.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(2):
        a(torch.randn(5, 4)).square().sum().backward()
        oa.step()
        oa.zero_grad()
    b.load_state_dict(a.state_dict())
    ob = LAMB(b.parameters(), lr=0.01, weight_decay=0.1)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from disk: no tensors shared with oa
    x = torch.randn(5, 4)
    for m, o in ((a, oa), (b, ob)):
        m(x).square().sum().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_lamb_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LAMB([nn.Parameter(torch.zeros(2))], **kwargs)


def test_param_groups_exclude_bias_and_norm_from_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias


def test_build_optimizer_kinds_and_errors():
    model = nn.Linear(3, 3)
    assert isinstance(build_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, "LAMB", lr=1e-3), LAMB)
    with pytest.raises(ValueError, match="optimizer name"):
        build_optimizer(model, "sgd")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen)


def test_warmup_linear_schedule_values():
    f = WarmupLinearSchedule(warmup_steps=4, total_steps=12)
    assert [f(s) for s in (0, 1, 2, 4, 8, 12, 20)] == [0.0, 0.25, 0.5, 1.0, 0.5, 0.0, 0.0]
    g = WarmupLinearSchedule(0, 10)
    assert g(0) == 1.0 and g(5) == 0.5
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupLinearSchedule(11, 10)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupLinearSchedule(0, 0)


def test_scheduler_drives_optimizer_lr_and_round_trips():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = warmup_linear_scheduler(opt, 2, 6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.5, 1.0, 0.5])
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched2 = warmup_linear_scheduler(opt2, 2, 6)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 6 and sched2.get_last_lr() == sched.get_last_lr()
