"""What every report shows, as plain rows of strings: metric labels and formats, gate results, baseline deltas,
per-group metrics and the text of a pair. The writers (terminal, Markdown, HTML, JUnit) only lay these out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prefdiag import flags
from prefdiag.diagnostics import worst_pairs
from prefdiag.formatting import base_name, format_value, is_rate, plural  # noqa: F401 (re-exported)
from prefdiag.gate import OPS

# (summary key, label) in display order; keys missing from a summary are skipped.
METRIC_LABELS = [
    ("n_pairs", "pairs"),
    ("n_scored", "pairs scored"),
    ("beta", "beta"),
    ("reward_accuracy", "reward accuracy (reward_margin > 0)"),
    ("ranking_accuracy", "ranking accuracy, policy (policy_margin > 0)"),
    ("ref_ranking_accuracy", "ranking accuracy, reference (ref_margin > 0)"),
    ("idealised_ranking_accuracy", "idealised ranking accuracy (Chen et al.)"),
    ("flip_rate", "reference-misranked pairs the policy fixed"),
    ("break_rate", "reference-correct pairs the policy broke"),
    ("mean_dpo_loss", "mean DPO loss"),
    ("mean_reward_margin", "mean reward margin"),
    ("mean_ref_margin", "mean reference margin (nats)"),
    ("mean_policy_margin", "mean policy margin (nats)"),
    ("mean_chosen_logratio", "mean chosen log-ratio (policy - ref)"),
    ("mean_rejected_logratio", "mean rejected log-ratio (policy - ref)"),
    ("median_displacement_ratio", "median d(rejected)/d(chosen)"),
    ("ref_prefers_rejected_rate", "reference prefers rejected"),
    ("negative_margin_regime_rate", "negative-margin regime"),
    ("chosen_displaced_rate", "chosen displaced"),
    ("both_displaced_rate", "both displaced"),
    ("likely_mislabeled_rate", "likely mislabeled"),
    ("chosen_longer_rate", "chosen longer than rejected"),
    ("reward_margin_length_correlation", "corr(reward margin, length difference)"),
    ("ref_margin_length_correlation", "corr(reference margin, length difference)"),
    ("identical_rate", "chosen == rejected"),
    ("near_identical_rate", "near-identical responses"),
    ("duplicate_rate", "duplicated pairs"),
    ("conflict_rate", "conflicting pairs"),
    ("empty_response_rate", "empty response"),
    ("empty_prompt_rate", "empty prompt"),
    ("length_ratio_rate", "length ratio > 4x"),
    ("truncated_rate", "truncated at --max-length"),
    ("dropped_rate", "dropped (prompt fills --max-length)"),
    ("boundary_mismatch_rate", "prompt/completion token boundary mismatch"),
]
LABELS = dict(METRIC_LABELS)
# Metrics shown per group and in the baseline comparison.
KEY_METRICS = [
    "n_pairs",
    "reward_accuracy",
    "ranking_accuracy",
    "ref_ranking_accuracy",
    "negative_margin_regime_rate",
    "chosen_displaced_rate",
    "ref_prefers_rejected_rate",
    "likely_mislabeled_rate",
    "mean_dpo_loss",
    "mean_reward_margin",
    "mean_ref_margin",
    "mean_policy_margin",
    "flip_rate",
    "break_rate",
]
STATUS = {"pass": "pass", "fail": "FAIL", "warn": "warn"}
TEXT_LIMIT = 4000  # characters of a prompt or response shown in a report


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, formatted value) for every metric the summary has."""
    return [(k, label, format_value(k, summary[k])) for k, label in METRIC_LABELS if k in summary]


def metric_label(name: str) -> str:
    """A readable label for a gate metric name (its summary key when there is no label)."""
    return LABELS.get(name, name)


@dataclass
class GateRow:
    status: str  # pass, fail or warn
    metric: str
    condition: str  # ">= 60.0%"
    observed: str
    severity: str
    source: str
    message: str  # one line: "ranking_accuracy = 58.3%, needs >= 60.0%"


def gate_rows(summary: dict[str, Any]) -> list[GateRow]:
    rows = []
    for rule in (summary.get("gate") or {}).get("rules", []):
        metric = rule["metric"]
        condition = f"{OPS[rule['op']]} {format_value(metric, rule['threshold'])}"
        observed = format_value(metric, rule["observed"])
        if rule["passed"]:
            status = "pass"
        else:
            status = "fail" if rule["severity"] == "error" else "warn"
        verb = "meets" if rule["passed"] else "needs"
        message = f"{metric} = {observed}, {verb} {condition}"
        if rule["observed"] is None:
            message = f"{metric} has no value in this run, needs {condition}"
        rows.append(GateRow(status, metric, condition, observed, rule["severity"], rule.get("source", ""), message))
    return rows


def gate_headline(summary: dict[str, Any]) -> tuple[str, str]:
    """(level, sentence) for the gate: level ok / warn / fail / none."""
    gate = summary.get("gate")
    if not gate or not gate.get("n_rules"):
        return "none", "No gate rules were set (--min/--max, --gate FILE or [tool.prefdiag.gate])."
    n, failed, warned = gate["n_rules"], gate["n_failed"], gate["n_warnings"]
    if failed:
        plural = "s" if warned != 1 else ""
        return "fail", f"Gate FAILED: {failed} of {n} rules failed" + (f", {warned} warning{plural}." if warned else ".")
    if warned:
        return "warn", f"Gate passed with {warned} warning{'s' if warned != 1 else ''} ({n} rules)."
    return "ok", "Gate passed: the one rule holds." if n == 1 else f"Gate passed: all {n} rules hold."


def baseline_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, baseline, current, delta) for the key metrics both runs have."""
    metrics = (summary.get("baseline") or {}).get("metrics") or {}
    rows = []
    for key in [k for k, _ in METRIC_LABELS]:
        if key in metrics and key in KEY_METRICS:
            d = metrics[key]
            rows.append(
                (metric_label(key), format_value(key, d["baseline"]), format_value(key, d["current"]),
                 format_value(f"{key}_delta", d["delta"]))
            )  # fmt: skip
    return rows


def group_rows(summary: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """(grouping column, metric headers, one row per group) for the metrics the groups have."""
    groups = summary.get("groups") or {}
    values = groups.get("values") or {}
    if not isinstance(values, dict) or not values:
        return "", [], []
    present = [k for k in KEY_METRICS if any(isinstance(v, dict) and k in v for v in values.values())]
    rows = [[str(g)] + [format_value(k, (m or {}).get(k)) for k in present] for g, m in values.items()]
    return str(groups.get("column", "group")), present, rows


def as_text(value: Any, limit: int = TEXT_LIMIT) -> str:
    """A prompt or response as plain text: strings as they are, a conversation as "role: content" lines."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        lines = []
        for message in value:
            if isinstance(message, dict):
                lines.append(f"{message.get('role', '?')}: {message.get('content', '')}")
            else:
                lines.append(str(message))
        text = "\n".join(lines)
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


def one_line(value: Any, width: int) -> str:
    text = " ".join(as_text(value, limit=width * 4).split())
    return text if len(text) <= width else text[: width - 1] + "…"


# Model-free data checks (prefdiag.checks): a pair flagged by one is worth a look even with no model.
DATA_FLAG_LABELS = {
    "identical": "identical responses",
    "near_identical": "near-identical responses",
    "duplicate": "duplicate",
    "conflict": "conflict",
    "empty_response": "empty response",
    "empty_prompt": "empty prompt",
    "length_ratio": "length ratio > 4x",
}


def pairs_to_show(table: pd.DataFrame | None, n: int) -> tuple[str, pd.DataFrame | None]:
    """(title, rows): the worst pairs when a model was scored, else the pairs a data check flagged."""
    if table is None:
        return "", None
    worst = worst_pairs(table, n)
    if len(worst):
        return f"Worst {len(worst)} pairs", worst
    flags = [c for c in DATA_FLAG_LABELS if c in table.columns and table[c].dtype == bool]
    if not flags:
        return "", None
    flagged = table[table[flags].any(axis=1)].head(n)
    return (f"First {len(flagged)} flagged pairs", flagged) if len(flagged) else ("", None)


def flag_labels(row: pd.Series, labels: dict[str, str]) -> list[str]:
    """The labels of the flags that are True on a row."""
    return [label for column, label in labels.items() if column in row.index and _true(row[column])]


def _true(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) and bool(value)
