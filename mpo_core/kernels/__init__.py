"""Triton kernels, each file holding one kernel family and its launch helper only.

Nothing here decides *when* a kernel runs (device, dtype, backend): that policy lives
in :mod:`mpo_core.ops`. Modules are imported lazily by full path
(``mpo_core.kernels.layer_norm`` ...) so that importing :mod:`mpo_core` never imports
Triton, and so ``TRITON_INTERPRET`` can still be set before the first kernel import.
"""
