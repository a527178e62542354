"""A finished run (the per-pair table and its summary) and what can be done with it without the CLI or torch:
compare it with a previous run, gate it, write every output file."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from prefdiag.checks import CHECKS, SCORES
from prefdiag.options import DEFAULT_TOP

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """The per-pair table (one row per input pair, input order) and the summary written to summary.json.

    ``pairs`` is None for a saved run read back without its table (``prefdiag gate`` on a summary.json alone)."""

    pairs: pd.DataFrame | None
    summary: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        """A saved run: its --output directory (summary.json and pairs.*) or its summary.json."""
        from prefdiag.baseline import load_run

        saved = load_run(Path(path))
        return cls(saved.pairs, saved.summary)

    def compare_with_baseline(self, baseline: str | Path | Any) -> dict[str, Any]:
        """Add ``summary["baseline"]`` (metric deltas, regressed and fixed pairs) and the pairs table's
        ``baseline_margin`` / ``ranking_change`` columns. ``baseline`` is a previous run's --output directory, its
        summary.json, or a ``prefdiag.baseline.SavedRun``; returns the baseline record."""
        from prefdiag.baseline import compare_with_baseline, load_run

        saved = load_run(Path(baseline)) if isinstance(baseline, (str, Path)) else baseline
        record, self.pairs = compare_with_baseline(self.pairs, self.summary, saved)
        _insert_before_provenance(self.summary, "baseline", record)
        return record

    def apply_gate(self, rules: Any) -> dict[str, Any]:
        """Evaluate gate rules (``prefdiag.gate.Rule`` objects, or a TOML-style table such as ``{"min_ranking_accuracy":
        0.6}``) and record the outcome as ``summary["gate"]``; returns it (``outcome["passed"]``). Raises
        UsageError on a metric this run does not have."""
        from prefdiag import gate

        if isinstance(rules, dict):
            rules = gate.rules_from_table(rules, "apply_gate", self.summary.get("command"))
        return gate.apply(self.summary, list(rules))

    @property
    def passed(self) -> bool:
        """False when the gate was applied and an error-severity rule failed."""
        return bool((self.summary.get("gate") or {}).get("passed", True))

    def write(self, directory: str | Path, table_format: str | None = "parquet", top: int = DEFAULT_TOP) -> list[Path]:
        """Write the per-pair table (``pairs.<table_format>``, ``responses.<table_format>`` for unpaired KTO rows; none
        when table_format is None), summary.json,
        report.md, junit.xml and report.html into ``directory``, all or nothing; returns the paths written."""
        from prefdiag.phases import phase
        from prefdiag.reports.files import dumps_summary, write_atomically, write_table, write_text
        from prefdiag.reports.html import render_html
        from prefdiag.reports.junit import render_junit
        from prefdiag.reports.markdown import render_markdown
        from prefdiag.unpaired import table_name

        pairs, summary = self.pairs, self.summary
        with phase("write_outputs"):
            writers = {}
            if pairs is not None and table_format is not None:
                writers[f"{table_name(summary)}.{table_format}"] = lambda path: write_table(pairs, path, table_format)
            writers.update(
                {
                    "summary.json": write_text(dumps_summary(summary)),
                    "report.md": write_text(render_markdown(pairs, summary, top)),
                    "junit.xml": write_text(render_junit(summary)),
                    "report.html": write_text(render_html(pairs, summary, top)),
                }
            )
            return write_atomically(Path(directory), writers)

    def append_step_summary(self, top: int = DEFAULT_TOP) -> bool:
        """Append report.md to $GITHUB_STEP_SUMMARY when GitHub Actions sets it (a write failure only warns);
        returns whether it was written."""
        target = os.environ.get("GITHUB_STEP_SUMMARY")
        if not target:
            return False
        from prefdiag.reports.markdown import render_markdown

        try:
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(render_markdown(self.pairs, self.summary, top) + "\n")
        except OSError as exc:
            log.warning("could not append to GITHUB_STEP_SUMMARY (%s): %s", target, exc)
            return False
        return True


# The per-pair table's leading columns, in order (those a run has); the data's own columns follow.
COLUMN_ORDER = [
    "pair_id",
    "prompt_tokens",
    "chosen_tokens",
    "rejected_tokens",
    "ref_chosen_logp",
    "ref_rejected_logp",
    "ref_margin",
    "ref_prefers_rejected",
    "ches",
    "ches_norm",
    "ches_percentile",
    "ches_norm_percentile",
    "high_ches",
    "policy_chosen_logp",
    "policy_rejected_logp",
    "policy_margin",
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "dpo_loss",
    "negative_margin_regime",
    "negative_margin_regime_per_token",
    "chosen_displaced",
    "both_displaced",
    "likely_mislabeled",
    "mislabel_score",
    "truncated",
    "dropped",
    "non_finite",
    "boundary_mismatch",
    *CHECKS,
    *SCORES,
]


def order_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The per-pair table with prefdiag's columns first, in COLUMN_ORDER, then the data's own columns."""
    leading = [c for c in COLUMN_ORDER if c in table.columns]
    return table[leading + [c for c in table.columns if c not in leading]]


def check_output_dir(directory: str | Path, flag: str = "--output") -> None:
    """Refuse, before any work, an output directory that cannot be created or written (a file in the way, a
    read-only parent), naming the path."""
    from prefdiag.errors import UsageError

    path = Path(directory)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UsageError(f"{flag} {path}: {where}; expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def _insert_before_provenance(summary: dict[str, Any], key: str, value: Any) -> None:
    summary.pop(key, None)
    provenance = summary.pop("provenance", None)
    summary[key] = value
    if provenance is not None:
        summary["provenance"] = provenance
