"""The family's less travelled paths: members that cannot be made, fixed plans that cannot be built, repeated
bonds on a curve, and the helpers' branches the planner only reaches on some inputs."""
import torch

from mpo_core import decompose
from mpo_core.family import (Member, _evaluate, _fixed_point, _reference_sq, _svd_points, family_members,
                             member_curve, plan, uniform_ranks)
from mpo_core.shapes import core_params
from mpo_core.whitening import whitening_factor


def _matrix(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, min(rows, cols), dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g, dtype=torch.float64))
    return (u * decay) @ v.T


def test_describe_names_the_svd_and_the_mpo_members():
    svd, mpo = family_members(8, 27, cores=(2, 3))
    assert svd.describe() == "truncated SVD"
    assert mpo.describe() == "MPO n=3 (2, 2, 2)x(3, 3, 3)"


def test_a_prime_dimension_has_no_mpo_member_and_its_kind_is_not_a_fixed_plan():
    assert [m.name for m in family_members(7, 8, cores=(2, 3))] == ["svd"]  # 7 has no 3 factors >= 2
    weights = {"a": _matrix(7, 8), "b": _matrix(8, 8, seed=1)}
    result = plan(weights, budget=60, cores=(2, 3))
    assert "mpo3 allocated" not in result.candidates and "mpo3 uniform" not in result.candidates
    assert "svd allocated" in result.candidates and result.params <= 60


def test_compare_fixed_false_returns_the_envelope_alone():
    weights = {"a": _matrix(16, 16)}
    result = plan(weights, budget=100, cores=(2, 3), compare_fixed=False)
    assert result.source == "envelope" and list(result.candidates) == ["envelope"]
    assert result.candidates["envelope"] == result.objective and result.params <= 100


def test_a_budget_below_the_svd_floor_leaves_out_its_fixed_plans_but_the_mpo_meets_it():
    """64 x 64 at 100 entries: the SVD needs 128 at rank 1 (allocation raises, no uniform cap), an MPO fits."""
    weights = {"w": _matrix(64, 64)}
    members = {"w": family_members(64, 64, cores=(2,))[0]}
    assert uniform_ranks(members, 100) is None and uniform_ranks(members, 128) == (1, {"w": [1, 1, 1]})
    result = plan(weights, budget=100, cores=(2, 3))
    assert not any(k.startswith("svd ") for k in result.candidates)
    assert "mpo3 allocated" in result.candidates and "mpo3 uniform" in result.candidates
    assert result.entries["w"].point.member.name == "mpo3" and result.params <= 100


def test_a_small_member_curve_keeps_each_bond_vector_once():
    """16 x 16 as (2,4,2) x (2,4,2) on a 40-size grid: neighbouring sizes give the same bonds, kept once."""
    member = family_members(16, 16, cores=(3,))[0]
    _, points = member_curve(_matrix(16, 16), member, levels=40)
    ranks = [tuple(p.ranks) for p in points]
    assert len(ranks) == len(set(ranks)) and 3 <= len(ranks) < 40
    assert ranks[-1] == (1, 4, 4, 1) and [p.params for p in points] == sorted(p.params for p in points)


def test_evaluate_an_exactly_whitened_member_agrees_with_the_closed_form_spectrum():
    """``in_shape = (I, 1)`` is whitened exactly (no ``output_error`` from decompose): the rebuilt error is
    then computed by ``_evaluate`` itself and must equal the SVD member's closed-form one at every rank."""
    g = torch.Generator().manual_seed(3)
    w = _matrix(12, 10)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 12, dtype=torch.float64)
    wh = whitening_factor(x.T @ x)
    member = Member((12, 1), (1, 10))
    exact = decompose(w, member.in_shape, member.out_shape, input_cov=wh)
    assert "output_error" not in exact.metadata
    reference = _reference_sq(w, wh)
    for point in _svd_points(exact, member)[:6]:
        assert abs(_evaluate(w, member, point.ranks, wh, reference) - point.error) < 1e-9 + 1e-6 * point.error


def test_fixed_point_is_dense_at_dense_size_and_the_svd_point_at_its_rank():
    w = _matrix(12, 10)
    svd = Member((12, 1), (1, 10))
    exact = decompose(w, svd.in_shape, svd.out_shape)
    dense = _fixed_point(w, svd, [1, 10, 1], exact, None)  # 10 * 22 entries >= 120
    assert dense.member is None and dense.params == 120 and dense.error == 0.0
    at3 = _fixed_point(w, svd, [1, 3, 1], exact, None)
    assert at3.ranks == [1, 3, 1] and at3.params == core_params(svd.in_shape, svd.out_shape, [1, 3, 1])
    s = torch.linalg.svdvals(w)
    assert abs(at3.error - float((s[3:] ** 2).sum() / (s ** 2).sum())) < 1e-12
