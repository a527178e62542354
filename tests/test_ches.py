"""CHES from the scoring engine equals an unbatched fp32 computation in every layout and code path; its percentiles,
flag and summary; and the engine's faults: weights with NaN, a pair too long for any memory."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from oracle import full_ches

from prefdiag.ches import HIGH_CHES_TOP_SHARE, add_ches_columns, ches_from_sums, summarize_ches
from prefdiag.scoring import LogProbScorer, ScoreSettings
from prefdiag.tokenization import TokenizedPairs, tokenize_pairs


def _load(model_dirs, style):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dirs[style]
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _tokenized(tokenizer, path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows])


def _assert_ches_equals_oracle(model, tokenized, extras):
    for i in range(len(tokenized)):
        ches, ches_norm = full_ches(model, tokenized.prompt_ids[i], tokenized.chosen_ids[i], tokenized.rejected_ids[i])
        assert extras["ches"][i] == pytest.approx(ches, rel=1e-4), i
        assert extras["ches_norm"][i] == pytest.approx(ches_norm, rel=1e-4), i


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen"])
@pytest.mark.parametrize("layout", ["prefix", "packed", "separate"])
def test_ches_equals_unbatched_fp32_oracle_in_every_layout(model_dirs, pairs_file, chat_file, style, layout):
    tokenizer, model = _load(model_dirs, style)
    tokenized = _tokenized(tokenizer, chat_file if style == "qwen" else pairs_file)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=256, layout=layout, ches=True))
    seen = {}

    def on_pairs_done(indices, chosen, rejected, extras):
        for name, values in extras.items():
            seen.setdefault(name, {}).update(zip(indices.tolist(), values.tolist()))

    scorer.score(tokenized, on_pairs_done=on_pairs_done)
    assert scorer.settings.layout == layout
    _assert_ches_equals_oracle(model, tokenized, scorer.extras)
    for name in ("ches", "ches_norm"):  # the values handed on as pairs finish are the final ones
        assert sorted(seen[name]) == list(range(len(tokenized)))
        np.testing.assert_array_equal([seen[name][i] for i in range(len(tokenized))], scorer.extras[name])
    assert np.ptp(scorer.extras["ches_norm"]) > 0


def test_ches_on_the_full_forward_path_and_the_2d_mask_path(model_dirs, pairs_file):
    import torch
    import transformers

    tokenizer, model = _load(model_dirs, "llama")
    tokenized = _tokenized(tokenizer, pairs_file)
    scorer = LogProbScorer(model, ScoreSettings(batch_tokens=300, ches=True))
    scorer.use_full_forward = True  # as after a failed head-path check
    scorer.score(tokenized)
    _assert_ches_equals_oracle(model, tokenized, scorer.extras)

    torch.manual_seed(0)
    bloom = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=len(tokenizer), hidden_size=32,
                                                                   n_layer=2, n_head=4)).eval()
    scorer = LogProbScorer(bloom, ScoreSettings(batch_tokens=300, ches=True))
    scorer.score(tokenized)
    assert scorer.windows is None  # ALiBi: TRL's right-padded rows with a 2D mask
    _assert_ches_equals_oracle(bloom, tokenized, scorer.extras)


def test_ches_is_nan_where_unscored_or_empty_and_zero_for_identical_responses(model_dirs):
    tokenizer, model = _load(model_dirs, "llama")
    prompts = ["Question: what is a cat?", "Question: why?", "Question: how?", "Question: who?"]
    chosen = [" a small animal.", "", " because.", " the same answer."]
    rejected = [" a large rock.", " no idea.", " somehow.", " the same answer."]
    tokenized = tokenize_pairs(tokenizer, prompts, chosen, rejected)
    scorer = LogProbScorer(model, ScoreSettings(ches=True))
    scorer.score(tokenized, pairs=[0, 1, 3])
    ches, norm = scorer.extras["ches"], scorer.extras["ches_norm"]
    if len(tokenized.chosen_ids[1]):  # the tokenizer may give an empty completion an EOS token
        assert np.isfinite(ches[1])
    else:
        assert np.isnan(ches[1]) and np.isnan(norm[1])
    assert np.isfinite(ches[0]) and np.isnan(ches[2]) and np.isnan(norm[2])  # pair 2 was not asked for
    assert ches[3] == 0.0 and norm[3] == 0.0
    plain = LogProbScorer(model)
    plain.score(tokenized)
    assert plain.extras == {}  # off by default


def test_ches_from_sums_matches_its_definition():
    rng = np.random.default_rng(0)
    s_w, s_l = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    n_w, n_l = np.array([2, 3, 0]), np.array([4, 1, 2])
    ches, norm = ches_from_sums(s_w, s_l, n_w, n_l)
    for k in range(2):
        assert ches[k] == pytest.approx(s_w[k] @ s_l[k] - s_w[k] @ s_w[k])
        assert norm[k] == pytest.approx(s_w[k] @ s_l[k] / (n_w[k] * n_l[k]) - s_w[k] @ s_w[k] / n_w[k] ** 2)
    assert np.isnan(ches[2]) and np.isnan(norm[2])


def test_percentiles_flag_the_top_share_by_ches_norm_and_summary_counts_them():
    n = 40
    table = pd.DataFrame({"ches": np.arange(n, 0, -1, dtype=float), "ches_norm": np.arange(n, dtype=float)})
    table.loc[5, "ches_norm"] = np.nan
    out = add_ches_columns(table)
    assert list(out.columns[:2]) == ["ches", "ches_norm"] and "high_ches" not in table.columns
    assert out.loc[0, "ches_percentile"] == 100.0 and out.loc[n - 1, "ches_percentile"] == pytest.approx(100 / n)
    assert np.isnan(out.loc[5, "ches_norm_percentile"]) and not out.loc[5, "high_ches"]
    assert out.index[out["high_ches"]].tolist() == [38, 39]  # 5% of the 39 finite values: the top ~2
    assert add_ches_columns(table, 0.25)["high_ches"].sum() == 10  # ceil(0.25 * 39)
    summary = summarize_ches(out)
    assert summary["n_ches"] == 39 and summary["n_high_ches"] == 2
    assert summary["high_ches_rate"] == pytest.approx(2 / 39)
    assert summary["high_ches_top_share"] == HIGH_CHES_TOP_SHARE
    assert summary["ches_norm_quantiles"]["q50"] == pytest.approx(np.nanmedian(table["ches_norm"]))
    assert summarize_ches(pd.DataFrame({"x": [1.0]})) == {}
    assert "ches_percentile" not in add_ches_columns(pd.DataFrame({"x": [1.0]})).columns


def test_weights_with_nan_name_the_model_instead_of_a_tolerance_error(model_dirs, pairs_file):
    """Regression (issue 11): NaN weights made the head-path check raise 'atol must be greater than or equal to
    zero' (exit 3)."""
    import torch

    from prefdiag.errors import ModelError

    tokenizer, model = _load(model_dirs, "llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"model .*llama-0: its weights hold NaN or inf "
                                         r"\(model\.layers\.1\.mlp\.down_proj\.weight\)"):
        LogProbScorer(model).score(_tokenized(tokenizer, pairs_file))


def test_a_pair_too_long_for_any_memory_is_refused_up_front_naming_its_row(model_dirs):
    """Regression (issue 11): a 10 MB pair made the engine try to allocate terabytes for its attention mask."""
    from prefdiag.errors import UsageError

    tokenizer, model = _load(model_dirs, "llama")
    n = 3_000_000  # its [L, L] mask alone is 9 TB
    tokenized = TokenizedPairs(
        prompt_ids=[[1, 5, 6], [1, 5]], chosen_ids=[[7, 8], list(np.arange(n) % 50 + 3)], rejected_ids=[[9], [10]],
        chosen_full_tokens=np.array([2, n]), rejected_full_tokens=np.array([1, 1]),
        boundary_mismatch=np.zeros(2, bool), truncated=np.zeros(2, bool), dropped=np.zeros(2, bool),
    )
    started = time.perf_counter()
    with pytest.raises(UsageError, match=rf"row 2: the pair is {n + 3} tokens long") as info:
        LogProbScorer(model).score(tokenized)
    assert "--max-length" in info.value.hint
    assert time.perf_counter() - started < 30  # fails fast: no forward pass was tried


def test_weights_with_nan_are_named_on_the_full_forward_path_too(model_dirs, pairs_file):
    import torch

    from prefdiag.errors import ModelError

    tokenizer, model = _load(model_dirs, "gpt2")
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")
    scorer = LogProbScorer(model)
    scorer.use_full_forward = True  # no head-path check runs: the first batch's log-probs reveal it
    with pytest.raises(ModelError, match=r"its weights hold NaN or inf \(transformer\.h\.0\.attn\.c_attn\.weight\)"):
        scorer.score(_tokenized(tokenizer, pairs_file))
