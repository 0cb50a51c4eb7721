"""Optimizers and learning-rate schedules for MPOBERT: AdamW, LAMB, warmup + linear decay.

LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning", Algorithm 2),
per parameter tensor ``w`` with gradient ``g`` at step ``t``::

    m = β1·m + (1−β1)·g          v = β2·v + (1−β2)·g²
    m̂ = m / (1−β1^t)             v̂ = v / (1−β2^t)        (bias correction)
    u = m̂ / (√v̂ + ε) + λ·w
    r = ‖w‖ / ‖u‖  if both norms are > 0, else 1             (trust ratio)
    w ← w − lr·r·u
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

NO_DECAY_KEYWORDS: tuple[str, ...] = ("bias", "norm", "LayerNorm")
"""Parameter names containing one of these get no weight decay (with every 1-D parameter)."""


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


class LAMB(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training (LAMB), see the module docstring.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups.
    lr : float
        Learning rate.
    betas : (float, float)
        Moment decay rates.
    eps : float
        Added to ``√v̂``.
    weight_decay : float
        Decoupled weight decay ``λ`` (added to the update before the trust ratio).
    """

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6, weight_decay: float = 0.0,
    ) -> None:
        _check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one LAMB step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LAMB does not support sparse gradients")
                dt = p.dtype if p.dtype == torch.float64 else torch.float32  # fp32 math for fp32/bf16/fp16
                g = p.grad.to(dt)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                m_hat = m / (1.0 - beta1**t)
                v_hat = v / (1.0 - beta2**t)
                w = p.to(dt)
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(w, alpha=group["weight_decay"])
                w_norm, u_norm = w.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.copy_((w - group["lr"] * trust * update).to(p.dtype))
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and undecayed biases / norms / 1-D parameters.

    Parameters shared between modules appear once (``named_parameters`` deduplicates).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_KEYWORDS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def build_optimizer(
    model: nn.Module, name: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW (torch's) or :class:`LAMB` over :func:`param_groups` of ``model``.

    Parameters
    ----------
    model : nn.Module
        Its trainable parameters are optimized.
    name : {"adamw", "lamb"}
        Optimizer.
    lr, weight_decay, betas : float
        Hyper-parameters (weight decay only on matrices).
    eps : float, optional
        Defaults to 1e-8 for AdamW and 1e-6 for LAMB.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in ("adamw", "lamb"):
        raise ValueError(f"optimizer name must be 'adamw' or 'lamb', got {name!r}")
    eps = (1e-8 if key == "adamw" else 1e-6) if eps is None else eps
    _check_hparams(lr, betas, eps, weight_decay)
    groups = param_groups(model, weight_decay)
    if key == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return LAMB(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class WarmupLinearSchedule:
    """LR multiplier: linear warmup from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    ``factor(s) = s / warmup`` for ``s < warmup``, else ``max(0, (total − s) / (total − warmup))``.
    A picklable callable for ``torch.optim.lr_scheduler.LambdaLR`` (its state is saved with it).
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.total_steps == self.warmup_steps:
            return 0.0
        return max(0.0, (self.total_steps - step) / (self.total_steps - self.warmup_steps))


def warmup_linear_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :class:`WarmupLinearSchedule` to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearSchedule(warmup_steps, total_steps))
