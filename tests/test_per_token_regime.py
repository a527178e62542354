"""The per-token regime flag and per-token ranking accuracy (Yang et al. 2026), on hand-made log-probs."""

from __future__ import annotations

import pandas as pd
import pytest

from prefdiag.diagnostics import add_pair_metrics, summarize


def test_per_token_regime_and_accuracy_by_hand():
    # chosen responses have 2 tokens, rejected 4: the summed and per-token conventions disagree.
    table = pd.DataFrame(
        {
            "pair_id": ["a", "b", "c", "d"],
            "chosen_tokens": [2, 2, 2, 2],
            "rejected_tokens": [4, 4, 4, 4],
            # reference per-token margins: a: -4/2 - -4/4 = -1; b: -1; c: -1; d: +1 (-2/2 - -8/4 = -1 + 2)
            "ref_chosen_logp": [-4.0, -4.0, -4.0, -2.0],
            "ref_rejected_logp": [-4.0, -4.0, -4.0, -8.0],
            # policy per-token margins: a: -3/2 - -4/4 = -0.5 (in U: < 0, above -1); b: -6/2 - -4/4 = -2 (below ref);
            # c: -1/2 - -4/4 = +0.5 (correct); d: -3/2 - -4/4 = -0.5 (negative, but the reference's was +1)
            "policy_chosen_logp": [-3.0, -6.0, -1.0, -3.0],
            "policy_rejected_logp": [-4.0, -4.0, -4.0, -4.0],
        }
    )
    out = add_pair_metrics(table, beta=0.1)
    assert out["policy_margin_per_token"].tolist() == pytest.approx([-0.5, -2.0, 0.5, -0.5])
    assert out["negative_margin_regime_per_token"].tolist() == [True, False, False, False]
    # The summed rule disagrees on pair a: summed margins 1 > 0, so it is not in the summed regime.
    assert out["negative_margin_regime"].tolist() == [False, False, False, False]
    summary = summarize(out, beta=0.1)
    assert summary["ranking_accuracy_per_token"] == pytest.approx(0.25)
    assert summary["negative_margin_regime_per_token_rate"] == pytest.approx(0.25)
    assert summary["ranking_accuracy"] == pytest.approx(0.75)  # summed margins: a 1, b -2, c 3, d 1


def test_compare_reports_the_per_token_variants(model_dirs, pairs_file):
    from prefdiag import api

    result = api.compare(str(pairs_file), str(model_dirs["llama"]), str(model_dirs["llama-policy"]),
                         api.RunOptions(dtype="float32", device="cpu", cache=False))
    pairs, summary = result.pairs, result.summary
    per_token = pairs["policy_margin_per_token"]
    expected = (per_token < 0) & (per_token > pairs["ref_margin_per_token"])
    assert pairs["negative_margin_regime_per_token"].tolist() == expected.tolist()
    assert summary["negative_margin_regime_per_token_rate"] == pytest.approx(expected.mean())
    assert summary["ranking_accuracy_per_token"] == pytest.approx((per_token > 0).mean())
