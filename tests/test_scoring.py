"""The scoring engine equals an unbatched fp32 full-logits computation, and no batching choice changes a number."""

from __future__ import annotations

import json

import numpy as np
import pytest
from oracle import full_logits_logp, logp_close

from prefdiag.scoring import LogProbScorer, ScoreSettings
from prefdiag.tokenization import tokenize_pairs


def _load(model_dirs, style):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs[style]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tokenize(tokenizer, rows, **kwargs):
    return tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], **kwargs)


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen"])
@pytest.mark.parametrize("layout", ["prefix", "packed", "separate"])
def test_logps_equal_unbatched_full_logits(model_dirs, pairs_file, chat_file, style, layout):
    tokenizer, model = _load(model_dirs, style)
    rows = _rows(chat_file if style == "qwen" else pairs_file)
    tokenized = _tokenize(tokenizer, rows)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=256, layout=layout))
    chosen, rejected = scorer.score(tokenized)
    assert scorer.settings.layout == layout  # no fallback happened
    for i in range(len(rows)):
        expected_c, n_c = full_logits_logp(model, tokenized.prompt_ids[i], tokenized.chosen_ids[i])
        expected_r, n_r = full_logits_logp(model, tokenized.prompt_ids[i], tokenized.rejected_ids[i])
        assert chosen[i] == logp_close(expected_c)
        assert rejected[i] == logp_close(expected_r)
        assert (n_c, n_r) == (len(tokenized.chosen_ids[i]), len(tokenized.rejected_ids[i]))
    assert np.abs(chosen - rejected).max() > 1.0  # the test models tell responses apart


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_batch_size_order_and_padding_side_change_nothing(model_dirs, pairs_file, style):
    tokenizer, model = _load(model_dirs, style)
    rows = _rows(pairs_file)
    tokenized = _tokenize(tokenizer, rows)
    base_c, base_r = LogProbScorer(model, ScoreSettings(batch_tokens=1)).score(tokenized)  # one pair per batch
    variants = [
        ScoreSettings(batch_tokens=100_000),
        ScoreSettings(batch_tokens=300, padding_side="left"),
        ScoreSettings(batch_tokens=500, layout="separate", padding_side="left"),
    ]
    for settings in variants:
        c, r = LogProbScorer(model, settings).score(tokenized)
        np.testing.assert_allclose(c, base_c, atol=1e-5, rtol=0)
        np.testing.assert_allclose(r, base_r, atol=1e-5, rtol=0)
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled = _tokenize(tokenizer, [rows[k] for k in order])
    c, r = LogProbScorer(model, ScoreSettings(batch_tokens=700)).score(shuffled)
    np.testing.assert_allclose(c, base_c[order], atol=1e-5, rtol=0)
    np.testing.assert_allclose(r, base_r[order], atol=1e-5, rtol=0)


def test_truncated_pairs_score_what_trl_scores_and_dropped_pairs_are_nan(model_dirs, pairs_file):
    tokenizer, model = _load(model_dirs, "llama")
    rows = _rows(pairs_file)
    tokenized = _tokenize(tokenizer, rows, max_length=24)
    assert tokenized.truncated.any() and tokenized.dropped.any()
    chosen, rejected = LogProbScorer(model).score(tokenized)
    for i in range(len(rows)):
        if tokenized.dropped[i]:
            assert np.isnan(chosen[i]) and np.isnan(rejected[i])
            continue
        assert len(tokenized.prompt_ids[i]) + len(tokenized.chosen_ids[i]) <= 24
        expected, _ = full_logits_logp(model, tokenized.prompt_ids[i], tokenized.chosen_ids[i])
        assert chosen[i] == logp_close(expected)


def test_a_model_whose_head_transform_we_do_not_know_falls_back_to_full_forwards(model_dirs, pairs_file):
    tokenizer, model = _load(model_dirs, "llama")
    rows = _rows(pairs_file)[:4]
    tokenized = _tokenize(tokenizer, rows)
    expected = LogProbScorer(model).score(tokenized)
    original_forward = model.forward

    def scaled_forward(*args, **kwargs):  # an unknown architecture that rescales its logits
        out = original_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled_forward
    scorer = LogProbScorer(model)
    chosen, _ = scorer.score(tokenized)
    assert scorer.use_full_forward
    for i in range(len(rows)):
        assert chosen[i] != pytest.approx(expected[0][i], abs=1e-3)


def test_out_of_memory_halves_the_batch_and_loses_no_pair(model_dirs, pairs_file, caplog):
    import torch

    import logging

    caplog.set_level(logging.WARNING, logger="prefdiag")
    tokenizer, model = _load(model_dirs, "llama")
    tokenized = _tokenize(tokenizer, _rows(pairs_file))
    expected = LogProbScorer(model, ScoreSettings(batch_tokens=100_000)).score(tokenized)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=100_000))
    original = scorer._forward

    def small_device(bins):  # a device that holds at most 300 padded tokens
        if len(bins) * max(sum(len(r.input_ids) for r in rows) for rows in bins) > 300:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(bins)

    scorer._forward = small_device
    chosen, rejected = scorer.score(tokenized)
    np.testing.assert_allclose(chosen, expected[0], atol=1e-5)
    np.testing.assert_allclose(rejected, expected[1], atol=1e-5)
    assert scorer.settings.batch_tokens <= 300
    assert "out of memory" in caplog.text


def test_out_of_memory_on_one_sequence_is_a_clear_run_error(model_dirs, pairs_file):
    import torch

    from prefdiag.errors import RunError

    tokenizer, model = _load(model_dirs, "llama")
    scorer = LogProbScorer(model)

    def no_memory(rows):
        raise torch.OutOfMemoryError("CUDA out of memory")

    scorer._forward = no_memory
    with pytest.raises(RunError, match="out of memory scoring a single sequence"):
        scorer.score(_tokenize(tokenizer, _rows(pairs_file)))


def test_identical_responses_tie_exactly(model_dirs):
    tokenizer, model = _load(model_dirs, "llama")
    tokenized = tokenize_pairs(tokenizer, ["Question: what is the sky", "Q: one two"], [" blue.", " three."],
                               [" blue.", " four."])
    chosen, rejected = LogProbScorer(model).score(tokenized)
    assert chosen[0] == rejected[0]
    assert chosen[1] != rejected[1]


def test_packed_rows_hold_several_pairs_each_once_within_the_row_length():
    from prefdiag.scoring import pack_rows

    lengths = list(np.random.default_rng(0).integers(50, 900, size=2000))
    order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
    bins = pack_rows(lengths, order, 2048)
    assert sorted(k for b in bins for k in b) == list(range(len(lengths)))
    assert all(sum(lengths[k] for k in b) <= 2048 for b in bins)
    assert sum(lengths) / (2048 * len(bins)) > 0.9  # rows are nearly full: little padding
    assert pack_rows([3000, 10], [0, 1], 3000) == [[0], [1]]


def test_packed_layout_falls_back_to_prefix_when_the_kernel_cannot_run(model_dirs, pairs_file, monkeypatch, caplog):
    import logging

    from prefdiag import flex

    caplog.set_level(logging.WARNING, logger="prefdiag")
    tokenizer, model = _load(model_dirs, "llama")
    tokenized = _tokenize(tokenizer, _rows(pairs_file))
    expected = LogProbScorer(model).score(tokenized)

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no flex attention on this device")

    monkeypatch.setattr(flex, "attention", no_kernel)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=256, layout="packed"))
    chosen, rejected = scorer.score(tokenized)
    assert scorer.settings.layout == "prefix"
    assert "packed layout cannot run here (NotImplementedError: no flex attention" in caplog.text
    assert model.config._attn_implementation == "sdpa"  # the model's own attention is back
    np.testing.assert_allclose(chosen, expected[0], atol=1e-5)
    np.testing.assert_allclose(rejected, expected[1], atol=1e-5)


@pytest.mark.parametrize("layout", ["prefix", "separate"])
def test_padding_stays_under_a_tenth_of_the_computed_tokens(model_dirs, pairs_file, layout):
    tokenizer, model = _load(model_dirs, "llama")
    rows = _rows(pairs_file)
    rows[0] = dict(rows[0], prompt=rows[0]["prompt"] * 6)  # one long outlier among short pairs
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=4096, layout=layout))
    scorer.score(_tokenize(tokenizer, rows))
    assert 1 - scorer.tokens["real"] / scorer.tokens["computed"] <= 0.1


def test_packed_batches_keep_one_shape_where_the_kernel_is_compiled(model_dirs, pairs_file, monkeypatch):
    """On CUDA every packed batch has the same shape, so the compiled kernel is never recompiled: the last batch is
    filled up with empty rows. Checked here as CUDA would run it, the block masks compiled too, except that the
    eager attention kernel stands in for the compiled one."""
    from torch.nn.attention.flex_attention import flex_attention

    from prefdiag import flex

    tokenizer, model = _load(model_dirs, "llama")
    tokenized = _tokenize(tokenizer, _rows(pairs_file))
    expected = LogProbScorer(model).score(tokenized)
    monkeypatch.setattr(flex, "compiles_on", lambda device_type: True)
    monkeypatch.setattr(flex, "_kernel", lambda device_type: flex_attention)
    shapes = []
    original = flex.attention

    def recording(module, query, *args, **kwargs):
        shapes.append(tuple(query.shape[::2]))  # (rows, row length)
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(flex, "attention", recording)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=512, pack_tokens=256, layout="packed"))
    chosen, rejected = scorer.score(tokenized)
    assert scorer.settings.layout == "packed" and scorer.batches_done > 2
    assert set(shapes) == {(2, 256)}  # 512 tokens a batch, rows of 256
    np.testing.assert_allclose(chosen, expected[0], atol=1e-5)
    np.testing.assert_allclose(rejected, expected[1], atol=1e-5)
