"""The terminal report: verdict, metric table and worst pairs, drawn with rich."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from prefdiag.diagnostics import worst_pairs
from prefdiag.reports.markdown import metric_rows

LEVEL_STYLES = {"ok": "green", "warn": "yellow", "fail": "red"}


def print_report(console: Console, table: pd.DataFrame, summary: dict[str, Any], n_worst: int = 10) -> None:
    """Print verdict, metrics and the worst pairs."""
    verdict = summary.get("verdict", {})
    level = verdict.get("level", "ok")
    metrics = Table(title=f"prefdiag {summary.get('command', '')}", title_justify="left", show_header=True)
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for _, label, value in metric_rows(summary):
        metrics.add_row(label, value)
    console.print(metrics)
    worst = worst_pairs(table, n_worst)
    if len(worst):
        pairs = Table(title=f"worst {len(worst)} pairs", title_justify="left")
        numbers = [c for c in ("ref_margin", "policy_margin", "reward_margin", "dpo_loss") if c in worst.columns]
        pairs.add_column("pair")
        for column in numbers:
            pairs.add_column(column, justify="right")
        pairs.add_column("prompt", overflow="ellipsis", no_wrap=True, max_width=50)
        for _, row in worst.iterrows():
            prompt = str(row.get("prompt", "")).replace("\n", " ")
            pairs.add_row(escape(str(row["pair_id"])), *(f"{row[c]:.3f}" for c in numbers), escape(prompt))
        console.print(pairs)
    console.print(
        Panel(escape(verdict.get("text", "")), title=f"verdict: {level}", border_style=LEVEL_STYLES.get(level, "white"))
    )
