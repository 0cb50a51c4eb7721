"""scripts/mutation_check.py stays in step with the kernels: every mutation applies to today's sources
(its snippet occurs exactly once), covers each kernel file, and the verdicts read pytest's outcome."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(_spec)
sys.modules["mutation_check"] = mutation_check
_spec.loader.exec_module(mutation_check)


def test_every_mutation_applies_to_the_current_sources():
    assert mutation_check.check_applicable(mutation_check.MUTATIONS) == []
    names = [m.name for m in mutation_check.MUTATIONS]
    assert len(names) == len(set(names))


def test_every_kernel_source_is_mutated_with_each_kind_of_bug():
    mutated = {m.path for m in mutation_check.MUTATIONS}
    kernels = {str(p.relative_to(ROOT)) for p in (ROOT / "mpo_core" / "kernels").glob("*.py") if p.stem != "__init__"}
    kernels |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")}
    kernels |= {"csrc/residual_layernorm_cpu.cpp"}
    assert kernels <= mutated, f"kernels no mutation touches: {sorted(kernels - mutated)}"
    kinds = " ".join(m.kind for m in mutation_check.MUTATIONS)
    for kind in ("sign", "off by one", "dropped scale", "wrong program order", "missing barrier", "uninitialised"):
        assert kind in kinds, kind


def test_check_applicable_reports_stale_snippets(tmp_path):
    (tmp_path / "k.py").write_text("a = 1\na = 1\n")
    stale = [mutation_check.Mutation("x/twice", "sign", "k.py", "a = 1", "a = -1", ()),
             mutation_check.Mutation("x/missing", "sign", "nope.py", "a", "b", ())]
    problems = mutation_check.check_applicable(stale, tmp_path)
    assert any("occurs 2 times" in p for p in problems) and any("does not exist" in p for p in problems)


def test_verdicts():
    assert mutation_check.verdict(0, "1 passed") == "survived"
    assert mutation_check.verdict(1, "FAILED tests/x.py::t - assert 0.5 < 2e-05") == "caught"
    assert mutation_check.verdict(-6, "Fatal Python error: Aborted") == "caught"
    assert mutation_check.verdict(1, "layernorm.cu:12:5: error: expected ';'") == "invalid"
    assert mutation_check.verdict(5, "no tests ran") == "invalid"
