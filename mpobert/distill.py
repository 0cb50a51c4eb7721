"""Distillation: a pretrained Hugging Face encoder (the teacher) brought back into its MPOBERT conversion.

The student starts as the teacher's conversion (:meth:`MPOBertModel.from_bert` /
:meth:`~MPOBertModel.from_albert` / RoBERTa through ``from_bert``) and is trained with the
ordinary :class:`~mpobert.train.Trainer` to reproduce the teacher on plain text:

* ``hidden``: relative squared error ``||h_s - h_t||² / ||h_t||²`` of the hidden states of the
  chosen teacher layers (0 = embeddings output, ``L`` = last layer; padding excluded);
* ``cosine``: ``1 - cos`` of the mean-pooled last hidden states (the sentence embedding);
* ``attention``: KL divergence of the attention probabilities of the chosen layers
  (teacher ‖ student, averaged over heads and query tokens);
* ``logits``: KL divergence of the MLM distributions at temperature ``T`` (times ``T²``), on
  inputs with 15% of the tokens masked; needs a teacher with an MLM head.

The loss is the weighted sum; each term and its weight is an option of ``python -m mpobert
distill``. For the first ``teacher_input_steps`` micro-batches every student layer is fed the
teacher's hidden state instead of the previous student layer's output (layer-local matching:
each layer learns its own map without the others' errors compounding; measured on a 6-layer
BERT it reached a held-out cosine of 0.39 in 20 steps where end-to-end matching reached 0.14 in
26), then training goes end to end. :func:`evaluate_distillation` measures the student against the teacher on held-out
text: the mean-pooled sentence-embedding cosine, each layer's relative hidden-state error and,
where the teacher has an MLM head, how often the student's top-1 MLM prediction agrees with
the teacher's at masked positions.

``transformers`` is needed here (teacher and tokenizer); it is imported lazily.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mpo_core.io import atomic_write
from mpobert.data import StreamBatches, pad_collate
from mpobert.data.pretraining import corpus_files
from mpobert.layers import attention_bool_mask
from mpobert.options import nested, option
from mpobert.train import TrainConfig, Trainer, setup_distributed

__all__ = [
    "TEACHER_FAMILIES", "Teacher", "load_teacher", "convert_student", "TextStream", "DistillLoss",
    "Distiller", "DistillOutput", "evaluate_distillation", "format_comparison", "teacher_layer_list", "DistillConfig",
    "distill",
]

TEACHER_FAMILIES = ("bert", "albert", "roberta")
"""``model_type`` values of the teacher checkpoints :func:`load_teacher` accepts."""

_MLM_ARCHS = ("ForMaskedLM", "ForPreTraining")


# ---------------------------------------------------------------------------- teacher
@dataclass
class Teacher:
    """A loaded teacher: the ``transformers`` model (eval mode, frozen), its tokenizer and facts about it.

    Attributes
    ----------
    model : nn.Module
        ``AutoModelForMaskedLM`` when the checkpoint has an MLM head, else ``AutoModel``.
    tokenizer : transformers tokenizer
    family : str
        One of :data:`TEACHER_FAMILIES`.
    path : str
    has_mlm : bool
    num_layers : int
    num_params : int
        Unique parameters (tied tensors once).
    """

    model: nn.Module
    tokenizer: Any
    family: str
    path: str
    has_mlm: bool
    num_layers: int
    num_params: int

    @property
    def encoder(self) -> nn.Module:
        """The base encoder (``BertModel``, ...) inside an MLM model, or the model itself."""
        return getattr(self.model, self.model.base_model_prefix, self.model)

    def __call__(self, batch: dict[str, torch.Tensor], attentions: bool = False, logits: bool = False) -> Any:
        """Hidden states (and attentions / MLM logits) of ``batch``, without gradients."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if self.family == "roberta":
            inputs.pop("token_type_ids", None)  # RoBERTa has a single token type
        net = self.model if logits else self.encoder
        with torch.no_grad():
            return net(**inputs, output_hidden_states=True, output_attentions=attentions)


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_teacher(path: str | os.PathLike, attentions: bool = False) -> Teacher:
    """Load a local BERT / ALBERT / RoBERTa checkpoint directory (no network) as the teacher.

    Parameters
    ----------
    path : path-like
        Directory with ``config.json``, the weights and the tokenizer files.
    attentions : bool
        Load with eager attention so that attention probabilities can be returned.

    Raises
    ------
    ValueError
        Missing directory/config/tokenizer, or a ``model_type`` outside :data:`TEACHER_FAMILIES`.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"teacher path {path!r} is not a directory (expected a Hugging Face checkpoint directory)")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"teacher {path!r} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            hf = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path!r} is not valid JSON: {exc}") from exc
    family = hf.get("model_type") if isinstance(hf, dict) else None
    if family not in TEACHER_FAMILIES:
        raise ValueError(f"teacher {path!r} has model_type={family!r}; expected one of {list(TEACHER_FAMILIES)}")
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    has_mlm = any(a.endswith(_MLM_ARCHS) for a in hf.get("architectures") or [])
    kwargs = {"attn_implementation": "eager"} if attentions else {}
    try:
        model = (AutoModelForMaskedLM if has_mlm else AutoModel).from_pretrained(path, local_files_only=True, **kwargs)
    except OSError as exc:
        raise ValueError(f"cannot load the teacher weights from {path!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot load the teacher's tokenizer from {path!r} (vocab/tokenizer files): {exc}") from exc
    model.eval().requires_grad_(False)
    return Teacher(model, tokenizer, family, path, has_mlm, int(hf["num_hidden_layers"]), _unique_params(model))


_MLM_HEAD_KEYS = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
    "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
}


def convert_student(teacher: Teacher, **overrides: Any) -> nn.Module:
    """The teacher's MPOBERT conversion: :class:`~mpobert.MPOBertForPreTraining` (MLM head copied) when the
    teacher has an MLM head, else :class:`~mpobert.MPOBertModel`. ``overrides`` are config fields
    (``num_groups``, ``adapter_rank``, ...) and, for BERT/RoBERTa, ``central_from``."""
    from mpobert import MPOBertForPreTraining, MPOBertModel

    cls = MPOBertForPreTraining if teacher.has_mlm else MPOBertModel
    if teacher.family == "albert":
        overrides.pop("central_from", None)
        student = cls.from_albert(teacher.path, **overrides)
    else:
        student = cls.from_bert(teacher.path, **overrides)
    if teacher.has_mlm and teacher.family != "albert":  # from_albert copies ALBERT's heads itself
        _copy_mlm_head(student, teacher)
    return student


def _copy_mlm_head(student: nn.Module, teacher: Teacher) -> None:
    dense, ln, bias = _MLM_HEAD_KEYS[teacher.family]
    state = teacher.model.state_dict()
    head = student.mlm
    pairs = [(head.dense.weight, dense + ".weight"), (head.dense.bias, dense + ".bias"), (head.ln_weight, ln + ".weight"),
             (head.ln_bias, ln + ".bias"), (head.bias, bias)]
    with torch.no_grad():
        for param, key in pairs:
            if key not in state or state[key].shape != param.shape:
                raise ValueError(f"teacher MLM head tensor {key!r} is missing or has shape "
                                 f"{tuple(state[key].shape) if key in state else None}, expected {tuple(param.shape)}")
            param.copy_(state[key])


def check_vocabulary(student: nn.Module, teacher: Teacher) -> None:
    """Raise ``ValueError`` unless the student's vocabulary is the teacher's tokenizer's."""
    n_tok, n_student = len(teacher.tokenizer), student.config.vocab_size
    n_teacher = teacher.encoder.config.vocab_size
    if n_student != n_teacher or n_tok > n_student:
        raise ValueError(f"vocabulary mismatch: student vocab_size={n_student}, teacher vocab_size={n_teacher}, "
                         f"teacher tokenizer {n_tok} tokens; the student must use the teacher's vocabulary")


# ---------------------------------------------------------------------------- text
class TextStream:
    """Token sequences from plain-text files, streamed, resumable, with held-out documents.

    A document is a run of non-empty lines (blank lines separate documents). Its lines are
    tokenized and packed greedily into sequences of at most ``max_seq_len`` tokens (special
    tokens included; a longer line is cut). Document ``k`` (0-based, counted over all files)
    is held out when ``k % holdout_every == 0``: the ``"train"`` split skips those documents,
    the ``"heldout"`` split yields only them (``holdout_every = 0``: nothing held out).

    Parameters
    ----------
    files : sequence of path-like
    tokenizer : transformers tokenizer
        A ``transformers`` tokenizer (``__call__`` with ``truncation``/``max_length``).
    max_seq_len : int
    split : {"train", "heldout"}
    holdout_every : int
    loop : bool
        Start a new epoch after the last file (the training stream); otherwise stop.
    """

    def __init__(self, files: Sequence[str | os.PathLike], tokenizer: Any, max_seq_len: int = 128, split: str = "train",
                 holdout_every: int = 20, loop: bool = True) -> None:
        self.files = corpus_files(files)
        if not isinstance(max_seq_len, int) or max_seq_len < 4:
            raise ValueError(f"max_seq_len must be an int >= 4, got {max_seq_len!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not isinstance(holdout_every, int) or holdout_every < 0 or (split == "heldout" and holdout_every == 0):
            raise ValueError(f"holdout_every must be an int >= 0 (>= 1 for the held-out split), got {holdout_every!r}")
        self.tokenizer, self.max_seq_len, self.split = tokenizer, max_seq_len, split
        self.holdout_every, self.loop = holdout_every, loop
        self._pos = {"epoch": 0, "file": 0, "offset": 0, "doc": 0, "skip": 0}

    def state_dict(self) -> dict[str, int]:
        """Position after the last sequence handed out."""
        return dict(self._pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`."""
        if not isinstance(state, dict) or set(state) != set(self._pos):
            raise ValueError(f"text stream state must have keys {sorted(self._pos)}, got {state!r}")
        if not 0 <= state["file"] < len(self.files):
            raise ValueError(f"text stream state names file {state['file']}, the stream has {len(self.files)}")
        self._pos = {k: int(v) for k, v in state.items()}

    def _wanted(self, doc: int) -> bool:
        held = self.holdout_every > 0 and doc % self.holdout_every == 0
        return held == (self.split == "heldout")

    def _documents(self, file_idx: int, offset: int) -> Iterator[tuple[int, int, list[str]]]:
        with open(self.files[file_idx], "rb") as fh:
            fh.seek(offset)
            start, pos, lines = offset, offset, []
            for raw in iter(fh.readline, b""):
                pos += len(raw)
                line = raw.decode("utf-8").strip()
                if line:
                    lines.append(line)
                    continue
                if lines:
                    yield start, pos, lines
                start, lines = pos, []
            if lines:
                yield start, pos, lines

    def pack(self, lines: Sequence[str]) -> list[list[int]]:
        """Token ids of ``lines`` grouped greedily into sequences of at most ``max_seq_len`` tokens
        (special tokens added by the tokenizer; a group is cut at ``max_seq_len``)."""
        tok = self.tokenizer
        room = self.max_seq_len - tok.num_special_tokens_to_add(pair=False)
        groups, cur, used = [], [], 0
        counted = tok(list(lines), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        for line, ids in zip(lines, counted):
            if cur and used + len(ids) > room:
                groups.append(" ".join(cur))
                cur, used = [], 0
            cur.append(line)
            used += len(ids)
        if cur:
            groups.append(" ".join(cur))
        return tok(groups, truncation=True, max_length=self.max_seq_len)["input_ids"]

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        produced = False
        while True:
            epoch, file_idx = self._pos["epoch"], self._pos["file"]
            doc = self._pos["doc"]
            for start, nxt, lines in self._documents(file_idx, self._pos["offset"]):
                if self._wanted(doc):
                    skip = self._pos["skip"] if start == self._pos["offset"] else 0
                    seqs = self.pack(lines)
                    for k in range(skip, len(seqs)):
                        self._pos = {"epoch": epoch, "file": file_idx, "offset": start, "doc": doc, "skip": k + 1}
                        produced = True
                        yield {"input_ids": seqs[k]}
                doc += 1
                self._pos = {"epoch": epoch, "file": file_idx, "offset": nxt, "doc": doc, "skip": 0}
            if file_idx + 1 < len(self.files):
                self._pos = {"epoch": epoch, "file": file_idx + 1, "offset": 0, "doc": doc, "skip": 0}
                continue
            if not produced:
                raise ValueError(f"corpus files {[str(f) for f in self.files]} yield no {self.split} text")
            if not self.loop:
                return
            self._pos = {"epoch": epoch + 1, "file": 0, "offset": 0, "doc": 0, "skip": 0}
            produced = False


# ---------------------------------------------------------------------------- loss
def teacher_layer_list(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Teacher layer indices from ``"all"``, ``"last"``, ``"none"`` or ``"2,4,6"`` (0 = embeddings output)."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("all", "last", "none", ""):
            return {"all": list(range(1, num_layers + 1)), "last": [num_layers]}.get(s, [])
        try:
            spec = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"layers must be 'all', 'last', 'none' or comma-separated ints, got {spec!r}") from None
    layers = sorted(set(int(x) for x in spec))
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} outside [0, {num_layers}] (0 = embeddings output)")
    return layers


@dataclass
class DistillLoss:
    """Weights and targets of the distillation loss (see the module docstring).

    Parameters
    ----------
    hidden_weight : float
        Weight of the hidden-state term (summed over ``hidden_layers``).
    hidden_layers : str or list of int
        Teacher layers whose hidden states the student matches (``"all"`` = 1..L).
    cosine_weight : float
        Weight of ``1 - cos`` of the mean-pooled sentence embeddings.
    attention_weight : float
        Weight of the attention KL term (summed over ``attention_layers``).
    attention_layers : str or list of int
        Teacher layers (1..L) whose attention probabilities the student matches.
    logits_weight : float
        Weight of the MLM logits KL term (teacher with an MLM head only).
    temperature : float
        Softmax temperature of the logits term.
    mlm_probability : float
        Fraction of tokens masked in the inputs of the logits term.
    teacher_input_steps : int
        For this many training forwards (micro-batches) every student layer gets the teacher's
        hidden state as its input instead of the previous student layer's output (each layer
        learns its own map, errors do not compound: much faster early progress); end to end after.
    """

    hidden_weight: float = 1.0
    hidden_layers: str | list[int] = "all"
    cosine_weight: float = 1.0
    attention_weight: float = 0.0
    attention_layers: str | list[int] = "all"
    logits_weight: float = 0.0
    temperature: float = 2.0
    mlm_probability: float = 0.15
    teacher_input_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_weight", "cosine_weight", "attention_weight", "logits_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.teacher_input_steps, bool) or not isinstance(self.teacher_input_steps, int) \
                or self.teacher_input_steps < 0:
            raise ValueError(f"teacher_input_steps must be an int >= 0, got {self.teacher_input_steps!r}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if not (self.hidden_weight or self.cosine_weight or self.attention_weight or self.logits_weight):
            raise ValueError("at least one of hidden/cosine/attention/logits weights must be > 0")


@dataclass
class DistillOutput:
    """``loss`` (the weighted sum) and its unweighted ``terms``."""

    loss: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)


def _masked_rel_sq(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (((s.float() - t.float()) ** 2) * m).sum() / ((t.float() ** 2) * m).sum().clamp_min(1e-12)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``mask`` is 1: the sentence embedding ``(B, H)``."""
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def mask_for_mlm(batch: dict[str, torch.Tensor], tokenizer: Any, probability: float,
                 generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A copy of ``batch`` with ``probability`` of the ordinary tokens replaced by the mask token,
    and the boolean ``(B, S)`` map of those positions (at least one per sequence with an ordinary token)."""
    ids = batch["input_ids"]
    special = torch.tensor(tokenizer.all_special_ids, dtype=ids.dtype)
    ordinary = ~torch.isin(ids, special) & batch["attention_mask"].bool()
    r = torch.rand(ids.shape, generator=generator)
    chosen = ordinary & (r < probability)
    first = torch.where(ordinary, r, torch.full_like(r, 2.0)).argmin(1)  # ensure one position per sequence
    chosen[torch.arange(ids.shape[0]), first] |= ordinary[torch.arange(ids.shape[0]), first]
    return {**batch, "input_ids": torch.where(chosen, torch.full_like(ids, tokenizer.mask_token_id), ids)}, chosen


def student_attention_probs(student: nn.Module, hidden_in: torch.Tensor, attention_mask: torch.Tensor,
                            layer: int) -> torch.Tensor:
    """Attention probabilities ``(B, heads, S, S)`` of student layer ``layer`` (0-based) given its input."""
    cfg = student.config
    lyr = student.base_model.encoder.layers[layer]
    b, s, _ = hidden_in.shape
    q, k = ((lyr.project(m, hidden_in) + lyr.norms.bias[m]).view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
            for m in ("q", "k"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.float().softmax(-1)


class Distiller(nn.Module):
    """``Distiller(student, teacher, loss)(**batch)`` -> :class:`DistillOutput`; trainable by :class:`~mpobert.train.Trainer`.

    Only the student is a submodule (its state is what checkpoints hold); the teacher follows
    the device moves and stays in eval mode. Student layer ``j`` is matched with teacher
    layer ``j · L_t / L_s`` (the depths must divide).
    """

    def __init__(self, student: nn.Module, teacher: Teacher, loss: DistillLoss, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(loss, DistillLoss):
            raise TypeError(f"loss must be a DistillLoss, got {type(loss).__name__}")
        check_vocabulary(student, teacher)
        self.student = student
        self._teacher = [teacher]  # not a submodule: not trained, not checkpointed
        self.loss_config = loss
        lt, ls = teacher.num_layers, student.config.num_layers
        self.hidden_layers = teacher_layer_list(loss.hidden_layers, lt) if loss.hidden_weight else []
        self.attention_layers = [x for x in teacher_layer_list(loss.attention_layers, lt) if x > 0] if loss.attention_weight else []
        for t in {*self.hidden_layers, *self.attention_layers}:
            if (t * ls) % lt:
                raise ValueError(f"teacher layer {t} has no student counterpart (student {ls} layers, teacher {lt})")
        if loss.logits_weight and not (teacher.has_mlm and hasattr(student, "mlm")):
            raise ValueError("logits_weight > 0 needs a teacher with an MLM head (a *ForMaskedLM/*ForPreTraining "
                             "checkpoint) and a student with one")
        if loss.teacher_input_steps and lt % ls:
            raise ValueError(f"teacher_input_steps needs a teacher depth ({lt}) divisible by the student's ({ls})")
        self._generator = torch.Generator().manual_seed(seed)
        # training forwards done so far (checkpointed with the student: a resumed run switches at the same step)
        self.register_buffer("teacher_input_steps_done", torch.zeros((), dtype=torch.long))

    @property
    def teacher(self) -> Teacher:
        return self._teacher[0]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "Distiller":
        super()._apply(fn, *args, **kwargs)
        self.teacher.model._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.model.eval()
        return self

    def _student_layer(self, t: int) -> int:
        return t * self.student.config.num_layers // self.teacher.num_layers

    def _student_states(self, batch: dict[str, torch.Tensor], teacher_states: Sequence[torch.Tensor],
                        local: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The student's hidden states ``0..L_s`` and each layer's input: end to end, or (``local``)
        every layer fed the teacher's hidden state at its matched input layer."""
        base = self.student.base_model
        if not local:
            out = base(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), output_hidden_states=True)
            return list(out.hidden_states), list(out.hidden_states[:-1])
        ids = batch["input_ids"]
        mask = attention_bool_mask(batch["attention_mask"], ids.shape[0], ids.shape[1], ids.device)
        step = self.teacher.num_layers // self.student.config.num_layers
        inputs = [teacher_states[j * step] for j in range(self.student.config.num_layers)]
        first = base.embeddings(ids, batch.get("token_type_ids"), None, None) if 0 in self.hidden_layers else inputs[0]
        return [first, *(layer(x, mask) for layer, x in zip(base.encoder.layers, inputs))], inputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> DistillOutput:
        cfg = self.loss_config
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        t_out = self.teacher(batch, attentions=bool(self.attention_layers))
        local = self.training and int(self.teacher_input_steps_done) < cfg.teacher_input_steps
        if self.training:
            self.teacher_input_steps_done += 1
        states, inputs = self._student_states(batch, t_out.hidden_states, local)
        m = attention_mask[..., None].float()
        terms: dict[str, torch.Tensor] = {}
        if self.hidden_layers:
            terms["hidden"] = sum(_masked_rel_sq(states[self._student_layer(t)], t_out.hidden_states[t], m)
                                  for t in self.hidden_layers)
        if cfg.cosine_weight:
            cos = F.cosine_similarity(mean_pool(states[-1].float(), attention_mask),
                                      mean_pool(t_out.hidden_states[-1].float(), attention_mask), dim=-1)
            terms["cosine"] = (1 - cos).mean()
        if self.attention_layers:
            kl = []
            for t in self.attention_layers:
                j = self._student_layer(t)
                p_s = student_attention_probs(self.student, inputs[j - 1], attention_mask, j - 1)
                p_t = t_out.attentions[t - 1].float()
                rows = attention_mask.bool()[:, None, :, None].expand_as(p_t)
                kl.append((p_t * (p_t.clamp_min(1e-12).log() - p_s.clamp_min(1e-12).log()))
                          .sum(-1)[rows[..., 0]].mean())
            terms["attention"] = sum(kl)
        if cfg.logits_weight:
            masked, where = mask_for_mlm(batch, self.teacher.tokenizer, cfg.mlm_probability, self._generator)
            where = where.to(input_ids.device)
            masked = {k: v.to(input_ids.device) for k, v in masked.items()}
            t_logits = self.teacher(masked, logits=True).logits[where].float()
            s_logits = self.student(**masked).logits[where].float()
            temp = cfg.temperature
            terms["logits"] = F.kl_div(F.log_softmax(s_logits / temp, -1), F.log_softmax(t_logits / temp, -1),
                                       log_target=True, reduction="batchmean") * temp ** 2
        weights = {"hidden": cfg.hidden_weight, "cosine": cfg.cosine_weight, "attention": cfg.attention_weight,
                   "logits": cfg.logits_weight}
        loss = sum(weights[k] * v for k, v in terms.items())
        return DistillOutput(loss, {k: float(v.detach()) for k, v in terms.items()})


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_distillation(student: nn.Module, teacher: Teacher, batches: Sequence[dict[str, torch.Tensor]],
                          mlm_probability: float = 0.15, seed: int = 0) -> dict[str, Any]:
    """Student vs teacher on held-out ``batches``.

    Returns
    -------
    dict
        ``sentence_cosine`` (mean over sequences of the cosine of the mean-pooled last hidden
        states) and ``sentence_cosine_min``; ``layer_rel_error``: per layer ``0..L`` of the
        student, ``||h_s - h_t||_F / ||h_t||_F`` over the non-padding tokens (matched teacher
        layer); ``mlm_agreement`` (fraction of masked positions where the top-1 predictions
        agree) and ``mlm_accuracy_student``/``_teacher`` (top-1 = the original token) when both
        have MLM heads, else ``None``; ``sequences``, ``tokens``.
    """
    if not batches:
        raise ValueError("evaluate_distillation needs at least one held-out batch")
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    ls, lt = student.config.num_layers, teacher.num_layers
    cos, err_num, err_den = [], torch.zeros(ls + 1), torch.zeros(ls + 1)
    agree = s_hit = t_hit = total = 0
    gen = torch.Generator().manual_seed(seed)
    mlm = teacher.has_mlm and hasattr(student, "mlm")
    tokens = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["attention_mask"]
        tokens += int(mask.sum())
        t_out = teacher(batch)
        s_out = student.base_model(batch["input_ids"], mask, batch.get("token_type_ids"), output_hidden_states=True)
        cos.append(F.cosine_similarity(mean_pool(s_out.last_hidden_state.float(), mask),
                                       mean_pool(t_out.hidden_states[-1].float(), mask), dim=-1).cpu())
        m = mask[..., None].float()
        for j in range(ls + 1):
            if (j * lt) % ls:
                continue
            t_h = t_out.hidden_states[j * lt // ls].float()
            err_num[j] += float((((s_out.hidden_states[j].float() - t_h) ** 2) * m).sum())
            err_den[j] += float(((t_h ** 2) * m).sum())
        if mlm:
            masked, where = mask_for_mlm({k: v.cpu() for k, v in batch.items()}, teacher.tokenizer, mlm_probability, gen)
            masked = {k: v.to(device) for k, v in masked.items()}
            where = where.to(device)
            t_pred = teacher(masked, logits=True).logits[where].argmax(-1)
            s_pred = student(**masked).logits[where].argmax(-1)
            truth = batch["input_ids"][where]
            agree += int((t_pred == s_pred).sum())
            s_hit += int((s_pred == truth).sum())
            t_hit += int((t_pred == truth).sum())
            total += int(where.sum())
    student.train(was_training)
    cos_all = torch.cat(cos)
    errors = [math.sqrt(float(n / d)) if d > 0 else None for n, d in zip(err_num, err_den)]
    return {
        "sentence_cosine": float(cos_all.mean()), "sentence_cosine_min": float(cos_all.min()),
        "layer_rel_error": errors, "mlm_agreement": agree / total if mlm and total else None,
        "mlm_accuracy_student": s_hit / total if mlm and total else None,
        "mlm_accuracy_teacher": t_hit / total if mlm and total else None,
        "sequences": int(cos_all.numel()), "tokens": tokens,
    }


def format_comparison(before: dict[str, Any], after: dict[str, Any] | None, student_params: int,
                      teacher_params: int) -> str:
    """A table of the :func:`evaluate_distillation` metrics before and after distillation."""
    cols = ["before"] + (["after"] if after is not None else [])
    rows: list[tuple[str, list[Any]]] = [
        ("sentence-embedding cosine (mean)", [r["sentence_cosine"] for r in (before, after) if r]),
        ("sentence-embedding cosine (min)", [r["sentence_cosine_min"] for r in (before, after) if r]),
    ]
    for j, e in enumerate(before["layer_rel_error"]):
        if e is not None:
            rows.append((f"hidden-state rel. error, layer {j}", [r["layer_rel_error"][j] for r in (before, after) if r]))
    if before.get("mlm_agreement") is not None:
        rows.append(("MLM top-1 agreement with teacher", [r["mlm_agreement"] for r in (before, after) if r]))
        rows.append(("MLM top-1 accuracy (student)", [r["mlm_accuracy_student"] for r in (before, after) if r]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'held-out metric (student vs teacher)':<{width}}" + "".join(f"{c:>10}" for c in cols), "-" * (width + 10 * len(cols))]
    lines += [f"{name:<{width}}" + "".join(f"{v:>10.4f}" for v in vals) for name, vals in rows]
    lines.append(f"{'parameters: student / teacher':<{width}}{student_params:,} / {teacher_params:,} "
                 f"({student_params / max(teacher_params, 1):.3f}x)")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def heldout_batches(stream: TextStream, batch_size: int, max_sequences: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_sequences`` held-out sequences of ``stream`` (a non-looping stream) in batches."""
    items = [x for _, x in zip(range(max_sequences), stream)]
    if not items:
        raise ValueError("the held-out text yields no sequence")
    return [pad_collate(items[i : i + batch_size], pad_id) for i in range(0, len(items), batch_size)]


# ---------------------------------------------------------------------------- workflow
@dataclass(kw_only=True)
class DistillConfig:
    """Settings of ``python -m mpobert distill`` (see :func:`distill`)."""

    teacher: str = option(help="Hugging Face BERT/ALBERT/RoBERTa checkpoint directory: config.json, weights, tokenizer files")
    student: str | None = option(None, "start from this MPOBERT model directory (save_pretrained / convert output) "
                                       "instead of converting the teacher")
    corpus: list[str] | None = option(None, "plain-text files: one sentence per line, blank line between documents "
                                            "(default: the bundled pydoc corpus)")
    eval_corpus: list[str] | None = option(None, "held-out text files (default: every HOLDOUT_EVERY-th document of the "
                                                 "corpus, which training then skips)")
    holdout_every: int = option(20, "hold out documents k with k %% HOLDOUT_EVERY == 0 when --eval-corpus is absent")
    eval_sequences: int = option(128, "held-out sequences of the before/after report")
    batch_size: int = option(16, "per-device micro-batch size (sequences)")
    max_seq_len: int = option(64, "tokens per sequence incl. specials")
    num_groups: int | None = option(None, "student: groups sharing a central (default 1: one central per matrix)")
    adapter_rank: int | None = option(None, "student: rank of the per-layer adapters (default: the config's, 8)")
    unshare_biases_norms: bool = option(False, "student: every layer keeps its own biases and LayerNorms (copied "
                                               "exactly; costs L x (6 biases + 2 LayerNorms))")
    central_from: str = option("mean", "student (BERT/RoBERTa): each group's central from the mean of its layers, "
                                       "or 'layer:K'")
    hidden_weight: float = option(1.0, "weight of the hidden-state term (relative squared error, summed over layers)")
    hidden_layers: str = option("all", "teacher layers the hidden-state term matches: all, last, none, or e.g. 0,3,6 "
                                       "(0 = embeddings output)")
    cosine_weight: float = option(1.0, "weight of 1 - cosine of the mean-pooled sentence embeddings")
    attention_weight: float = option(0.0, "weight of the attention-probability KL term")
    attention_layers: str = option("all", "teacher layers (1..L) the attention term matches")
    logits_weight: float = option(0.0, "weight of the MLM-logits KL term (teacher with an MLM head)")
    temperature: float = option(2.0, "softmax temperature of the logits term")
    teacher_input_steps: int = option(0, "for this many micro-batches feed every student layer the teacher's hidden "
                                         "state (layer-local matching, fast early progress), end to end after")
    dropout: float = option(0.0, "student hidden/attention dropout while distilling")
    train_embeddings: bool = option(False, "also train the embeddings and pooler (copied from the teacher; frozen "
                                           "by default)")
    max_minutes: float = option(0.0, "stop training after this many minutes (0 = run all --max-steps); the checkpoint "
                                      "and the after-report still follow")
    threads: int = option(0, "torch CPU threads (0 = torch's default); 1 is fastest on a shared, loaded CPU")
    train: TrainConfig = nested(TrainConfig, "training", required=("output_dir",), max_steps=300, lr=1e-3,
                                optimizer="adamw", weight_decay=0.0, warmup_steps=10, log_every=10)


def _corpus_files(cfg: DistillConfig, out: Path, rank: int, world: int) -> list[str]:
    if cfg.corpus:
        return list(cfg.corpus)
    path = out / "corpus.txt"
    if rank == 0 and not path.exists():
        from mpobert.data import write_corpus
        from mpobert.data.corpus import pydoc_documents

        write_corpus(pydoc_documents(), path)
    if world > 1:
        torch.distributed.barrier()
    return [str(path)]


def _student(cfg: DistillConfig, teacher: Teacher) -> nn.Module:
    if cfg.student:
        from mpobert import MPOBertForPreTraining, MPOBertModel

        cls = MPOBertForPreTraining if teacher.has_mlm else MPOBertModel
        return cls.from_pretrained(cfg.student, strict=False)
    overrides = {k: getattr(cfg, k) for k in ("num_groups", "adapter_rank") if getattr(cfg, k) is not None}
    return convert_student(teacher, central_from=cfg.central_from, hidden_dropout=cfg.dropout,
                           attention_dropout=cfg.dropout, share_biases_norms=not cfg.unshare_biases_norms, **overrides)


def _freeze_unused(student: nn.Module, cfg: DistillConfig) -> None:
    """Freeze what no loss term trains (DDP needs a gradient for every trainable tensor): the
    sentence-order head, the MLM head unless ``logits_weight > 0``, the embeddings and pooler unless
    ``train_embeddings`` (the pooler then rides along: ``find_unused_parameters``)."""
    frozen = [getattr(student, "sop_classifier", None)]
    if not cfg.logits_weight:
        frozen.append(getattr(student, "mlm", None))
    if not cfg.train_embeddings:
        frozen += [student.base_model.embeddings, student.base_model.pooler]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)


def _time_limit(minutes: float, world: int) -> Any:
    """An ``on_step`` hook ending the run (at the same step on every rank) once ``minutes`` have passed."""
    if not minutes:
        return None
    if minutes < 0:
        raise ValueError(f"max_minutes must be >= 0, got {minutes!r}")
    start = time.perf_counter()

    def on_step(trainer: Trainer) -> None:
        over = torch.tensor([float(time.perf_counter() - start >= 60.0 * minutes)], device=trainer.device)
        if world > 1:
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        if over.item():
            trainer.config.max_steps = trainer.step  # the loop ends here; save and final metrics follow

    return on_step


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Distill a local Hugging Face BERT/ALBERT/RoBERTa checkpoint into its MPOBERT conversion.

    Converts the teacher (or loads ``--student``), reports the held-out metrics of the
    conversion, trains with the :class:`~mpobert.train.Trainer` (progress, checkpoints,
    ``--resume``, ``torchrun``), reports them again and saves the student. Writes
    ``OUTPUT_DIR/distill_report.json`` (before, after, parameter counts, settings) and
    ``OUTPUT_DIR/model`` (an MPOBERT directory with the teacher's tokenizer files).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, _ = setup_distributed()
    loss = DistillLoss(hidden_weight=cfg.hidden_weight, hidden_layers=cfg.hidden_layers, cosine_weight=cfg.cosine_weight,
                       attention_weight=cfg.attention_weight, attention_layers=cfg.attention_layers,
                       logits_weight=cfg.logits_weight, temperature=cfg.temperature,
                       teacher_input_steps=cfg.teacher_input_steps)
    teacher = load_teacher(cfg.teacher, attentions=cfg.attention_weight > 0)
    tok = teacher.tokenizer
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    student = _student(cfg, teacher)
    convert_s = time.perf_counter() - t0
    check_vocabulary(student, teacher)
    missing = [f for f in [*(cfg.corpus or []), *(cfg.eval_corpus or [])] if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"corpus files {missing} do not exist (expected plain-text files)")
    out = Path(cfg.train.output_dir)  # created only once the inputs proved valid
    out.mkdir(parents=True, exist_ok=True)
    files = _corpus_files(cfg, out, rank, world)
    holdout = 0 if cfg.eval_corpus else cfg.holdout_every
    _freeze_unused(student, cfg)
    held_stream = TextStream(cfg.eval_corpus or files, tok, cfg.max_seq_len, split="heldout",
                             holdout_every=cfg.holdout_every if not cfg.eval_corpus else 1, loop=False)
    held = heldout_batches(held_stream, cfg.batch_size, cfg.eval_sequences, tok.pad_token_id)
    student_params, teacher_params = student.parameter_report().total, teacher.num_params
    before = evaluate_distillation(student, teacher, held) if rank == 0 else None
    batches = StreamBatches(TextStream(files, tok, cfg.max_seq_len, split="train", holdout_every=holdout),
                            cfg.batch_size, rank, world, tok.pad_token_id)
    model = Distiller(student, teacher, loss, seed=cfg.train.seed)
    fingerprint = {"teacher": os.path.abspath(cfg.teacher), "student": student.config.to_dict(), "loss": asdict(loss),
                   "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len, "train_embeddings": cfg.train_embeddings}
    trainer = Trainer(model, batches, cfg.train, fingerprint=fingerprint, on_step=_time_limit(cfg.max_minutes, world),
                      find_unused_parameters=bool(cfg.train_embeddings))  # the pooler has no gradient
    if rank == 0:
        print(f"[distill] teacher {teacher.family} ({teacher_params:,} parameters), student MPOBERT "
              f"({student_params:,}; converted in {convert_s:.0f} s); held-out cosine before: "
              f"{before['sentence_cosine']:.4f}; {cfg.train.max_steps} steps on {trainer.device}", flush=True)
    final = trainer.train()
    if rank != 0:
        return final
    after = evaluate_distillation(student, teacher, held)
    report = {"teacher": {"path": cfg.teacher, "family": teacher.family, "params": teacher_params},
              "student": {"params": student_params, "trainable": sum(p.numel() for p in student.parameters()
                                                                     if p.requires_grad),
                          "config": student.config.to_dict(), "convert_s": convert_s},
              "before": before, "after": after, "train": {k: final[k] for k in ("steps", "train_time_s", "tokens_per_s",
                                                                               "loss_first", "loss_last", "resumed_from")},
              "loss": asdict(loss)}
    student.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    write_json(out / "distill_report.json", report)
    print(format_comparison(before, after, student_params, teacher_params))
    print(f"[distill] {final['steps']} steps in {final['train_time_s']:.0f} s; student saved to {out / 'model'}; "
          f"report in {out / 'distill_report.json'}")
    return report
