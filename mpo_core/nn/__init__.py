"""``torch.nn`` building blocks: the MPO layer and the model surgery around it.

* :mod:`~mpo_core.nn.linear`: :class:`MPOLinear` (cores, shared cores, conversion, the forward);
* :mod:`~mpo_core.nn.dense`: :func:`is_linear`, :func:`linear_weight`, :func:`dense_from_weight` (``nn.Linear`` and transformers' ``Conv1D``);
* :mod:`~mpo_core.nn.surgery`: :func:`mpo_ify` / :func:`unmpo_ify`, :func:`set_trainable`, :func:`select_modules`,
  :func:`replace_module`, :func:`name_matcher`, :func:`num_parameters`, ...

Every name is importable from ``mpo_core.nn`` as before.
"""
from mpo_core.nn.dense import dense_from_weight, is_linear, linear_weight
from mpo_core.nn.linear import MPOLinear
from mpo_core.nn.surgery import (
    Include, MPOifyReport, dense_module, mpo_ify, name_matcher, num_parameters, progress_bar, replace_module,
    select_modules, set_trainable, shape_kwargs, unmpo_ify,
)

__all__ = ["Include", "MPOLinear", "MPOifyReport", "dense_from_weight", "dense_module", "is_linear", "linear_weight", "mpo_ify",
           "name_matcher", "num_parameters", "progress_bar", "replace_module", "select_modules", "set_trainable",
           "shape_kwargs", "unmpo_ify"]
