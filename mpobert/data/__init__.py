"""MPOBERT data: tokenizer, pretraining stream (MLM + SOP), plain-text stream (distillation), GLUE-format tasks, SQuAD, bundled corpus."""
from mpobert.data.batching import ExampleBatches, MultiTaskBatches, StreamBatches
from mpobert.data.corpus import TOPIC_FAMILIES, pydoc_documents, pydoc_paragraphs, split_sentences, write_corpus, write_pydoc_corpus, write_pydoc_topic_task
from mpobert.data.glue import TASKS, Example, TaskSpec, compute_metrics, encode_examples, few_shot, get_task, load_split, read_tsv
from mpobert.data.metrics import METRICS, accuracy, f1_binary, matthews_corrcoef, pearson, spearman
from mpobert.data.documents import DocumentStream, corpus_files, read_documents
from mpobert.data.pretraining import IGNORE_INDEX, PretrainingStream, mask_tokens, pad_collate, sop_instances
from mpobert.data.squad import SquadExample, best_spans, exact_match_score, f1_score, normalize_answer, read_squad, squad_features, squad_metrics
from mpobert.data.text import TextStream, heldout_batches
from mpobert.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer, train_wordpiece

__all__ = [
    "ExampleBatches", "MultiTaskBatches", "StreamBatches",
    "TOPIC_FAMILIES", "pydoc_documents", "pydoc_paragraphs", "split_sentences", "write_corpus",
    "write_pydoc_corpus", "write_pydoc_topic_task",
    "TASKS", "Example", "TaskSpec", "compute_metrics", "encode_examples", "few_shot", "get_task", "load_split", "read_tsv",
    "METRICS", "accuracy", "f1_binary", "matthews_corrcoef", "pearson", "spearman",
    "DocumentStream", "IGNORE_INDEX", "PretrainingStream", "corpus_files", "mask_tokens", "pad_collate", "read_documents", "sop_instances",
    "TextStream", "heldout_batches",
    "SquadExample", "best_spans", "exact_match_score", "f1_score", "normalize_answer", "read_squad",
    "squad_features", "squad_metrics",
    "SPECIAL_TOKENS", "WordPieceTokenizer", "train_wordpiece",
]
