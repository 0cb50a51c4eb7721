"""Input statistics and whitening: factorizations that minimise the output error ``||X W - X W'||_F``.

A layer ``y = x @ W`` (``W``: ``I x J``, rows are inputs) sees inputs ``X`` (one row per token).
With the input Gram ``G = X^T X = L L^T`` (``L`` lower triangular, Cholesky),

    ||X (W - W')||_F^2 = tr((W - W')^T G (W - W')) = ||L^T (W - W')||_F^2,

so factorizing ``L^T W`` and multiplying the result by ``L^{-T}`` minimises the error the layer's
outputs feel instead of the weight error (SVD-LLM's truncation-aware whitening, Wang et al. 2024).
For the truncated SVD, and for every MPO whose first core holds all input modes, ``L^{-T}`` is absorbed
into that first core exactly (``"exact"``). An MPO that spreads the input modes over its cores cannot
absorb a general ``L^{-T}``; there the Gram is replaced by the Kronecker product of its per-mode Grams
(``G ≈ G_1 ⊗ ... ⊗ G_n``, each the partial trace of ``G`` over the other modes, K-FAC style) whose
factors are absorbed core by core (``"kronecker"``): the certified bound then holds in that Kronecker
norm, and :func:`output_error` computes the error in the exact one.

:class:`InputStats` accumulates ``G`` in float64, streamed one batch at a time;
:func:`collect_input_stats` fills one per module of a model from calibration batches through forward
hooks; :func:`whitening_factor` turns a Gram into ``L``, regularising a rank-deficient one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["InputStats", "Whitening", "collect_input_stats", "kronecker_factors", "model_output", "output_error",
           "run_model", "whitening_factor"]

DEFAULT_DAMPING = 1e-6
"""Ridge added to a rank-deficient Gram, relative to the mean of its diagonal."""
DEFICIENT_RCOND = 1e-10
"""A Gram whose smallest eigenvalue is at most this fraction of its largest counts as rank-deficient."""


class InputStats:
    """The float64 Gram ``X^T X`` of a layer's inputs, accumulated one batch at a time.

    Parameters
    ----------
    features : int
        Size of the input's last dimension (``I``).
    name : str
        Used in error messages (the module's name).
    """

    def __init__(self, features: int, name: str = "input") -> None:
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1, got {features!r}")
        self.features = features
        self.name = name
        self.gram: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` (``(..., features)``); with ``mask`` (``x.shape[:-1]``, bool), only the kept rows."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"the input of {self.name} must be a floating tensor, got {type(x).__name__}")
        if x.shape[-1] != self.features:
            raise ValueError(f"the input of {self.name} has {x.shape[-1]} features, expected {self.features}")
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            x = x[mask.to(torch.bool)]
        rows = x.detach().reshape(-1, self.features).to(torch.float64)
        gram = rows.mT @ rows
        self.gram = gram if self.gram is None else self.gram + gram
        self.count += rows.shape[0]

    def checked_gram(self) -> torch.Tensor:
        """The Gram, after checking that it exists and is finite (``ValueError`` naming the module otherwise)."""
        if self.gram is None or self.count == 0:
            raise ValueError(f"calibration gave no inputs to {self.name}: the calibration batches never reached it")
        if not bool(torch.isfinite(self.gram).all()):
            raise ValueError(f"the calibration statistics of {self.name} contain NaN or Inf "
                             f"(the model produced non-finite activations on the calibration batches)")
        return self.gram


@dataclass
class Whitening:
    """A whitening factor ``L`` (``G + ridge I = L L^T``) and how it was obtained."""

    factor: torch.Tensor
    """Lower-triangular ``I x I`` float64 Cholesky factor."""
    gram: torch.Tensor
    """The (regularised) Gram it factors."""
    ridge: float
    """Absolute ridge added to the diagonal (0 unless the Gram was rank-deficient)."""
    rank_deficient: bool
    """Whether the Gram was numerically rank-deficient (then ``ridge > 0``)."""

    def describe(self) -> str:
        if not self.rank_deficient:
            return "full-rank input Gram"
        return f"rank-deficient input Gram regularised with ridge {self.ridge:.3g}"


def whitening_factor(gram: torch.Tensor | Whitening, damping: float = DEFAULT_DAMPING, name: str = "input_cov"
                     ) -> Whitening:
    """The Cholesky factor of an input Gram, regularised when it is rank-deficient.

    Parameters
    ----------
    gram : torch.Tensor or Whitening
        ``X^T X`` (``I x I``, symmetric positive semi-definite); a :class:`Whitening` is returned unchanged.
    damping : float
        Ridge, relative to the mean diagonal, added when the smallest eigenvalue is at most
        ``DEFICIENT_RCOND`` of the largest (and, doubling, until the Cholesky factorization succeeds).
    name : str
        The argument's name in error messages.

    Raises
    ------
    TypeError
        Not a floating tensor.
    ValueError
        Not square, NaN/Inf entries, not symmetric, a negative diagonal, or all zeros.
    """
    if isinstance(gram, Whitening):
        return gram
    if not isinstance(gram, torch.Tensor) or not gram.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor (the input Gram X^T X), got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"{name} must be a square matrix (features x features), got shape {tuple(gram.shape)}")
    g = gram.detach().to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")
    scale = float(g.abs().max())
    if scale == 0.0:
        raise ValueError(f"{name} is all zeros: the inputs it was gathered from are all zero")
    if float((g - g.mT).abs().max()) > 1e-8 * scale:
        raise ValueError(f"{name} must be symmetric (an input Gram X^T X)")
    g = (g + g.mT) / 2
    diag = g.diagonal()
    if bool((diag < 0).any()):
        raise ValueError(f"{name} has negative diagonal entries: it is not a Gram matrix X^T X")
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and damping > 0):
        raise ValueError(f"damping must be a float > 0, got {damping!r}")
    eig = torch.linalg.eigvalsh(g)
    deficient = float(eig[0]) <= DEFICIENT_RCOND * float(eig[-1])
    ridge = damping * float(diag.mean()) if deficient else 0.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(60):
        regular = g + ridge * eye if ridge else g
        factor, info = torch.linalg.cholesky_ex(regular)
        if int(info) == 0:
            return Whitening(factor, regular, ridge, deficient)
        deficient = True
        ridge = max(2 * ridge, damping * float(diag.mean()))
    raise ValueError(f"{name} could not be factored even with ridge {ridge:.3g}: it is not positive semi-definite")


def kronecker_factors(whitening: Whitening, in_shape: Sequence[int]) -> list[Whitening]:
    """Per-mode whitening factors for ``in_shape``: Cholesky factors of the partial traces of the Gram.

    ``G_k = tr_{l != k} G / tr(G)^{(n-1)/n}``, so that ``G_1 ⊗ ... ⊗ G_n`` has the trace of ``G``
    (and equals ``G`` when ``G`` is itself such a Kronecker product of positive definite factors).
    """
    g = whitening.gram
    n = len(in_shape)
    if math.prod(in_shape) != g.shape[0]:
        raise ValueError(f"in_shape={tuple(in_shape)} has product {math.prod(in_shape)}, the Gram has {g.shape[0]} rows")
    t = g.reshape(*in_shape, *in_shape)
    trace = float(g.diagonal().sum())
    factors = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    for k in range(n):
        rows = list(letters[:n])
        cols = list(letters[:n])
        cols[k] = "Z"
        part = torch.einsum(f"{''.join(rows)}{''.join(cols)}->{rows[k]}Z", t)
        part = part / trace ** ((n - 1) / n)
        factors.append(whitening_factor(part, name=f"the mode-{k} input Gram"))
    return factors


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W - W')||_F = sqrt(tr((W - W')^T G (W - W')))`` for ``G = X^T X`` (``W``: ``I x J``)."""
    delta = (weight.to(torch.float64) - approx.to(torch.float64))
    value = float(((gram.to(torch.float64) @ delta) * delta).sum())
    return math.sqrt(max(value, 0.0))


def run_model(model: nn.Module, batch: Any, index: int = 0) -> Any:
    """``model(**batch)`` for a mapping, ``model(batch)`` for a tensor; ``ValueError`` naming the batch if it does not fit."""
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, torch.Tensor):
            return model(batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"calibration batch {index} does not fit the model: {type(exc).__name__}: {exc}") from exc
    raise TypeError(f"calibration batches must be dicts of model inputs or tensors, batch {index} is "
                    f"{type(batch).__name__}")


def model_output(output: Any) -> torch.Tensor:
    """The tensor a model's outputs are compared by: ``last_hidden_state``, else ``logits``, else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "logits"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find a tensor in the model's output ({type(output).__name__})")


def _batch_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"]
    return None


def collect_input_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration: Iterable[Any],
    features: Mapping[str, int],
) -> dict[str, InputStats]:
    """Input Grams of ``modules`` over the calibration batches, gathered by forward hooks (float64, streamed).

    Parameters
    ----------
    model : nn.Module
        Run in eval mode under ``torch.no_grad`` (its mode is restored after).
    modules : mapping of str to nn.Module
        The layers whose inputs to gather, by name.
    calibration : iterable
        Model inputs: a dict is passed as ``model(**batch)``, a tensor as ``model(batch)``. Where a dict
        holds an ``attention_mask`` of the inputs' ``(batch, tokens)`` shape, padding tokens are left out.
    features : mapping of str to int
        The input size each module expects.

    Raises
    ------
    ValueError
        No batches, a batch that does not fit the model or a module's input size, a module never reached,
        NaN/Inf in the statistics. Nothing in the model changes either way.
    """
    stats = {name: InputStats(features[name], name) for name in modules}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, _output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"{name} was called without a tensor input")
            stats[name].update(args[0], current["mask"])
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in modules.items()]
    was_training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(calibration):
                current["mask"] = _batch_mask(batch)
                run_model(model, batch, index)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration must hold at least one batch")
    for st in stats.values():
        st.checked_gram()
    return stats
