"""The terminal report: metric table, margin histogram, worst pairs, verdict and gate results, drawn with rich.
Readable in an 80-column CI log: pair ids and numbers never shrink, only the prompt column does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from prefdiag.diagnostics import PairList
from prefdiag.formatting import plural
from prefdiag.reports.common import (
    GROUP_HEADERS,
    baseline_rows,
    clean_text,
    gate_headline,
    gate_rows,
    group_rows,
    metric_rows,
    one_line,
    pair_sections,
    row_id,
    short,
    unit,
)

LEVEL_STYLES = {"ok": "green", "warn": "yellow", "fail": "red", "none": "white"}
STATUS_STYLES = {"pass": "green", "fail": "bold red", "warn": "yellow"}
BLOCKS = " ▏▎▍▌▋▊▉█"
NUMBERS = [("ref_margin", "ref"), ("policy_margin", "policy"), ("reward_margin", "reward"), ("dpo_loss", "loss")]
UNITS = "ref, policy: margins in nats; reward: beta x (policy - ref margin); loss: DPO loss"
# Unpaired (KTO) responses: log-probs per token, and the change the policy made.
RESPONSE_NUMBERS = [("ref_logp_per_token", "ref/tok"), ("policy_logp_per_token", "policy/tok"), ("reward", "reward")]
RESPONSE_UNITS = {"ref/tok": "ref/tok: reference log-prob per token (nats)",
                  "policy/tok": "policy/tok: policy log-prob per token", "reward": "reward: beta x (policy - ref)"}
# Per-group columns that fit an 80-column log beside the group name.
GROUP_COLUMNS = ["n_pairs", "reward_accuracy", "ranking_accuracy", "ref_ranking_accuracy",
                 "negative_margin_regime_rate", "mean_dpo_loss",
                 "n_responses", "ref_desirable_auc", "reward_auc", "policy_desirable_auc",
                 "desirable_displaced_rate"]  # fmt: skip


def print_report(console: Console, table: pd.DataFrame | None, summary: dict[str, Any], n_worst: int = 10) -> None:
    """Print metrics, the margin histogram, the worst pairs, the baseline deltas, the verdict and the gate."""
    metrics = Table(title=f"prefdiag {summary.get('command', '')}", title_justify="left", show_header=True)
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for _, label, value in metric_rows(summary):
        metrics.add_row(label, value)
    console.print(metrics)
    if table is not None:
        shown = ("reward_margin", "ref_margin", "reward", "ref_logp_per_token")  # the first the table has
        column = next((c for c in shown if c in table.columns), None)
        if column is not None:
            console.print(margin_histogram(table[column], column, width=min(console.width, 80), what=unit(summary)))
        _print_worst(console, table, n_worst)
    _print_groups(console, summary)
    _print_baseline(console, summary)
    console.print(verdict_panel(summary))
    _print_gate(console, summary)


def verdict_panel(summary: dict[str, Any]) -> Panel:
    """The verdict's findings in a panel titled with its level (what `prefdiag gate` prints beside the gate)."""
    verdict = summary.get("verdict", {})
    level = verdict.get("level", "ok")
    style = LEVEL_STYLES.get(level, "white")
    return Panel(_findings_text(verdict, unit(summary)), title=f"verdict: {level}", border_style=style)


def _findings_text(verdict: dict[str, Any], what: str = "pair") -> Text:
    """The headline, then every further finding on its own line with its level and the pairs behind it."""
    findings = verdict.get("findings") or [{"level": verdict.get("level", "ok"), "text": verdict.get("text", "")}]
    text = Text()
    for i, finding in enumerate(findings):
        if i:
            text.append("\n")
        text.append(f"{finding['level']:<4} ", style=LEVEL_STYLES.get(finding["level"], "white"))
        text.append(clean_text(str(finding["text"]), bidi=True))
        if finding.get("pairs_text"):
            text.append(f" {what.capitalize()}s: {short(finding['pairs_text'], 200)}.", style="dim")
    return text


def worst_pairs_table(table: pd.DataFrame | PairList, n_worst: int, width: int = 80) -> Table | None:
    """One list of pairs behind a finding (the first list when given a table): pair id and margins at full width;
    the prompt takes what is left of ``width``, cut with an ellipsis."""
    if isinstance(table, PairList):
        section = table
    else:
        sections = pair_sections(table, n_worst)
        if not sections:
            return None
        section = sections[0]
    worst = section.rows.head(n_worst)
    unpaired = "response_id" in worst.columns
    numbers = [(c, label) for c, label in (RESPONSE_NUMBERS if unpaired else NUMBERS) if c in worst.columns]
    ids = [short(row_id(row)) for _, row in worst.iterrows()]
    title = f"{section.title} ({len(worst)} of {section.n}, by {section.order})"
    if numbers and unpaired:
        title += "\n" + "; ".join(RESPONSE_UNITS[label] for _, label in numbers)
    elif numbers:
        title += f"\n{UNITS}" if "reward_margin" in worst.columns else "\nref: reference margin in nats"
    pairs = Table(title=escape(clean_text(title, bidi=True)), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)  # fmt: skip
    id_width = max(4, min(max(map(len, ids)), 24))
    pairs.add_column("response" if unpaired else "pair", no_wrap=True, min_width=id_width, max_width=id_width,
                     overflow="ellipsis")
    cells = {c: [f"{v:.2f}" for v in worst[c]] for c, _ in numbers}
    fixed = id_width
    for column, label in numbers:
        cell_width = max(len(label), *map(len, cells[column]))
        pairs.add_column(label, justify="right", no_wrap=True, min_width=cell_width)
        fixed += cell_width
    prompt_width = max(12, width - fixed - 3 * (len(numbers) + 2))  # padding and separators: 3 per column
    pairs.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=prompt_width)
    for i, (_, row) in enumerate(worst.iterrows()):
        prompt = escape(one_line(row.get("prompt", ""), prompt_width))
        pairs.add_row(escape(ids[i]), *(cells[c][i] for c, _ in numbers), prompt)
    return pairs


def _print_worst(console: Console, table: pd.DataFrame, n_worst: int) -> None:
    for section in pair_sections(table, n_worst):
        console.print(worst_pairs_table(section, n_worst, console.width))


def _print_groups(console: Console, summary: dict[str, Any]) -> None:
    column, headers, rows = group_rows(summary)
    if not rows:
        return
    shown = [i for i, key in enumerate(headers) if key in GROUP_COLUMNS]
    table = Table(title=f"by {escape(short(column, 40))}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(escape(short(column, 40)), overflow="fold")
    for i in shown:
        table.add_column(GROUP_HEADERS.get(headers[i], headers[i]), justify="right")
    for row in rows:
        table.add_row(escape(row[0]), *(row[1 + i] for i in shown))
    console.print(table)


def margin_histogram(values: pd.Series, name: str, width: int = 80, bins: int = 10, what: str = "pair") -> Text:
    """A compact histogram with unicode block bars, one line per bin, the bin holding 0 marked."""
    data = values.to_numpy(float)
    data = data[np.isfinite(data)]
    text = Text(f"{name} distribution ({plural(len(data), what)})\n", style="bold")
    if not len(data):
        return text
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(data, bins=bins, range=(lo, hi))
    labels = [f"[{edges[i]:>8.3g}, {edges[i + 1]:>8.3g}{']' if i == bins - 1 else ')'}" for i in range(bins)]
    bar_width = max(10, width - len(labels[0]) - 10)
    top = counts.max() or 1
    for label, count, left, right in zip(labels, counts, edges[:-1], edges[1:]):
        eighths = int(round(8 * bar_width * count / top))
        bar = "█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")
        style = "red" if right <= 0 else "green" if left >= 0 else "yellow"
        text.append(f"{label} ")
        text.append(f"{bar:<{bar_width}}", style=style)
        text.append(f" {count:>4d}\n")
    return text


def _print_baseline(console: Console, summary: dict[str, Any]) -> None:
    baseline = summary.get("baseline")
    if not baseline:
        return
    rows = baseline_rows(summary)
    deltas = Table(title=f"against the baseline {escape(str(baseline.get('source')))}", title_justify="left")
    for name, justify in (("metric", "left"), ("baseline", "right"), ("current", "right"), ("change", "right")):
        deltas.add_column(name, justify=justify, no_wrap=name != "metric")
    for label, before, now, change in rows:
        deltas.add_row(label, before, now, change)
    console.print(deltas)
    if baseline.get("ranking_column"):
        console.print(
            f"{baseline['n_joined']} pairs joined: [bold]{baseline['n_regressed']} regressed[/] "
            f"(correct -> misranked), {baseline['n_fixed']} fixed."
        )


def gate_table(summary: dict[str, Any]) -> Table | None:
    """The gate's rules and results as a table (None when no rule was set)."""
    rows = gate_rows(summary)
    if not rows:
        return None
    table = Table(title="gate", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("result", no_wrap=True)
    table.add_column("metric", overflow="fold")
    table.add_column("rule", justify="right", no_wrap=True)
    table.add_column("observed", justify="right", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    for row in rows:
        table.add_row(Text(row.mark, style=STATUS_STYLES[row.status]), escape(row.name), row.condition, row.observed,
                      row.severity)  # fmt: skip
    return table


def _print_gate(console: Console, summary: dict[str, Any]) -> None:
    table = gate_table(summary)
    if table is None:
        return
    console.print(table)
    level, headline = gate_headline(summary)
    console.print(Text(headline, style=f"bold {LEVEL_STYLES[level]}"))
