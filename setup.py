"""Build mpo-core and its extension ``mpo_core._C``.

The C++ (CPU) sources in ``csrc/`` are always built; the CUDA sources in
``csrc/cuda/`` only when a CUDA toolchain *and* a CUDA build of torch are
present (``TORCH_CUDA_ARCH_LIST`` picks the architectures, as usual for
``torch.utils.cpp_extension``). Set ``MPO_CORE_NO_EXT=1`` to skip the
extension entirely; the package then runs on its pure torch/Triton paths.

Install with ``pip install --no-build-isolation -e .`` (torch must already be
installed; an isolated build would download a multi-GB CUDA torch).
"""
from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("MPO_CORE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # no torch in the build env: pure-Python install
        return [], {}
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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
        "test": ["pytest", "hypothesis", "tensorly", "tntorch", "transformers"],
    },
    entry_points={"console_scripts": ["mpobert=mpobert.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
