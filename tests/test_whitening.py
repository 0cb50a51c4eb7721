"""Data-aware factorization: whitening by the input Gram (SVD-LLM carried over to MPO), input statistics."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core import decompose
from mpo_core.whitening import InputStats, collect_input_stats, kronecker_factors, output_error, whitening_factor


def _inputs(rows, features, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g, dtype=torch.float64)
    scale = torch.logspace(0, -2, features, dtype=torch.float64)
    return torch.randn(rows, features, generator=g, dtype=torch.float64) @ (mix * scale)


def _svd_llm(w, x, r):
    """The SVD-LLM reference: truncate the SVD of L^T W, un-whiten with L^{-T} (numpy-free torch dense math)."""
    lower = torch.linalg.cholesky(x.T @ x)
    u, s, vh = torch.linalg.svd(lower.T @ w, full_matrices=False)
    return torch.linalg.solve(lower.T, (u[:, :r] * s[:r]) @ vh[:r])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 24), cols=st.integers(2, 24), rank=st.integers(1, 24), seed=st.integers(0, 10 ** 6))
def test_whitened_svd_member_is_svd_llm_and_its_bound_is_the_output_error(rows, cols, rank, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = _inputs(4 * rows + 8, rows, seed)
    rank = min(rank, rows, cols)
    mpo = decompose(w, (rows, 1), (1, cols), max_bond=rank, input_cov=x.T @ x)
    assume(not mpo.metadata["whitening_rank_deficient"])  # a ridged Gram is another matrix (its own test below)
    approx = mpo.to_dense()
    torch.testing.assert_close(approx, _svd_llm(w, x, rank), rtol=1e-7, atol=1e-7 * float(w.abs().max()))
    true = float(torch.linalg.norm(x @ (w - approx)))
    assert mpo.metadata["whitening"] == "exact"
    assert true <= mpo.error_bound * (1 + 1e-9) + 1e-9
    assert mpo.error_bound == pytest.approx(true, rel=1e-6, abs=1e-8)
    assert mpo.norm == pytest.approx(float(torch.linalg.norm(x @ w)), rel=1e-10)


def test_whitening_beats_plain_truncation_in_the_output_norm_and_loses_in_the_weight_norm():
    w = torch.randn(32, 40, dtype=torch.float64)
    x = _inputs(200, 32)
    plain = decompose(w, (32, 1), (1, 40), max_bond=6)
    white = decompose(w, (32, 1), (1, 40), max_bond=6, input_cov=x.T @ x)
    out = lambda m: float(torch.linalg.norm(x @ (w - m.to_dense())))  # noqa: E731
    weight = lambda m: float(torch.linalg.norm(w - m.to_dense()))  # noqa: E731
    assert out(white) < 0.9 * out(plain)
    assert weight(white) > weight(plain)


def test_kronecker_whitening_is_exact_for_a_kronecker_gram():
    """With G = G1 ⊗ G2 ⊗ G3 the per-mode factors reproduce G, so the certified bound is the output error."""
    shapes = (3, 4, 2)
    grams = []
    for k, i in enumerate(shapes):
        a = torch.randn(i + 5, i, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        grams.append(a.T @ a)
    gram = torch.kron(torch.kron(grams[0], grams[1]), grams[2])
    w = torch.randn(24, 30, dtype=torch.float64)
    mpo = decompose(w, shapes, (5, 3, 2), max_bond=5, input_cov=gram)
    assert mpo.metadata["whitening"] == "kronecker"
    true = output_error(w, mpo.to_dense(), gram)
    assert mpo.metadata["output_error"] == pytest.approx(true, rel=1e-12)
    assert mpo.error_bound == pytest.approx(true, rel=1e-7)
    factors = kronecker_factors(whitening_factor(gram), shapes)
    rebuilt = torch.kron(torch.kron(factors[0].gram, factors[1].gram), factors[2].gram)
    torch.testing.assert_close(rebuilt, gram, rtol=1e-10, atol=1e-10)


def test_rel_tol_holds_in_the_output_norm():
    w = torch.randn(30, 36, dtype=torch.float64)
    x = _inputs(120, 30)
    mpo = decompose(w, (30, 1), (1, 36), rel_tol=0.3, input_cov=x.T @ x)
    assert float(torch.linalg.norm(x @ (w - mpo.to_dense()))) <= 0.3 * float(torch.linalg.norm(x @ w)) + 1e-9
    assert mpo.ranks[1] < 30


def test_rank_deficient_gram_is_regularised_and_says_so():
    x = _inputs(5, 20)  # 5 samples, 20 features: rank 5
    wh = whitening_factor(x.T @ x)
    assert wh.rank_deficient and wh.ridge > 0
    assert "ridge" in wh.describe()
    w = torch.randn(20, 12, dtype=torch.float64)
    mpo = decompose(w, (20, 1), (1, 12), max_bond=3, input_cov=x.T @ x)
    assert mpo.metadata["whitening_rank_deficient"] is True
    assert torch.isfinite(mpo.to_dense()).all()
    full = whitening_factor(_inputs(100, 20).T @ _inputs(100, 20))
    assert not full.rank_deficient and full.ridge == 0.0


@pytest.mark.parametrize("bad, match", [
    (torch.full((6, 6), float("nan")), "NaN or Inf"),
    (torch.ones(6, 5), "square"),
    (torch.zeros(6, 6), "all zeros"),
    (torch.triu(torch.ones(6, 6)), "symmetric"),
    (-torch.eye(6), "negative diagonal"),
])
def test_bad_gram_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        decompose(torch.randn(6, 4), (6, 1), (1, 4), max_bond=2, input_cov=bad)


def test_gram_of_the_wrong_size_names_input_cov():
    with pytest.raises(ValueError, match="input_cov must be 6 x 6"):
        decompose(torch.randn(6, 4), (6, 1), (1, 4), max_bond=2, input_cov=torch.eye(5))
    with pytest.raises(TypeError, match="input_cov"):
        decompose(torch.randn(6, 4), (6, 1), (1, 4), input_cov=[[1.0]])


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, input_ids=None, attention_mask=None):
        return self.b(torch.tanh(self.a(input_ids)))


def test_collect_input_stats_matches_the_gram_by_hand_and_drops_padding():
    model = _Two()
    x = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    batches = [{"input_ids": x[:2], "attention_mask": mask[:2]}, {"input_ids": x[2:], "attention_mask": mask[2:]}]
    stats = collect_input_stats(model, {"a": model.a, "b": model.b}, batches, {"a": 8, "b": 6})
    kept = x[mask.bool()].double()
    torch.testing.assert_close(stats["a"].gram, kept.T @ kept)
    hidden = torch.tanh(model.a(x))[mask.bool()].double().detach()
    torch.testing.assert_close(stats["b"].gram, hidden.T @ hidden)
    assert stats["a"].count == int(mask.sum())
    assert not model._forward_hooks and not model.a._forward_hooks


def test_calibration_that_does_not_fit_is_a_value_error_and_removes_its_hooks():
    model = _Two()
    with pytest.raises(ValueError, match="calibration batch 0 does not fit"):
        collect_input_stats(model, {"a": model.a}, [torch.randn(2, 7)], {"a": 8})
    assert not model.a._forward_hooks
    with pytest.raises(ValueError, match="at least one batch"):
        collect_input_stats(model, {"a": model.a}, [], {"a": 8})
    with pytest.raises(TypeError, match="dicts of model inputs or tensors"):
        collect_input_stats(model, {"a": model.a}, [[1, 2]], {"a": 8})


def test_non_finite_statistics_name_the_module():
    stats = InputStats(3, "layer.q")
    stats.update(torch.tensor([[1.0, float("inf"), 0.0]]))
    with pytest.raises(ValueError, match="layer.q"):
        stats.checked_gram()
    with pytest.raises(ValueError, match="never reached"):
        InputStats(3, "unused").checked_gram()


def test_output_error_is_the_frobenius_norm_of_x_delta():
    x = torch.randn(10, 4, dtype=torch.float64)
    w, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert output_error(w, v, x.T @ x) == pytest.approx(float(torch.linalg.norm(x @ (w - v))), rel=1e-10)
    assert math.isclose(output_error(w, w, x.T @ x), 0.0, abs_tol=1e-12)
