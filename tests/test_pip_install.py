"""``pip install -e .`` exactly as the README writes it, in a fresh venv, builds ``mpo_core._C``.

The fresh venv gets the running interpreter's torch (and numpy, scipy, ...) through a ``.pth``
file pointing at links to them, instead of a new 200 MB torch install: pip sees them installed
and downloads nothing but the build requirements (setuptools, wheel, ninja, pybind11: from pip's
cache or the configured index). The repository is mirrored into a fixed folder under
``~/.cache/mpo_core/fresh_install`` (files rewritten only when they changed, so their times
stay) and the object files are kept there (``MPO_CORE_BUILD_TEMP``): measured on 2 busy cores,
the first run compiles (4-5 min), later runs relink only (~20 s). Marked ``install`` (and
``slow``): ``-m "not install"`` leaves it out.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mpo_core" / "fresh_install"
SKIP_LINKS = ("mpo_core", "mpo-core", "__editable__", "_distutils_hack", "distutils-precedence", "pip", "setuptools",
              "pkg_resources", "wheel")

pytestmark = [pytest.mark.slow, pytest.mark.install]


def mirror_repository(dest: Path) -> None:
    """The files git tracks (and untracked ones it does not ignore) under ``dest``, rewritten only when changed."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src, dst = ROOT / name, dest / name
        if not src.is_file():
            continue
        data = src.read_bytes()
        if not dst.is_file() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)


def fresh_venv(where: Path, with_torch: bool) -> Path:
    """A new venv at ``where``; with ``with_torch``, the running interpreter's packages linked in (not copied)."""
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    python = where / "bin" / "python"
    if with_torch:
        links = where.parent / (where.name + "_links")
        shutil.rmtree(links, ignore_errors=True)
        links.mkdir()
        for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
            if not entry.name.startswith(SKIP_LINKS):
                (links / entry.name).symlink_to(entry)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "linked_packages.pth").write_text(str(links) + "\n")
    return python


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MPO_CORE_", "VIRTUAL_ENV", "PYTHON"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_pip_install_e_dot_builds_the_extension():
    repo = CACHE / "repo"
    mirror_repository(repo)
    for stale in (repo / "mpo_core").glob("_C*.so"):  # a leftover would pass the check without a build
        stale.unlink()
    python = fresh_venv(CACHE / "venv", with_torch=True)
    env = dict(clean_env(), MPO_CORE_BUILD_TEMP=str(CACHE / "build"))
    proc = subprocess.run([str(python), "-m", "pip", "install", "-e", "."], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = "import json, mpo_core; print(json.dumps([mpo_core.__file__, mpo_core.backends()]))"
    out = subprocess.run([str(python), "-c", probe], cwd="/", env=clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    where, backends = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(where).resolve() == (repo / "mpo_core" / "__init__.py").resolve()
    assert backends["cpp"] is True


def test_without_torch_the_install_stops_and_says_what_to_run(tmp_path):
    repo = CACHE / "repo"
    mirror_repository(repo)
    python = fresh_venv(tmp_path / "venv", with_torch=False)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-e", "."], cwd=repo, env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Install torch first" in proc.stdout + proc.stderr and "MPO_CORE_NO_EXT=1" in proc.stdout + proc.stderr
