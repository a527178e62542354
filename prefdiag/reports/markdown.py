"""The Markdown report (report.md, and the GitHub step summary): gate, verdict, metric table, ranking transitions,
the comparison with a baseline and the worst pairs. Dataset text is escaped so it cannot inject HTML or Markdown."""

from __future__ import annotations

import html
import re
from typing import Any

import pandas as pd

from prefdiag.reports.common import (
    DATA_FLAG_LABELS,
    GROUP_HEADERS,
    RESPONSE_FLAG_LABELS,
    baseline_rows,
    clean_text,
    flag_labels,
    gate_headline,
    gate_rows,
    group_rows,
    metric_rows,
    one_line,
    pair_sections,
    provenance_rows,
    row_id,
    unit,
)

MARKS = {"pass": "✅ pass", "fail": "❌ **FAIL**", "warn": "⚠️ warn"}
# The per-pair numbers a list of pairs shows, in this order, headed with their units.
_HEADERS = {"ref_margin": "ref margin (nats)", "policy_margin": "policy margin (nats)",
            "reward_margin": "reward margin (beta x nats)", "dpo_loss": "DPO loss",
            "ref_logp_per_token": "ref log-prob per token", "policy_logp_per_token": "policy log-prob per token",
            "reward": "reward (beta x nats)"}  # fmt: skip
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md(text: Any) -> str:
    """Text that renders as itself in a Markdown table cell: HTML entities for <, > and &, backslashes before
    Markdown punctuation, newlines as spaces."""
    text = " ".join(clean_text(str(text), bidi=True).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def code(text: Any) -> str:
    """Text as a code span (literal in Markdown, HTML shown as text), or escaped when it holds a backtick."""
    text = " ".join(clean_text(str(text), bidi=True).split())
    return md(text) if "`" in text else "`" + text.replace("|", "\\|") + "`"


def _cell(value: Any, width: int) -> str:
    return md(one_line(value, width))


def render_markdown(table: pd.DataFrame | None, summary: dict[str, Any], n_worst: int = 10) -> str:
    """The whole report.md text (``table`` may be None when only a summary is known)."""
    verdict = summary.get("verdict", {})
    level, headline = gate_headline(summary)
    lines = [f"# prefdiag {md(summary.get('command', ''))} report", ""]
    if level != "none":
        lines += [f"**{'❌' if level == 'fail' else '⚠️' if level == 'warn' else '✅'} {headline}**", ""]
    lines += [f"**Verdict ({md(verdict.get('level', 'ok'))}):** {md(verdict.get('text', ''))}", ""]
    findings = verdict.get("findings") or []
    if len(findings) > 1:
        lines += [f"| level | finding | {unit(summary)}s |", "| --- | --- | --- |"]
        lines += [f"| {md(f['level'])} | {md(f['text'])} | {md(one_line(f.get('pairs_text', ''), 200))} |"
                  for f in findings]  # fmt: skip
        lines.append("")
    rows = gate_rows(summary)
    if rows:
        lines += ["## Gate", "", "| result | rule | observed | severity | from |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {MARKS[r.status]} | {code(r.name)} {r.condition} | {r.observed} | {r.severity} | {code(r.source)} |"
            for r in rows
        ]
        lines.append("")
    marks = {r.metric: f"{MARKS[r.status]} ({r.condition})" for r in rows}
    gated = any(key in marks for key, _, _ in metric_rows(summary))
    lines += ["| metric | value |" + (" gate |" if gated else ""), "| --- | --- |" + (" --- |" if gated else "")]
    for key, label, value in metric_rows(summary):
        lines.append(f"| {label} | {value} |" + (f" {marks.get(key, '')} |" if gated else ""))
    transitions = summary.get("transitions")
    if transitions:
        lines += [
            "",
            "## Ranking under the reference -> under the policy",
            "",
            "| | policy correct | policy incorrect |",
            "| --- | --- | --- |",
            f"| reference correct | {transitions['ref_correct_to_policy_correct']} | "
            f"{transitions['ref_correct_to_policy_incorrect']} |",
            f"| reference incorrect | {transitions['ref_incorrect_to_policy_correct']} | "
            f"{transitions['ref_incorrect_to_policy_incorrect']} |",
        ]
    lines += _baseline_section(table, summary, n_worst)
    column, headers, group_table = group_rows(summary)
    if group_table:
        labels = [GROUP_HEADERS.get(h, h) for h in headers]
        lines += ["", f"## By {md(column)}", "", f"| {md(column)} | " + " | ".join(md(h) for h in labels) + " |"]
        lines.append("| --- " * (len(headers) + 1) + "|")
        lines += ["| " + " | ".join(md(cell) for cell in row) + " |" for row in group_table]
    sections = pair_sections(table, n_worst)
    what = unit(summary)
    if sections:
        lines += ["", f"## Worst {what}s, by finding"]
    for section in sections:
        worst = section.rows
        numbers = [c for c in _HEADERS if c in worst.columns]
        headers = [_HEADERS[c] for c in numbers] or ["flags"]
        lines += ["", f"### {md(section.title)}", "", f"{len(worst)} of {section.n} {what}s, by {md(section.order)}.",
                  "", f"| {what} | " + " | ".join(headers) + " | prompt |"]  # fmt: skip
        lines.append("| --- " * (len(headers) + 2) + "|")
        for _, row in worst.iterrows():
            if not numbers:
                labels = RESPONSE_FLAG_LABELS if what == "response" else DATA_FLAG_LABELS
                values = md(", ".join(flag_labels(row, labels)))
            else:
                values = " | ".join(f"{row[c]:.3f}" for c in numbers)
            lines.append(f"| {_cell(row_id(row), 24)} | {values} | {_cell(row.get('prompt', ''), 60)} |")
    lines += ["", "## Provenance", ""]
    lines += [f"- {key}: {md(text)}" for key, text in provenance_rows(summary.get("provenance") or {})]
    return "\n".join(lines) + "\n"


def _baseline_section(table: pd.DataFrame | None, summary: dict[str, Any], n_worst: int) -> list[str]:
    baseline = summary.get("baseline")
    if not baseline:
        return []
    lines = ["", "## Against the baseline", "", f"Baseline: {md(baseline.get('source'))}"]
    if baseline.get("created_at"):
        lines[-1] += f" (run {md(baseline['created_at'])})"
    if baseline.get("same_dataset") is False:
        lines += ["", "**The baseline scored a different dataset**: deltas compare different pairs."]
    rows = baseline_rows(summary)
    if rows:
        lines += ["", "| metric | baseline | current | change |", "| --- | --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if baseline.get("ranking_column") is None:
        lines += ["", "Unpaired responses: the metrics are compared, not the rows." if unit(summary) == "response" else
                  "No per-pair comparison: one of the runs has no pairs table with a margin column."]  # fmt: skip
        return lines
    lines += [
        "",
        f"{baseline['n_joined']} pairs joined by pair_id (on {md(baseline['ranking_column'])} > 0): "
        f"**{baseline['n_regressed']} went from correctly ranked to misranked**, {baseline['n_fixed']} the other way.",
    ]
    titles = {"regressed": "Regressed pairs (correct -> misranked)", "fixed": "Fixed pairs (misranked -> correct)"}
    for kind, title in titles.items():
        listed = baseline.get(kind) or []
        if not listed:
            continue
        prompts = {}
        if table is not None and "prompt" in table.columns:
            prompts = dict(zip(table["pair_id"].astype(str), table["prompt"]))
        lines += ["", f"### {title}", "", "| pair | baseline margin | margin | prompt |", "| --- | --- | --- | --- |"]
        for item in listed[:n_worst]:
            lines.append(
                f"| {_cell(item['pair_id'], 24)} | {item['baseline_margin']:.3f} | {item['margin']:.3f} | "
                f"{_cell(prompts.get(item['pair_id'], ''), 60)} |"
            )
    return lines
