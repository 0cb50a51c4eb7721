import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import factorize
from mpo_core.shapes import (bond_caps, bond_limits, bond_list, capped_ranks, check_int, core_params, full_ranks, placement_order,
                              resolve_shapes)


@pytest.mark.parametrize(
    "dim, shape",
    [(768, (4, 4, 4, 4, 3)), (1024, (4, 4, 4, 4, 4)), (3072, (4, 4, 8, 6, 4)), (4096, (4, 4, 8, 8, 4))],
)
def test_factorize_reproduces_mpobert_shapes(dim, shape):
    assert factorize(dim, 5) == shape


@given(st.integers(1, 6), st.lists(st.integers(2, 7), min_size=1, max_size=6))
def test_factorize_product_and_central_largest(n, factors):
    dim = math.prod(factors)
    try:
        shape = factorize(dim, n)
    except ValueError:
        # only legitimate when no n factors >= 2 exist: more modes than prime factors
        prime_count, d, p = 0, dim, 2
        while d > 1:
            while d % p == 0:
                d //= p
                prime_count += 1
            p += 1
        assert prime_count < n
        return
    assert len(shape) == n and math.prod(shape) == dim
    assert shape[n // 2] == max(shape)
    assert min(shape) >= 2 or dim == 1


def test_factorize_is_balanced():
    # 4096 = 2^12 -> five factors as close to 4096^(1/5) ~ 5.3 as integers allow
    assert sorted(factorize(4096, 5)) == [4, 4, 4, 8, 8]
    assert sorted(factorize(30000, 5)) == [5, 6, 10, 10, 10]


def test_factorize_errors():
    with pytest.raises(ValueError, match="cannot be factored"):
        factorize(7, 3)
    assert factorize(7, 3, min_factor=1) == (1, 7, 1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        factorize(8, 0)
    with pytest.raises(TypeError, match="dim must be an int"):
        factorize(8.0, 2)
    with pytest.raises(TypeError):
        factorize(True, 2)


def test_placement_order_covers_every_position():
    for n in range(1, 10):
        assert sorted(placement_order(n)) == list(range(n))
        assert placement_order(n)[0] == n // 2


def test_resolve_shapes():
    assert resolve_shapes(12, 6, (3, 4), (2, 3)) == ((3, 4), (2, 3))
    assert resolve_shapes(768, 3072, n=5) == ((4, 4, 4, 4, 3), (4, 4, 8, 6, 4))
    assert resolve_shapes(12, 6, in_shape=(3, 4)) == ((3, 4), (2, 3))
    with pytest.raises(ValueError, match="product 12, expected 10"):
        resolve_shapes(10, 6, (3, 4), (2, 3))
    with pytest.raises(ValueError, match="same number of modes"):
        resolve_shapes(12, 6, (3, 4), (6,))
    with pytest.raises(ValueError, match="but n=3"):
        resolve_shapes(12, 6, (3, 4), (2, 3), n=3)
    with pytest.raises(ValueError, match="give in_shape and out_shape, or n"):
        resolve_shapes(12, 6)
    with pytest.raises(ValueError, match=r"in_shape\[1\] must be >= 1"):
        resolve_shapes(0, 6, (3, 0), (2, 3))
    with pytest.raises(TypeError, match="in_shape must be a sequence"):
        resolve_shapes(12, 6, "34", (2, 3))


def test_check_int_names_the_argument():
    assert check_int("n", 3) == 3 and check_int("n", 0, minimum=0) == 0
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int("n", True)
    with pytest.raises(TypeError, match="n must be an int, got float"):
        check_int("n", 2.0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int("n", 0)


def _brute_full_ranks(in_shape, out_shape):
    """Rank of each unfolding of a generic (random) matrix with these modes."""
    import torch

    torch.manual_seed(0)
    n = len(in_shape)
    w = torch.randn(math.prod(in_shape), math.prod(out_shape), dtype=torch.float64)
    t = w.reshape(*in_shape, *out_shape).permute([a for k in range(n) for a in (k, n + k)])
    modes = [i * j for i, j in zip(in_shape, out_shape)]
    return [1] + [int(torch.linalg.matrix_rank(t.reshape(math.prod(modes[:k]), -1))) for k in range(1, n)] + [1]


@pytest.mark.parametrize("in_shape,out_shape", [((2, 3), (3, 2)), ((2, 3, 2), (2, 2, 3)), ((4, 1, 3), (1, 2, 2))])
def test_full_ranks_are_the_unfolding_ranks_of_a_generic_matrix(in_shape, out_shape):
    assert full_ranks(in_shape, out_shape) == _brute_full_ranks(in_shape, out_shape)
    assert full_ranks((4, 4, 4, 4, 3), (4, 4, 4, 4, 3)) == [1, 16, 256, 144, 9, 1]


def test_capped_ranks_and_bond_specs():
    shape = ((4, 4, 4, 4, 3), (4, 4, 4, 4, 3))
    assert capped_ranks(*shape) == full_ranks(*shape)
    assert capped_ranks(*shape, max_bond=20) == [1, 16, 20, 20, 9, 1]
    # bond 2 cannot exceed d_1 i_2 j_2 = 8 * 16 once bond 1 is cut to 8 (a TT-SVD gives 128, not 256)
    assert capped_ranks(*shape, max_bond=[8, 300, 200, 2]) == [1, 8, 128, 144, 2, 1]
    assert capped_ranks(*shape, max_bond=[1, 8, 300, 200, 2, 1]) == [1, 8, 128, 144, 2, 1]
    assert bond_caps(*shape, max_bond=[8, 300, 200, 2]) == [8, 256, 144, 2] and bond_caps(*shape) == [None] * 4
    assert bond_limits(None, 3) == [None, None] and bond_limits(4, 3) == [4, 4]
    with pytest.raises(ValueError, match="max_bond must be the n-1=4 inner bonds"):
        capped_ranks(*shape, max_bond=[1, 2, 3])
    with pytest.raises(ValueError, match="must start and end with 1"):
        bond_list([2, 3, 4, 1], 3)
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        capped_ranks(*shape, max_bond=0)
    with pytest.raises(TypeError, match="max_bond must be an int or a list"):
        capped_ranks(*shape, max_bond="full")


def test_core_params_counts_core_entries():
    assert core_params((2, 3, 4), (2, 3, 4), [1, 2, 3, 1]) == 1 * 4 * 2 + 2 * 9 * 3 + 3 * 16 * 1
    assert core_params((4, 3), (2, 5), full_ranks((4, 3), (2, 5))) == 1 * 8 * 8 + 8 * 15 * 1


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_capped_ranks_are_the_bonds_tt_svd_gives(data):
    """For any caps (an int or a per-bond list), MPOLinear's bonds equal those TT-SVD with the same caps produces."""
    import torch

    from mpo_core import MPOLinear, decompose

    n = data.draw(st.integers(2, 4))
    in_shape = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    out_shape = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    caps = data.draw(st.one_of(st.none(), st.integers(1, 40), st.lists(st.integers(1, 40), min_size=n - 1, max_size=n - 1)))
    w = torch.randn(math.prod(in_shape), math.prod(out_shape), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    tt = decompose(w, in_shape, out_shape, max_bond=caps, method="exact").ranks
    assert capped_ranks(in_shape, out_shape, caps) == tt
    layer = MPOLinear(w.shape[0], w.shape[1], in_shape, out_shape, max_bond=caps)
    assert layer.ranks == tt == layer.mpo.ranks
