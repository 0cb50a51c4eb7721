import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import MPO, decompose
from mpo_core import truncation

# ---------------------------------------------------------------- plain numpy reference


def numpy_tt_svd(w, in_shape, out_shape, max_bond=None, rel_tol=None):
    """Textbook TT-SVD (Oseledets 2011, Alg. 1) on an interleaved (i1 j1, i2 j2, ...) tensor.

    Returns (dense reconstruction, ranks, sqrt of summed squared discarded singular values).
    """
    n = len(in_shape)
    t = w.reshape(*in_shape, *out_shape).transpose([p for k in range(n) for p in (k, n + k)])
    delta = None if rel_tol is None else rel_tol * np.linalg.norm(w) / math.sqrt(n - 1)
    cores, ranks, disc, r = [], [1], 0.0, 1
    c = t.reshape(-1)
    for k in range(n - 1):
        c = c.reshape(r * in_shape[k] * out_shape[k], -1)
        u, s, vt = np.linalg.svd(c, full_matrices=False)
        keep = len(s)
        if delta is not None:
            keep = next(q for q in range(len(s) + 1) if np.sum(s[q:] ** 2) <= delta**2)
        if max_bond is not None:
            keep = min(keep, max_bond)
        keep = max(keep, 1)
        disc += float(np.sum(s[keep:] ** 2))
        cores.append(u[:, :keep].reshape(r, in_shape[k], out_shape[k], keep))
        c = s[:keep, None] * vt[:keep]
        r = keep
        ranks.append(r)
    cores.append(c.reshape(r, in_shape[-1], out_shape[-1], 1))
    ranks.append(1)
    dense = cores[0][0]
    for core in cores[1:]:
        dense = np.einsum("rca,aijd->ricjd", dense, core).reshape(
            dense.shape[0] * core.shape[1], dense.shape[1] * core.shape[2], core.shape[3]
        )
    return dense[..., 0], ranks, math.sqrt(disc)


def dense_from_cores(cores):
    """Independent reconstruction: explicit index loop over the chain of matrices (tiny shapes only)."""
    in_shape = [c.shape[1] for c in cores]
    out_shape = [c.shape[2] for c in cores]
    w = np.zeros((math.prod(in_shape), math.prod(out_shape)))
    for r, ii in enumerate(np.ndindex(*in_shape)):
        for col, jj in enumerate(np.ndindex(*out_shape)):
            m = np.ones((1, 1))
            for core, i, j in zip(cores, ii, jj):
                m = m @ core[:, i, j, :]
            w[r, col] = m[0, 0]
    return w


shapes_strategy = st.integers(2, 6).flatmap(
    lambda n: st.tuples(st.lists(st.integers(1, 6), min_size=n, max_size=n),
                        st.lists(st.integers(1, 6), min_size=n, max_size=n))
).filter(lambda s: math.prod(s[0]) * math.prod(s[1]) <= 6000)


def random_matrix(in_shape, out_shape, seed, decay=False):
    rng = np.random.default_rng(seed)
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    w = rng.standard_normal((rows, cols))
    if decay:  # a spectrum that decays, so truncation is meaningful
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        w = (u * (s * np.exp(-np.arange(len(s)) / 3.0))) @ vt
    return w


# ---------------------------------------------------------------- exact


@given(shapes_strategy, st.integers(0, 2**31 - 1))
def test_exact_reconstruction(shapes, seed):
    in_shape, out_shape = shapes
    w = random_matrix(in_shape, out_shape, seed)
    mpo = decompose(torch.from_numpy(w), in_shape, out_shape)
    assert mpo.in_shape == tuple(in_shape) and mpo.out_shape == tuple(out_shape)
    assert mpo.error_bound == mpo.metadata["rounding_bound"] <= 1e-12 * np.linalg.norm(w)  # float64 rounding only
    dense = mpo.to_dense().numpy()
    assert np.linalg.norm(dense - w) <= mpo.error_bound
    for k, core in enumerate(mpo.cores):
        assert core.shape == (mpo.ranks[k], in_shape[k], out_shape[k], mpo.ranks[k + 1])
    assert mpo.ranks[0] == mpo.ranks[-1] == 1


def test_to_dense_is_c_order():
    rng = np.random.default_rng(0)
    cores = [rng.standard_normal(s) for s in [(1, 2, 3, 2), (2, 3, 1, 3), (3, 2, 2, 1)]]
    mpo = MPO([torch.from_numpy(c) for c in cores])
    np.testing.assert_allclose(mpo.to_dense().numpy(), dense_from_cores(cores), rtol=1e-13, atol=1e-13)


def test_dtypes_devices_and_numpy_input():
    w = np.random.default_rng(1).standard_normal((12, 20))
    m64 = decompose(w, (3, 4), (4, 5))
    assert m64.dtype == torch.float64 and m64.device.type == "cpu"
    m32 = decompose(torch.from_numpy(w).float(), (3, 4), (4, 5))
    assert m32.dtype == torch.float32
    assert m32.relative_error(torch.from_numpy(w)) < 1e-6
    m32_in = decompose(torch.from_numpy(w).float(), (3, 4), (4, 5), svd_dtype="input")
    assert m32_in.dtype == torch.float32 and m32_in.relative_error(torch.from_numpy(w)) < 1e-5
    mbf = decompose(torch.from_numpy(w).bfloat16(), (3, 4), (4, 5))
    assert mbf.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["zero", "rank1", "rank_deficient"])
def test_degenerate_matrices(kind):
    rng = np.random.default_rng(2)
    if kind == "zero":
        w = np.zeros((16, 9))
    elif kind == "rank1":
        w = np.outer(rng.standard_normal(16), rng.standard_normal(9))
    else:  # an MPO of bond 2 made dense: its unfoldings have rank 2
        w = MPO([torch.from_numpy(rng.standard_normal(s)) for s in [(1, 4, 3, 2), (2, 4, 3, 1)]]).to_dense().numpy()
    for kwargs in ({}, {"rel_tol": 0.0}, {"rel_tol": 0.1}, {"max_bond": 2}):
        mpo = decompose(w, (4, 4), (3, 3), **kwargs)
        err = np.linalg.norm(mpo.to_dense().numpy() - w)
        assert err <= mpo.error_bound + 1e-12 * (1 + np.linalg.norm(w))
        assert all(np.isfinite(c.numpy()).all() for c in mpo.cores)
    if kind == "zero":
        assert decompose(w, (4, 4), (3, 3), rel_tol=0.0).ranks == [1, 1, 1]
    if kind == "rank_deficient":
        assert decompose(w, (4, 4), (3, 3), rel_tol=1e-12).ranks == [1, 2, 1]


# ---------------------------------------------------------------- truncated


@settings(max_examples=30)
@given(
    shapes_strategy,
    st.integers(0, 2**31 - 1),
    st.one_of(st.none(), st.integers(1, 8)),
    st.one_of(st.none(), st.floats(0.0, 0.95)),
)
def test_truncation_matches_reference_and_bound(shapes, seed, max_bond, rel_tol):
    in_shape, out_shape = shapes
    w = random_matrix(in_shape, out_shape, seed, decay=True)
    mpo = decompose(w, in_shape, out_shape, max_bond=max_bond, rel_tol=rel_tol)
    ref_dense, ref_ranks, ref_bound = numpy_tt_svd(w, in_shape, out_shape, max_bond, rel_tol)
    norm = np.linalg.norm(w)
    dense = mpo.to_dense().numpy()
    err = np.linalg.norm(dense - w)
    assert mpo.ranks == ref_ranks
    assert mpo.error_bound == pytest.approx(ref_bound, rel=1e-9, abs=1e-12 * norm)
    assert err <= mpo.error_bound * (1 + 1e-9) + 1e-12 * norm
    if rel_tol is not None and max_bond is None:  # a max_bond cap may override the tolerance
        assert mpo.error_bound <= rel_tol * norm * (1 + 1e-12) + 1e-12 * norm
        assert mpo.relative_error_bound <= rel_tol + 1e-12
    # the truncated result is the best per-split truncation: equal to the reference's
    np.testing.assert_allclose(dense, ref_dense, rtol=0, atol=1e-9 * max(norm, 1.0))


def test_max_bond_per_bond_list_and_full_ranks_list():
    w = random_matrix((4, 4, 4), (4, 4, 4), 3)
    a = decompose(w, (4, 4, 4), (4, 4, 4), max_bond=[5, 7])
    b = decompose(w, (4, 4, 4), (4, 4, 4), max_bond=[1, 5, 7, 1])
    assert a.ranks == b.ranks == [1, 5, 7, 1]
    np.testing.assert_array_equal(a.to_dense().numpy(), b.to_dense().numpy())


def test_spectra_are_the_unfolding_singular_values():
    w = random_matrix((3, 4, 2), (2, 3, 4), 4)
    mpo = decompose(w, (3, 4, 2), (2, 3, 4))
    t = w.reshape(3, 4, 2, 2, 3, 4).transpose(0, 3, 1, 4, 2, 5)
    for k, s in enumerate(mpo.spectra):
        rows = math.prod(t.shape[: 2 * (k + 1)])
        expected = np.linalg.svd(t.reshape(rows, -1), compute_uv=False)
        np.testing.assert_allclose(s.numpy(), expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- canonical forms and rounding


def _left_orthogonal(core):
    m = core.reshape(-1, core.shape[3])
    return torch.linalg.matrix_norm(m.T @ m - torch.eye(m.shape[1], dtype=m.dtype))


def _right_orthogonal(core):
    m = core.reshape(core.shape[0], -1)
    return torch.linalg.matrix_norm(m @ m.T - torch.eye(m.shape[0], dtype=m.dtype))


@given(shapes_strategy, st.integers(0, 2**31 - 1), st.data())
def test_canonicalize(shapes, seed, data):
    in_shape, out_shape = shapes
    w = random_matrix(in_shape, out_shape, seed)
    mpo = decompose(w, in_shape, out_shape, max_bond=4)
    center = data.draw(st.integers(0, len(in_shape) - 1))
    can = mpo.canonicalize(center)
    assert can.canonical_center == center
    for k, core in enumerate(can.cores):
        if k < center:
            assert _left_orthogonal(core) < 1e-10
        elif k > center:
            assert _right_orthogonal(core) < 1e-10
    before = mpo.to_dense()
    assert torch.linalg.vector_norm(can.to_dense() - before) <= 1e-12 * max(float(torch.linalg.vector_norm(before)), 1)
    assert can.frobenius_norm() == pytest.approx(float(torch.linalg.vector_norm(before)), rel=1e-12, abs=1e-300)


def test_decompose_result_is_left_canonical():
    mpo = decompose(random_matrix((3, 4, 5), (5, 4, 3), 5), (3, 4, 5), (5, 4, 3))
    assert mpo.canonical_center == 2
    assert all(_left_orthogonal(c) < 1e-10 for c in mpo.cores[:-1])


@settings(max_examples=25)
@given(shapes_strategy, st.integers(0, 2**31 - 1), st.floats(0.0, 0.9), st.one_of(st.none(), st.integers(1, 6)))
def test_round_guarantee(shapes, seed, rel_tol, max_bond):
    in_shape, out_shape = shapes
    w = random_matrix(in_shape, out_shape, seed, decay=True)
    exact = decompose(w, in_shape, out_shape)
    rounded = exact.round(rel_tol=rel_tol)
    exact_dense = exact.to_dense().numpy()
    norm = np.linalg.norm(exact_dense)
    err = np.linalg.norm(rounded.to_dense().numpy() - exact_dense)
    assert err <= rel_tol * norm * (1 + 1e-9) + 1e-12 * norm
    assert err <= rounded.error_bound * (1 + 1e-9) + 1e-12 * norm
    # rounding an exact TT-SVD with rel_tol gives the same ranks as TT-SVD with that rel_tol
    assert rounded.ranks == decompose(w, in_shape, out_shape, rel_tol=rel_tol).ranks
    capped = decompose(w, in_shape, out_shape, rel_tol=0.05).round(max_bond=max_bond)
    assert max(capped.ranks) <= max(max_bond or 10**9, 1)
    # error_bound still bounds the distance to the *original* matrix
    assert np.linalg.norm(capped.to_dense().numpy() - w) <= capped.error_bound * (1 + 1e-9) + 1e-12 * norm


def test_round_reduces_oversized_bonds():
    rng = np.random.default_rng(6)
    # a rank-2 MPO padded to bond 5 with redundant directions
    cores = [rng.standard_normal(s) for s in [(1, 3, 3, 2), (2, 3, 3, 1)]]
    pad = np.zeros((1, 3, 3, 5))
    pad[..., :2] = cores[0]
    pad2 = np.zeros((5, 3, 3, 1))
    pad2[:2] = cores[1]
    mpo = MPO([torch.from_numpy(pad), torch.from_numpy(pad2)])
    r = mpo.round(rel_tol=1e-12)
    assert r.ranks == [1, 2, 1]
    assert torch.allclose(r.to_dense(), mpo.to_dense(), atol=1e-12)


def _dense_longdouble(cores):
    """The matrix of ``cores`` in numpy's extended precision (64-bit mantissa on x86): a reference whose own
    rounding is far below float64's."""
    acc = np.ones((1, 1, 1), dtype=np.longdouble)
    for core in cores:
        c = core.double().numpy().astype(np.longdouble)
        rows, cols, _ = acc.shape
        acc = np.einsum("IJd,dije->IiJje", acc, c).reshape(rows * c.shape[1], cols * c.shape[2], c.shape[3])
    return acc[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gauge", ["left-orthogonal", "random", "unbalanced"])
def test_round_bound_holds_its_floating_point_rounding(dtype, gauge):
    """An untruncated round changes the matrix by rounding alone: error_bound must cover it without slack
    (measured in extended precision), so it fails without the rounding term (the old bound was 0 here)."""
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("numpy's longdouble is float64 here: no reference more precise than float64")
    gen = torch.Generator().manual_seed(11)
    in_shape, out_shape = (4, 6, 5), (5, 3, 4)
    if gauge == "left-orthogonal":
        cores = decompose(torch.randn(120, 60, generator=gen, dtype=torch.float64), in_shape, out_shape).cores
    else:
        ranks = [1, 7, 9, 1]
        cores = [torch.randn(ranks[k], in_shape[k], out_shape[k], ranks[k + 1], generator=gen, dtype=torch.float64)
                 for k in range(3)]
        if gauge == "unbalanced":
            cores[0], cores[2] = cores[0] * 1e3, cores[2] * 1e-3
    mpo = MPO([c.to(dtype) for c in cores], in_shape, out_shape)  # error_bound 0: these cores are the matrix
    w = _dense_longdouble(mpo.cores)
    norm = float(np.linalg.norm(w))
    u = float(torch.finfo(dtype).eps) / 2
    for kwargs in ({}, {"rel_tol": 1e-3}, {"max_bond": 4}):
        rounded = mpo.round(**kwargs)
        err = float(np.linalg.norm(_dense_longdouble(rounded.cores) - w))
        assert err <= rounded.error_bound, (kwargs, err, rounded.error_bound)
        discarded = math.sqrt(sum(float((s[r:].double() ** 2).sum()) for s, r in zip(rounded.spectra, rounded.ranks[1:-1])))
        if "max_bond" not in kwargs:  # nothing discarded: the whole error is rounding, above the old bound
            assert discarded == 0 and 0 < err and rounded.error_bound <= 1e4 * u * norm
        else:
            assert rounded.error_bound - discarded <= 1e4 * u * norm  # the rounding term stays first order in u


# ---------------------------------------------------------------- the BERT case


def test_bert_768_central_core_holds_most_parameters(capsys):
    w = torch.randn(768, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mpo = decompose(w, n=5)
    assert mpo.in_shape == mpo.out_shape == (4, 4, 4, 4, 3)
    assert mpo.ranks == [1, 16, 256, 144, 9, 1]
    shares = mpo.param_shares()
    with capsys.disabled():
        print("\n768x768 n=5 full-rank parameter shares per core:", [f"{s:.4f}" for s in shares])
    assert max(range(5), key=lambda k: shares[k]) == mpo.central_index == 2
    assert mpo.central.numel() == 768 * 768  # the central core is as large as the dense matrix
    assert shares[2] > 0.85
    assert sum(a.numel() for a in mpo.auxiliary) == mpo.num_params - 768 * 768
    assert mpo.relative_error(w) < 1e-12


# ---------------------------------------------------------------- tensorly cross-check


@pytest.mark.parametrize(
    "in_shape, out_shape, ranks",
    [((4, 3, 2), (2, 3, 4), [1, 3, 5, 1]), ((2, 2, 2, 2), (3, 2, 2, 3), [1, 2, 4, 3, 1]), ((4, 4), (3, 5), [1, 6, 1])],
)
def test_matches_tensorly_tensor_train_matrix(in_shape, out_shape, ranks):
    tl_decomp = pytest.importorskip("tensorly.decomposition")
    from tensorly.tt_matrix import tt_matrix_to_tensor

    w = random_matrix(in_shape, out_shape, 7, decay=True)
    ours = decompose(w, in_shape, out_shape, max_bond=ranks)
    theirs = tl_decomp.tensor_train_matrix(w.reshape(*in_shape, *out_shape), ranks)
    theirs_dense = tt_matrix_to_tensor(theirs).reshape(w.shape)
    assert [f.shape[0] for f in theirs.factors] + [1] == ours.ranks
    err_ours = np.linalg.norm(ours.to_dense().numpy() - w)
    err_theirs = np.linalg.norm(theirs_dense - w)
    assert abs(err_ours - err_theirs) <= 1e-8 * np.linalg.norm(w)


# ---------------------------------------------------------------- errors and robustness


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        ((np.ones(12),), {"n": 2}, ValueError, "must be 2-D"),
        ((np.ones((12, 6)), (3, 4), (2, 2)), {}, ValueError, "out_shape=.*product 4, expected 6"),
        ((np.ones((7, 6)),), {"n": 2}, ValueError, "cannot be factored"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"n": 3}, ValueError, "but n=3"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"max_bond": 0}, ValueError, "max_bond must be >= 1"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"max_bond": [2, 2, 2, 2]}, ValueError, "n-1=1"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"max_bond": [2, 2, 2]}, ValueError, "start and end with 1"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"max_bond": 2.5}, TypeError, "max_bond"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"rel_tol": 1.0}, ValueError, r"rel_tol must be in \[0, 1\)"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"rel_tol": -0.1}, ValueError, "rel_tol"),
        ((np.full((12, 6), np.nan), (3, 4), (2, 3)), {}, ValueError, "NaN or Inf"),
        ((np.full((12, 6), np.inf), (3, 4), (2, 3)), {}, ValueError, "NaN or Inf"),
        ((np.ones((12, 6), dtype=np.int64), (3, 4), (2, 3)), {}, TypeError, "floating dtype"),
        ((torch.ones(12, 6, dtype=torch.complex64), (3, 4), (2, 3)), {}, TypeError, "floating dtype"),
        ((torch.ones(12, 6, dtype=torch.int32), (3, 4), (2, 3)), {}, TypeError, "floating dtype"),
        (([[1.0]],), {"n": 1}, TypeError, "torch.Tensor or numpy.ndarray"),
        ((np.ones((12, 6)), (3, 4), (2, 3)), {"svd_dtype": "float16"}, ValueError, "svd_dtype"),
    ],
)
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        decompose(*args, **kwargs)


def test_svd_fallback_when_torch_fails(monkeypatch):
    w = random_matrix((3, 4), (4, 3), 8)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated: the algorithm failed to converge")

    monkeypatch.setattr(truncation.torch.linalg, "svd", failing_svd)
    mpo = decompose(w, (3, 4), (4, 3))
    assert np.linalg.norm(mpo.to_dense().numpy() - w) <= 1e-12 * np.linalg.norm(w)


def test_save_load_round_trip(tmp_path):
    w = random_matrix((4, 3), (2, 5), 9)
    mpo = decompose(w, (4, 3), (2, 5), rel_tol=0.2)
    mpo.metadata["name"] = "layer0.query"
    path = tmp_path / "w.mpo"
    mpo.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.mpo"]  # no temp file left behind
    back = MPO.load(path)
    assert back.ranks == mpo.ranks and back.in_shape == mpo.in_shape and back.out_shape == mpo.out_shape
    assert back.error_bound == mpo.error_bound and back.norm == mpo.norm
    assert back.canonical_center == mpo.canonical_center and back.metadata == mpo.metadata
    for a, b in zip(back.cores, mpo.cores):
        assert torch.equal(a, b)
    for a, b in zip(back.spectra, mpo.spectra):
        assert torch.equal(a, b)


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.mpo"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read an MPO"):
        MPO.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not an mpo_core.MPO"):
        MPO.load(foreign)
    mpo = decompose(random_matrix((2, 2), (2, 2), 1), (2, 2), (2, 2))
    state = mpo.state()
    state["cores"][1] = torch.zeros(3, 2, 2, 1, dtype=torch.float64)
    torch.save(state, foreign)
    with pytest.raises(ValueError, match="cores do not chain"):
        MPO.load(foreign)
    state = mpo.state()
    state["version"] = 99
    torch.save(state, foreign)
    with pytest.raises(ValueError, match="version"):
        MPO.load(foreign)
    with pytest.raises(FileNotFoundError):
        MPO.load(tmp_path / "missing.mpo")


def test_save_failure_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "w.mpo"
    first = decompose(random_matrix((2, 2), (2, 2), 1), (2, 2), (2, 2))
    first.save(path)

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        decompose(random_matrix((2, 2), (2, 2), 2), (2, 2), (2, 2)).save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["w.mpo"]
    assert torch.equal(MPO.load(path).cores[0], first.cores[0])


def test_repr_and_properties():
    mpo = decompose(random_matrix((4, 4), (4, 4), 1), (4, 4), (4, 4), max_bond=2)
    text = repr(mpo)
    assert "ranks=[1, 2, 1]" in text and "shape=(16, 16)" in text and "compression=" in text
    assert mpo.num_params == 2 * 16 * 2
    assert mpo.compression == pytest.approx(256 / 64)
    assert mpo.shape == (16, 16) and mpo.n == 2
    assert len(mpo.auxiliary) == 1 and mpo.central is mpo.cores[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_decompose_on_cuda():
    w = torch.randn(48, 60, dtype=torch.float32, device="cuda")
    mpo = decompose(w, (4, 3, 4), (3, 4, 5), rel_tol=0.1)
    assert mpo.device.type == "cuda" and mpo.dtype == torch.float32
    assert mpo.relative_error(w) <= 0.1 + 1e-5


@pytest.mark.slow
def test_decompose_speed_llm_tiny_run(tmp_path):
    """``benchmarks/decompose_speed.py --llm`` on a tiny configuration: every contender ran in its subprocess,
    at the ranks ours chose, with the certified bound >= the error and the one-pass floor measured."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decompose_speed.py"
    spec = importlib.util.spec_from_file_location("benchmark_decompose_speed_llm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "llm.json"
    payload = bench.main(["--llm", "--shapes", "96x128", "--n", "2", "--bonds", "4", "--rel-tols", "none",
                          "--repeat", "1", "--threads", "1", "--contenders", "randomized,numpy", "--json", str(out)])
    rows = {r["contender"]: r for r in payload["rows"]}
    assert set(rows) == {"randomized", "numpy"} and json.loads(out.read_text())["rows"]
    assert rows["randomized"]["ranks"] == rows["numpy"]["ranks"] == "[1, 4, 1]"
    assert rows["randomized"]["err"] <= rows["randomized"]["bound"] * (1 + 1e-9)
    assert rows["randomized"]["err"] <= 1.05 * rows["numpy"]["err"]
    assert rows["randomized"]["passes"] > 1 and rows["numpy"]["floor_s"] > 0 and rows["numpy"]["peak_x"] > 0
