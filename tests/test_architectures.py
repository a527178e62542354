"""Any causal LM architecture scores as its own unpadded forward does, in every layout: rotary, learned and
ALiBi positions, sliding windows, logit soft-capping and scaling, attention sinks, mixtures of experts."""

from __future__ import annotations

import pytest
from oracle import full_logits_logp, logp_close

from prefdiag.scoring import LogProbScorer, ScoreSettings
from prefdiag.tokenization import tokenize_pairs

ARCHITECTURES = [
    "opt", "gpt_neox", "phi", "stablelm", "gptj", "codegen", "gpt_bigcode", "olmo2", "starcoder2", "cohere",
    "granite", "gemma", "gemma3_text", "qwen3", "mixtral", "exaone4", "gpt_oss", "ministral", "persimmon", "xglm",
    "biogpt", "llama4_text",
]  # fmt: skip

TINY = {"hidden_size": 32, "n_embd": 32, "d_model": 32, "intermediate_size": 64, "ffn_dim": 64, "n_inner": 64,
        "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "num_attention_heads": 4, "n_head": 4, "num_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "rotary_dim": 4, "max_position_embeddings": 512, "n_positions": 512,
        "sliding_window": 6}  # fmt: skip


def _tiny_model(model_type: str, vocab: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    config.vocab_size = vocab
    for name, value in TINY.items():
        if hasattr(config, name):
            setattr(config, name, value)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenized():
    from conftest import build_tokenizer, make_pairs

    tokenizer = build_tokenizer("llama")
    rows = make_pairs(6)
    pairs = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                           [r["rejected"] for r in rows])
    return len(tokenizer), pairs


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_layout_scores_as_the_models_own_forward(tokenized, model_type):
    vocab, pairs = tokenized
    model = _tiny_model(model_type, vocab)
    expected = [
        (full_logits_logp(model, p, c)[0], full_logits_logp(model, p, r)[0])
        for p, c, r in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)
    ]
    for layout in ["prefix", "packed"]:
        chosen, rejected = LogProbScorer(model, ScoreSettings(batch_tokens=256, layout=layout)).score(pairs)
        for i, (c, r) in enumerate(expected):
            assert chosen[i] == logp_close(c), (layout, i)
            assert rejected[i] == logp_close(r), (layout, i)


def _windowed_model(name: str, vocab: int):
    """Tiny models whose masks are not plain causal: windows shorter than the pairs, ALiBi biases that follow token
    indices, and layers that are not attention at all."""
    import torch
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if name == "mistral: one mask, window 6":
        return transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=6, **common))
    if name == "gemma2: sliding and full layers":
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(sliding_window=6, head_dim=8, **common))
    if name == "qwen2 eager: sliding and full layers":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            use_sliding_window=True, sliding_window=5, max_window_layers=1, attn_implementation="eager", **common))
    if name == "bloom: alibi":
        return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2,
                                                                      n_head=4))
    if name == "mpt: alibi":
        return transformers.MptForCausalLM(transformers.MptConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4))
    assert name == "mamba: no attention"
    return transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, state_size=4))


WINDOWED = ["mistral: one mask, window 6", "gemma2: sliding and full layers", "qwen2 eager: sliding and full layers",
            "bloom: alibi", "mpt: alibi", "mamba: no attention"]


@pytest.fixture(scope="module")
def windowed_models(tokenized):
    vocab, _ = tokenized
    return {name: _windowed_model(name, vocab).eval() for name in WINDOWED}


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize(
    "layout,padding_side", [("prefix", "right"), ("prefix", "left"), ("packed", "right"), ("separate", "right")]
)
def test_sliding_window_and_non_attention_models_score_as_unpadded_forwards(
    windowed_models, tokenized, name, layout, padding_side
):
    """Regression: a 4D mask made every layer attend to the whole prefix, so sliding-window layers saw past their
    window (0.26 nats off on Mistral, 0.93 on Gemma 2); MPT's ALiBi measured distances across the chosen response
    (0.06 nats off), and Bloom and Mamba crashed on the mask."""
    _, pairs = tokenized
    model = windowed_models[name]
    assert max(len(p) + len(c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)) > 3 * 6  # past every window
    settings = ScoreSettings(batch_tokens=200, layout=layout, padding_side=padding_side)
    chosen, rejected = LogProbScorer(model, settings).score(pairs)
    for i in range(len(pairs)):
        expected_c, _ = full_logits_logp(model, pairs.prompt_ids[i], pairs.chosen_ids[i])
        expected_r, _ = full_logits_logp(model, pairs.prompt_ids[i], pairs.rejected_ids[i])
        assert chosen[i] == logp_close(expected_c)
        assert rejected[i] == logp_close(expected_r)


def _rescaling_llama(vocab: int):
    """A Llama whose own forward halves its logits after the head: a head path our engine does not know."""
    import torch
    import transformers

    class RescalingLlama(transformers.LlamaForCausalLM):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = out.logits * 0.5
            return out

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return RescalingLlama(config).eval()


@pytest.mark.parametrize("layout", ["prefix", "separate", "packed"])
def test_a_head_path_that_differs_is_caught_on_the_first_batch(tokenized, layout):
    vocab, pairs = tokenized
    model = _rescaling_llama(vocab)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=256, layout=layout))
    chosen, rejected = scorer.score(pairs)
    assert scorer.use_full_forward
    for i in range(len(pairs)):
        assert chosen[i] == logp_close(full_logits_logp(model, pairs.prompt_ids[i], pairs.chosen_ids[i])[0])
        assert rejected[i] == logp_close(full_logits_logp(model, pairs.prompt_ids[i], pairs.rejected_ids[i])[0])


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text", "cohere", "granite"])
def test_the_head_path_check_adds_no_forward_pass(tokenized, model_type):
    """The check runs within the first batch's own forward pass: the body runs once per batch and on real batches
    only (it used to run twice more, with the whole model, on 16 tokens of the first pair)."""
    vocab, pairs = tokenized
    model = _tiny_model(model_type, vocab)
    shapes = []
    handle = model.base_model.register_forward_hook(lambda module, args, out: shapes.append(tuple(out[0].shape[:2])))
    try:
        scorer = LogProbScorer(model, ScoreSettings(batch_tokens=256))
        scorer.score(pairs)
    finally:
        handle.remove()
    assert not scorer.use_full_forward
    assert len(shapes) == scorer.batches_done
    assert all(length > 16 for _, length in shapes)
