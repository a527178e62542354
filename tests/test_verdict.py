"""The verdict: a list of findings, most severe first, each true to the numbers beside it and naming the pairs
behind it; non-finite log-probs flagged and left out of every rate; one list of pairs per finding, ordered per
token; the flag registry that every report labels from."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from prefdiag import diagnostics, flags
from prefdiag.cli import app
from prefdiag.diagnostics import add_pair_metrics, summarize, verdict
from prefdiag.findings import findings
from prefdiag.formatting import format_value
from prefdiag.reports.html import render_html
from prefdiag.reports.junit import render_junit
from prefdiag.reports.markdown import render_markdown
from prefdiag.reports.terminal import print_report

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
runner = CliRunner()


def scored(ref_margins, policy_margins=None, tokens=(5, 6), beta=0.1, **columns):
    """A table of log-probs from margins (chosen logp = margin - 10, rejected logp = -10), through the metrics."""
    n = len(ref_margins)
    data = {"pair_id": [f"p{i}" for i in range(n)], "prompt_tokens": [4] * n, "chosen_tokens": [tokens[0]] * n,
            "rejected_tokens": [tokens[1]] * n, "ref_chosen_logp": np.array(ref_margins, float) - 10,
            "ref_rejected_logp": [-10.0] * n, "prompt": [f"prompt {i}" for i in range(n)]}  # fmt: skip
    if policy_margins is not None:
        data.update(policy_chosen_logp=np.array(policy_margins, float) - 10, policy_rejected_logp=[-10.0] * n)
    data.update(columns)
    table = add_pair_metrics(pd.DataFrame(data), beta)
    summary = {"command": "compare" if policy_margins is not None else "audit", **summarize(table, beta)}
    summary["verdict"] = verdict(summary)
    return table, summary


def ids(summary):
    return [f["id"] for f in summary["verdict"]["findings"]]


def finding(summary, finding_id):
    return next(f for f in summary["verdict"]["findings"] if f["id"] == finding_id)


# ----------------------------------------------------------------------------------------------- one per finding


def test_policy_equal_to_the_reference_fails():
    """Failed before: the verdict was "ok" (ranking 50%, 0% in the negative-margin regime)."""
    _, summary = scored([1, -1, 2, -2], [1, -1, 2, -2])
    assert summary["verdict"]["level"] == "fail" and ids(summary)[0] == "policy_equals_reference"
    assert summary["reward_accuracy"] == 0 and summary["mean_dpo_loss"] == pytest.approx(np.log(2))
    assert "exactly as the reference" in summary["verdict"]["text"]


def test_compare_with_the_reference_as_policy_fails_through_the_cli(model_dirs, pairs_file, tmp_path):
    result = runner.invoke(app, ["compare", str(pairs_file), "-r", str(model_dirs["llama"]), "-p",
                                 str(model_dirs["llama"]), "--device", "cpu", "-q", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output  # the verdict informs; only rules set the exit code
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["verdict"]["level"] == "fail", summary["verdict"]
    assert summary["verdict"]["findings"][0]["id"] == "policy_equals_reference"
    assert "Verdict (fail)" in (tmp_path / "o" / "report.md").read_text()


def test_reward_accuracy_below_a_half_fails():
    _, summary = scored([2, 2, 2, 2], [1, 1, 1, 3])
    assert summary["reward_accuracy"] == 0.25
    assert finding(summary, "reward_accuracy_below_half")["level"] == "fail"


def test_pairs_broken_by_training_are_named():
    _, summary = scored([2] * 10, [3] * 8 + [-1, -2])
    broken = finding(summary, "broken_by_training")
    assert broken["n_pairs"] == 2 and broken["pairs"] == ["p9", "p8"]  # lowest policy margin per token first
    assert broken["pairs_text"] == "p9, p8" and broken["level"] == "warn"  # 20% of the correct pairs


def test_ranking_accuracy_below_the_reference():
    _, summary = scored([2, 2, 2, -1], [3, 3, -1, -2])  # reference 75%, policy 50%
    assert finding(summary, "ranking_below_reference")["level"] == "fail"


def test_data_findings_are_kept_with_a_model():
    """Failed before: with a reference the verdict spoke only of the reference; the duplicates were dropped."""
    _, audit = scored([1, -1, 2], duplicate=[True, True, False], identical=[False, False, True])
    _, compare = scored([1, -1, 2], [2, 1, 3], duplicate=[True, True, False], identical=[False, False, True])
    for summary in (audit, compare):
        data = finding(summary, "data_problems")
        assert data["level"] == "warn" and data["n_pairs"] == 3
        assert "2 duplicated" in data["text"] and "1 with identical responses" in data["text"]


def test_the_audit_does_not_claim_a_flip_rate_it_cannot_know():
    """Failed before: "rarely flips them" whatever the data; only a policy shows how many flip."""
    _, audit = scored([1, -1, -2, -3])
    text = finding(audit, "ref_prefers_rejected")["text"]
    assert "rarely" not in text and "75.0%" in text
    _, compare = scored([1, -1, -2, -3], [1, 1, 1, -3])
    assert "fixed 66.7% of them" in finding(compare, "ref_prefers_rejected")["text"]


def test_findings_are_ordered_by_severity_and_the_headline_is_the_worst():
    _, summary = scored([5] * 6 + [-50] * 4, [6] * 6 + [-1] * 4, duplicate=[True, True] + [False] * 8)
    levels = [f["level"] for f in summary["verdict"]["findings"]]
    assert levels == sorted(levels, key=("fail", "warn", "ok").index)
    assert summary["verdict"]["level"] == levels[0] == "fail"
    assert summary["verdict"]["text"] == summary["verdict"]["findings"][0]["text"]


# ----------------------------------------------------------------------- the words are true to the numbers


def _summaries():
    cases = [
        scored([1, -1, 2, -2], [1, -1, 2, -2]),
        scored([2, 2, 2, 2], [1, 1, 1, 3]),
        scored([2] * 10, [3] * 8 + [-1, -2]),
        scored([1, -1, -2, -3], [1, 1, 1, -3], duplicate=[True, True, False, False]),
        scored([5] * 6 + [-50] * 4, [6] * 6 + [-1] * 4, truncated=[True] + [False] * 9),
        scored([1, -1, -2, -3], length_ratio=[True, False, False, False]),
        scored([1, 2], [np.nan, 3]),
    ]
    return [summary for _, summary in cases]


@pytest.mark.parametrize("summary", _summaries())
def test_every_verdict_text_names_only_numbers_of_the_summary(summary):
    """Each number a sentence quotes is one of its ``numbers``, formatted as the reports format that summary key,
    and equal to the summary's value (flag labels such as "length ratio > 4x" are names, not numbers)."""
    for f in findings(summary):
        text = f["text"]
        for label in flags.LABELS.values():
            text = text.replace(label, "")
        quoted = re.findall(r"-?\d+(?:\.\d+)?%?", text)
        allowed = set()
        for key, value in f["numbers"].items():
            expected = summary
            for part in key.split("."):
                expected = expected[part]
            assert value == expected, (key, value, expected)
            allowed.add(format_value(key, value))
        assert quoted and set(quoted) <= allowed, (f["id"], quoted, allowed)


# --------------------------------------------------------------------------------------------- non-finite


def test_non_finite_log_probs_are_flagged_left_out_and_fail_the_verdict():
    """Failed before: a NaN policy log-prob or an infinite reference one ran to a normal verdict, with numpy
    RuntimeWarnings and rates computed over them."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        table = pd.DataFrame({
            "pair_id": ["a", "b", "c", "d", "e"], "prompt_tokens": [3] * 5, "chosen_tokens": [4] * 5,
            "rejected_tokens": [4] * 5, "dropped": [False, False, False, False, True],
            "ref_chosen_logp": [-5.0, -np.inf, -5.0, -5.0, np.nan],
            "ref_rejected_logp": [-6.0, -6.0, -6.0, -4.0, np.nan],
            "policy_chosen_logp": [-4.0, -4.0, np.nan, -3.0, np.nan],
            "policy_rejected_logp": [-7.0, -7.0, -7.0, -5.0, np.nan], "prompt": ["q"] * 5,
        })  # fmt: skip
        table = add_pair_metrics(table, 0.1)
        summary = {"command": "compare", **summarize(table, 0.1)}
        summary["verdict"] = verdict(summary)
        for render in (lambda: render_html(table, summary), lambda: render_markdown(table, summary),
                       lambda: render_junit(summary)):  # fmt: skip
            render()
        print_report(Console(file=io.StringIO(), width=80), table, summary)
    assert table["non_finite"].tolist() == [False, True, True, False, False]  # the dropped pair is not scored
    assert summary["n_non_finite"] == 2 and summary["n_non_finite_reference"] == 1
    assert summary["n_non_finite_policy"] == 1
    # rates over pairs a and d only (ref margins 1 and -1, policy margins 3 and 2)
    assert summary["n_scored"] == 2 and summary["ranking_accuracy"] == 1.0 and summary["reward_accuracy"] == 1.0
    assert summary["ref_ranking_accuracy"] == 0.5 and summary["non_finite_rate"] == 0.5
    assert not table.loc[table["non_finite"], list(diagnostics.POLICY_FLAGS[2:])].any().any()
    bad = finding(summary, "non_finite")
    assert summary["verdict"]["level"] == "fail" and bad["pairs"] == ["b", "c"]
    assert "reference" in bad["text"] and "policy" in bad["text"]
