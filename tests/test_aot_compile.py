"""Every registered Triton kernel compiled to real GPU code for sm_80 and sm_90, without a GPU.

The interpreter proves the arithmetic; this proves the GPU code: each
:class:`~mpo_core.gpu.registry.KernelSpec` (every config ``ops`` launches, matmul
autotune configs included) is compiled by Triton to PTX and cubin for both targets
(``mpo_core.gpu.aot``, worker processes without ``TRITON_INTERPRET``) and must have no
compile error, no spills, shared memory within the device limit, tensor-core ``mma`` on
sm_80 for ``tl.dot`` kernels and ``wgmma`` on sm_90 for the configs meant for Hopper.
Deliberately bad specs (an oversized row that spills, a block that does not compile, a
kernel without ``tl.dot`` marked as one) prove each check can fail. The resource table
is printed (``pytest -s`` or the CI log).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core.gpu import aot, registry
from mpo_core.gpu.compiled import COLUMNS, CompiledKernel, problems, report_rows
from mpo_core.gpu.devices import A100, DEVICES, H100, occupancy
from mpo_core.gpu.shapes import FFN
from mpo_core.gpu.tables import format_rows

SPECS = registry.kernel_specs()


def _spec(family: str, **changes) -> registry.KernelSpec:
    base = next(s for s in SPECS if s.family == family)
    return dataclasses.replace(base, **changes)


# row of 8192 fp32 values in one warp: 256 per thread for x and y alone -> ptxas spills
SPILLING = _spec("layer_norm_fwd", name="BAD spilling layer_norm_fwd[BLOCK_N=8192,1 warp]",
                 constexprs={**_spec("layer_norm_fwd").constexprs, "BLOCK_N": 8192}, num_warps=1)
NOT_COMPILING = _spec("layer_norm_fwd", name="BAD layer_norm_fwd[BLOCK_N=1000]",
                      constexprs={**_spec("layer_norm_fwd").constexprs, "BLOCK_N": 1000})  # tl.arange: power of 2
NO_DOT = _spec("column_sum", name="BAD column_sum marked as a Hopper tl.dot kernel", uses_dot=True, hopper=True)
BAD = (SPILLING, NOT_COMPILING, NO_DOT)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int], CompiledKernel]:
    results = aot.compile_all([*SPECS, *BAD], aot.ARCHS)
    return {(r.name, r.arch): r for r in results}


def test_registry_lists_every_kernel_of_the_package():
    import importlib
    import pkgutil

    import mpo_core.kernels as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "arg_names") and obj.fn.__module__ == module.__name__:
                found.add((module.__name__, name))
    assert found == {(s.module, s.function) for s in SPECS}


def test_registry_uses_the_launchers_configs():
    from mpo_core.kernels import bias_gelu, layer_norm, mpo_matmul

    ln = [s for s in SPECS if s.family == "layer_norm_fwd"]
    assert [(s.constexprs["BLOCK_N"], s.num_warps) for s in ln] == [layer_norm.block_and_warps(768, 2)]
    gelu = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps) for s in SPECS if s.family == "bias_gelu_fwd"}
    assert gelu == {(*bias_gelu.blocks(n), bias_gelu.WARPS) for n in FFN}
    tiles = lambda cfgs: {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in cfgs}  # noqa: E731
    mm = [s for s in SPECS if s.family == "mpo_matmul"]
    for store_pre in (False, True):
        got = {(tuple(sorted((k, s.constexprs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))),
                s.num_warps, s.num_stages) for s in mm if s.constexprs["STORE_PRE"] == store_pre}
        assert got == tiles(mpo_matmul.launch_configs(store_pre))
    # the autotuner's own prune decides the training (STORE_PRE) tiles
    assert mpo_matmul._autotuned_kernel.early_config_prune is mpo_matmul._prune_configs
    assert len(mpo_matmul.launch_configs(False)) == len(mpo_matmul._GPU_CONFIGS) > len(mpo_matmul.launch_configs(True))
    assert all(s.hopper for s in mm)


def test_every_registered_kernel_compiles_cleanly_for_sm80_and_sm90(compiled, capsys):
    results = [compiled[s.name, a] for s in SPECS for a in aot.ARCHS]
    with capsys.disabled():
        print(f"\n{len(SPECS)} registered kernel configs x sm_80, sm_90 (Triton AOT; occupancy is a model)")
        print(format_rows(report_rows(results), COLUMNS))
    bad = {(r.name, r.arch): problems(r) for r in results if problems(r)}
    assert not bad, bad
    for r in results:
        assert 0 < r.registers <= 255 and r.spills == 0
        if r.uses_dot:
            assert r.mma and (r.wgmma or r.arch == 80), r.name
    assert {r.source for r in results} == {s.family for s in SPECS}


def test_spilling_config_fails_the_spill_check(compiled):
    for arch in aot.ARCHS:
        r = compiled[SPILLING.name, arch]
        assert not r.error and r.spills > 0
        assert any(p.startswith("spills:") for p in problems(r)), problems(r)


def test_compile_error_is_reported_not_raised(compiled):
    r = compiled[NOT_COMPILING.name, 80]
    assert r.error and r.registers == 0
    assert problems(r)[0].startswith("compile error")


def test_kernel_without_dot_fails_the_tensor_core_checks(compiled):
    assert "tl.dot kernel without mma in its sm_80 PTX" in problems(compiled[NO_DOT.name, 80])
    assert "config meant for Hopper without wgmma in its sm_90 PTX" in problems(compiled[NO_DOT.name, 90])


def test_shared_memory_over_the_device_limit_is_a_problem():
    ok = CompiledKernel("k", 90, "f", num_warps=4, registers=32, dynamic_smem=H100.smem_per_block)
    assert problems(ok) == []
    over = dataclasses.replace(ok, static_smem=1)
    assert problems(over) == [f"shared memory {H100.smem_per_block + 1} B over the H100-SXM per-block limit "
                                  f"{H100.smem_per_block} B"]
    # the A100 limit is lower: the same kernel fits sm_90 but not sm_80
    assert problems(dataclasses.replace(ok, arch=80))


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:16
 Function _a_kernel:
  REG:40 STACK:8 SHARED:1024 LOCAL:4 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _b_kernel:
  REG:255 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = aot.parse_resource_usage(text)
    assert usage["_a_kernel"]["REG"] == 40 and usage["_a_kernel"]["STACK"] == 8 and usage["_a_kernel"]["LOCAL"] == 4
    assert usage["_a_kernel"]["SHARED"] == 1024 and usage["_b_kernel"]["REG"] == 255
    assert set(usage) == {"_a_kernel", "_b_kernel"}


def test_signature_follows_tritons_specialization():
    from triton.runtime.jit import JITFunction

    from mpo_core.kernels import layer_norm

    spec = _spec("layer_norm_bwd")
    fn = JITFunction(layer_norm._layer_norm_bwd_kernel.fn)  # the interpreter wraps the same function
    sig, const, attrs = aot._signature(fn, spec)
    index = fn.arg_names.index
    assert sig["DY"] == "*bf16" and sig["DW"] == "*fp32" and sig["p"] == "fp32"
    assert sig["N"] == "i32" and attrs[(index("N"),)] == [["tt.divisibility", 16]]  # 768 % 16 == 0
    assert (index("seed"),) not in attrs  # 1234567 is not
    assert sig["DR"] == "constexpr" and const["DR"] is None  # no dropout: no dr buffer
    with pytest.raises(ValueError, match="missing \\['offset'\\]"):
        aot._signature(fn, dataclasses.replace(spec, args={k: v for k, v in spec.args.items() if k != "offset"}))


def test_compile_in_an_interpreting_process_is_refused():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        aot.compile_spec(SPECS[0], 80)


def test_bad_arguments_are_rejected_early():
    with pytest.raises(ValueError, match="archs"):
        aot.compile_all(SPECS[:1], (70,))
    with pytest.raises(ValueError, match="jobs"):
        aot.compile_all(SPECS[:1], jobs=0)
    with pytest.raises(TypeError, match="dtype"):
        registry.kernel_specs((torch.float64,))
    with pytest.raises(TypeError, match="dtypes"):
        registry.kernel_specs(torch.bfloat16)
    with pytest.raises(ValueError, match="registers"):
        occupancy(0, 0, 4, H100)


def test_occupancy_hand_computed():
    assert occupancy(32, 16, 4, H100) == dict(blocks_per_sm=16, warps_per_sm=64, occupancy=1.0, limiter="warps")
    # 255 registers -> 8192 per warp -> 8 warps per SM -> one 8-warp block
    assert occupancy(255, 33280, 8, A100)["blocks_per_sm"] == 1
    assert occupancy(64, 100 * 1024, 4, A100) == dict(blocks_per_sm=1, warps_per_sm=4, occupancy=4 / 64,
                                                          limiter="smem")
    assert occupancy(32, 164 * 1024, 4, A100)["blocks_per_sm"] == 0  # over the per-block limit


@settings(max_examples=200)
@given(regs=st.integers(1, 255), smem=st.integers(0, 240 * 1024), warps=st.sampled_from([1, 2, 4, 8, 16, 32]),
       device=st.sampled_from(sorted(DEVICES)))
def test_property_occupancy_is_the_largest_fitting_block_count(regs, smem, warps, device):
    dev = DEVICES[device]
    occ = occupancy(regs, smem, warps, dev)
    per_warp = -(-32 * regs // 256) * 256

    def fits(blocks):
        return (blocks * warps * per_warp <= dev.regs_per_sm and blocks * (smem + 1024) <= dev.smem_per_sm
                and blocks * warps <= 64 and blocks <= 32 and smem <= dev.smem_per_block)

    b = occ["blocks_per_sm"]
    assert (b == 0 or fits(b)) and not fits(b + 1)
    assert occ["occupancy"] == b * warps / 64
