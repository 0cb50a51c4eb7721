"""Argument checks shared by the fused ops: early, clear errors naming the argument."""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_input(name: str, x: object) -> torch.Tensor:
    """``x`` must be a floating tensor with at least one dim and a non-empty last dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one dim and a non-empty last dim, got shape {tuple(x.shape)}")
    return x


def check_like(name: str, t: object, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``t`` is ``None`` or a tensor of ``shape`` on ``x``'s device with a floating dtype."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like the input, got {t.device}")
    return t


def check_probability(name: str, p: object) -> float:
    """``p`` must be a real number in ``[0, 1]``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(p)


def check_eps(eps: object) -> float:
    """``eps`` must be a finite, non-negative real number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps < float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return float(eps)
