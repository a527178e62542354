"""The Markdown report: verdict, metric table, ranking transitions and the worst pairs."""

from __future__ import annotations

from typing import Any

import pandas as pd

from prefdiag.diagnostics import worst_pairs

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
    ("truncated_rate", "truncated at --max-length"),
    ("dropped_rate", "dropped (prompt fills --max-length)"),
    ("boundary_mismatch_rate", "prompt/completion token boundary mismatch"),
]


def format_value(key: str, value: Any) -> str:
    """Rates and accuracies as percentages, counts as integers, other numbers with 4 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if key.startswith("n_"):
        return str(int(value))
    if key.endswith(("_rate", "_accuracy")):
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, label, formatted value) for every metric the summary has."""
    return [(k, label, format_value(k, summary[k])) for k, label in METRIC_LABELS if k in summary]


def _cell(text: Any, width: int = 80) -> str:
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_markdown(table: pd.DataFrame, summary: dict[str, Any], n_worst: int = 10) -> str:
    """The whole report.md text."""
    verdict = summary.get("verdict", {})
    lines = [
        f"# prefdiag {summary.get('command', '')} report",
        "",
        f"**Verdict ({verdict.get('level', 'ok')}):** {verdict.get('text', '')}",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {label} | {value} |" for _, label, value in metric_rows(summary)]
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
    worst = worst_pairs(table, n_worst)
    if len(worst):
        numbers = [c for c in ("ref_margin", "policy_margin", "reward_margin", "dpo_loss") if c in worst.columns]
        lines += ["", f"## Worst {len(worst)} pairs", "", "| pair | " + " | ".join(numbers) + " | prompt |"]
        lines.append("| --- " * (len(numbers) + 2) + "|")
        for _, row in worst.iterrows():
            values = " | ".join(f"{row[c]:.3f}" for c in numbers)
            lines.append(f"| {_cell(row['pair_id'], 24)} | {values} | {_cell(row.get('prompt', ''), 60)} |")
    provenance = summary.get("provenance", {})
    lines += ["", "## Provenance", ""]
    for key in ("reference", "policy"):
        if key in provenance:
            model = provenance[key]
            lines.append(f"- {key}: `{model['name']}` ({model['dtype']} on {model['device']})")
    dataset = provenance.get("dataset", {})
    if dataset:
        lines.append(f"- dataset: `{dataset.get('source')}` (sha256 {str(dataset.get('content_sha256'))[:12]})")
    lines.append(f"- prefdiag {provenance.get('prefdiag_version', '')}")
    return "\n".join(lines) + "\n"
