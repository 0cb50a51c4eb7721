"""Build mpo-core and its extension ``mpo_core._C``.

The C++ (CPU) sources in ``csrc/`` are always built; the CUDA sources in
``csrc/cuda/`` only when a CUDA toolchain *and* a CUDA build of torch are
present (``TORCH_CUDA_ARCH_LIST`` picks the architectures, as usual for
``torch.utils.cpp_extension``). Set ``MPO_CORE_NO_EXT=1`` to skip the
extension entirely; the package then runs on its pure torch/Triton paths.

The extension is built against the torch it will run with, the one installed in the target
environment. ``pip install -e .`` as written works: pip's isolated build environment has no
torch (``pyproject.toml`` must not require one: pip would download a multi-GB CUDA wheel into
it), so this script asks the same interpreter, outside the isolation, where its torch is and
builds against that one (saying so). ``pip install --no-build-isolation -e .`` (the set-up
scripts' route) imports it directly. With no torch installed at all it stops with the command
to run first: it never ends in silence with no extension. ``MPO_CORE_BUILD_TEMP=DIR`` keeps the
object files in ``DIR`` between builds (ninja then recompiles only what changed).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

from setuptools import find_packages, setup

NO_TORCH = (
    "mpo-core builds its C++ extension against the torch it runs with, and none is installed in "
    "this environment ({python}). Install torch first (CPU: pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu; CUDA: see README), then pip install -e . again; or set "
    "MPO_CORE_NO_EXT=1 for a pure-Python install (torch/Triton paths only)."
)


def _target_torch_dir() -> str | None:
    """The ``site-packages`` folder holding torch for this interpreter outside pip's isolated build
    environment (pip isolates through ``PYTHONPATH`` / ``PYTHONNOUSERSITE``), or ``None``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = ("import importlib.util, json, os; s = importlib.util.find_spec('torch'); "
             "print(json.dumps(None if s is None else os.path.dirname(os.path.dirname(s.origin))))")
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                             cwd=os.path.expanduser("~"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _import_torch():
    """The installed torch: importable here, or found outside pip's build isolation and put on ``sys.path``."""
    if importlib.util.find_spec("torch") is None:
        where = _target_torch_dir()
        if where is None:
            raise SystemExit(NO_TORCH.format(python=sys.executable))
        sys.path.append(where)  # after the build environment's own packages, so its setuptools stay first
        import torch

        print(f"mpo-core: building mpo_core._C against torch {torch.__version__} from {where} "
              "(the target environment's; pip's isolated build environment has none)", file=sys.stderr, flush=True)
        return torch
    import torch

    return torch


def _extensions():
    if os.environ.get("MPO_CORE_NO_EXT") == "1":
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    # csrc/cuda/*.cu are plain CUDA (no torch headers); csrc/cuda/*.cpp is their torch glue.
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("MPO_CORE_FORCE_CPU_EXT") == "1":
        with_cuda = False
    # torch 2.13's headers (and its cpp_extension default) are C++20; the .cu files are
    # plain C++17 CUDA, checked by scripts/nvcc_check.py with the same nvcc flags. No
    # --use_fast_math: it turns tanhf/expf into approximations that fp32 GELU would not survive.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    define_macros = [("MPO_CORE_WITH_CUDA", "1")] if with_cuda else []
    if with_cuda:
        ext = CUDAExtension(
            "mpo_core._C",
            cpp_sources + cuda_sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "mpo_core._C",
            cpp_sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build = BuildExtension.with_options(use_ninja=True)
    keep = os.environ.get("MPO_CORE_BUILD_TEMP")
    if keep:  # a persistent object folder: ninja then recompiles only what changed (tests reuse it)
        class KeptBuild(build):
            def finalize_options(self):
                super().finalize_options()
                self.build_temp = os.path.abspath(keep)

        build = KeptBuild
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _extensions()

setup(
    name="mpo-core",
    version="0.1.0",
    description="Matrix product operator (tensor-train matrix) factorization for PyTorch, with fused kernels, and MPOBERT",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpo_core", "mpo_core.*", "mpobert", "mpobert.*"]),
    install_requires=["torch>=2.1", "numpy", "scipy", "tokenizers"],
    extras_require={
        "triton": ["triton"],
        "mpobert": ["tqdm", "safetensors", "pyyaml"],
        "test": ["pytest", "hypothesis", "coverage>=7.10", "tensorly", "tntorch", "transformers"],
    },
    entry_points={"console_scripts": ["mpobert=mpobert.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
