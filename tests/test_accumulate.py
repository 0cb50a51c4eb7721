"""weight_cache: one rebuild per optimizer step gives the gradients of one rebuild per micro-batch.

Reference: the same model and micro-batches without the context (every forward rebuilds ``W``
with graph). float64 to 1e-10; float32 to ``8 sqrt(K) eps`` relative to the gradient's scale;
bf16 autocast to the bf16 rounding of the GEMM inputs (both paths cast to bf16, the rebuild
precision differs: per micro-batch it runs in bf16, in the cache in float32).
"""
import math
import os
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mpo_core.accumulate import exclude_cores_from_ddp, forward_weights, mpo_core_names, shared_central_weights, weight_cache
from mpo_core.nn import MPOLinear, set_trainable
from mpo_core.rebuild import dense_matrix
from mpobert import MPOBertConfig, MPOBertModel


def _model(dtype=torch.float64, **overrides) -> MPOBertModel:
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    return MPOBertModel(cfg).to(dtype)


def _batches(k: int, vocab: int = 100, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (2, 7), generator=g) for _ in range(k)]


def _loss(model: nn.Module, ids: torch.Tensor, k: int) -> torch.Tensor:
    out = model(input_ids=ids)
    return (out.last_hidden_state.float().sin().sum() + out.pooler_output.float().square().sum()) / k


def _grads(model: nn.Module, batches, cache: bool, autocast: bool = False) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    ctx = weight_cache(model) if cache else nullcontext()
    with ctx:
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(model, ids, len(batches))
            loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ref: dict, got: dict, atol_scale: float) -> None:
    """Each gradient within ``atol_scale`` of its largest entry; the attention key bias, whose true
    gradient is exactly zero (softmax ignores a per-query constant), within ``atol_scale`` of the
    largest gradient entry overall (its entries are rounding noise of that size)."""
    assert ref.keys() == got.keys() and ref
    overall = max(float(g.abs().max()) for g in ref.values())
    for name in ref:
        scale = overall if name.endswith("bias.k") else float(ref[name].abs().max())
        err = float((ref[name] - got[name]).abs().max())
        assert err <= atol_scale * scale, f"{name}: max |diff| {err:.3e} > {atol_scale:.1e} x {scale:.3e}"


@pytest.mark.parametrize("overrides", [
    {},                                   # one shared central per matrix, rank-2 adapters
    {"num_groups": 2},                    # MPOBERT+: one central per group
    {"adapter_rank": 0},                  # no adapters
    {"max_bond": 3},                      # truncated bonds
])
def test_float64_gradients_equal_per_micro_batch_rebuild(overrides):
    model = _model(**overrides)
    batches = _batches(3)
    ref = _grads(model, batches, cache=False)
    got = _grads(model, batches, cache=True)
    _assert_same_grads(ref, got, 1e-10)
    # the cores did receive gradient (the flush ran), the shared central summed over layers
    central = model.encoder.groups[0].central["q"]
    assert got[next(n for n, p in model.named_parameters() if p is central)].abs().max() > 0


@pytest.mark.parametrize("which", ["auxiliary", "central"])
def test_frozen_cores(which):
    model = _model()
    set_trainable(model, which)
    batches = _batches(2)
    ref = _grads(model, batches, cache=False)
    got = _grads(model, batches, cache=True)
    _assert_same_grads(ref, got, 1e-10)
    frozen = "central" if which == "auxiliary" else "auxiliary"
    layer = model.encoder.layers[0].mpo["q"]
    cores = [layer.central] if frozen == "central" else layer.auxiliary
    assert all(c.grad is None for c in cores)


def test_all_cores_frozen_input_gradient_still_flows():
    layer = MPOLinear(12, 20, (2, 2, 3), (2, 5, 2), bias=True).double()
    for c in layer.cores:
        c.requires_grad_(False)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    (layer(x).sin().sum()).backward()
    ref = x.grad.clone()
    x.grad = None
    with weight_cache(layer):
        (layer(x).sin().sum()).backward()
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=1e-12)


def test_float32_within_size_scaled_tolerance():
    model = _model(torch.float32)
    batches = _batches(4)
    ref = _grads(model, batches, cache=False)
    got = _grads(model, batches, cache=True)
    k = max(model.config.intermediate_size, model.config.hidden_size)
    _assert_same_grads(ref, got, 8 * math.sqrt(k) * torch.finfo(torch.float32).eps * 4)


def test_bf16_autocast_matches_per_micro_batch_rebuild():
    model = _model(torch.float32)
    batches = _batches(3)
    exact = _grads(model, batches, cache=False)
    ref = _grads(model, batches, cache=False, autocast=True)
    got = _grads(model, batches, cache=True, autocast=True)
    for name in exact:
        scale = float(exact[name].abs().max()) + 1e-30
        err_ref = float((ref[name] - exact[name]).abs().max())
        err_got = float((got[name] - exact[name]).abs().max())
        # the cache is no less accurate than the per-micro-batch bf16 path (within bf16 noise)
        assert err_got <= 2 * err_ref + 2 * 2.0 ** -8 * scale, name


def test_plain_layers_with_bias_and_input_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(MPOLinear(12, 20, (2, 2, 3), (2, 5, 2)), nn.Tanh(), MPOLinear(20, 6, (2, 5, 2), (1, 3, 2))).double()
    xs = [torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def run(cache):
        net.zero_grad(set_to_none=True)
        for x in xs:
            x.grad = None
        with (weight_cache(net) if cache else nullcontext()):
            for x in xs:
                net(x).pow(2).sum().backward()
        return [p.grad.clone() for p in net.parameters()] + [x.grad.clone() for x in xs]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_central_weights_equal_each_layers_rebuild(side):
    torch.manual_seed(0)
    in_shape, out_shape, ranks = (2, 3, 2, 2), (3, 2, 2, 2), (1, 4, 5, 3, 1)
    central = torch.randn(ranks[1], in_shape[1], out_shape[1], ranks[2], dtype=torch.float64)
    chains = []
    for _ in range(3):
        cores = [torch.randn(ranks[k], in_shape[k], out_shape[k], ranks[k + 1], dtype=torch.float64) for k in range(4)]
        cores[1] = central
        chains.append(cores)
    w = shared_central_weights(chains, 1, side=side)
    for l, cores in enumerate(chains):
        torch.testing.assert_close(w[l], dense_matrix(cores), rtol=0, atol=1e-12)


def test_shared_central_weights_rejects_an_outer_center():
    cores = [torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)]
    with pytest.raises(ValueError, match="center"):
        shared_central_weights([cores], 0)


def test_misuse_is_reported():
    model = _model()
    with weight_cache(model):
        with pytest.raises(RuntimeError, match="nested"):
            with weight_cache(model):
                pass
    with pytest.raises(RuntimeError, match="changed"):
        with weight_cache(model):
            with torch.no_grad():
                model.encoder.layers[0].mpo["q"].cores[0].add_(1.0)
    with pytest.raises(TypeError, match="module"):
        with weight_cache("model"):
            pass
    with pytest.raises(ValueError, match="process_group"):
        with weight_cache(model, process_group=True):
            pass


def test_an_exception_inside_propagates_nothing_and_restores_the_layers():
    model = _model()
    model.zero_grad(set_to_none=True)
    with pytest.raises(KeyError):
        with weight_cache(model):
            _loss(model, _batches(1)[0], 1).backward()
            raise KeyError("boom")
    layers = [m for m in model.modules() if isinstance(m, MPOLinear)]
    assert all(m.step_weight is None for m in layers)
    assert all(c.grad is None for m in layers for c in m.cores)


def test_no_grad_inside_builds_no_graph_and_matches():
    model = _model().eval()
    ids = _batches(1)[0]
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        with weight_cache(model):
            got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_core_names_cover_every_alias_of_a_shared_core():
    model = _model()
    names = set(mpo_core_names(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    central = model.encoder.layers[1].mpo["ffn_in"].central
    aliases = {n for n, p in params.items() if p is central}
    assert len(aliases) == model.config.num_layers + 1 and aliases <= names  # every layer's name and the owner's
    core_ids = {id(c) for m in model.modules() if isinstance(m, MPOLinear) for c in m.cores}
    update_ids = {id(t) for m in model.modules() if isinstance(m, MPOLinear) and m.update is not None
                  for t in (m.update.U, m.update.D)}
    assert update_ids  # the adapters are attached: their gradients also arrive when weight_cache ends
    assert {n for n, p in params.items() if id(p) in core_ids | update_ids} == names
    assert "encoder.layers.0.adapters.q.U" in names


# ---------------------------------------------------------------- data parallel (2 gloo processes)
K = 2
STEPS = 2


def _dp_train(rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS SGD steps, K micro-batches per rank per step; rank r takes its shard of every global batch.

    Each rank's loss is its micro-batches' mean and DDP averages over the ranks: the mean over the
    global batch, which the single process (world 1, all 2K micro-batches) computes directly."""
    model = _model()
    net = model
    if world > 1:
        exclude_cores_from_ddp(model)
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        batches = _batches(K * 2, seed=10 + step)  # the global batch of this step: 2 shards of K micro-batches
        mine = batches[rank * K:(rank + 1) * K] if world > 1 else batches
        with weight_cache(model, process_group=True if world > 1 else None):
            for i, ids in enumerate(mine):
                sync = world == 1 or i == len(mine) - 1
                with (net.no_sync() if not sync else nullcontext()):
                    _loss(net, ids, len(mine)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_dp_train(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_no_sync_accumulation_matches_one_process(tmp_path):
    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = _dp_train(0, 1)
    start = _model().state_dict()
    assert r0.keys() == single.keys()
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=1e-12, msg=k)
        torch.testing.assert_close(r0[k], single[k], rtol=0, atol=1e-10, msg=k)
    moved = [k for k in start if not torch.equal(start[k], single[k])]
    assert any(".cores." in k for k in moved)  # the cores trained (their gradient reached both ranks)


# ---------------------------------------------------------------- forward_weights (one forward, batched)
class _Chain(nn.Module):
    """Three MPO layers sharing their central core, applied in sequence (one with an adapter-like update)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layers = nn.ModuleList(MPOLinear(12, 12, n=3).double() for _ in range(3))
        for layer in self.layers[1:]:
            layer.share_core(1, self.layers[0].cores[1])
        self.U = nn.Parameter(torch.randn(12, 2, dtype=torch.float64))
        self.D = nn.Parameter(torch.randn(2, 12, dtype=torch.float64))
        self.layers[2].attach_update(self)

    def forward(self, x, batched: bool):
        with forward_weights(self) if batched else nullcontext():
            seen = [layer.step_weight is not None for layer in self.layers]
            for layer in self.layers:
                x = torch.tanh(layer(x))
        return x, seen


def test_forward_weights_gradients_equal_each_layers_own_rebuild():
    model, x = _Chain(), torch.randn(4, 12, dtype=torch.float64)
    results = []
    for batched in (False, True):
        model.zero_grad(set_to_none=True)
        y, seen = model(x, batched)
        y.sin().sum().backward()
        assert seen == [batched] * 3
        results.append((y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) == 3 * 3 - 2 + 3 * 1 + 2  # cores (central once), biases, U, D
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12)
    assert all(layer.step_weight is None for layer in model.layers)


def test_forward_weights_builds_nothing_without_gradients_or_inside_weight_cache():
    model, x = _Chain(), torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        assert model(x, True)[1] == [False] * 3  # inference keeps its cached W
    with weight_cache(model):
        steps = [layer.step_weight for layer in model.layers]
        with forward_weights(model):
            assert [layer.step_weight for layer in model.layers] == steps  # weight_cache's, untouched
    for p in model.parameters():
        p.requires_grad_(False)
    assert model(x, True)[1] == [False] * 3


def test_mpobert_plain_loop_equals_the_per_layer_rebuild():
    """The encoder's forward_weights against calling its layers one by one (each rebuilds its own W)."""
    model = _model()
    ids = _batches(1)[0]
    out = model(input_ids=ids).last_hidden_state
    out.sin().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    enc = model.encoder
    hidden = model.embeddings(ids, None, None, None)
    for layer in enc.layers:
        assert all(m.step_weight is None for m in layer.mpo.values())
        hidden = layer(hidden, None)
    torch.testing.assert_close(hidden, out.detach(), rtol=1e-12, atol=1e-12)
    hidden.sin().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_forward_weights_build_in_the_autocast_dtype():
    model = _Chain().float()
    x = torch.randn(4, 12)
    want = model(x, False)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with forward_weights(model):
            assert {layer.step_weight.dtype for layer in model.layers} == {torch.bfloat16}
            y = x
            for layer in model.layers:
                y = torch.tanh(layer(y))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.detach(), rtol=0.05, atol=0.05)  # bf16: 8 bits of mantissa
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_weight_cache_dtype_builds_in_it_and_keeps_the_cores_dtype():
    """dtype=bf16: the rebuild's products in bf16 (as autocast runs the GEMMs), the step weights and the
    accumulated dL/dW in float32; gradients as close to float32's as the plain loop's bf16 build gives."""
    model = _model(torch.float32)
    batches = _batches(2)
    exact = _grads(model, batches, cache=True)
    ref = _grads(model, batches, cache=False, autocast=True)  # the plain loop: bf16 build per micro-batch
    model.zero_grad(set_to_none=True)
    with weight_cache(model, dtype=torch.bfloat16):
        layer = model.encoder.layers[0].mpo["q"]
        assert layer.step_weight.dtype == torch.float32
        with torch.autocast("cpu", enabled=False):
            w32 = dense_matrix(list(layer.cores)) + layer.update.U @ layer.update.D
        err = float((layer.step_weight - w32).abs().max())
        assert 0 < err <= 4 * 2.0 ** -8 * float(w32.abs().max())  # built in bf16, not float32
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(model, ids, len(batches))
            loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert got.keys() == exact.keys()
    for name in exact:  # no further from the float32 gradients than the plain loop's bf16 build, within bf16 noise
        scale = float(exact[name].abs().max()) + 1e-30
        err_ref = float((ref[name] - exact[name]).abs().max())
        assert float((got[name] - exact[name]).abs().max()) <= 2 * err_ref + 4 * 2.0 ** -8 * scale, name
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        with weight_cache(model, dtype=torch.int32):
            pass
