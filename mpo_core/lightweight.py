"""MPOP's lightweight fine-tuning as a PEFT-style workflow: train the auxiliary cores only.

The chosen linear modules (``nn.Linear``, or transformers' ``Conv1D``) of a model are replaced by
their exact (or truncated) :class:`~mpo_core.nn.MPOLinear`; the central cores stay frozen and
only the auxiliary cores train (optionally also the chosen layers' biases, every LayerNorm, and
whole modules such as a classification head). The verbs are those of ``peft``::

    from mpo_core.lightweight import LightweightConfig, LightweightModel, get_lightweight_model

    config = LightweightConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_lightweight_model(base, config)       # base is changed in place, as peft does
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out")                       # only the trained tensors + JSON settings
    again = LightweightModel.from_pretrained(fresh_base, "out")
    merged = model.merge_and_unload()                  # the base architecture, plain modules

``peft`` (0.21) registers a tuner only under a name in its closed ``PeftType`` enum, so a new
method cannot be added without patching peft itself; this module mirrors its verbs instead.

Rebuilding from the base model: ``from_pretrained`` decomposes the base model's matrices again
with the saved shapes and bonds, and fixes the gauge of every bond (each singular vector's
largest entry positive, :func:`fix_gauge`), so the frozen central cores come out the same as
when training started and the saved auxiliaries fit them. A checksum of every central core is
saved and checked: a different base model is an error, never a silently wrong model.

Whole models (e.g. after :func:`mpo_core.compress`, whose cores no longer follow from the
base weights) are saved with :func:`save_mpo_model` and loaded with :func:`load_mpo_model`.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from mpo_core.io import atomic_write
from mpo_core.nn import MPOLinear, mpo_ify, num_parameters, replace_module, select_modules, unmpo_ify

__all__ = ["LightweightConfig", "LightweightModel", "get_lightweight_model", "fix_gauge",
           "mpo_layout", "save_mpo_model", "load_mpo_model"]

CONFIG_NAME = "mpo_adapter_config.json"
WEIGHTS_NAME = "mpo_adapter.safetensors"
LAYOUT_NAME = "mpo_layout.json"
MODEL_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_TRAIN = ("auxiliary", "all", "central")


@dataclass
class LightweightConfig:
    """Settings of a lightweight (auxiliary-only) fine-tuning run; saved as JSON beside the tensors.

    Parameters
    ----------
    target_modules : str or list of str
        Linear modules to replace by MPOs: a qualified name, a suffix of one (``"query"`` matches
        ``encoder.layer.0.attention.self.query``, as in peft) or a glob (``"*.attention.*"``).
        Each pattern must match at least one linear module.
    n : int, default 5
        Cores per matrix (balanced factorization).
    max_bond, rel_tol : optional
        Truncation when the MPOs are created (exact when both are ``None``), as :func:`mpo_core.decompose`.
    train : {"auxiliary", "all", "central"}, default "auxiliary"
        Which cores of the target modules train (``"auxiliary"``: MPOP's lightweight fine-tuning).
    train_bias : bool, default False
        Also train the target modules' biases.
    train_layer_norms : bool, default False
        Also train every LayerNorm (any module whose class name ends in ``LayerNorm`` or ``RMSNorm``).
    modules_to_save : list of str, optional
        Further modules (same pattern rules) trained and saved in full, e.g. ``["classifier"]``.
    """

    target_modules: str | list[str]
    n: int = 5
    max_bond: int | list[int] | None = None
    rel_tol: float | None = None
    train: str = "auxiliary"
    train_bias: bool = False
    train_layer_norms: bool = False
    modules_to_save: list[str] | None = None
    balance: bool = True
    """Cores in the balanced gauge (:meth:`~mpo_core.mpo.MPO.balanced`). Measured on all-MiniLM-L6-v2 (query/value,
    n=5, 3 seeds, one epoch): 0.752 +- 0.002 at lr 1e-3 against 0.744 +- 0.014 in the TT-SVD gauge (peft LoRA at the
    same trainable count: 0.751 +- 0.012). Configs saved before this field load with ``False``."""
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Filled by :func:`get_lightweight_model`: per target module its shapes, ranks, origin and central checksum."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, list) or not self.target_modules or \
                not all(isinstance(p, str) and p for p in self.target_modules):
            raise TypeError(f"target_modules must be a non-empty list of name patterns, got {self.target_modules!r}")
        if self.train not in _TRAIN:
            raise ValueError(f"train must be one of {_TRAIN}, got {self.train!r}")
        if self.modules_to_save is not None and (
                isinstance(self.modules_to_save, str) or not all(isinstance(p, str) for p in self.modules_to_save)):
            raise TypeError(f"modules_to_save must be a list of name patterns, got {self.modules_to_save!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": "mpo-lightweight", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LightweightConfig":
        if data.get("method") != "mpo-lightweight":
            raise ValueError(f"not an mpo-lightweight config (method={data.get('method')!r})")
        known = {f.name for f in fields(cls)}
        return cls(**{"balance": False, **{k: v for k, v in data.items() if k in known}})  # older: TT-SVD gauge


def fix_gauge(layer: MPOLinear) -> None:
    """Fix the sign freedom of every bond of ``layer`` in place (the dense ``W`` is unchanged).

    For bond ``k`` (between cores ``k`` and ``k + 1``) each index ``b`` is flipped, in core ``k``'s
    slice ``[..., b]`` and core ``k + 1``'s slice ``[b, ...]`` together, so that the largest-magnitude
    entry of core ``k``'s slice is positive. Two TT-SVDs of the same matrix then give equal cores
    even where the SVD routines chose opposite signs.
    """
    with torch.no_grad():
        for k in range(layer.n - 1):
            left, right = layer.cores[k], layer.cores[k + 1]
            flat = left.reshape(-1, left.shape[-1])
            signs = torch.sign(flat.gather(0, flat.abs().argmax(0, keepdim=True))).reshape(-1)
            signs[signs == 0] = 1
            left.mul_(signs)
            right.mul_(signs.reshape(-1, 1, 1, 1))


def _checksum(core: torch.Tensor) -> list[float]:
    """Norm and a fixed random projection of a core: equal cores give equal values to rounding."""
    flat = core.detach().double().reshape(-1).cpu()
    probe = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return [float(flat.norm()), float(flat @ probe) / math.sqrt(flat.numel())]


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm") or name.endswith("RMSNorm")


def _layer_record(layer: MPOLinear) -> dict[str, Any]:
    return {"in_features": layer.in_features, "out_features": layer.out_features, "in_shape": list(layer.in_shape),
            "out_shape": list(layer.out_shape), "ranks": layer.ranks, "bias": layer.bias is not None,
            "origin": layer.origin}


class LightweightModel(nn.Module):
    """A model whose target modules are MPOs with trainable auxiliaries; peft's ``PeftModel`` verbs.

    Build it with :func:`get_lightweight_model` or :meth:`from_pretrained`. Calls and unknown
    attributes go to :attr:`base_model`.
    """

    def __init__(self, base_model: nn.Module, config: LightweightConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.config_ = config
        self._merged: dict[str, MPOLinear] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    # ------------------------------------------------------------------ what trains
    def _trained_names(self) -> list[str]:
        """Qualified names (in ``base_model``) of the parameters this method trains and saves."""
        cfg, model = self.config_, self.base_model
        names: list[str] = []
        for name in cfg.layers:
            layer = model.get_submodule(name)
            if not isinstance(layer, MPOLinear):
                raise RuntimeError(f"module {name!r} is merged; call unmerge() first")
            for k in range(layer.n):
                central = k == layer.central_index
                if cfg.train == "all" or (cfg.train == "central") == central:
                    names.append(f"{name}.cores.{k}")
            if cfg.train_bias and layer.bias is not None:
                names.append(f"{name}.bias")
        chosen = [(n, m) for n, m in model.named_modules() if n and cfg.train_layer_norms and _is_norm(m)]
        if cfg.modules_to_save:
            chosen += select_modules(model, cfg.modules_to_save, "modules_to_save", kind=lambda m: True, what="module")
        for mod_name, module in chosen:
            names.extend(f"{mod_name}.{p}" for p, _ in module.named_parameters())
        return list(dict.fromkeys(names))

    def _apply_trainable(self) -> None:
        trained = set(self._trained_names())
        for name, param in self.base_model.named_parameters(remove_duplicate=False):
            param.requires_grad_(name in trained)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter entries (shared parameters counted once), as peft."""
        return num_parameters(self.base_model, trainable=True), num_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: X || all params: Y || trainable%: Z`` (peft's line)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (detached, contiguous CPU copies), by name in ``base_model``."""
        params = dict(self.base_model.named_parameters(remove_duplicate=False))
        return {name: params[name].detach().cpu().contiguous().clone() for name in self._trained_names()}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``mpo_adapter_config.json`` and ``mpo_adapter.safetensors`` (the trained tensors only).

        Each file is written atomically; the tensors file is written last and :meth:`from_pretrained`
        checks it against the config.
        """
        from safetensors.torch import save

        tensors = self.trainable_state_dict()
        config = self.config_.to_dict()
        config["trained_tensors"] = sorted(tensors)
        os.makedirs(save_directory, exist_ok=True)
        atomic_write(os.path.join(save_directory, CONFIG_NAME), json.dumps(config, indent=2).encode())
        atomic_write(os.path.join(save_directory, WEIGHTS_NAME), save(tensors, metadata={"format": "pt"}))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, is_trainable: bool = False) -> "LightweightModel":
        """Rebuild the MPOs of ``model`` (the same base model as at training) and load the saved tensors.

        Raises
        ------
        FileNotFoundError
            ``model_id`` lacks the config or the tensors file.
        ValueError
            The base model does not fit: a missing module, other shapes, or central cores that differ
            from the saved checksums (a different base checkpoint); tensors that do not match the config.
        """
        from safetensors.torch import load_file

        config_path, weights_path = (os.path.join(model_id, f) for f in (CONFIG_NAME, WEIGHTS_NAME))
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} not found: save_pretrained writes {CONFIG_NAME} and {WEIGHTS_NAME}")
        with open(config_path) as fh:
            data = json.load(fh)
        config = LightweightConfig.from_dict(data)
        wrapped = _inject(model, config, saved_layers=config.layers)
        tensors = load_file(weights_path)
        expected = data.get("trained_tensors", sorted(tensors))
        if sorted(tensors) != sorted(expected) or sorted(tensors) != sorted(wrapped._trained_names()):
            raise ValueError(f"{weights_path} holds tensors {sorted(tensors)[:5]}..., the config expects "
                             f"{sorted(wrapped._trained_names())[:5]}...")
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in tensors.items():
                if params[name].shape != value.shape:
                    raise ValueError(f"tensor {name!r} is {tuple(value.shape)} in {weights_path}, the model has "
                                     f"{tuple(params[name].shape)}")
                params[name].copy_(value)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return wrapped

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Contract every target MPO into its original dense module (``nn.Linear`` / ``Conv1D``); :meth:`unmerge` undoes it."""
        for name in self.config_.layers:
            layer = self.base_model.get_submodule(name)
            if isinstance(layer, MPOLinear):
                self._merged[name] = layer
        unmpo_ify(self.base_model, include=lambda name, mod: name in self._merged)

    def unmerge(self) -> None:
        """Put the MPO modules back (the dense copies made by :meth:`merge` are dropped)."""
        for name, layer in self._merged.items():
            replace_module(self.base_model, name, layer)
        self._merged.clear()

    def merge_and_unload(self) -> nn.Module:
        """Merge and return the base model: the original architecture, ready for ``save_pretrained``."""
        self.merge()
        self._merged.clear()
        return self.base_model


def _inject(model: nn.Module, config: LightweightConfig, saved_layers: dict[str, dict] | None = None) -> LightweightModel:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, MPOLinear) for m in model.modules()):
        raise ValueError("model already holds MPOLinear modules: pass the dense base model "
                         "(whole MPO models load with load_mpo_model)")
    targets = [name for name, _ in select_modules(model, config.target_modules, "target_modules")]
    if saved_layers is not None and sorted(targets) != sorted(saved_layers):
        raise ValueError(f"the base model's target modules {sorted(targets)[:4]}... differ from the saved "
                         f"{sorted(saved_layers)[:4]}...: a different model family or architecture")
    layers: dict[str, dict[str, Any]] = {}
    for name in targets:
        if saved_layers is None:
            kw = dict(n=config.n, max_bond=config.max_bond, rel_tol=config.rel_tol)
        else:
            rec = saved_layers[name]
            kw = dict(n=lambda i, o, rec=rec: (rec["in_shape"], rec["out_shape"]), max_bond=rec["ranks"])
        mpo_ify(model, include=lambda qual, mod, name=name: qual == name, balance=config.balance, **kw)
        layer = model.get_submodule(name)
        fix_gauge(layer)
        record = _layer_record(layer)
        record["central_checksum"] = _checksum(layer.central)
        if saved_layers is not None:
            _check_same(name, saved_layers[name], record)
        layers[name] = record
    config.layers = layers
    wrapped = LightweightModel(model, config)
    wrapped._apply_trainable()
    return wrapped


def _check_same(name: str, saved: dict[str, Any], built: dict[str, Any]) -> None:
    for key in ("in_shape", "out_shape", "ranks", "origin", "bias"):
        if saved[key] != built[key]:
            raise ValueError(f"module {name!r}: saved {key}={saved[key]!r}, the base model gives {built[key]!r}")
    for saved_v, built_v in zip(saved["central_checksum"], built["central_checksum"]):
        if abs(saved_v - built_v) > 1e-4 * max(1.0, abs(saved_v)):
            raise ValueError(f"module {name!r}: its central core differs from the one the tensors were trained with "
                             f"(checksum {built['central_checksum']} vs saved {saved['central_checksum']}): "
                             f"load onto the same base checkpoint")


def get_lightweight_model(model: nn.Module, config: LightweightConfig) -> LightweightModel:
    """Replace ``config.target_modules`` of ``model`` (in place) by MPOs and make only the chosen tensors trainable.

    Learning rate: a LoRA-like one, AdamW 3e-3 (1e-3 close behind), not full fine-tuning's. Measured on
    all-MiniLM-L6-v2, query/value, n=5, balanced cores, one epoch, mean of 3 seeds at 3e-4 / 1e-3 / 3e-3 / 1e-2
    (``benchmarks/real_checkpoint.py --sections peft``): pydoc-topics 0.613 / 0.752 / 0.760 / 0.466, stdlib-docs
    0.634 / 0.731 / 0.770 / 0.737; peft LoRA at the same trainable count 0.601 / 0.737 / 0.751 / 0.259 and
    0.625 / 0.724 / 0.758 / 0.270: the same best lr, and a softer fall above it.

    Raises
    ------
    ValueError
        A pattern matches no linear module (the message names it and lists available modules), or
        ``model`` already holds MPO modules.
    """
    if not isinstance(config, LightweightConfig):
        raise TypeError(f"config must be a LightweightConfig, got {type(config).__name__}")
    return _inject(model, config)


# ---------------------------------------------------------------------- whole MPO models
def mpo_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per :class:`MPOLinear` of ``model``: features, mode shapes, ranks, bias and original module kind."""
    return {name: _layer_record(mod) for name, mod in model.named_modules() if isinstance(mod, MPOLinear)}


def save_mpo_model(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Save a model holding MPO modules: ``config.json`` (when it has a transformers config),
    ``model.safetensors`` (every tensor, cores included) and ``mpo_layout.json``.

    The folder is written beside the target and renamed into place, so a failure leaves no
    half-written checkpoint.
    """
    from safetensors.torch import save_model

    layout = mpo_layout(model)
    if not layout:
        raise ValueError("model holds no MPOLinear module: save it with its own save_pretrained")
    target = os.path.abspath(os.fspath(save_directory))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        if getattr(model, "config", None) is not None and hasattr(model.config, "save_pretrained"):
            model.config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, MODEL_NAME))
        atomic_write(os.path.join(tmp, LAYOUT_NAME), json.dumps(layout, indent=2).encode())
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old.", dir=parent)
            os.replace(target, os.path.join(old, "x"))
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_mpo_model(model_class: type, save_directory: str | os.PathLike) -> nn.Module:
    """Load what :func:`save_mpo_model` wrote: ``model_class(config)`` (a transformers model class),
    its saved modules replaced by MPOs of the saved layout, every tensor loaded strictly. Sharded
    weights (``model.safetensors.index.json``, as ``python -m mpo_core.compress_checkpoint`` writes)
    load the same way."""
    from safetensors.torch import load_model

    layout_path, weights = (os.path.join(save_directory, f) for f in (LAYOUT_NAME, MODEL_NAME))
    index = os.path.join(save_directory, INDEX_NAME)
    for path in (layout_path, weights):
        if not os.path.isfile(path) and not (path == weights and os.path.isfile(index)):
            raise FileNotFoundError(f"{path} not found: save_mpo_model writes {LAYOUT_NAME} and {MODEL_NAME}")
    config_class = getattr(model_class, "config_class", None)
    if config_class is None:
        raise TypeError(f"model_class must be a transformers model class (with config_class), got {model_class!r}")
    with open(layout_path) as fh:
        layout = json.load(fh)
    config_path = os.path.join(save_directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: save_mpo_model writes it for models with a transformers config")
    with open(config_path) as fh:
        saved_type = json.load(fh).get("model_type")
    expected_type = getattr(config_class, "model_type", None)
    if expected_type and saved_type != expected_type:
        raise ValueError(f"{save_directory} holds a {saved_type!r} model; {model_class.__name__} expects {expected_type!r}: "
                         f"a checkpoint of the wrong family")
    model = model_class(config_class.from_pretrained(save_directory))
    for name, rec in layout.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{model_class.__name__} has no module {name!r} of the saved layout: "
                             f"a different model class or family") from None
        layer = MPOLinear(rec["in_features"], rec["out_features"], rec["in_shape"], rec["out_shape"],
                          max_bond=rec["ranks"], bias=rec["bias"])
        if layer.ranks != rec["ranks"]:
            raise ValueError(f"module {name!r}: saved ranks {rec['ranks']} exceed the full ranks {layer.ranks}")
        layer.origin = rec["origin"]
        layer.train(dense.training)
        replace_module(model, name, layer)
    if os.path.isfile(weights):
        load_model(model, weights, strict=True)
    else:
        _load_shards(model, save_directory, index)
    return model.eval()


def _load_shards(model: nn.Module, save_directory: str | os.PathLike, index: str) -> None:
    """Load the shards of a ``model.safetensors.index.json`` (as ``compress_checkpoint`` writes) strictly:
    a tensor the model lacks, or a model tensor no shard holds (other than a tied copy), is an error."""
    from safetensors.torch import load_file

    with open(index) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(save_directory, name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    loaded = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if k in params and params[k].data_ptr() not in loaded]  # tied copies are loaded
    if missing or unexpected:
        raise ValueError(f"{save_directory}: checkpoint and model disagree: missing {missing[:5]}, unexpected {unexpected[:5]}")
