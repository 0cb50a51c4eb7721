"""``compress_checkpoint --n auto``: per matrix, the family's member under that matrix's own limit
(mpo_core.family's per-matrix rule), recorded in the layout; loaded and merged back within the bounds;
resumed after SIGKILLs to the same bytes; and bad ``--n`` values refused by name."""
from __future__ import annotations

import json
import math

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from test_compress_checkpoint import cli, folder_bytes, kill_and_resume, make_llama  # noqa: E402

from mpo_core.compress_checkpoint import Settings, compress_checkpoint, merge_checkpoint  # noqa: E402
from mpo_core.compress_checkpoint.plan import LAYOUT_NAME, auto_budget  # noqa: E402
from mpo_core.compress_checkpoint.report import format_summary  # noqa: E402
from mpo_core.decompose import decompose  # noqa: E402
from mpo_core.family import (family_members, member_at_tolerance, member_curve, member_for_budget,  # noqa: E402
                             plan)

TT_RANK_2 = "model.layers.0.mlp.up_proj.weight"  # replaced by an MPO n=3 matrix of bond 2: the MPO member wins


def _tt_rank_2(rows: int, cols: int) -> torch.Tensor:
    """An ``rows x cols`` matrix that MPO n=3 (balanced shapes) holds exactly at bond 2; its matrix rank is far higher."""
    member = family_members(rows, cols, (3,))[0]
    gen = torch.Generator().manual_seed(5)
    w = decompose(torch.randn(rows, cols, generator=gen, dtype=torch.float64), member.in_shape, member.out_shape,
                  max_bond=2).to_dense()
    assert torch.linalg.matrix_rank(w) > 20
    return w


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer LLaMA-shaped checkpoint (3 shards), one matrix replaced by a bond-2 MPO n=3 one; its tensors."""
    ckpt = make_llama(tmp_path_factory.mktemp("auto") / "in", layers=2, shards=3)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = ckpt / index[TT_RANK_2]
    tensors = safetensors_torch.load_file(str(shard))
    tensors[TT_RANK_2] = _tt_rank_2(*tensors[TT_RANK_2].T.shape).T.to(torch.float32).contiguous()
    safetensors_torch.save_file(tensors, str(shard), metadata={"format": "pt"})
    originals = {}
    for path in ckpt.glob("*.safetensors"):
        originals.update(safetensors_torch.load_file(str(path)))
    return ckpt, originals


def _merged_within_bounds(out, ckpt, tmp_path, layout, originals):
    """Merge ``out`` back to dense: every matrix within its reported bound, its error the layout's."""
    report = merge_checkpoint(out, tmp_path / "merged", reference=ckpt, progress="none")
    assert len(report["matrices"]) == len(layout) == 14
    for row in report["matrices"]:
        assert row["rel_error"] <= row["rel_bound"], row
    merged = {}
    for path in (tmp_path / "merged").glob("*.safetensors"):
        merged.update(safetensors_torch.load_file(str(path)))
    for rec in layout.values():
        w = originals[rec["source"]].double()
        err = float((merged[rec["source"]].double() - w).norm() / w.norm())
        assert err <= rec["rel_bound"] * (1 + 1e-9) and err == pytest.approx(rec["rel_error"], rel=1e-4, abs=1e-6)


def test_auto_budget_is_the_family_choice_per_matrix(checkpoint, tmp_path):
    ckpt, originals = checkpoint
    out = tmp_path / "out"
    summary = compress_checkpoint(ckpt, out, n="auto", budget=0.3, progress="none")
    layout = json.loads((out / LAYOUT_NAME).read_text())
    settings = Settings(n="auto", budget=0.3)
    for module, rec in layout.items():
        matrix = originals[rec["source"]].T  # in x out
        rows, cols = matrix.shape
        budget = auto_budget(settings, rows, cols)
        assert budget == rec["auto_budget"] == max(rows + cols, int(0.3 * rows * cols))
        expected = member_for_budget(matrix, budget).point
        assert (rec["member"], rec["n"], rec["ranks"]) == (expected.member.name, expected.member.n, expected.ranks)
        assert (rec["in_shape"], rec["out_shape"]) == (list(expected.member.in_shape), list(expected.member.out_shape))
        assert rec["entries_mpo"] == expected.params <= budget
        # the planned (squared, relative) error is the written cores' measured one
        assert rec["rel_error"] ** 2 == pytest.approx(expected.error, rel=1e-3, abs=1e-12)
    assert layout[TT_RANK_2[:-len(".weight")]]["n"] == 3 and layout[TT_RANK_2[:-len(".weight")]]["rel_error"] < 1e-6
    assert sorted({rec["n"] for rec in layout.values()}) == [2, 3]  # the SVD wins the decaying-spectrum matrices
    kinds = {k["kind"]: k for k in summary["kinds"]}
    assert kinds["model.layers.*.mlp.up_proj.weight"]["n"] == [2, 3] and kinds["model.layers.*.mlp.down_proj.weight"]["n"] == [2]
    assert "n " in format_summary(summary).splitlines()[0] and " 2|3 " in format_summary(summary)
    _merged_within_bounds(out, ckpt, tmp_path, layout, originals)
    transformers = pytest.importorskip("transformers")
    from mpo_core.lightweight import load_mpo_model

    model = load_mpo_model(transformers.LlamaForCausalLM, out)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.in_shape == tuple(layout["model.layers.0.mlp.up_proj"]["in_shape"])
    torch.testing.assert_close(layer.weight.double(), originals[TT_RANK_2].double(), rtol=0, atol=1e-5)


def test_auto_rel_tol_and_max_bond_are_the_family_choice_per_matrix(checkpoint, tmp_path):
    ckpt, originals = checkpoint
    compress_checkpoint(ckpt, tmp_path / "tol", n="auto", rel_tol=0.1, progress="none")
    compress_checkpoint(ckpt, tmp_path / "bond", n="auto", max_bond=5, progress="none")
    tol = json.loads((tmp_path / "tol" / LAYOUT_NAME).read_text())
    bond = json.loads((tmp_path / "bond" / LAYOUT_NAME).read_text())
    for module, rec in tol.items():
        matrix = originals[rec["source"]].T
        point, _, sizes = member_at_tolerance(matrix, 0.1)
        assert (rec["member"], rec["ranks"], rec["entries_mpo"]) == (point.member.name, point.ranks, point.params)
        assert rec["entries_mpo"] == min(sizes.values()) and rec["auto_budget"] is None
        assert rec["rel_error"] <= 0.1 and rec["rel_tol_met"]
        rows, cols = matrix.shape
        assert bond[module]["auto_budget"] == 5 * (rows + cols)  # the rank-5 SVD's entries
        assert bond[module]["entries_mpo"] <= 5 * (rows + cols)
        assert bond[module]["member"] == member_for_budget(matrix, 5 * (rows + cols)).point.member.name
    assert tol[TT_RANK_2[:-len(".weight")]]["n"] == 3 and bond[TT_RANK_2[:-len(".weight")]]["n"] == 3
    _merged_within_bounds(tmp_path / "tol", ckpt, tmp_path, tol, originals)


def test_auto_resume_after_kills_is_bitwise_identical(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    ref, out = tmp_path / "ref", tmp_path / "out"
    compress_checkpoint(ckpt, ref, n="auto", budget=0.3, progress="none")
    kill_and_resume(cli(str(ckpt), str(out), "--n", "auto", "--budget", "0.3", "--progress", "lines"), out, 17, 7)
    assert folder_bytes(out) == folder_bytes(ref)
    with pytest.raises(ValueError, match=r"setting n: 'auto' there, 2 now"):
        compress_checkpoint(ckpt, out, n=2, budget=0.3, progress="none")
    with pytest.raises(ValueError, match=r"setting cores: \[2, 3, 4, 5\] there, \[2, 3\] now"):
        compress_checkpoint(ckpt, out, n="auto", budget=0.3, cores=(2, 3), progress="none")
    assert folder_bytes(out) == folder_bytes(ref)  # refused, nothing written


def test_bad_n_is_a_clear_error(checkpoint, tmp_path, capsys):
    with pytest.raises(ValueError, match="n must be an int >= 2 or 'auto', got 'three'"):
        Settings(n="three", max_bond=4)
    with pytest.raises(ValueError, match="n must be >= 2"):
        Settings(n=1, max_bond=4)
    with pytest.raises(TypeError, match="n must be an int"):
        Settings(n=2.5, max_bond=4)
    with pytest.raises(ValueError, match="n='auto' takes rel_tol alone"):
        Settings(n="auto", rel_tol=0.1, max_bond=4)
    with pytest.raises(ValueError, match="cores must be >= 2"):
        Settings(n="auto", budget=0.3, cores=(1, 2))
    with pytest.raises(ValueError, match="cores must name at least one"):
        Settings(n="auto", budget=0.3, cores=())
    with pytest.raises(ValueError, match="auto_budget is for n='auto', got n=2"):
        auto_budget(Settings(n=2, max_bond=4), 4, 4)
    from mpo_core.compress_checkpoint.plan import matrix_shapes

    with pytest.raises(ValueError, match="n='auto' chooses the shapes per matrix"):
        matrix_shapes(Settings(n="auto", max_bond=4), 4, 4)
    from mpo_core.compress_checkpoint.cli import main

    for bad in ("x", "1", "auto3"):
        with pytest.raises(SystemExit) as exc:
            main([str(checkpoint[0]), str(tmp_path / "x"), "--n", bad, "--max-bond", "4"])
        assert exc.value.code == 2
        assert f"argument --n: must be an int >= 2 or auto, got {bad!r}" in capsys.readouterr().err
    assert main([str(checkpoint[0]), str(tmp_path / "x"), "--n", "auto", "--max-bond", "4", "--rel-tol", "0.1"]) == 2
    assert "n='auto' takes rel_tol alone" in capsys.readouterr().err
    assert main([str(checkpoint[0]), str(tmp_path / "x"), "--n", "auto", "--budget", "0.3", "--cores", "1", "3"]) == 2
    assert "cores must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main([str(checkpoint[0]), str(tmp_path / "svd"), "--n", "auto", "--budget", "0.3", "--cores", "2",
                 "--progress", "none"]) == 0
    assert " n " in capsys.readouterr().out.splitlines()[0]
    layout = json.loads((tmp_path / "svd" / LAYOUT_NAME).read_text())
    assert {rec["member"] for rec in layout.values()} == {"svd"}  # the family of --cores 2 alone


def test_auto_budget_limits():
    s = Settings(n="auto", budget=0.25, max_bond=3)
    assert auto_budget(s, 64, 176) == min(int(0.25 * 64 * 176), 3 * (64 + 176))
    assert auto_budget(Settings(n="auto", budget=0.001), 64, 176) == 64 + 176  # at least the rank-1 SVD
    assert auto_budget(Settings(n="auto", budget=1.0), 64, 176) == 64 * 176 - 1  # dense never fits
    assert auto_budget(Settings(n="auto", rel_tol=0.1), 64, 176) is None


def _decaying_and_tt(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(80, 48, generator=gen, dtype=torch.float64))
    return {"decaying": (u * 0.7 ** torch.arange(48, dtype=torch.float64)) @ v.T, "tt": _tt_rank_2(48, 80)}


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.6])
def test_member_for_budget_is_the_best_point_within_the_budget(fraction):
    """Brute force over every member's curve: nothing within the budget has a smaller error, and the chosen
    point's error is its decomposition's (a plain rebuild); one matrix alone, it is plan()'s entry."""
    for name, w in _decaying_and_tt(3).items():
        budget = int(fraction * w.numel())
        entry = member_for_budget(w, budget)
        point = entry.point
        assert point.params <= budget and point.member is not None
        candidates = [p for m in family_members(*w.shape) for p in member_curve(w, m)[1] if p.params <= budget]
        assert point.error <= min(p.error for p in candidates) * (1 + 1e-9) + 1e-15
        rebuilt = decompose(w, point.member.in_shape, point.member.out_shape, max_bond=point.ranks).to_dense()
        assert point.error == pytest.approx(float(((w - rebuilt) ** 2).sum() / (w ** 2).sum()), rel=1e-6, abs=1e-20)
        alone = plan({name: w}, budget).entries[name].point
        assert (alone.member, alone.ranks, alone.params) == (point.member, point.ranks, point.params)
    assert member_for_budget(_decaying_and_tt(3)["tt"], 300).point.member.n == 3  # far below the SVD's rank
    dense = member_for_budget(_decaying_and_tt(3)["decaying"], 48 * 80)
    assert dense.point.member is None and dense.point.error == 0  # dense fits and is best
    with pytest.raises(ValueError, match="budget must be >= 1"):
        member_for_budget(_decaying_and_tt(3)["tt"], 0)


def test_member_at_tolerance_has_the_fewest_entries_meeting_it():
    for w in _decaying_and_tt(4).values():
        point, mpo, sizes = member_at_tolerance(w, 0.05)
        by_member = {m.name: decompose(w, m.in_shape, m.out_shape, rel_tol=0.05) for m in family_members(*w.shape)}
        assert sizes == {k: m.num_params for k, m in by_member.items()}
        assert point.params == mpo.num_params == min(sizes.values())
        assert point.member.name == min(sizes, key=lambda k: (sizes[k], list(sizes).index(k)))
        err = float(((w - mpo.to_dense()) ** 2).sum() / (w ** 2).sum())
        assert point.error == pytest.approx(err, rel=1e-9, abs=1e-24) and math.sqrt(err) <= 0.05
    assert member_at_tolerance(_decaying_and_tt(4)["tt"], 0.05)[0].member.name == "mpo3"
    with pytest.raises(TypeError, match="rel_tol must be a float, got None"):
        member_at_tolerance(_decaying_and_tt(4)["tt"], None)
    with pytest.raises(ValueError, match="no member of cores"):
        member_at_tolerance(torch.randn(7, 11, dtype=torch.float64), 0.1, cores=(3,))
