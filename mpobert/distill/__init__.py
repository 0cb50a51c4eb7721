"""Teacher-matching: train a student model to reproduce a frozen teacher on plain text.

One implementation serves distillation (a Hugging Face encoder into its MPOBERT conversion, the
``distill`` workflow) and any other student, e.g. a ``transformers`` model whose linears were
compressed to MPOs (healing):

* :mod:`~mpobert.distill.teacher`: :class:`Teacher` (frozen HF model + tokenizer; :func:`load_teacher`
  from a checkpoint directory, :meth:`Teacher.wrap` for a loaded model), :func:`hf_inputs`;
* :mod:`~mpobert.distill.student`: the :class:`Student` view (hidden states ``0..L``, MLM logits,
  optionally layer-local states and attention probabilities) for MPOBERT (:class:`MPOBertStudent`) and
  ``transformers`` models (:class:`HFStudent`), :func:`as_student`; :func:`convert_student`;
* :mod:`~mpobert.distill.loss`: the loss terms as tensor functions, :class:`DistillLoss` (weights),
  :class:`Distiller` (teacher + student + loss as one module the :class:`~mpobert.train.Trainer` trains);
* :mod:`~mpobert.distill.evaluate`: :func:`evaluate_distillation` (sentence cosine, per-layer error,
  MLM top-1 agreement on held-out batches) and :func:`format_comparison`;
* :mod:`~mpobert.distill.workflow`: :class:`DistillConfig` and :func:`distill` (``python -m mpobert distill``).

The text comes from :class:`mpobert.data.text.TextStream` (re-exported here). ``transformers`` is
imported lazily.
"""
from mpobert.data.text import TextStream, heldout_batches
from mpobert.distill.evaluate import evaluate_distillation, format_comparison
from mpobert.distill.loss import (
    DistillLoss, Distiller, DistillOutput, attention_kl, logits_kl, mask_for_mlm, masked_rel_sq, mean_pool,
    sentence_cosine, teacher_layer_list,
)
from mpobert.distill.student import HFStudent, MPOBertStudent, Student, as_student, convert_student, copy_mlm_head
from mpobert.distill.teacher import TEACHER_FAMILIES, Teacher, check_vocabulary, hf_inputs, load_teacher
from mpobert.distill.workflow import DistillConfig, distill, write_json

__all__ = [
    "TEACHER_FAMILIES", "Teacher", "load_teacher", "check_vocabulary", "hf_inputs",
    "Student", "MPOBertStudent", "HFStudent", "as_student", "convert_student", "copy_mlm_head",
    "TextStream", "heldout_batches",
    "DistillLoss", "Distiller", "DistillOutput", "teacher_layer_list", "masked_rel_sq", "mean_pool", "sentence_cosine",
    "attention_kl", "logits_kl", "mask_for_mlm",
    "evaluate_distillation", "format_comparison",
    "DistillConfig", "distill", "write_json",
]
