"""mpobert.data: tokenizer, MLM/SOP instances, resumable stream, batching, GLUE formats and metrics, SQuAD."""
import json
import random
from collections import Counter

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpobert.data import (
    IGNORE_INDEX, TASKS, Example, ExampleBatches, MultiTaskBatches, PretrainingStream, StreamBatches, WordPieceTokenizer,
    accuracy, best_spans, compute_metrics, encode_examples, exact_match_score, f1_binary, f1_score, few_shot, get_task,
    load_split, mask_tokens, matthews_corrcoef, normalize_answer, pad_collate, pearson, pydoc_paragraphs, read_squad,
    read_tsv, sop_instances, spearman, split_sentences, squad_features, squad_metrics, train_wordpiece, write_corpus,
    write_pydoc_topic_task,
)
from mpobert.data.corpus import TOPIC_FAMILIES

TEXT = [
    "The quick brown fox jumps over the lazy dog. It was not amused.",
    "Python statements are executed one after another. Compound statements contain other statements.",
    "A list display yields a new list object. Its contents are given by expressions.",
    "Exceptions break the normal flow of control. Handlers catch them.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(TEXT, vocab_size=200, min_frequency=1)


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_special_ids_and_round_trip(tok, tmp_path):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    ids = tok.encode("The quick brown fox")
    assert tok.decode(ids) == "the quick brown fox"
    for name in ("tokenizer.json", "vocab.txt"):
        tok.save(tmp_path / name)
        again = WordPieceTokenizer.from_file(tmp_path / name)
        assert again.encode("Handlers catch exceptions, quickly!") == tok.encode("Handlers catch exceptions, quickly!")
        assert again.vocab_size == tok.vocab_size
    assert WordPieceTokenizer.from_file(tmp_path).vocab_size == tok.vocab_size  # directory: tokenizer.json


def test_tokenizer_to_transformers_gives_the_same_ids(tok):
    pytest.importorskip("transformers")
    hf = tok.to_transformers()
    a, b = "Handlers catch exceptions, quickly!", "A list display."
    ids, types = tok.encode_pair(a, b, max_length=64)
    got = hf(a, b)
    assert got["input_ids"] == ids and got["token_type_ids"] == types
    assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 2, 3, 4)
    assert hf.num_special_tokens_to_add(pair=False) == 2


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        WordPieceTokenizer.from_file(tmp_path / "nope.txt")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("[UNK]\na\n")
    with pytest.raises(ValueError, match="special tokens"):
        WordPieceTokenizer.from_file(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(TEXT, vocab_size=10)


def test_build_pair_truncates_longer_side(tok):
    ids, types = tok.build_pair(list(range(10, 20)), list(range(30, 33)), max_length=10)
    assert ids == [tok.cls_id, 10, 11, 12, 13, tok.sep_id, 30, 31, 32, tok.sep_id]
    assert types == [0] * 6 + [1] * 4
    ids, types = tok.build_pair([7, 8], None, max_length=10)
    assert ids == [tok.cls_id, 7, 8, tok.sep_id] and types == [0] * 4
    with pytest.raises(ValueError, match="max_length"):
        tok.build_pair([1], [2], max_length=3)


# ---------------------------------------------------------------- masking and SOP
@settings(max_examples=40)
@given(n=st.integers(1, 200), seed=st.integers(0, 10**6), p=st.sampled_from([0.15, 0.3, 1.0]))
def test_mask_tokens_properties(n, seed, p):
    special = frozenset({0, 1, 2, 3, 4})
    rng = random.Random(seed)
    ids = [2] + [rng.randrange(5, 50) for _ in range(n)] + [3]
    masked, labels = mask_tokens(ids, special, 50, random.Random(seed + 1), p, mask_id=4)
    picked = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert len(picked) == min(n, max(1, round(p * n)))
    assert labels[0] == labels[-1] == IGNORE_INDEX and masked[0] == 2 and masked[-1] == 3
    for i in range(len(ids)):
        if i in picked:
            assert labels[i] == ids[i] and masked[i] not in {0, 1, 2, 3}
        else:
            assert masked[i] == ids[i]


def test_mask_tokens_80_10_10_split():
    special = frozenset({0, 1, 2, 3, 4})
    rng = random.Random(0)
    counts = Counter()
    for _ in range(300):
        ids = [2] + [rng.randrange(5, 1000) for _ in range(100)] + [3]
        masked, labels = mask_tokens(ids, special, 1000, rng, 0.15, mask_id=4)
        for i, lab in enumerate(labels):
            if lab != IGNORE_INDEX:
                counts["mask" if masked[i] == 4 else ("keep" if masked[i] == ids[i] else "random")] += 1
    total = sum(counts.values())
    assert total == 300 * 15
    # binomial std of a 10% share over 4500 draws is 0.45%; allow ~4.5 std
    assert abs(counts["mask"] / total - 0.8) < 0.03
    assert abs(counts["random"] / total - 0.1) < 0.02
    assert abs(counts["keep"] / total - 0.1) < 0.02


def test_sop_pairs_preserve_document_order_or_swap():
    segs = [[10 + i] * 3 for i in range(6)]  # 6 sentences of 3 tokens
    labels = []
    for seed in range(200):
        for a, b, label in sop_instances(segs, max_seq_len=64, rng=random.Random(seed)):
            first, second = (b, a) if label == 1 else (a, b)
            flat = first + second
            assert flat == [t for s in segs for t in s]  # one chunk: the whole document, cut once
            assert first and second
            labels.append(label)
    assert 0.4 < np.mean(labels) < 0.6


def test_sop_packs_to_max_length_and_handles_single_sentences():
    segs = [[i] * 5 for i in range(20)]  # 100 tokens
    inst = sop_instances(segs, max_seq_len=23, rng=random.Random(0))
    assert len(inst) >= 4
    assert all(len(a) + len(b) <= 20 for a, b, _ in inst)
    single = sop_instances([[7, 8, 9, 10]], max_seq_len=16, rng=random.Random(1))
    assert len(single) == 1 and sorted(single[0][0] + single[0][1]) == [7, 8, 9, 10]
    assert sop_instances([[5]], max_seq_len=16, rng=random.Random(0)) == []


# ---------------------------------------------------------------- stream
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("corpus")
    docs = [split_sentences(t) for t in TEXT[:12]]
    a = write_corpus(docs[:7], tmp_path / "a.txt")
    b = write_corpus(docs[7:], tmp_path / "b.txt")
    return [a, b]


def test_stream_format_and_epochs(tok, corpus):
    s = PretrainingStream(corpus, tok, max_seq_len=32, loop=False)
    items = list(s)
    assert len(items) == 12  # each short document makes one pair
    for it in items:
        ids = it["input_ids"]
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and ids.count(tok.sep_id) == 2
        assert len(ids) == len(it["token_type_ids"]) == len(it["labels"]) <= 32
        assert it["sentence_order_label"] in (0, 1)
        assert any(lab != IGNORE_INDEX for lab in it["labels"])
    looping = iter(PretrainingStream(corpus, tok, max_seq_len=32))
    epoch0 = [next(looping) for _ in range(12)]
    epoch1 = [next(looping) for _ in range(12)]
    assert epoch0 == items
    assert epoch0 != epoch1  # new masks and swaps in epoch 1


@settings(max_examples=10)
@given(k=st.integers(0, 30))
def test_stream_resumes_exactly(tok, corpus, k):
    ref = iter(PretrainingStream(corpus, tok, max_seq_len=16))
    expected = [next(ref) for _ in range(k + 8)]
    s = PretrainingStream(corpus, tok, max_seq_len=16)
    it = iter(s)
    got = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(s.state_dict()))  # survives serialization
    s2 = PretrainingStream(corpus, tok, max_seq_len=16)
    s2.load_state_dict(state)
    it2 = iter(s2)
    got += [next(it2) for _ in range(8)]
    assert got == expected


def test_stream_errors(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PretrainingStream([tmp_path / "missing.txt"], tok)
    with pytest.raises(TypeError, match="WordPieceTokenizer"):
        PretrainingStream(corpus, "tok")
    with pytest.raises(ValueError, match="max_seq_len"):
        PretrainingStream(corpus, tok, max_seq_len=4)
    s = PretrainingStream(corpus, tok)
    with pytest.raises(ValueError, match="keys"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="file"):
        s.load_state_dict({"epoch": 0, "file": 5, "offset": 0, "skip": 0})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\nx\n\n")  # one token: no pair possible
    with pytest.raises(ValueError, match="no sentence pairs"):
        next(iter(PretrainingStream([empty], tok)))


def test_pad_collate():
    b = pad_collate([{"input_ids": [2, 5, 3], "labels": [-100, 5, -100], "sentence_order_label": 1},
                     {"input_ids": [2, 3], "labels": [-100, -100], "sentence_order_label": 0}])
    assert b["input_ids"].tolist() == [[2, 5, 3], [2, 3, 0]]
    assert b["labels"].tolist() == [[-100, 5, -100], [-100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["sentence_order_label"].dtype == torch.long
    assert pad_collate([{"input_ids": [1], "labels": 0.5}])["labels"].dtype == torch.float32


# ---------------------------------------------------------------- batching
def test_stream_batches_shard_the_single_process_batch(tok, corpus):
    single = iter(StreamBatches(PretrainingStream(corpus, tok, max_seq_len=32), batch_size=4))
    ranks = [StreamBatches(PretrainingStream(corpus, tok, max_seq_len=32), 2, rank=r, world_size=2) for r in range(2)]
    iters = [iter(r) for r in ranks]
    for _ in range(5):
        full = next(single)
        parts = [next(i) for i in iters]
        for r, part in enumerate(parts):
            width = part["input_ids"].shape[1]
            assert torch.equal(part["input_ids"], full["input_ids"][2 * r : 2 * r + 2, :width])
    assert ranks[0].state_dict() == ranks[1].state_dict()


def _features(n):
    return [{"input_ids": [2, 10 + i, 3], "token_type_ids": [0, 0, 0], "labels": i % 3} for i in range(n)]


def test_example_batches_epochs_shards_and_resume():
    feats = _features(10)
    src = ExampleBatches(feats, batch_size=2, world_size=2, rank=1, seed=3)
    assert src.steps_per_epoch == 2
    it = iter(src)
    seen = [next(it)["input_ids"][:, 1].tolist() for _ in range(5)]
    state = src.state_dict()
    assert state == {"epoch": 2, "step": 1}
    nxt = next(it)["input_ids"][:, 1].tolist()
    again = ExampleBatches(feats, batch_size=2, world_size=2, rank=1, seed=3)
    again.load_state_dict(state)
    assert next(iter(again))["input_ids"][:, 1].tolist() == nxt
    # both ranks together cover one epoch's permutation without overlap
    r0 = ExampleBatches(feats, 2, rank=0, world_size=2, seed=3)
    first = [t for b in [next(iter(r0))] for t in b["input_ids"][:, 1].tolist()]
    assert not set(first) & set(seen[0])
    with pytest.raises(ValueError, match="global batch"):
        ExampleBatches(feats[:3], batch_size=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ExampleBatches(feats, 2, rank=2, world_size=2)


def test_multitask_batches_mix_and_resume():
    a = ExampleBatches(_features(40), 4, seed=0)
    b = ExampleBatches(_features(10), 2, seed=1)
    mt = MultiTaskBatches({"a": a, "b": b}, alpha=1.0, seed=5)
    it = iter(mt)
    tasks = [next(it)["task"] for _ in range(200)]
    assert 0.7 < tasks.count("a") / 200 < 0.9  # 40 vs 10 examples, proportional
    state = json.loads(json.dumps(mt.state_dict()))
    want = [next(it) for _ in range(3)]
    mt2 = MultiTaskBatches({"a": ExampleBatches(_features(40), 4, seed=0), "b": ExampleBatches(_features(10), 2, seed=1)},
                           alpha=1.0, seed=5)
    mt2.load_state_dict(state)
    it2 = iter(mt2)
    for w in want:
        g = next(it2)
        assert g["task"] == w["task"] and torch.equal(g["input_ids"], w["input_ids"])
    with pytest.raises(ValueError, match="alpha"):
        MultiTaskBatches({"a": a}, alpha=2.0)


# ---------------------------------------------------------------- GLUE formats
GLUE_ROWS = {
    "cola": (False, ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks.", "gj04\t0\t*\tThe more books I ask to whom he will give."]),
    "sst2": (True, ["sentence\tlabel", "hide new secretions \t0", "a gorgeous film \t1"]),
    "mrpc": (True, ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t702876\t702977\tAmrozi accused his brother.\tHe called him a liar."]),
    "stsb": (True, ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000"]),
    "qqp": (True, ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "133273\t213221\t213222\tHow is the life?\tHow is life?\t0"]),
    "mnli": (True, ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
                    "0\t31193\t31193n\tgovernment\t(x)\t(y)\t(X)\t(Y)\tConceptually cream skimming.\tProduct and geography.\tneutral\tneutral"]),
    "qnli": (True, ["index\tquestion\tsentence\tlabel", "0\tWhat came into force?\tThe law came into force.\tentailment"]),
    "rte": (True, ["index\tsentence1\tsentence2\tlabel", "0\tNo weapons were found.\tWeapons were found.\tnot_entailment"]),
}
EXPECTED = {
    "cola": [Example("The sailors rode the breeze clear of the rocks.", None, 1), Example("The more books I ask to whom he will give.", None, 0)],
    "sst2": [Example("hide new secretions ", None, 0), Example("a gorgeous film ", None, 1)],
    "mrpc": [Example("Amrozi accused his brother.", "He called him a liar.", 1)],
    "stsb": [Example("A plane is taking off.", "An air plane is taking off.", 5.0)],
    "qqp": [Example("How is the life?", "How is life?", 0)],
    "mnli": [Example("Conceptually cream skimming.", "Product and geography.", 2)],
    "qnli": [Example("What came into force?", "The law came into force.", 0)],
    "rte": [Example("No weapons were found.", "Weapons were found.", 1)],
}


@pytest.mark.parametrize("task", sorted(GLUE_ROWS))
def test_glue_layouts(task, tmp_path):
    _, rows = GLUE_ROWS[task]
    spec = get_task(task)
    name = spec.dev_file
    (tmp_path / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert load_split(task, tmp_path, "dev") == EXPECTED[task]
    assert load_split(task, tmp_path, "train") == EXPECTED[task]


def test_glue_errors(tmp_path):
    assert get_task("SST-2") is TASKS["sst2"] and get_task("STS-B").is_regression
    with pytest.raises(ValueError, match="unknown task"):
        get_task("wnli2")
    p = tmp_path / "dev.tsv"
    p.write_text("index\tquestion\tsentence\tlabel\n0\tq\ts\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: .*'maybe'"):
        read_tsv(p, TASKS["qnli"])
    p.write_text("index\tquestion\tsentence\tlabel\n0\tq\n")
    with pytest.raises(ValueError, match="columns"):
        read_tsv(p, TASKS["qnli"])
    with pytest.raises(ValueError, match="split"):
        load_split("rte", tmp_path, "test")


def test_encode_examples(tok):
    feats = encode_examples([Example("quick fox", "lazy dog", 1), Example("a list", None, 0.5)], tok, max_seq_len=16)
    assert feats[0]["token_type_ids"].count(1) == len(tok.encode("lazy dog")) + 1
    assert feats[1]["labels"] == 0.5 and feats[1]["input_ids"][0] == tok.cls_id


# ---------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2, fp=1, fn=1, tn=2
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: undefined -> 0
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 25]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="same length"):
        accuracy([1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        pearson([], [])


@settings(max_examples=30)
@given(seed=st.integers(0, 10**6), n=st.integers(3, 60), k=st.integers(2, 4))
def test_metrics_match_scipy_and_definitions(seed, n, k):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, n).astype(float)  # ties
    y = x + rng.normal(0, 1, n)
    if np.ptp(x) > 0:
        assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-10)
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-10)
    p, t = rng.integers(0, k, n), rng.integers(0, k, n)
    if k == 2:
        tp, tn = np.sum((p == 1) & (t == 1)), np.sum((p == 0) & (t == 0))
        fp, fn = np.sum((p == 1) & (t == 0)), np.sum((p == 0) & (t == 1))
        d = np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        assert matthews_corrcoef(p, t) == pytest.approx((tp * tn - fp * fn) / d if d else 0.0, abs=1e-12)
    else:  # multiclass MCC is the Pearson correlation of the one-hot indicator matrices
        P, T = np.eye(k)[p], np.eye(k)[t]
        Pc, Tc = P - P.mean(0), T - T.mean(0)
        d = np.sqrt((Pc * Pc).sum() * (Tc * Tc).sum())
        assert matthews_corrcoef(p, t) == pytest.approx((Pc * Tc).sum() / d if d else 0.0, abs=1e-12)


def test_compute_metrics_per_task():
    assert set(compute_metrics("mrpc", [1, 0], [1, 1])) == {"accuracy", "f1"}
    assert set(compute_metrics("stsb", [0.1, 0.5, 0.2], [1.0, 3.0, 2.0])) == {"pearson", "spearman"}
    assert set(compute_metrics("cola", [1, 0], [1, 0])) == {"matthews_corrcoef"}


def test_few_shot_is_seeded_and_balanced():
    ex = [Example(f"t{i}", None, i % 3) for i in range(30)]
    a, b = few_shot(ex, 4, seed=1), few_shot(ex, 4, seed=1)
    assert a == b and Counter(e.label for e in a) == {0: 4, 1: 4, 2: 4}
    assert a != few_shot(ex, 4, seed=2)
    assert [ex.index(e) for e in a] == sorted(ex.index(e) for e in a)
    with pytest.raises(ValueError, match="fewer than k"):
        few_shot(ex, 11)
    with pytest.raises(ValueError, match="regression"):
        few_shot([Example("x", None, 0.5)], 1)


# ---------------------------------------------------------------- bundled corpus
def test_pydoc_topic_task_is_fixed_and_disjoint(tmp_path):
    paras = pydoc_paragraphs()
    assert len(paras) > 1000 and {f for f, _ in paras} == set(TOPIC_FAMILIES)
    write_pydoc_topic_task(tmp_path / "a", seed=0)
    write_pydoc_topic_task(tmp_path / "b", seed=0)
    for name in ("train.tsv", "dev.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = load_split("pydoc-topics", tmp_path / "a", "train")
    dev = load_split("pydoc-topics", tmp_path / "a", "dev")
    assert not {e.text_a for e in train} & {e.text_a for e in dev}
    assert len(dev) / (len(train) + len(dev)) == pytest.approx(0.2, abs=0.01)
    assert set(Counter(e.label for e in dev)) == set(range(len(TOPIC_FAMILIES)))


# ---------------------------------------------------------------- SQuAD
def test_squad_normalization_and_scores():
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match_score("the Denver Broncos", "Denver Broncos") == 1.0
    # pred tokens {denver, broncos, team} vs gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert f1_score("", "x") == 0.0
    ex = read_squad_like()
    m = squad_metrics({"q1": "Denver Broncos", "q2": "in 2016"}, ex)
    # q1 exact. q2 "in 2016" -> {in, 2016}: vs "2016" P = 1/2, R = 1, F1 = 2/3; vs "in the year 2016"
    # -> {in, year, 2016}: P = 1, R = 2/3, F1 = 0.8; the max is 0.8, EM 0.
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8) / 2)


def read_squad_like():
    from mpobert.data import SquadExample
    return [SquadExample("q1", "Who won?", "The Denver Broncos won.", ("Denver Broncos", "The Denver Broncos"), (4, 0)),
            SquadExample("q2", "When?", "It was 2016.", ("2016", "in the year 2016"), (7, 7))]


def test_squad_read_features_and_decode(tok, tmp_path):
    ctx = "The quick brown fox jumps over the lazy dog. It was not amused. " * 3
    data = {"data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "a", "question": "What jumps?", "answers": [{"text": "brown fox", "answer_start": ctx.index("brown fox")}]},
        {"id": "b", "question": "Was it amused?", "answers": [{"text": "not amused", "answer_start": ctx.rindex("not amused")}]},
    ]}]}]}
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(data))
    ex = read_squad(path)
    assert [e.qid for e in ex] == ["a", "b"]
    feats = squad_features(ex, tok, max_seq_len=24, doc_stride=8, max_query_len=8)
    assert len(feats) > 2  # windows
    for f in feats:
        assert len(f["input_ids"]) <= 24
        e = ex[f["example_index"]]
        if f["start_positions"]:
            s, t = f["offsets"][f["start_positions"]], f["offsets"][f["end_positions"]]
            assert e.context[s[0] : t[1]].lower() == e.answers[0].lower()
    # logits that put all mass on the gold span decode to the gold answer text
    width = max(len(f["input_ids"]) for f in feats)
    start = np.full((len(feats), width), -10.0)
    end = np.full((len(feats), width), -10.0)
    for i, f in enumerate(feats):
        if f["start_positions"]:
            start[i, f["start_positions"]] = end[i, f["end_positions"]] = 10.0
    preds = best_spans(ex, feats, start, end)
    assert squad_metrics(preds, ex) == {"exact_match": 100.0, "f1": 100.0}
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_squad(path)
