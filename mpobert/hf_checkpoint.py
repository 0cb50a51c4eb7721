"""Reading local Hugging Face checkpoints without ``transformers``: ``config.json`` plus
``model.safetensors`` (needs the ``safetensors`` package) or ``pytorch_model.bin``; the state with
its base-model prefix stripped and checked look-ups; the MPOBERT config of a BERT/ALBERT/RoBERTa one.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from mpobert.config import HIDDEN_ACTS, MPOBertConfig

__all__ = ["read_hf_checkpoint", "CheckpointState", "hf_config"]


def read_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a local Hugging Face checkpoint directory: ``(config dict, state dict)``.

    Reads ``model.safetensors`` (with the ``safetensors`` package) or ``pytorch_model.bin``.
    Raises ``ValueError`` for a missing/invalid ``config.json`` or unreadable weights.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory")
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {path!r} has no config.json") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path!r} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path!r} must hold a JSON object")
    st_path, bin_path = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.exists(st_path):
            try:
                from safetensors.torch import load_file
            except ImportError:
                if not os.path.exists(bin_path):
                    raise ValueError(f"{st_path!r} needs the 'safetensors' package (pip install safetensors)") from None
            else:
                return config, load_file(st_path)
        if os.path.exists(bin_path):
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{bin_path!r} does not hold a state dict")
            return config, state
    except ValueError:
        raise
    except Exception as exc:  # safetensors / torch raise various types on corrupt files
        raise ValueError(f"cannot read the weights in {path!r}: {exc}") from exc
    raise ValueError(f"checkpoint {path!r} has neither model.safetensors nor pytorch_model.bin")


class CheckpointState:
    """A checkpoint state dict with the base-model prefix stripped and checked look-ups (float64)."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.raw = state
        self.base = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.base:
            raise ValueError(f"checkpoint is missing tensor {key!r}")
        t = self.base[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t.detach().to(torch.float64)


def hf_config(hf: dict[str, Any], model_type: str, overrides: dict[str, Any]) -> MPOBertConfig:
    """The :class:`~mpobert.config.MPOBertConfig` of a ``model_type`` checkpoint's ``config.json`` dict, with ``overrides``."""
    if hf.get("model_type", model_type) != model_type:
        raise ValueError(f"expected a {model_type} checkpoint, config.json says model_type={hf.get('model_type')!r}")
    act = hf.get("hidden_act", "gelu")
    if act not in HIDDEN_ACTS:
        raise ValueError(f"unsupported hidden_act {act!r} in the checkpoint; supported: {sorted(HIDDEN_ACTS)}")
    try:
        base = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"], hidden_act=act,
            hidden_dropout=hf.get("hidden_dropout_prob", 0.0), attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
            max_position_embeddings=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pad_token_id=hf.get("pad_token_id") or 0,
            initializer_range=hf.get("initializer_range", 0.02),
            embedding_size=hf.get("embedding_size", hf["hidden_size"]),
        )
    except KeyError as exc:
        raise ValueError(f"checkpoint config.json lacks {exc.args[0]!r}") from None
    if model_type == "albert" and hf.get("classifier_dropout_prob") is not None:
        base["classifier_dropout"] = hf["classifier_dropout_prob"]
    return MPOBertConfig(**{**base, **overrides})
