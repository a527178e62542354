"""What every report shows, as plain rows of strings: metric labels and formats, gate results, baseline deltas,
per-group metrics and the text of a pair. The writers (terminal, Markdown, HTML, JUnit) only lay these out."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prefdiag import flags
from prefdiag.diagnostics import PairList, pair_lists, worst_pairs
from prefdiag.formatting import format_value, plural  # format_value is re-exported for the writers
from prefdiag.gate import OPS
from prefdiag.unpaired import is_unpaired, response_lists

_MODEL_FLAGS = [f for f in flags.FLAGS if f.kind in ("reference", "policy") and f.name != "non_finite"]
_DATA_FLAGS = [f for f in flags.FLAGS if f.kind in ("data", "token")]
# (summary key, label) in display order; keys missing from a summary are skipped. Flag rates: the registry's labels.
METRIC_LABELS = [
    ("n_pairs", "pairs"),
    ("n_scored", "pairs scored"),
    ("n_non_finite", "pairs with a NaN/inf log-prob (left out)"),
    ("beta", "beta"),
    ("reward_accuracy", "reward accuracy (reward_margin > 0)"),
    ("ranking_accuracy", "ranking accuracy, policy (policy_margin > 0)"),
    ("ranking_accuracy_per_token", "ranking accuracy per token, policy"),
    ("ref_ranking_accuracy", "ranking accuracy, reference (ref_margin > 0)"),
    ("idealised_ranking_accuracy", "idealised ranking accuracy (Chen et al.)"),
    ("flip_rate", "reference-misranked pairs the policy fixed"),
    ("break_rate", "reference-correct pairs the policy broke"),
    ("policy_unchanged_rate", "pairs the policy scores exactly as the reference"),
    ("mean_dpo_loss", "mean DPO loss"),
    ("mean_reward_margin", "mean reward margin (beta x nats)"),
    ("mean_ref_margin", "mean reference margin (nats)"),
    ("mean_policy_margin", "mean policy margin (nats)"),
    ("mean_chosen_logratio", "mean chosen log-ratio (policy - ref, nats)"),
    ("mean_rejected_logratio", "mean rejected log-ratio (policy - ref, nats)"),
    ("median_displacement_ratio", "median d(rejected)/d(chosen)"),
    *((f"{f.name}_rate", f.label) for f in _MODEL_FLAGS),
    ("chosen_longer_rate", "chosen longer than rejected"),
    ("reward_margin_length_correlation", "corr(reward margin, length difference)"),
    ("ref_margin_length_correlation", "corr(reference margin, length difference)"),
    *((f"{f.name}_rate", f.label) for f in _DATA_FLAGS),
]
# Unpaired (KTO) runs: their own metrics and the response flags' labels (prefdiag.unpaired).
RESPONSE_METRIC_LABELS = [
    ("n_responses", "responses"),
    ("n_desirable", "desirable responses"),
    ("n_undesirable", "undesirable responses"),
    ("desirable_rate", "desirable share"),
    ("n_prompts", "prompts"),
    ("n_prompts_both_labels", "prompts with both labels"),
    ("n_scored", "responses scored"),
    ("n_non_finite", "responses with a NaN/inf log-prob (left out)"),
    ("beta", "beta"),
    ("desirable_weight_min", "desirable_weight for KTO's balance: at least"),
    ("desirable_weight_max", "desirable_weight for KTO's balance: at most"),
    ("ref_logp_per_token_median", "median ref log-prob per token (what favoured means)"),
    ("ref_favoured_desirable_rate", "desirable responses the reference favours"),
    ("ref_favoured_undesirable_rate", "undesirable responses the reference favours"),
    ("ref_desirable_auc", "AUC desirable vs undesirable, reference, per token"),
    ("ref_prompt_accuracy", "prompts where the reference prefers desirable, per token"),
    ("mean_ref_logp_desirable", "mean ref log-prob, desirable (nats)"),
    ("mean_ref_logp_undesirable", "mean ref log-prob, undesirable (nats)"),
    ("reward_auc", "AUC desirable vs undesirable, implicit reward"),
    ("policy_desirable_auc", "AUC desirable vs undesirable, policy, per token"),
    ("policy_prompt_accuracy", "prompts where the policy prefers desirable, per token"),
    ("mean_logps_desirable", "mean policy log-prob, desirable (logps/chosen)"),
    ("mean_logps_undesirable", "mean policy log-prob, undesirable (logps/rejected)"),
    ("mean_reward_desirable", "mean reward, desirable (rewards/chosen)"),
    ("mean_reward_undesirable", "mean reward, undesirable (rewards/rejected)"),
    ("mean_reward_gap", "reward gap (rewards/margins)"),
    ("policy_unchanged_rate", "responses the policy scores exactly as the reference"),
    ("desirable_displaced_rate", "desirable responses made less likely"),
    ("undesirable_raised_rate", "undesirable responses made more likely"),
    *((f"{f.name}_rate", f.label) for f in flags.RESPONSE_FLAGS if f.kind in ("data", "token")),
]
LABELS = {**dict(RESPONSE_METRIC_LABELS), **dict(METRIC_LABELS)}
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
RESPONSE_KEY_METRICS = [  # the same, for unpaired (KTO) runs
    "n_responses",
    "desirable_rate",
    "ref_desirable_auc",
    "reward_auc",
    "ref_favoured_desirable_rate",
    "ref_favoured_undesirable_rate",
    "policy_desirable_auc",
    "desirable_displaced_rate",
    "undesirable_raised_rate",
    "mean_reward_gap",
]
# Short column headers for the per-group table (terminal and HTML); a flag rate is headed by the registry's label
# unless that is too wide for an 80-column log.
GROUP_HEADERS = {
    "n_pairs": "pairs",
    "reward_accuracy": "reward acc.",
    "ranking_accuracy": "rank acc.",
    "ref_ranking_accuracy": "ref rank acc.",
    "negative_margin_regime_rate": "neg. margin",
    "chosen_displaced_rate": flags.label("chosen_displaced"),
    "ref_prefers_rejected_rate": "ref prefers rejected",
    "likely_mislabeled_rate": flags.label("likely_mislabeled"),
    "mean_dpo_loss": "mean loss",
    "mean_reward_margin": "mean reward margin",
    "mean_ref_margin": "mean ref margin (nats)",
    "mean_policy_margin": "mean policy margin (nats)",
    "flip_rate": "fixed",
    "break_rate": "broken",
    "n_responses": "responses",
    "desirable_rate": "desirable",
    "ref_desirable_auc": "ref AUC",
    "reward_auc": "reward AUC",
    "ref_favoured_desirable_rate": "ref favours desirable",
    "ref_favoured_undesirable_rate": "ref favours undesirable",
    "policy_desirable_auc": "policy AUC",
    "desirable_displaced_rate": "desirable displaced",
    "undesirable_raised_rate": "undesirable raised",
    "mean_reward_gap": "reward gap",
}
# How a gate rule's result is marked in the terminal and HTML (Markdown uses emoji GitHub renders).
STATUS_SYMBOLS = {"pass": "✓", "fail": "✗", "warn": "!"}
STATUS_WORDS = {"pass": "pass", "fail": "FAIL", "warn": "warn"}
ID_LIMIT = 80  # characters of a pair id or group value shown
TEXT_LIMIT = 4000  # characters of a prompt or response shown in a report


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, formatted value) for every metric the summary has."""
    labels = RESPONSE_METRIC_LABELS if is_unpaired(summary) else METRIC_LABELS
    return [(k, label, format_value(k, summary[k])) for k, label in labels if k in summary]


def row_id(row: pd.Series) -> Any:
    """A row's id: its pair_id, or its response_id in an unpaired (KTO) table."""
    return row["pair_id"] if "pair_id" in row.index else row["response_id"]


def unit(summary: dict[str, Any] | None) -> str:
    """What a row of the run is: "pair", or "response" for unpaired (KTO) data."""
    return "response" if is_unpaired(summary) else "pair"


def metric_label(name: str) -> str:
    """A readable label for a gate metric name (its summary key when there is no label)."""
    return LABELS.get(name, name)


@dataclass
class GateRow:
    """One gate rule's result as every report shows it."""

    status: str  # pass, fail or warn
    metric: str
    condition: str  # ">= 60.0%"
    observed: str
    severity: str
    source: str
    message: str  # one line: "ranking_accuracy = 58.3%, needs >= 60.0%"

    @property
    def name(self) -> str:
        """The metric as shown: cleaned, and cut when a group value makes it long."""
        return short(self.metric, 200)

    @property
    def symbol(self) -> str:
        """✓, ✗ or ! (pass, fail, warn)."""
        return STATUS_SYMBOLS[self.status]

    @property
    def mark(self) -> str:
        """The symbol and the word: "✓ pass", "✗ FAIL", "! warn"."""
        return f"{self.symbol} {STATUS_WORDS[self.status]}"


def gate_rows(summary: dict[str, Any]) -> list[GateRow]:
    """One row per gate rule of the summary, in the gate's order."""
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
        shown = short(metric, 200)
        message = f"{shown} = {observed}, {verb} {condition}"
        if rule["observed"] is None:
            message = f"{shown} has no value in this run, needs {condition}"
        rows.append(GateRow(status, metric, condition, observed, rule["severity"], rule.get("source", ""), message))
    return rows


def gate_headline(summary: dict[str, Any]) -> tuple[str, str]:
    """(level, sentence) for the gate: level ok / warn / fail / none."""
    gate = summary.get("gate")
    if not gate or not gate.get("n_rules"):
        return "none", "No gate rules were set (--min/--max, --gate FILE or [tool.prefdiag.gate])."
    n, failed, warned = gate["n_rules"], gate["n_failed"], gate["n_warnings"]
    if failed:
        return "fail", f"Gate FAILED: {failed} of {plural(n, 'rule')} failed" + (
            f", {plural(warned, 'warning')}." if warned else "."
        )
    if warned:
        return "warn", f"Gate passed with {plural(warned, 'warning')} ({plural(n, 'rule')})."
    return "ok", "Gate passed: the one rule holds." if n == 1 else f"Gate passed: all {n} rules hold."


def baseline_rows(summary: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, baseline, current, delta) for the key metrics both runs have."""
    metrics = (summary.get("baseline") or {}).get("metrics") or {}
    unpaired = is_unpaired(summary)
    labels, keys = (RESPONSE_METRIC_LABELS, RESPONSE_KEY_METRICS) if unpaired else (METRIC_LABELS, KEY_METRICS)
    rows = []
    for key in [k for k, _ in labels]:
        if key in metrics and key in keys:
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
    keys = RESPONSE_KEY_METRICS if is_unpaired(summary) else KEY_METRICS
    present = [k for k in keys if any(isinstance(v, dict) and k in v for v in values.values())]
    rows = [[short(g)] + [format_value(k, (m or {}).get(k)) for k in present] for g, m in values.items()]
    return str(groups.get("column", "group")), present, rows


def as_text(value: Any, limit: int = TEXT_LIMIT, bidi: bool = False) -> str:
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
    text = text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"
    return clean_text(text, bidi=bidi)


def one_line(value: Any, width: int) -> str:
    """One line of at most ``width`` characters, bidi controls shown as code points (safe in a table row)."""
    text = " ".join(as_text(value, limit=width * 4, bidi=True).split())
    return text if len(text) <= width else text[: width - 1] + "…"


_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffe\uffff]")
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _picture(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # the control picture: U+0001 shows as ␁
    return "␡" if code == 0x7F else f"<U+{code:04X}>"


def clean_text(text: str, bidi: bool = False) -> str:
    """Text any report can hold as is: lone surrogates become U+FFFD, control characters (other than tab and
    newline) their visible pictures, and with ``bidi`` the direction controls their code points (a right-to-left
    override cannot reverse the rest of a table row or log line)."""
    text = _SURROGATE.sub("\ufffd", text)
    text = _CONTROL.sub(_picture, text)
    return _BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", text) if bidi else text


def short(value: Any, limit: int = ID_LIMIT) -> str:
    """A pair id or group value for a heading or cell: cleaned (bidi controls shown) and cut at ``limit``."""
    return one_line(value, limit)


# Model-free data checks (prefdiag.checks): a pair flagged by one is worth a look even with no model.
DATA_FLAG_LABELS = {f.name: f.label for f in flags.FLAGS if f.kind == "data"}
FLAG_LABELS = dict(flags.LABELS)  # every flag, for the chips beside a pair
RESPONSE_FLAG_LABELS = {f.name: f.label for f in flags.RESPONSE_FLAGS if f.name != "ref_favoured"}


def pair_sections(table: pd.DataFrame | None, n: int) -> list[PairList]:
    """The lists of pairs behind the findings (diagnostics.pair_lists), each headed by what it holds; when no
    finding names a pair, the pairs with the lowest margin per token (still worth a look)."""
    if table is None:
        return []
    if "response_id" in table.columns:  # unpaired (KTO) rows
        return response_lists(table, n)
    sections = pair_lists(table, n)
    if not sections and "ref_margin" in table.columns:
        column = "policy_margin" if "policy_margin" in table.columns else "ref_margin"
        rows = worst_pairs(table, n)
        if len(rows):
            title = f"Lowest {column.replace('_', ' ')}s: no finding flagged a pair"
            sections = [PairList("lowest_margin", title, f"{column.replace('_', ' ')} per token, lowest first",
                                 len(table), rows)]  # fmt: skip
    return sections


def flag_labels(row: pd.Series, labels: dict[str, str]) -> list[str]:
    """The labels of the flags that are True on a row."""
    return [label for column, label in labels.items() if column in row.index and _true(row[column])]


def _true(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) and bool(value)


def provenance_rows(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, where it came from) for the models, the dataset, the tokenization and prefdiag's version."""
    items = []
    for key in ("reference", "policy"):
        model = provenance.get(key)
        if isinstance(model, dict):
            items.append((key, f"{model.get('name')} ({model.get('dtype')} on {model.get('device')})"))
    dataset = provenance.get("dataset")
    if isinstance(dataset, dict):
        items.append(("dataset", f"{dataset.get('source')} (sha256 {str(dataset.get('content_sha256'))[:12]})"))
    tokenization = provenance.get("tokenization")
    if isinstance(tokenization, dict):
        items.append(("tokenization", f"{tokenization.get('scheme')}, max_length {tokenization.get('max_length')}"))
    if provenance.get("prefdiag_version"):
        items.append(("prefdiag", str(provenance["prefdiag_version"])))
    return items
