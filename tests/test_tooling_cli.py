"""The command lines of the tooling (``python -m mpo_core.gpu.nvcc`` / ``.gpu.aot`` /
``.cost.calibration``) and their error paths, and finding nvcc or the extension where they are
not: what a first run on a new machine goes through, executed here (``bash scripts/coverage.sh``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpo_core.gpu import aot, nvcc


def test_find_nvcc_under_cuda_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setattr(nvcc.shutil, "which", lambda name: None)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert nvcc.find_nvcc() == str(tmp_path / "bin" / "nvcc")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(nvcc, "Path", lambda p: tmp_path / "none" / str(p).lstrip("/"))  # no /usr/local/cuda either
    assert nvcc.find_nvcc() is None


def test_nvcc_check_arguments_and_missing_pieces(tmp_path, monkeypatch, capsys):
    for argv, message in ((["--arch", "5"], "--arch expects compute capabilities like 75 80 90, got [5]"),
                          (["--jobs", "0"], "--jobs must be >= 1, got 0"),
                          ([str(tmp_path / "missing.cu")], "files not found")):
        with pytest.raises(SystemExit) as exit_info:
            nvcc.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(nvcc, "find_nvcc", lambda explicit=None: None)
    assert nvcc.main([]) == 2
    assert "nvcc not found" in capsys.readouterr().err
    monkeypatch.setattr(nvcc, "find_nvcc", lambda explicit=None: "nvcc")
    monkeypatch.setattr(nvcc, "ROOT", tmp_path)  # a checkout without csrc/cuda/*.cu
    assert nvcc.main([]) == 1
    assert "no .cu files to compile" in capsys.readouterr().err


def test_aot_cli_compiles_the_registry_it_is_given(tmp_path, monkeypatch, capsys):
    from mpo_core.gpu import registry

    spec = next(s for s in registry.kernel_specs() if not s.uses_dot)  # one small kernel: seconds
    monkeypatch.setattr(registry, "kernel_specs", lambda dtypes: [spec])
    out = tmp_path / "aot.json"
    status = aot.main(["--arch", "80", "--jobs", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "1 kernel configs x 1 targets" in printed and spec.name in printed
    rows = json.loads(out.read_text())
    assert status in (0, 1) and spec.name in json.dumps(rows)
    with pytest.raises(FileNotFoundError, match="no-such-tool is not in Triton's wheel"):
        aot.triton_bin("no-such-tool")


def test_aot_refuses_a_cubin_whose_function_cuobjdump_does_not_list():
    """compile_spec runs outside the interpreter: in a subprocess, with cuobjdump's table read as empty."""
    code = ("from mpo_core.gpu import aot, registry\n"
            "spec = next(s for s in registry.kernel_specs() if not s.uses_dot)\n"
            "aot.parse_resource_usage = lambda text: {}\n"
            "try:\n    aot.compile_spec(spec, 80)\nexcept RuntimeError as exc:\n    print('refused:', exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "refused: cuobjdump reported no function" in proc.stdout, proc.stderr[-2000:]


def test_calibration_cli(monkeypatch, capsys, tmp_path):
    from mpo_core.cost import calibration
    from mpo_core.cost.devices import DEFAULT_MODELS

    monkeypatch.setenv("MPO_CORE_CACHE", str(tmp_path))
    with pytest.raises(SystemExit, match="no calibration cached at"):
        calibration.main(["--show"])
    measured = []
    monkeypatch.setattr(calibration, "use_calibration", lambda device, remeasure: measured.append(remeasure)
                        or DEFAULT_MODELS["cpu"])
    calibration.main([])
    assert measured == [True] and "us/op" in capsys.readouterr().out


def test_without_the_extension_backends_say_so(monkeypatch):
    from mpo_core import _backends

    def no_extension(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_backends.importlib, "import_module", no_extension)
    assert _backends._load_extension() is None


@pytest.mark.parametrize("module", ["mpo_core.gpu.nvcc", "mpo_core.gpu.aot", "mpo_core.cost.calibration"])
def test_module_entry_points(module):
    """``python -m`` runs ``main`` (``--help``: exit 0 before any work)."""
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
