"""The policy's vocabulary is compared from its files: no second tokenizer is built, and a policy whose tokenizer
really differs is still refused."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers

from prefdiag import models
from prefdiag.errors import ModelError


@pytest.fixture
def tokenizer_loads(monkeypatch):
    """Every tokenizer built from a directory (AutoTokenizer or prefdiag's loader) during the test."""
    built = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def counting(cls, name, *args, **kwargs):
        built.append(str(name))
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counting))
    return built


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen"])
def test_vocabulary_read_from_files_equals_the_loaded_tokenizers(model_dirs, style):
    loaded = models.load_tokenizer(str(model_dirs[style]))
    assert models.policy_vocabulary_from_files(str(model_dirs[style])) == loaded.get_vocab()


def test_tokenizer_files_that_differ_only_in_irrelevant_ways_build_no_second_tokenizer(model_dirs, tmp_path,
                                                                                      tokenizer_loads):
    reference = str(model_dirs["llama"])
    tokenizer = models.load_tokenizer(reference)
    policy = _copy(model_dirs["llama-policy"], tmp_path / "policy")
    definition = json.loads((policy / "tokenizer.json").read_text())
    definition["padding"] = {"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None,
                             "pad_id": 2, "pad_type_id": 0, "pad_token": "</s>"}
    (policy / "tokenizer.json").write_text(json.dumps(definition, indent=1))  # re-serialised: bytes differ
    config = json.loads((policy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 4096
    (policy / "tokenizer_config.json").write_text(json.dumps(config))
    assert (policy / "tokenizer.json").read_bytes() != (model_dirs["llama"] / "tokenizer.json").read_bytes()
    tokenizer_loads.clear()
    models.check_same_vocabulary(reference, str(policy), tokenizer)
    assert tokenizer_loads == []


def test_a_policy_tokenizer_with_other_ids_is_refused_without_building_it(model_dirs, tmp_path, tokenizer_loads):
    reference = str(model_dirs["llama"])
    tokenizer = models.load_tokenizer(reference)
    policy = _copy(model_dirs["llama-policy"], tmp_path / "policy")
    definition = json.loads((policy / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    a, b = sorted(t for t in vocab if t.isalpha())[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, same tokens, two ids swapped
    (policy / "tokenizer.json").write_text(json.dumps(definition))
    tokenizer_loads.clear()
    with pytest.raises(ModelError, match="differs from the reference's"):
        models.check_same_vocabulary(reference, str(policy), tokenizer)
    assert tokenizer_loads == []


def test_a_policy_with_another_tokenizer_is_refused(model_dirs, tokenizer_loads):
    tokenizer = models.load_tokenizer(str(model_dirs["llama"]))
    tokenizer_loads.clear()
    with pytest.raises(ModelError, match="vocabular|differs"):
        models.check_same_vocabulary(str(model_dirs["llama"]), str(model_dirs["gpt2"]), tokenizer)
    assert tokenizer_loads == []


def test_a_policy_without_tokenizer_json_is_loaded_to_compare(model_dirs, tmp_path, tokenizer_loads):
    reference = str(model_dirs["gpt2"])
    tokenizer = models.load_tokenizer(reference)
    policy = _copy(model_dirs["gpt2-policy"], tmp_path / "policy")
    (policy / "tokenizer.json").write_text("{not json")  # unreadable: fall back to loading what the dir holds
    tokenizer_loads.clear()
    models.check_same_vocabulary(reference, str(policy), tokenizer)  # as before: a tokenizer that cannot load
    assert tokenizer_loads == [str(policy)]  # is not held against the policy, but it was tried
