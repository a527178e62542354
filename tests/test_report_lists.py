"""On the shipped sample: one list of pairs per finding, ordered per token (p0222, 344 chosen tokens against 9,
no longer leads), the likely mislabeled p0147 listed, columns headed with their units, histogram bins that spread
the pairs, the --group-by table in the terminal and the HTML; the flag registry; plurals; action.yml."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from prefdiag import checks, diagnostics, flags, gate
from prefdiag.cli import app
from prefdiag.reports import common
from prefdiag.reports.common import gate_headline, pair_sections
from prefdiag.reports.html import render_html
from prefdiag.reports.plots import report_plots
from prefdiag.reports.terminal import print_report

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "out"
    result = CliRunner().invoke(app, [
        "compare", str(SAMPLE / "pairs.jsonl"), "-r", str(SAMPLE / "models" / "reference"), "-p",
        str(SAMPLE / "models" / "policy"), "--max-length", "256", "--device", "cpu", "-q", "-o", str(out),
        "--group-by", "category"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out / "pairs.parquet"), json.loads((out / "summary.json").read_text()), out


def test_one_list_per_finding_ordered_per_token(sample):
    """Failed before: one "worst 10" list of negative-margin pairs by summed margin, led by p0222 (whose chosen
    answer the reference prefers per token), without p0147 (likely mislabeled, reward margin -4.39)."""
    table, _, _ = sample
    sections = {s.id: s for s in pair_sections(table, 10)}
    assert {"negative_margin_regime", "likely_mislabeled", "broken_by_training", "data_problems"} <= set(sections)
    for section in sections.values():
        assert section.rows["pair_id"].iloc[0] != "p0222"
    p0222 = table.set_index("pair_id").loc["p0222"]
    assert p0222["chosen_tokens"] > 20 * p0222["rejected_tokens"] and p0222["ref_margin_per_token"] > 0
    nmr = sections["negative_margin_regime"].rows
    assert nmr["policy_margin_per_token"].is_monotonic_increasing and nmr["negative_margin_regime"].all()
    assert "p0147" in set(sections["likely_mislabeled"].rows["pair_id"])
    assert sections["likely_mislabeled"].rows["likely_mislabeled"].all()


def test_every_report_heads_the_lists_and_their_units(sample):
    table, summary, out = sample
    markdown = (out / "report.md").read_text()
    assert "## Worst pairs, by finding" in markdown and "### Likely mislabeled" in markdown
    assert "| pair | ref margin (nats) | policy margin (nats) | reward margin (beta x nats) | DPO loss |" in markdown
    html = (out / "report.html").read_text()
    assert "Likely mislabeled" in html and "p0147" in html and "by policy margin per token" in html
    buffer = io.StringIO()
    print_report(Console(file=buffer, width=80, color_system=None), table, summary, 5)
    text = buffer.getvalue()
    assert "Negative-margin regime" in text and "Likely mislabeled" in text and "Broken by training" in text
    assert "reward: beta x (policy - ref margin)" in text and "margins in nats" in text
    assert max(map(len, text.splitlines())) <= 80


def test_group_by_is_a_readable_table_in_the_terminal_and_the_html(sample):
    """Failed before: --group-by printed nothing in the terminal; the HTML headers were raw snake_case keys."""
    table, summary, out = sample
    buffer = io.StringIO()
    print_report(Console(file=buffer, width=80, color_system=None), table, summary, 3)
    text = buffer.getvalue()
    lines = [line for line in text.splitlines() if line.strip().startswith(("arithmetic", "tone"))]
    assert len(lines) == 2 and "by category" in text and "rank acc." in text
    html = (out / "report.html").read_text()
    group = html[html.index("<h2>By <bdi>category</bdi></h2>"):]
    group = group[: group.index("</table>")]
    assert "ranking_accuracy" not in group and "rank acc." in group and '<div class="scroll">' in group


def test_histogram_bins_spread_the_pairs(sample):
    """Failed before: 245 of 304 sample pairs fell in one bin of the margins histogram (one outlier set the range)."""
    table, _, _ = sample
    plots = {p.title: p for p in report_plots(table)}
    for title in ("Margins, reference and policy", "Reward margin"):
        counts = [int(c) for c in re.findall(r"<title>[a-z_]+: (\d+) pairs in", plots[title].svg)]
        assert max(counts) < len(table) / 3, (title, max(counts))
    assert "Values beyond the axis are counted" in plots["Margins, reference and policy"].caption
    scatter = plots["Reference margin against policy margin"].svg
    assert scatter.count("<circle") == len(table) and "<title>p0222 · ref margin -508" in scatter


def test_hover_titles_name_the_pair_margins_and_prompt(sample):
    table, summary, _ = sample
    html = render_html(table, summary)
    title = re.search(r"<circle [^>]*><title>(p0147 [^<]*)</title>", html).group(1)
    assert "ref margin" in title and "policy margin" in title and "reward margin -4.39" in title
    assert "prompt: Question:" in title


def test_the_flag_registry_labels_every_flag_once(sample):
    table, _, _ = sample
    labels = [f.label for f in flags.FLAGS]
    assert len(labels) == len(set(labels)) and set(flags.KINDS) == {f.kind for f in flags.FLAGS}
    for future in ("high_ches", "reversed_pair", "non_finite", "negative_margin_regime_per_token"):
        assert future in flags.REGISTRY
    assert checks.CHECKS == flags.names("data") and diagnostics.POLICY_FLAGS == flags.names("policy")
    assert set(common.DATA_FLAG_LABELS) == set(flags.names("data"))
    for column in table.columns:
        if table[column].dtype == bool:
            assert column in flags.REGISTRY, column  # every boolean column of a run is a registered flag
            if f"{column}_rate" in common.LABELS:
                assert common.LABELS[f"{column}_rate"] == flags.label(column)
    assert {"reversed_pair_rate", "n_data_problems"} <= gate.metric_catalogue("data")
    assert {"non_finite_rate", "n_non_finite", "policy_unchanged_rate"} <= gate.metric_catalogue("policy")


def test_plurals():
    """Failed before: "Gate FAILED: 1 of 1 rules failed", "with 1 warning (1 rules)"."""
    def headline(n, failed, warned):
        return gate_headline({"gate": {"n_rules": n, "n_failed": failed, "n_warnings": warned}})[1]

    assert headline(1, 1, 0) == "Gate FAILED: 1 of 1 rule failed."
    assert headline(3, 2, 1) == "Gate FAILED: 2 of 3 rules failed, 1 warning."
    assert headline(1, 0, 1) == "Gate passed with 1 warning (1 rule)."
    assert headline(2, 0, 2) == "Gate passed with 2 warnings (2 rules)."


def test_action_yml_is_a_composite_action_that_uploads_the_output():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    assert action["inputs"]["data"]["required"] is True
    assert {"reference", "policy", "gate", "rules", "output"} <= set(action["inputs"])
    steps = action["runs"]["steps"]
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@"))
    assert upload["with"]["path"] == "${{ inputs.output }}" and "always()" in upload["if"]
    for step in steps:
        assert "${{" not in step.get("run", ""), step["name"]  # inputs reach scripts only through env
        assert step.get("shell", "bash") == "bash"
    assert "action.yml" in (ROOT / "docs" / "ci.md").read_text()
