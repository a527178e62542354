"""Reports: JUnit XML shape, the baseline comparison finding planted flips, escaping of dataset text in HTML and
Markdown, the self-contained HTML, and the terminal report in an 80-column CI log."""

from __future__ import annotations

import io
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from prefdiag import gate
from prefdiag.baseline import SavedRun, compare_with_baseline, load_run
from prefdiag.cli import app
from prefdiag.diagnostics import add_pair_metrics, summarize, verdict
from prefdiag.reports.html import render_html
from prefdiag.reports.junit import render_junit
from prefdiag.reports.markdown import md, render_markdown
from prefdiag.reports.terminal import print_report

runner = CliRunner()
SCRIPT = "<script>alert(1)</script>"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def synthetic(policy_margins: list[float], ref_margins: list[float], ids: list[str] | None = None, beta: float = 0.1):
    """A scored table and its summary from margins alone (chosen logp = margin - 10, rejected logp = -10)."""
    n = len(policy_margins)
    table = pd.DataFrame(
        {
            "pair_id": ids or [f"p{i}" for i in range(n)],
            "prompt_tokens": [4] * n,
            "chosen_tokens": [5] * n,
            "rejected_tokens": [6] * n,
            "ref_chosen_logp": np.array(ref_margins, float) - 10,
            "ref_rejected_logp": [-10.0] * n,
            "policy_chosen_logp": np.array(policy_margins, float) - 10,
            "policy_rejected_logp": [-10.0] * n,
            "prompt": [f"prompt {i}" for i in range(n)],
            "chosen": [f"chosen {i}" for i in range(n)],
            "rejected": [f"rejected {i}" for i in range(n)],
        }
    )
    table = add_pair_metrics(table, beta)
    summary = {"command": "compare", **summarize(table, beta)}
    summary["verdict"] = verdict(summary)
    return table, summary


# --------------------------------------------------------------------------------------------------------- JUnit


def test_junit_has_one_testcase_per_rule_and_a_failure_for_failed_error_rules():
    _, summary = synthetic([1, -1, 2, -3], [1, 1, 1, 1])
    rules = [gate.Rule("ranking_accuracy", "min", 0.9), gate.Rule("n_pairs", "min", 1),
             gate.Rule("reward_accuracy", "min", 0.9, "warn"), gate.Rule("mean_dpo_loss", "max", 1e-6)]
    gate.apply(summary, rules)
    root = ET.fromstring(render_junit(summary))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == 4 == int(suite.get("tests")) == int(root.get("tests"))
    assert int(suite.get("failures")) == 2 and suite.get("errors") == "0" and suite.get("skipped") == "0"
    for case in cases:
        assert case.get("classname") == "prefdiag.gate.compare" and case.get("name") and case.get("time") == "0"
        assert {child.tag for child in case} <= {"failure", "system-out"}
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"ranking_accuracy >= 90.0%", "mean_dpo_loss <= 1e-06"}
    failure = failed["ranking_accuracy >= 90.0%"]
    assert failure.get("type") == "GateFailure" and "ranking_accuracy = 50.0%" in failure.get("message")
    warned = [c for c in cases if c.find("system-out") is not None]
    assert len(warned) == 1 and "[warn]" in warned[0].get("name") and warned[0].find("failure") is None
    assert {p.get("name") for p in suite.find("properties")} >= {"command", "verdict", "gate"}


def test_junit_without_rules_holds_the_verdict_as_a_skipped_testcase():
    """Failed before: tests="0" and no testcase, which CI systems show as an empty or broken report."""
    _, summary = synthetic([1, 2], [1, 1])
    gate.apply(summary, [])
    suite = ET.fromstring(render_junit(summary)).find("testsuite")
    (case,) = suite.findall("testcase")
    assert suite.get("tests") == "1" and suite.get("skipped") == "1" and suite.get("failures") == "0"
    assert case.find("skipped").get("message") == "no gate rules were set"
    assert case.get("name") == f"verdict: {summary['verdict']['level']}"
    assert summary["verdict"]["text"] in case.find("system-out").text


# ------------------------------------------------------------------------------------------------------ baseline


def test_baseline_finds_planted_flips_and_gates_the_drop():
    ids = ["a", "b", "c", "d", "e", "f"]
    before_table, before = synthetic([1, 2, 3, -1, -2, 4], [0.5] * 6, ids)
    # pair b and c regress (correct -> misranked), d is fixed; the current run also lost pair f and has a new g
    now_table, now = synthetic([1, -2, -3, 1, -2, 5], [0.5] * 6, ["a", "b", "c", "d", "e", "g"])
    record, marked = compare_with_baseline(now_table, now, SavedRun(before, before_table, Path("v1")))
    assert record["ranking_column"] == "policy_margin"
    assert record["n_joined"] == 5 and record["n_only_current"] == 1 and record["n_only_baseline"] == 1
    assert record["n_regressed"] == 2 and record["n_fixed"] == 1
    assert [p["pair_id"] for p in record["regressed"]] == ["c", "b"]  # worst current margin first
    assert record["fixed"] == [{"pair_id": "d", "baseline_margin": -1.0, "margin": 1.0}]
    assert marked["ranking_change"].tolist() == ["unchanged", "regressed", "regressed", "fixed", "unchanged",
                                                "unmatched"]
    assert marked.loc[1, "baseline_margin"] == 2.0
    accuracy = record["metrics"]["ranking_accuracy"]
    assert accuracy["drop"] == pytest.approx(4 / 6 - 3 / 6) and accuracy["delta"] == pytest.approx(-accuracy["drop"])
    now["baseline"] = record
    result = gate.evaluate(now, [gate.Rule("ranking_accuracy_drop", "max", 0.1),
                                 gate.Rule("baseline.n_regressed", "max", 0),
                                 gate.Rule("mean_policy_margin_delta", "min", -10)])  # fmt: skip
    assert [r["passed"] for r in result["rules"]] == [False, False, True]
    markdown = render_markdown(marked, now)
    assert "2 went from correctly ranked to misranked" in markdown and "| b |" in markdown
    html = render_html(marked, now)
    assert "Regressed pairs" in html and "prompt 2" in html


def test_compare_against_a_baseline_run_through_the_cli(model_dirs, pairs_file, tmp_path):
    """Baseline: the reference scored as its own policy (so every pair keeps the reference's ranking); then the
    real policy: its regressed and fixed pairs are exactly the reference->policy transitions."""
    common = [pairs_file, "-r", model_dirs["llama"], "--device", "cpu", "-q"]
    assert invoke("compare", *common, "-p", model_dirs["llama"], "-o", tmp_path / "v1").exit_code == 0
    result = invoke("compare", *common, "-p", model_dirs["llama-policy"], "-o", tmp_path / "v2",
                    "--baseline", tmp_path / "v1", "--max", "baseline.n_regressed=1000")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "v2" / "summary.json").read_text())
    baseline, transitions = summary["baseline"], summary["transitions"]
    assert baseline["n_joined"] == summary["n_pairs"]
    assert baseline["n_regressed"] == transitions["ref_correct_to_policy_incorrect"]
    assert baseline["n_fixed"] == transitions["ref_incorrect_to_policy_correct"]
    assert baseline["n_regressed"] + baseline["n_fixed"] > 0
    pairs = pd.read_parquet(tmp_path / "v2" / "pairs.parquet")
    expected = pairs.loc[(pairs["ref_margin"] > 0) & (pairs["policy_margin"] <= 0), "pair_id"]
    assert sorted(pairs.loc[pairs["ranking_change"] == "regressed", "pair_id"]) == sorted(expected)
    assert "against the baseline" in result.stdout
    assert "Against the baseline" in (tmp_path / "v2" / "report.md").read_text()
    # gate re-derives the same comparison from the saved runs
    again = invoke("gate", tmp_path / "v2", "--baseline", tmp_path / "v1", "--max", "baseline.n_regressed=0", "-q",
                   "-f", "json")  # fmt: skip
    n = baseline["n_regressed"]
    assert again.exit_code == (1 if n else 0)
    assert json.loads(again.stdout)["baseline"]["n_regressed"] == n
    assert load_run(tmp_path / "v2").pairs is not None


# ------------------------------------------------------------------------------------------------------ escaping


@pytest.fixture(scope="module")
def hostile_run(model_dirs, tmp_path_factory) -> Path:
    """A compare run whose dataset text (and one pair id) tries to inject HTML and Markdown."""
    root = tmp_path_factory.mktemp("hostile")
    rows = [
        {"id": "<img src=x onerror=alert(2)>", "prompt": f"Question: {SCRIPT} | [link](javascript:alert(3))",
         "chosen": f" {SCRIPT} yes.", "rejected": " </pre></section><h1>injected</h1> no."},
        {"id": "plain", "prompt": "Question: what is two plus two?", "chosen": " four.", "rejected": " five."},
        {"id": "amp&", "prompt": "Question: a & b <b>bold</b>", "chosen": " ok.", "rejected": " `code` **x**."},
    ]  # fmt: skip
    data = root / "hostile.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "out"
    result = invoke("compare", data, "-r", model_dirs["llama"], "-p", model_dirs["llama-policy"], "--device", "cpu",
                    "-q", "-o", out, "--top", "10")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_html_escapes_every_piece_of_dataset_text(hostile_run):
    html = (hostile_run / "report.html").read_text()
    assert "<script" not in html.lower()
    assert "<img src=x" not in html and "<h1>injected" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert html.count("<pre>") == html.count("</pre>") and html.count("<section") == html.count("</section>")
    assert "Content-Security-Policy" in html


def test_markdown_cannot_inject_html_or_links(hostile_run):
    report = (hostile_run / "report.md").read_text()
    assert "<script" not in report and "<img" not in report and "<b>" not in report
    assert "&lt;script&gt;" in report
    assert "[link](javascript" not in report and r"\[link\](javascript" in report  # no link is formed
    rows = [line for line in report.splitlines() if line.startswith("| ") and "onerror" in line]
    assert rows and all(line.count(" | ") == rows[0].count(" | ") for line in rows)
    assert md("a|b\n<i>`c`</i> [x](y) *z*") == r"a\|b &lt;i&gt;\`c\`&lt;/i&gt; \[x\](y) \*z\*"


# ---------------------------------------------------------------------------------------------------- HTML shape


def test_html_report_is_self_contained_with_plots(hostile_run):
    html = (hostile_run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched from a network
    assert "<script" not in html
    plots = re.findall(r"<figure[^>]*>\s*<svg ", html)
    assert len(plots) == 5  # quadrant scatter, margins, reward margin, log-prob changes, DPO loss
    assert "<img" not in html  # inline SVG, no picture to fetch or decode
    for name in ("aligned", "fixed by training", "broken by training", "still wrong"):
        assert name in html  # transition table labels (the scatter names them in the image too)
    assert "Ranking under the reference" in html and "Worst pairs, by finding" in html


def test_audit_reports_get_the_reference_subset(model_dirs, pairs_file, tmp_path):
    assert invoke("audit", pairs_file, "-r", model_dirs["gpt2"], "--device", "cpu", "-q", "-o", tmp_path / "a",
                  "--min", "ref_ranking_accuracy=0").exit_code == 0  # fmt: skip
    html = (tmp_path / "a" / "report.html").read_text()
    assert "Reference margin" in html and "Length difference" in html
    assert len(re.findall(r"<figure[^>]*>\s*<svg ", html)) == 2 and "Ranking under the reference" not in html
    assert ET.fromstring((tmp_path / "a" / "junit.xml").read_text()).find("testsuite").get("tests") == "1"
    rows = [{"prompt": "Q: one?", "chosen": " same answer.", "rejected": " same  answer."},
            {"prompt": "Q: two?", "chosen": " yes.", "rejected": " no."}]  # fmt: skip
    data = tmp_path / "flagged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("audit", data, "-q", "-o", tmp_path / "b", "--max", "identical_rate=0")  # no model at all
    assert result.exit_code == 1, result.output
    html = (tmp_path / "b" / "report.html").read_text()
    assert "<svg" not in html and "Metrics" in html
    assert "Data problems: identical responses" in html and "1 of 1 pairs" in html and "Q: one?" in html
    assert "| identical responses |" in (tmp_path / "b" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------------ terminal


def test_terminal_report_in_an_80_column_ci_log():
    ids = [f"pair-{i:05d}-long" for i in range(12)]
    table, summary = synthetic(list(np.linspace(-40, 40, 12)), list(np.linspace(30, -30, 12)), ids)
    table["prompt"] = ["A very long prompt that goes on and on " * 5] * 12
    gate.apply(summary, [gate.Rule("ranking_accuracy", "min", 0.9), gate.Rule("n_pairs", "min", 1),
                         gate.Rule("n_pairs", "max", 1, "warn")])  # fmt: skip
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=False, color_system=None)
    print_report(console, table, summary, n_worst=5)
    text = buffer.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    worst = table.sort_values("policy_margin").head(5)
    for _, row in worst.iterrows():
        line = next(line for line in text.splitlines() if row["pair_id"] in line)  # full id, not "p…"
        for column in ("ref_margin", "policy_margin", "reward_margin", "dpo_loss"):
            assert f"{row[column]:.2f}" in line
        assert "…" in line  # only the prompt is cut
    assert "✗ FAIL" in text and "✓ pass" in text and "! warn" in text and "Gate FAILED" in text
    assert "reward_margin distribution (12 pairs)" in text and "█" in text


def test_per_token_accuracy_is_shown_as_a_percentage():
    # It printed as 0.7928 beside "ranking accuracy 77.0%": the per-token key ends in _per_token, not _accuracy.
    from prefdiag.formatting import format_value

    assert format_value("ranking_accuracy_per_token", 0.7928) == "79.3%"
    assert format_value("ranking_accuracy_per_token_drop", 0.01) == "+1.0 pp"
