"""Test configuration.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be
set before any module decorated with ``@triton.jit`` is imported, so it is set
here, at collection time, before the tests import ``mpo_core``.
"""
import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _skips_fail() -> bool:
    return bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure, unless the test needs CUDA (marked ``cuda``)."""
    outcome = yield
    report = outcome.get_result()
    if _skips_fail() and report.skipped and item.get_closest_marker("cuda") is None and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every CPU-runnable test must run: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Under CI=true a collection-time skip (a module-level ``pytest.importorskip`` or
    ``pytest.skip(allow_module_level=True)``) fails too: it would hide every test of the module."""
    outcome = yield
    report = outcome.get_result()
    if _skips_fail() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"collection skipped under CI=true, where every CPU-runnable test must run: {report.longrepr}"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skips cleanly without one)")


requires_cuda = pytest.mark.skipif(not _has_cuda, reason="needs a CUDA GPU")
