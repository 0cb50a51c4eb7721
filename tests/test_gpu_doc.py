"""``docs/gpu.md``'s list of GPU-only lines stays true, and ``scripts/coverage_check.py`` holds the
tests to it: a line never executed that the list lacks fails, so does a listed line that ran.

The whole suite under coverage is too slow for CI (``bash scripts/coverage.sh`` runs it by hand);
here the list is checked against the code (every entry's line exists, with a reason), and one
module (``mpo_core/gpu/timing.py``) is run under coverage through the script for real.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("coverage_check", ROOT / "scripts" / "coverage_check.py")
coverage_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = coverage_check
spec.loader.exec_module(coverage_check)


def test_every_listed_line_is_in_its_file_with_a_reason():
    listed = coverage_check.read_list()
    assert len(listed) >= 10
    for (path, code), reason in listed.items():
        lines = {line.strip() for line in (ROOT / path).read_text().splitlines()}
        assert code in lines, f"{path}: `{code}` is listed in docs/gpu.md but not in the file"
        assert len(reason) > 10, f"{path}: `{code}` has no reason"


def test_compare_names_unlisted_and_stale_lines():
    missing = {("a.py", "x()"): [3], ("a.py", "y()"): [4]}
    listed = {("a.py", "x()"): "GPU only", ("a.py", "z()"): "GPU only", ("b.py", "w()"): "GPU only"}
    unlisted, stale = coverage_check.compare(missing, listed, ["a.py"])
    assert unlisted == [("a.py", "y()")] and stale == [("a.py", "z()")]  # b.py was not compared


def test_the_timer_runs_everything_but_its_cuda_lines(capsys):
    """The real thing on one module: its tests under coverage, then the list decides."""
    status = coverage_check.main(["--files", "mpo_core/gpu/timing.py", "--", "tests/test_benchmarks.py", "-k",
                                  "time_calls or median_for or device_info_cpu"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "start.record()" in out and "NOT LISTED" not in out
