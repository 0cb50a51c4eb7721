import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpo_core import factorize
from mpo_core.shapes import placement_order, resolve_shapes


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
