"""report.html: one self-contained page (inline CSS, plots as inline SVG, no script, no network) with the gate,
the verdict, the metric table, the margin plots, the ranking transitions, the baseline comparison and the worst
pairs with their text. Rendered by jinja2 with autoescape on: every piece of dataset text is escaped."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd

from prefdiag.reports.common import (
    FLAG_LABELS,
    GROUP_HEADERS,
    RESPONSE_FLAG_LABELS,
    as_text,
    baseline_rows,
    clean_text,
    flag_labels,
    format_value,
    gate_headline,
    gate_rows,
    group_rows,
    metric_rows,
    pair_sections,
    provenance_rows,
    row_id,
    short,
    unit,
)
from prefdiag.reports.plots import report_plots

NUMBERS = ["ref_margin", "policy_margin", "reward_margin", "dpo_loss", "chosen_logratio", "rejected_logratio",
           "ref_margin_per_token", "policy_margin_per_token",
           "ref_logp", "ref_logp_per_token", "policy_logp", "logratio", "reward"]  # the last: unpaired responses


@functools.cache
def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(
        loader=PackageLoader("prefdiag", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True,
        lstrip_blocks=True, finalize=_safe,
    )  # fmt: skip


def _safe(value: Any) -> Any:
    """Every value the template prints: control characters and lone surrogates made visible (valid UTF-8 HTML)."""
    from markupsafe import Markup

    if isinstance(value, Markup):
        return Markup(clean_text(str(value)))
    return clean_text(value) if isinstance(value, str) else value


def render_html(table: pd.DataFrame | None, summary: dict[str, Any], n_worst: int = 10) -> str:
    """The whole report.html text (``table`` may be None when only a summary is known: no plots, no pairs)."""
    return _environment().get_template("report.html.j2").render(**report_context(table, summary, n_worst))


def report_context(table: pd.DataFrame | None, summary: dict[str, Any], n_worst: int = 10) -> dict[str, Any]:
    """Everything the template shows, as plain strings and numbers (dataset text still raw: jinja2 escapes it)."""
    provenance = summary.get("provenance") or {}
    gate_level, gate_text = gate_headline(summary)
    rows = gate_rows(summary)
    by_metric = {r.metric: r for r in rows}
    metrics = [
        {"label": label, "key": key, "value": value, "gate": by_metric.get(key)}
        for key, label, value in metric_rows(summary)
    ]
    column, group_headers, group_table = group_rows(summary)
    return {
        "command": str(summary.get("command") or ""),
        "unit": unit(summary),
        "created_at": provenance.get("created_at", ""),
        "verdict": summary.get("verdict") or {"level": "ok", "text": ""},
        "gate_level": gate_level,
        "gate_text": gate_text,
        "gate_rows": rows,
        "metrics": metrics,
        "transitions": _transitions(summary),
        "plots": report_plots(table),
        "baseline": _baseline(table, summary, n_worst),
        "groups": {"column": short(column), "headers": [GROUP_HEADERS.get(h, h) for h in group_headers],
                   "rows": group_table},
        "worst": _worst(table, n_worst),
        "provenance": provenance_rows(provenance),
    }


def _transitions(summary: dict[str, Any]) -> dict[str, Any] | None:
    t = summary.get("transitions")
    if not t:
        return None
    total = sum(t.values()) or 1
    cell = lambda k: {"n": t[k], "share": f"{100 * t[k] / total:.0f}%"}  # noqa: E731
    return {
        "cc": cell("ref_correct_to_policy_correct"),
        "ci": cell("ref_correct_to_policy_incorrect"),
        "ic": cell("ref_incorrect_to_policy_correct"),
        "ii": cell("ref_incorrect_to_policy_incorrect"),
        "flip_rate": format_value("flip_rate", summary.get("flip_rate")),
        "break_rate": format_value("break_rate", summary.get("break_rate")),
    }


def _pair(row: pd.Series, numbers: list[str]) -> dict[str, Any]:
    """A pair (or an unpaired response) as the template shows it: id, numbers, flag chips and texts, each text
    with its label and the CSS class that colours it."""
    if "response_id" in row.index:  # unpaired (KTO): one completion, labelled
        desirable = bool(row["label"])
        texts = [("prompt", "prompt", as_text(row.get("prompt"))),
                 ("desirable" if desirable else "undesirable", "chosen" if desirable else "rejected",
                  as_text(row.get("completion")))]  # fmt: skip
        chips = flag_labels(row, RESPONSE_FLAG_LABELS)
    else:
        texts = [(name, name, as_text(row.get(name))) for name in ("prompt", "chosen", "rejected")]
        chips = flag_labels(row, FLAG_LABELS)
    return {
        "pair_id": short(row_id(row)),
        "numbers": [(c, format_value(c, row[c])) for c in numbers if c in row.index],
        "flags": chips,
        "texts": texts,
    }


def _worst(table: pd.DataFrame | None, n: int) -> list[dict[str, Any]]:
    return [
        {"title": section.title, "n": section.n, "order": section.order,
         "pairs": [_pair(row, NUMBERS) for _, row in section.rows.iterrows()]}
        for section in pair_sections(table, n)
    ]  # fmt: skip


def _baseline(table: pd.DataFrame | None, summary: dict[str, Any], n: int) -> dict[str, Any] | None:
    baseline = summary.get("baseline")
    if not baseline:
        return None
    out: dict[str, Any] = {
        "source": str(baseline.get("source", "")),
        "created_at": baseline.get("created_at") or "",
        "same_dataset": baseline.get("same_dataset"),
        "rows": baseline_rows(summary),
        "column": baseline.get("ranking_column"),
        "n_joined": baseline.get("n_joined"),
        "n_regressed": baseline.get("n_regressed"),
        "n_fixed": baseline.get("n_fixed"),
        "regressed": [],
        "fixed": [],
    }
    if table is not None and "ranking_change" in table.columns and out["column"]:
        for kind, ascending in (("regressed", True), ("fixed", False)):
            rows = table[table["ranking_change"] == kind].sort_values(out["column"], ascending=ascending).head(n)
            out[kind] = [_pair(row, ["baseline_margin", out["column"]]) for _, row in rows.iterrows()]
    return out
