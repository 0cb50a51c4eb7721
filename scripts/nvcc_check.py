#!/usr/bin/env python3
"""Compile every ``csrc/cuda/*.cu`` with nvcc and judge ptxas' resource report (CI has no GPU).

The command line of :mod:`mpo_core.gpu.nvcc` (``python -m mpo_core.gpu.nvcc`` does the same)::

    python scripts/nvcc_check.py [--arch 75 80 90] [--json results/nvcc_check.json] [FILES...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpo_core.gpu.nvcc import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
