"""tests/conftest.py under CI=true: every skip of a CPU-runnable test fails, at run time and at
collection time (a module-level ``pytest.importorskip``); only tests marked ``cuda`` may skip."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")

SAMPLE = '''
import pytest

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_param_id_named_cuda(device):
    if device == "cuda":
        pytest.skip("no GPU")

@pytest.mark.cuda
def test_marked_cuda():
    pytest.skip("no GPU")
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("mpo_core_no_such_module")

def test_never_collected():
    pass
'''


def _run(tmp_path: Path, ci: bool) -> str:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_ci_turns_skips_into_failures(tmp_path):
    out = _run(tmp_path, ci=True)
    assert "FAILED test_sample.py::test_param_id_named_cuda[cuda]" in out, out
    assert "ERROR test_module_skip.py" in out and "collection skipped under CI=true" in out, out
    assert "1 failed, 1 passed, 1 skipped, 1 error" in out, out  # the skip is test_marked_cuda


def test_skips_allowed_outside_ci(tmp_path):
    out = _run(tmp_path, ci=False)
    assert "1 passed, 3 skipped" in out, out
