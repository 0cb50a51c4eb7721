"""The one dense rebuild (mpo_core.rebuild) against a plain einsum chain, for whole MPOs and chain segments."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import decompose
from mpo_core.cost import device_model
from mpo_core.rebuild import dense_matrix, dense_row_blocks, plan_merge, rebuild


def _einsum_chain(cores):
    """(d_left, prod in, prod out, d_right) by left-to-right einsums, C order."""
    t = cores[0]
    for c in cores[1:]:
        x0, a, b, _ = t.shape
        _, i, j, e = c.shape
        t = torch.einsum("xabd,dije->xaibje", t, c).reshape(x0, a * i, b * j, e)
    return t


def _trees(lo, hi):
    if lo == hi:
        yield lo
        return
    for s in range(lo, hi):
        for left, right in itertools.product(_trees(lo, s), _trees(s + 1, hi)):
            yield (left, right)


@settings(max_examples=30, deadline=None)
@given(modes=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=4),
       bonds=st.lists(st.integers(1, 3), min_size=5, max_size=5), seed=st.integers(0, 2 ** 16))
def test_rebuild_of_a_segment_matches_the_einsum_chain_for_every_tree(modes, bonds, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(modes)
    ranks = bonds[: n + 1]  # boundary bonds need not be 1: a segment of a longer chain
    cores = [torch.randn(ranks[k], i, j, ranks[k + 1], dtype=torch.float64, generator=g) for k, (i, j) in enumerate(modes)]
    ref = _einsum_chain(cores)
    torch.testing.assert_close(rebuild(cores), ref, rtol=1e-12, atol=1e-12)
    for tree in _trees(0, n - 1):
        torch.testing.assert_close(rebuild(cores, tree), ref, rtol=1e-12, atol=1e-12)


def test_dense_matrix_is_the_matrix_decompose_factored_and_to_dense_uses_it():
    torch.manual_seed(0)
    w = torch.randn(24, 30, dtype=torch.float64)
    mpo = decompose(w, (2, 3, 4), (3, 5, 2))
    torch.testing.assert_close(dense_matrix(mpo.cores), w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mpo.to_dense(), w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("max_entries", [1, 30, 31, 200, 10**6])
@pytest.mark.parametrize("modes", [[(24, 1), (1, 30)], [(2, 3), (3, 5), (4, 2)], [(3, 2), (1, 3), (4, 1), (2, 5)]])
def test_dense_row_blocks_tile_the_dense_matrix(modes, max_entries):
    g = torch.Generator().manual_seed(1)
    ranks = [1] + [3] * (len(modes) - 1) + [1]
    cores = [torch.randn(ranks[k], i, j, ranks[k + 1], dtype=torch.float64, generator=g) for k, (i, j) in enumerate(modes)]
    dense = _einsum_chain(cores)[0, :, :, 0]
    blocks = list(dense_row_blocks(cores, max_entries))
    assert [r for r, _ in blocks] == list(itertools.accumulate([0] + [b.shape[0] for _, b in blocks[:-1]]))
    torch.testing.assert_close(torch.cat([b for _, b in blocks]), dense, rtol=1e-12, atol=1e-12)
    assert all(b.numel() <= max(max_entries, dense.shape[1]) for _, b in blocks)  # one row at least
    if max_entries >= dense.numel():
        assert len(blocks) == 1


def test_rebuild_is_differentiable_and_the_default_tree_is_the_cheapest():
    torch.manual_seed(0)
    cores = [torch.randn(1, 4, 4, 16, requires_grad=True), torch.randn(16, 4, 4, 16, requires_grad=True),
             torch.randn(16, 3, 3, 1, requires_grad=True)]
    dense_matrix(cores).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)
    shapes = ((4, 4, 3), (4, 4, 3), (1, 16, 16, 1))
    model = device_model("cpu")
    best = plan_merge(*shapes, 4, model, torch.float32)
    for tree in _trees(0, 2):
        # price every tree with the same DP restricted to it: none beats the chosen one
        assert best[3] <= _tree_seconds(tree, *shapes, model) + 1e-15


def _tree_seconds(tree, in_shape, out_shape, ranks, model):
    modes = [i * j for i, j in zip(in_shape, out_shape)]

    def walk(node):  # (lo, hi, seconds)
        if isinstance(node, int):
            return node, node, 0.0
        (p, s, a), (_, q, b) = walk(node[0]), walk(node[1])
        ma, mb = math.prod(modes[p : s + 1]), math.prod(modes[s + 1 : q + 1])
        flops = 2 * ranks[p] * ma * ranks[s + 1] * mb * ranks[q + 1]
        nbytes = 4 * (ranks[p] * ma * ranks[s + 1] + ranks[s + 1] * mb * ranks[q + 1] + ranks[p] * ma * mb * ranks[q + 1])
        return p, q, a + b + model.op_seconds(flops, nbytes, torch.float32)

    permute = model.op_seconds(0, 2 * 4 * math.prod(modes), torch.float32)
    return walk(tree)[2] + permute

