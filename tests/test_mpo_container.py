"""The MPO container itself: its construction checks and the balanced gauge (``MPO.balanced``).

Reference: the dense matrix the cores contract to (``MPO.to_dense``), which the gauge must not change.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import MPO, decompose


def test_mpo_constructor_validation():
    ok = [torch.zeros(1, 2, 2, 3), torch.zeros(3, 2, 2, 1)]
    MPO(ok)
    with pytest.raises(ValueError, match=r"cores do not chain: cores\[0\] has right bond 3 but cores\[1\] has left bond 2"):
        MPO([torch.zeros(1, 2, 2, 3), torch.zeros(2, 2, 2, 1)])
    with pytest.raises(ValueError, match="boundary bonds must be 1"):
        MPO([torch.zeros(2, 2, 2, 1)])
    with pytest.raises(ValueError, match="must be 4-D"):
        MPO([torch.zeros(1, 2, 2)])
    with pytest.raises(TypeError, match=r"cores\[1\] is torch.float64, but cores\[0\] is torch.float32"):
        MPO([torch.zeros(1, 2, 2, 3), torch.zeros(3, 2, 2, 1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="empty dimension"):
        MPO([torch.zeros(1, 0, 2, 1)])
    with pytest.raises(TypeError, match="floating dtype"):
        MPO([torch.zeros(1, 2, 2, 1, dtype=torch.int64)])
    with pytest.raises(ValueError, match="does not match"):
        MPO(ok, in_shape=(2, 3))
    with pytest.raises(TypeError, match="list of 4-D tensors"):
        MPO(torch.zeros(1, 2, 2, 1))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 4), st.integers(0, 10_000))
def test_balanced_keeps_the_matrix_and_equalizes_every_bond(n, seed):
    """``balanced``: same dense matrix and bound, and every bond index's two slices have the same RMS entry,
    even from a whitened TT-SVD whose cores differ in scale by orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 36, generator=g, dtype=torch.float64)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64) * 30.0
    mpo = decompose(w, n=n, max_bond=5, input_cov=x.T @ x)
    out = mpo.balanced(sweeps=60)
    assert torch.allclose(out.to_dense(), mpo.to_dense(), rtol=1e-10, atol=1e-12)
    assert out.error_bound == mpo.error_bound and out.ranks == mpo.ranks and out.canonical_center is None
    for k in range(n - 1):
        left, right = out.cores[k], out.cores[k + 1]
        a = left.reshape(-1, left.shape[-1]).pow(2).mean(0).sqrt()
        b = right.reshape(right.shape[0], -1).pow(2).mean(1).sqrt()
        assert torch.allclose(a, b, rtol=1e-6), (k, a, b)
    before = [float(c.pow(2).mean().sqrt()) for c in mpo.cores]
    after = [float(c.pow(2).mean().sqrt()) for c in out.cores]
    assert max(before) / min(before) > 10 * max(after) / min(after)


def test_balanced_leaves_zero_slices_and_rejects_bad_sweeps():
    cores = [torch.zeros(1, 2, 3, 2), torch.randn(2, 3, 2, 1, dtype=torch.float32)]
    cores[0][0, :, :, 0] = 1.0
    mpo = MPO(cores, (2, 3), (3, 2))
    out = mpo.balanced()
    assert torch.equal(out.cores[0][..., 1], cores[0][..., 1]) and torch.equal(out.cores[1][1], cores[1][1])
    assert torch.allclose(out.to_dense(), mpo.to_dense(), atol=1e-6)
    with pytest.raises(ValueError, match="sweeps"):
        mpo.balanced(sweeps=0)
