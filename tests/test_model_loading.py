"""models.load_model's fast path (a local model.safetensors assigned to a model built without initialising) loads
exactly what from_pretrained loads, on every tiny architecture; anything unusual goes to from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from test_architectures import ARCHITECTURES, _tiny_model

from prefdiag import fast_loading, models

CPU = torch.device("cpu")


def _tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _assert_same_model(fast, slow) -> None:
    assert type(fast) is type(slow)
    assert fast.config.to_dict() == slow.config.to_dict()
    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    for key in fast_state:
        assert fast_state[key].dtype == slow_state[key].dtype, key
        assert torch.equal(fast_state[key], slow_state[key]), key
    fast_buffers, slow_buffers = dict(fast.named_buffers()), dict(slow.named_buffers())  # rotary inv_freq included
    assert fast_buffers.keys() == slow_buffers.keys()
    for key in fast_buffers:
        assert torch.equal(fast_buffers[key], slow_buffers[key]), key
    assert _tied(fast) == _tied(slow)
    assert not fast.training
    ids = torch.randint(0, fast.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(fast(input_ids=ids).logits, slow(input_ids=ids).logits)


def _reference_load(path, dtype=torch.float32):
    model = models._from_pretrained(str(path), "model", dict(dtype=dtype))
    return model.eval()


# gpt_neox (its head is saved as embed_out and renamed on loading) and mixtral (per-expert weights fused on loading)
CONVERTED = {"gpt_neox", "mixtral"}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_fast_path_loads_what_from_pretrained_loads(tmp_path, model_type):
    _tiny_model(model_type, 300).save_pretrained(tmp_path)
    fast = fast_loading.from_local_safetensors(str(tmp_path), torch.float32, False)
    if model_type in CONVERTED:
        assert fast is None
    else:
        assert fast is not None
        _assert_same_model(fast.eval(), _reference_load(tmp_path))
    loaded = models.load_model(str(tmp_path), dtype=torch.float32, device=CPU)
    _assert_same_model(loaded.model, _reference_load(tmp_path))


@pytest.mark.parametrize("style", ["llama", "qwen", "gpt2"])  # untied head, tied head, tied (Conv1D) head
def test_tied_and_untied_heads_and_a_cast_to_bfloat16(model_dirs, style):
    loaded = models.load_model(str(model_dirs[style]), dtype=torch.float32, device=CPU)
    assert fast_loading.from_local_safetensors(str(model_dirs[style]), torch.float32, False) is not None
    _assert_same_model(loaded.model, _reference_load(model_dirs[style]))
    assert loaded.model.config._name_or_path == str(model_dirs[style])
    bf16 = models.load_model(str(model_dirs[style]), dtype=torch.bfloat16, device=CPU)
    _assert_same_model(bf16.model, _reference_load(model_dirs[style], torch.bfloat16))


def _copy(model_dirs, tmp_path, style="llama"):
    import shutil

    target = tmp_path / style
    shutil.copytree(model_dirs[style], target)
    return target


def _rewrite_weights(path, change) -> None:
    import safetensors.torch

    state = safetensors.torch.load_file(str(path / "model.safetensors"))
    change(state)
    safetensors.torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_a_sharded_checkpoint_goes_to_from_pretrained(model_dirs, tmp_path):
    model = _reference_load(model_dirs["llama"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert fast_loading.from_local_safetensors(str(tmp_path), torch.float32, False) is None
    loaded = models.load_model(str(tmp_path), dtype=torch.float32, device=CPU)
    _assert_same_model(loaded.model, _reference_load(tmp_path))


@pytest.mark.parametrize("change", ["extra key", "missing key", "other shape"])
def test_keys_or_shapes_that_do_not_match_go_to_from_pretrained(model_dirs, tmp_path, change):
    path = _copy(model_dirs, tmp_path)

    def edit(state):
        if change == "extra key":
            state["model.layers.0.extra.weight"] = torch.zeros(2)
        elif change == "missing key":
            del state["model.layers.0.mlp.up_proj.weight"]
        else:
            state["model.norm.weight"] = torch.ones(7)

    _rewrite_weights(path, edit)
    assert fast_loading.from_local_safetensors(str(path), torch.float32, False) is None


def test_a_missing_tied_head_is_tied_as_from_pretrained_ties_it(model_dirs, tmp_path):
    import safetensors.torch

    path = _copy(model_dirs, tmp_path, "qwen")
    assert "lm_head.weight" not in safetensors.torch.load_file(str(path / "model.safetensors"))
    fast = fast_loading.from_local_safetensors(str(path), torch.float32, False)
    assert fast is not None and _tied(fast)


@pytest.mark.parametrize("key", ["quantization_config", "auto_map"])
def test_quantized_and_remote_code_configs_go_to_from_pretrained(model_dirs, tmp_path, key):
    path = _copy(model_dirs, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[key] = {"quant_method": "bitsandbytes"} if key == "quantization_config" else {"AutoModel": "x.Y"}
    (path / "config.json").write_text(json.dumps(config))
    assert fast_loading.from_local_safetensors(str(path), torch.float32, False) is None


def test_a_checkpoint_without_safetensors_goes_to_from_pretrained(model_dirs, tmp_path):
    path = _copy(model_dirs, tmp_path)
    state = _reference_load(path).state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    assert fast_loading.from_local_safetensors(str(path), torch.float32, False) is None
    _assert_same_model(models.load_model(str(path), dtype=torch.float32, device=CPU).model, _reference_load(path))


def test_an_architecture_without_sdpa_loads_with_eager_attention(tmp_path):
    # transformers refuses SDPA for gpt_oss with a message that names scaled_dot_product_attention, not "sdpa"
    _tiny_model("gpt_oss", 300).save_pretrained(tmp_path)
    loaded = models.load_model(str(tmp_path), dtype=torch.float32, device=CPU)
    assert loaded.model.config._attn_implementation == "eager"
    model = models._from_pretrained(str(tmp_path), "model", dict(dtype=torch.float32))
    assert model.config._attn_implementation == "eager"


@pytest.fixture
def config_loads(monkeypatch):
    """The names AutoConfig.from_pretrained is called with (it still runs)."""
    from transformers import AutoConfig

    calls, original = [], AutoConfig.from_pretrained.__func__

    def counted(cls, name, *args, **kwargs):
        calls.append(str(name))
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(counted))
    return calls


@pytest.mark.parametrize("style", ["llama", "qwen", "gpt2"])
def test_a_local_vocabulary_size_is_read_from_config_json(model_dirs, style, config_loads):
    from transformers import AutoConfig

    size = models.config_vocabulary_size(str(model_dirs[style]))
    assert config_loads == []
    assert size == AutoConfig.from_pretrained(model_dirs[style]).vocab_size


def test_a_config_json_without_vocab_size_asks_autoconfig(model_dirs, tmp_path, config_loads):
    path = _copy(model_dirs, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["vocab_size"]
    (path / "config.json").write_text(json.dumps(config))
    assert models.config_vocabulary_size(str(path)) == 32000  # LlamaConfig's default, as AutoConfig gives it
    assert config_loads == [str(path)]
