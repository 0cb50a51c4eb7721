"""The lightweight fine-tuning's and MPO checkpoints' error paths that tests/test_lightweight.py does not
reach: a wrong config, a merged model asked for its trained tensors, saved tensors or layouts that do not
fit the base model, checkpoints without a transformers config or of another model class."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_lightweight import CONFIG, bert, logits, train

from mpo_core import compress
from mpo_core.lightweight import (CONFIG_NAME, WEIGHTS_NAME, LightweightConfig, LightweightModel, get_lightweight_model,
                                  load_mpo_model, save_mpo_model)


def test_config_and_arguments():
    with pytest.raises(TypeError, match="modules_to_save must be a list of name patterns, got 'classifier'"):
        LightweightConfig(target_modules="query", modules_to_save="classifier")
    with pytest.raises(ValueError, match="not an mpo-lightweight config \\(method='lora'\\)"):
        LightweightConfig.from_dict({"method": "lora"})
    with pytest.raises(TypeError, match="config must be a LightweightConfig, got dict"):
        get_lightweight_model(bert(), {"target_modules": "query"})
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        get_lightweight_model("bert", LightweightConfig(target_modules="query"))


def test_attributes_and_a_merged_model():
    model = get_lightweight_model(bert(), LightweightConfig(**CONFIG))
    assert model.config is model.base_model.config  # the base model's attributes show through
    with pytest.raises(AttributeError):
        model.no_such_attribute
    bare = LightweightModel.__new__(LightweightModel)
    torch.nn.Module.__init__(bare)
    with pytest.raises(AttributeError):
        bare.base_model  # not set yet: no recursion through __getattr__
    model.merge()
    with pytest.raises(RuntimeError, match="is merged; call unmerge\\(\\) first"):
        model.trainable_state_dict()


def test_saved_tensors_that_do_not_fit(tmp_path):
    model = get_lightweight_model(bert(), LightweightConfig(**CONFIG))
    train(model, 1)
    model.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    name = sorted(tensors)[0]
    save_file({**tensors, "extra.weight": torch.zeros(1)}, tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="holds tensors"):
        LightweightModel.from_pretrained(bert(), tmp_path / "a")
    save_file({**tensors, name: torch.zeros(*tensors[name].shape, 2)}, tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=f"tensor '{name}' is"):
        LightweightModel.from_pretrained(bert(), tmp_path / "a")
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME)
    torch.manual_seed(0)
    one_layer = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, vocab_size=100,
        max_position_embeddings=32, num_labels=3)).eval()
    with pytest.raises(ValueError, match="the base model's target modules"):
        LightweightModel.from_pretrained(one_layer, tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    first = sorted(config["layers"])[0]
    config["layers"][first]["bias"] = not config["layers"][first]["bias"]  # a layout of another model
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"module '{first}': saved bias=.*, the base model gives"):
        LightweightModel.from_pretrained(bert(), tmp_path / "a")


def test_mpo_checkpoints_replaced_and_refused(tmp_path):
    model = bert()
    compress(model, budget=0.5, include=["query"])
    save_mpo_model(model, tmp_path / "ckpt")
    save_mpo_model(model, tmp_path / "ckpt")  # replaces the earlier one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert float((logits(load_mpo_model(transformers.BertForSequenceClassification, tmp_path / "ckpt"))
                  - logits(model)).abs().max()) < 1e-6
    with pytest.raises(TypeError, match="model_class must be a transformers model class"):
        load_mpo_model(torch.nn.Linear, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="BertModel has no module"):
        load_mpo_model(transformers.BertModel, tmp_path / "ckpt")  # the classifier's layout: bert.encoder...
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    compress(plain, budget=0.5, n=3)
    save_mpo_model(plain, tmp_path / "plain")  # no transformers config to save
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_mpo_model(transformers.BertForSequenceClassification, tmp_path / "plain")


def test_mpo_checkpoints_that_do_not_fit_the_model(tmp_path):
    """Files missing, a checkpoint of another family, saved ranks a layer cannot hold, and sharded weights
    with a tensor the model lacks: each refused with its reason."""
    import shutil

    model = bert()
    compress(model, budget=0.5, include=["query"])
    good = tmp_path / "good"
    save_mpo_model(model, good)
    cls = transformers.BertForSequenceClassification

    def variant(name):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    (v := variant("no_weights")).joinpath("model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found: save_mpo_model writes"):
        load_mpo_model(cls, v)
    config = json.loads((v := variant("gpt2")).joinpath("config.json").read_text())
    v.joinpath("config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="holds a 'gpt2' model; BertForSequenceClassification expects 'bert'"):
        load_mpo_model(cls, v)
    layout = json.loads((v := variant("ranks")).joinpath("mpo_layout.json").read_text())
    name = sorted(layout)[0]
    layout[name]["ranks"] = [1] + [10**6] * (len(layout[name]["ranks"]) - 2) + [1]
    v.joinpath("mpo_layout.json").write_text(json.dumps(layout))
    with pytest.raises(ValueError, match=f"module '{name}': saved ranks \\[1, 1000000.* exceed the full ranks"):
        load_mpo_model(cls, v)
    state = load_file((v := variant("sharded")).joinpath("model.safetensors"))
    v.joinpath("model.safetensors").unlink()
    save_file({**state, "extra.weight": torch.zeros(2)}, v / "shard-1.safetensors")
    v.joinpath("model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "shard-1.safetensors" for k in [*state, "extra.weight"]}}))
    with pytest.raises(ValueError, match=r"checkpoint and model disagree: missing \[\], unexpected \['extra.weight'\]"):
        load_mpo_model(cls, v)
    save_file(state, v / "shard-1.safetensors")  # the same tensors, sharded: loads as the single file did
    assert float((logits(load_mpo_model(cls, v)) - logits(model)).abs().max()) < 1e-6
