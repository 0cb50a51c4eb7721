"""MPOBERT: a BERT/ALBERT-style encoder whose weight matrices are MPOs with shared central tensors.

Public API::

    from mpobert import MPOBertConfig, MPOBertModel, MPOBertForPreTraining
    model = MPOBertForPreTraining(MPOBertConfig.tiny())
    out = model(input_ids, attention_mask=mask, labels=mlm_labels, sentence_order_label=sop)
    out.loss.backward()
    print(model.parameter_report())
"""
from mpobert.config import MATRICES, MPOBertConfig
from mpobert.heads import (
    IGNORE_INDEX,
    MPOBertForPreTraining,
    MPOBertForQuestionAnswering,
    MPOBertForSequenceClassification,
    PreTrainingOutput,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
)
from mpobert.model import MPOBertModel, MPOBertModelOutput, MPOBertPreTrainedModel, count_parameters
from mpobert.params import ParameterReport

__all__ = [
    "IGNORE_INDEX", "MATRICES", "MPOBertConfig", "MPOBertModel", "MPOBertModelOutput", "MPOBertPreTrainedModel",
    "MPOBertForPreTraining", "MPOBertForSequenceClassification", "MPOBertForQuestionAnswering",
    "PreTrainingOutput", "SequenceClassifierOutput", "QuestionAnsweringOutput",
    "ParameterReport", "count_parameters",
]
