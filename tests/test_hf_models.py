"""The MPO methods on transformers models of six families (tiny random models built by transformers itself).

Per family: ``mpo_ify`` at full rank is exact (outputs to 1e-5) and reports sizes and bounds;
``compress`` (MPOP) never returns more matrix entries than the dense model; OPF expands and merges
back to the original module types (GPT-2's ``Conv1D`` included); a whole MPO model saves and reloads;
and the merged model, saved with ``save_pretrained``, loads with plain transformers in a process
where ``mpo_core`` cannot be imported and gives the same outputs.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mpo_core import MPOLinear, compress, mpo_ify  # noqa: E402
from mpo_core.lightweight import LightweightConfig, get_lightweight_model, load_mpo_model, save_mpo_model  # noqa: E402
from mpo_core.nn import unmpo_ify  # noqa: E402
from mpo_core.opf import OverParameterization  # noqa: E402

H, FF, V, T = 48, 96, 100, 12

FAMILIES = {
    "bert": ("BertConfig", "BertModel", dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=FF, vocab_size=V, max_position_embeddings=32),
             ["query", "key", "value", "dense"]),
    "albert": ("AlbertConfig", "AlbertModel", dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=FF, vocab_size=V, embedding_size=16,
                                                   max_position_embeddings=32),
               ["query", "value", "ffn", "ffn_output"]),
    "roberta": ("RobertaConfig", "RobertaModel", dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=FF, vocab_size=V, max_position_embeddings=40),
                ["query", "value", "*.intermediate.dense"]),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(dim=H, n_layers=2, n_heads=4, hidden_dim=FF, vocab_size=V,
                                                               max_position_embeddings=32),
                   ["q_lin", "v_lin", "lin1", "lin2"]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=H, n_layer=2, n_head=4, vocab_size=V, n_positions=32,
                                                   bos_token_id=0, eos_token_id=0),
             ["c_attn", "c_proj", "c_fc"]),
    "t5": ("T5Config", "T5Model", dict(d_model=H, d_kv=12, d_ff=FF, num_layers=2, num_heads=4, vocab_size=V,
                                       decoder_start_token_id=0),
           ["q", "v", "wi", "wo"]),
}


def build(family: str, seed: int = 0):
    config_name, model_name, kw, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kw))
    return model.eval()


def inputs(family: str) -> dict:
    ids = torch.randint(3, V, (2, T), generator=torch.Generator().manual_seed(1))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        feed["decoder_input_ids"] = ids[:, :5]
    return feed


def output(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(family))
    return out.logits if family == "gpt2" else out.last_hidden_state


def _perturb_auxiliaries(model, seed: int = 2) -> None:
    """Stand in for training: move every trainable tensor a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mpo_ify_full_rank_is_exact_and_reported(family):
    model = build(family)
    ref = output(model, family)
    dense_types = {name: type(mod) for name, mod in model.named_modules()}
    report = mpo_ify(model, include=FAMILIES[family][3], n=5)
    replaced = [name for name, mod in model.named_modules() if isinstance(mod, MPOLinear)]
    assert replaced and sorted(replaced) == sorted(row.name for row in report.layers)
    diff = float((output(model, family) - ref).abs().max())
    assert diff < 1e-5, f"{family}: max abs diff {diff:.2e} at full rank"
    assert report.params_before == sum(p.numel() for p in build(family).parameters())
    assert report.params_after == sum(p.numel() for p in model.parameters())
    for row in report.layers:
        assert row.error_bound < 1e-4 and row.relative_error < 1e-5
        assert row.mpo_params > 0 and row.dense_params > 0
    if family == "gpt2":
        assert all(dense_types[name].__name__ == "Conv1D" for name in replaced)
    # merge back: the original module types, the same outputs
    unmpo_ify(model)
    assert not any(isinstance(m, MPOLinear) for m in model.modules())
    assert all(type(model.get_submodule(name)) is dense_types[name] for name in replaced)
    assert float((output(model, family) - ref).abs().max()) < 1e-5


def test_pattern_matching_nothing_names_the_pattern_and_the_modules():
    model = build("bert")
    with pytest.raises(ValueError, match=r"'qurey'.*encoder\.layer\.0\.attention\.self\.query"):
        mpo_ify(model, include=["query", "qurey"])
    assert not any(isinstance(m, MPOLinear) for m in model.modules()), "nothing replaced on a bad pattern"
    with pytest.raises(ValueError, match="qurey"):
        compress(model, rel_tol=0.3, include="qurey")
    with pytest.raises(ValueError, match="qurey"):
        OverParameterization(model, include=["qurey"])


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
@pytest.mark.parametrize("rel_tol", [0.1, 0.3])
def test_compress_never_larger_than_dense(family, rel_tol):
    model = build(family)
    before = sum(p.numel() for p in model.parameters())
    report = compress(model, rel_tol=rel_tol, include=FAMILIES[family][3], n=5)
    assert report.params <= report.dense_params
    assert report.model_params_after <= before
    for m in report.matrices:
        if m.kept_dense:
            assert m.params == m.dense_params and m.reason
            assert not isinstance(model.get_submodule(m.name), MPOLinear)
        else:
            assert m.params < m.dense_params
            assert m.relative_error_bound <= rel_tol + 1e-9


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_opf_expands_and_merges_back_to_original_types(family):
    model = build(family)
    ref = output(model, family)
    types = {name: type(mod) for name, mod in model.named_modules()}
    opf = OverParameterization(model, include=FAMILIES[family][3])
    opf.expand(opf.candidates)
    assert opf.extra_params() > 0
    assert float((output(model, family) - ref).abs().max()) < 1e-5
    opf.merge()
    assert all(type(model.get_submodule(name)) is types[name] for name in opf.candidates)
    assert float((output(model, family) - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_whole_mpo_model_saves_and_reloads(tmp_path, family):
    model = build(family)
    report = compress(model, budget=0.5, include=FAMILIES[family][3], n=5)
    assert report.params <= 0.5 * report.dense_params and not all(m.kept_dense for m in report.matrices)
    ref = output(model, family)
    save_mpo_model(model, tmp_path / "ckpt")
    again = load_mpo_model(type(model), tmp_path / "ckpt")
    assert float((output(again, family) - ref).abs().max()) < 1e-6
    assert sorted(n for n, m in again.named_modules() if isinstance(m, MPOLinear)) == \
        sorted(n for n, m in model.named_modules() if isinstance(m, MPOLinear))
    with pytest.raises(FileNotFoundError, match="mpo_layout.json"):
        load_mpo_model(type(model), tmp_path / "missing")
    other = transformers.DistilBertModel if family == "bert" else transformers.BertModel
    with pytest.raises(ValueError, match="wrong family"):
        load_mpo_model(other, tmp_path / "ckpt")


_PLAIN_LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["mpo_core"] = None            # mpo_core cannot be imported in this process
    import torch, transformers
    cases = json.loads(sys.argv[1])
    worst = 0.0
    for case in cases:
        model = getattr(transformers, case["class"]).from_pretrained(case["dir"]).eval()
        feed = torch.load(case["inputs"])
        with torch.no_grad():
            out = model(**feed)
        out = out.logits if case["family"] == "gpt2" else out.last_hidden_state
        worst = max(worst, float((out - torch.load(case["expected"])).abs().max()))
    print(json.dumps({"max_abs_diff": worst, "mpo_core_loaded": any(k.startswith("mpo_core.") for k in sys.modules)}))
""")


def test_merged_models_load_with_plain_transformers(tmp_path):
    """Lightweight fine-tuning on every family, merged, saved as ordinary checkpoints, loaded without mpo_core."""
    cases = []
    for family in FAMILIES:
        model = build(family)
        wrapped = get_lightweight_model(model, LightweightConfig(target_modules=FAMILIES[family][3]))
        _perturb_auxiliaries(wrapped)
        tuned = output(wrapped, family)
        merged = wrapped.merge_and_unload()
        assert not any(isinstance(m, MPOLinear) for m in merged.modules())
        assert float((output(merged, family) - tuned).abs().max()) < 1e-5
        assert float((output(merged, family) - output(build(family), family)).abs().max()) > 1e-4, "the tuning shows"
        folder = tmp_path / family
        merged.save_pretrained(folder)
        torch.save(inputs(family), folder / "inputs.pt")
        torch.save(tuned, folder / "expected.pt")
        cases.append({"family": family, "class": FAMILIES[family][1], "dir": str(folder),
                      "inputs": str(folder / "inputs.pt"), "expected": str(folder / "expected.pt")})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _PLAIN_LOADER, json.dumps(cases)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["mpo_core_loaded"]
    assert result["max_abs_diff"] < 1e-5, result
