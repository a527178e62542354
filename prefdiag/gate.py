"""The release gate: threshold rules on the metrics of a summary dict, evaluated without any model (no torch).
The rules themselves (Rule, and reading them from the command line, TOML and pyproject.toml) are in
prefdiag.gate_rules and re-exported here.

Metric names (:func:`metric_values`): every numeric top-level key of summary.json; nested numbers by dotted path
(``quantiles.reward_margin.p95``, ``transitions.ref_correct_to_policy_incorrect``); per-group metrics as
``groups.<value>.<metric>`` (``groups.*.<metric>`` checks every group); with a baseline, ``<metric>_delta`` =
current - baseline, ``<metric>_drop`` = baseline - current, and ``baseline.n_regressed``, ``baseline.n_fixed``,
``baseline.regressed_rate``. ``min`` passes when observed >= threshold, ``max`` when observed <= threshold; a
metric with no value in the run (None) fails its rule.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from prefdiag.errors import UsageError
from prefdiag.gate_rules import (  # noqa: F401 - re-exported: `from prefdiag import gate; gate.collect_rules(...)`
    BASELINE_METRICS,
    CLI_SYNTAX,
    COMMANDS,
    DELTA_SUFFIXES,
    EXAMPLE,
    GROUP_WILDCARD,
    RESPONSE_EXAMPLE,
    NOT_METRICS,
    OPS,
    SEVERITIES,
    Rule,
    collect_rules,
    load_gate_file,
    load_pyproject_rules,
    parse_cli_rule,
    rules_from_summary,
    rules_from_table,
)

_TOLERANCE = 1e-9  # relative: 0.1 + 0.2 <= 0.3 passes


# ------------------------------------------------------------------------------------------------ metric names


def metric_values(summary: dict[str, Any]) -> dict[str, float | None]:
    """Every gateable metric of a summary by name (see the module docstring); None where the run has no value."""
    values: dict[str, float | None] = {}
    for key, value in summary.items():
        if key not in NOT_METRICS:
            _collect(key, value, values, top=True)
    groups = summary.get("groups")
    if isinstance(groups, dict):
        for key, value in groups.items():
            if key == "values" and isinstance(value, dict):
                for group, metrics in value.items():
                    if isinstance(metrics, dict):
                        for metric, number in metrics.items():
                            _collect(f"groups.{group}.{metric}", number, values, top=True)
            elif key != "column":
                _collect(f"groups.{key}", value, values, top=False)
    baseline = summary.get("baseline")
    if isinstance(baseline, dict):
        for name, delta in (baseline.get("metrics") or {}).items():
            values[f"{name}_delta"] = _number(delta.get("delta"))
            values[f"{name}_drop"] = _number(delta.get("drop"))
        for key in BASELINE_METRICS:
            if key in baseline:
                values[f"baseline.{key}"] = _number(baseline[key])
    return values


def _collect(name: str, value: Any, out: dict[str, float | None], top: bool) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _collect(f"{name}.{key}", inner, out, top=False)
    elif value is None:
        if top:  # a metric the run could not compute (nested None: a missing block, not a metric)
            out[name] = None
    elif _is_number(value):
        out[name] = _number(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    if not _is_number(value):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@functools.cache
def metric_catalogue(mode: str) -> frozenset[str]:
    """The metric names a run produces before any grouping or baseline: mode "data" (no model), "reference"
    (audit with a reference) or "policy" (compare). Computed by summarising a small synthetic table."""
    import pandas as pd

    from prefdiag import diagnostics

    if mode not in ("data", "reference", "policy"):
        raise ValueError(mode)
    n = 6
    columns: dict[str, Any] = {
        "pair_id": [f"p{i}" for i in range(n)],
        "prompt": ["q"] * n,
        "chosen": ["a b"] * n,
        "rejected": ["c"] * n,
    }
    # Per-pair flags the run adds before summarising: the model-free checks always, token flags once tokenized.
    for flag in diagnostics.DATA_FLAGS:
        if mode != "data" or flag not in diagnostics.TOKEN_FLAGS:
            columns[flag] = [False] * n
    if mode != "data":
        columns.update(
            prompt_tokens=[3] * n,
            chosen_tokens=[2, 3, 4, 5, 6, 7],
            rejected_tokens=[3, 2, 5, 4, 7, 6],
            ref_chosen_logp=[-5.0, -6, -7, -3, -9, -2],
            ref_rejected_logp=[-6.0, -5, -8, -4, -2, -9],
        )
    if mode == "policy":
        columns.update(
            policy_chosen_logp=[-4.0, -7, -6, -5, -8, -1],
            policy_rejected_logp=[-7.0, -4, -9, -3, -3, -10],
        )
    table = diagnostics.add_pair_metrics(pd.DataFrame(columns), 0.1)
    return frozenset(metric_values(diagnostics.summarize(table, 0.1))) | _response_catalogue(mode)


def _response_catalogue(mode: str) -> frozenset[str]:
    """The metric names of the same mode on unpaired (KTO) rows (prefdiag.unpaired), from a synthetic table."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from prefdiag import unpaired

    n = 6
    rows = pd.DataFrame({"pair_id": [f"r{i}" for i in range(n)], "prompt": ["q", "q", "r", "r", "s", "s"],
                         "chosen": ["a"] * n, "rejected": ["a"] * n, "label": [True, False] * 3})  # fmt: skip
    keys = np.arange(n, dtype=np.uint64)
    features = SimpleNamespace(prompt_key=keys // 2, chosen_key=keys, prompt_chars=np.ones(n), chosen_chars=np.ones(n))
    scores = None
    if mode != "data":
        scores = pd.DataFrame({"prompt_tokens": [3] * n, "chosen_tokens": [2, 3, 4, 5, 6, 7],
                               "ref_chosen_logp": [-5.0, -6, -7, -3, -9, -2], "truncated": [False] * n,
                               "dropped": [False] * n, "boundary_mismatch": [False] * n})  # fmt: skip
        if mode == "policy":
            scores["policy_chosen_logp"] = [-4.0, -7, -6, -5, -8, -1]
    table = unpaired.response_table(rows, features, scores, 0.1)
    return frozenset(metric_values(unpaired.summarize(table, 0.1)))


def run_mode(command: str, reference: bool) -> str:
    """The catalogue mode of a run: compare scores a policy; audit a reference, or nothing at all."""
    if command == "compare":
        return "policy"
    return "reference" if reference else "data"


def check_rules(rules: Iterable[Rule], mode: str, *, baseline: bool = False, command: str = "") -> None:
    """Fail fast, before any model is loaded, on a rule no run of this mode can evaluate (the authoritative check
    is :func:`evaluate`, on the finished summary)."""
    known = metric_catalogue(mode)
    everything = metric_catalogue("policy")
    for rule in rules:
        name = rule.metric
        if name.startswith("baseline."):
            if name.removeprefix("baseline.") not in BASELINE_METRICS:
                raise _unknown(rule, sorted(known), baseline=baseline, groups=None)
            if not baseline:
                raise _needs_baseline(rule)
            continue
        base = name
        if name not in known:
            for suffix in DELTA_SUFFIXES:
                if name.endswith(suffix):
                    if not baseline:
                        raise _needs_baseline(rule)
                    base = name.removesuffix(suffix)
                    break
        if base.startswith("groups."):
            _, _, metric = base.rpartition(".")
            if base.count(".") < 2 or metric not in known:
                raise _unknown(rule, sorted(known), baseline=baseline, groups=[])
            continue
        if base not in known:
            if base in everything:
                raise _not_computed(rule, command or "this command")
            raise _unknown(rule, sorted(known), baseline=baseline, groups=None)


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(summary: dict[str, Any], rules: Iterable[Rule]) -> dict[str, Any]:
    """Check every rule against the summary. Returns the ``summary["gate"]`` record: ``passed`` is False when an
    error-severity rule failed; each rule records metric, op, threshold, severity, observed and passed.
    Raises UsageError on a metric this summary does not have."""
    values = metric_values(summary)
    results = []
    for rule in _expand(list(rules), values, summary):
        observed = values[rule.metric]
        tolerance = _TOLERANCE * max(1.0, abs(rule.threshold))
        if observed is None:
            passed = False
        elif rule.op == "min":
            passed = observed >= rule.threshold - tolerance
        else:
            passed = observed <= rule.threshold + tolerance
        results.append({**asdict(rule), "observed": observed, "passed": passed})
    failed = [r for r in results if not r["passed"] and r["severity"] == "error"]
    warnings = [r for r in results if not r["passed"] and r["severity"] == "warn"]
    return {
        "passed": not failed,
        "n_rules": len(results),
        "n_failed": len(failed),
        "n_warnings": len(warnings),
        "rules": results,
    }


def apply(summary: dict[str, Any], rules: Iterable[Rule]) -> dict[str, Any]:
    """Evaluate the rules and record the result as ``summary["gate"]`` (before provenance); returns that record."""
    gate = evaluate(summary, rules)
    summary.pop("gate", None)
    provenance = summary.pop("provenance", None)
    summary["gate"] = gate
    if provenance is not None:
        summary["provenance"] = provenance
    return gate


def _expand(rules: list[Rule], values: dict[str, float | None], summary: dict[str, Any]) -> list[Rule]:
    """Replace ``groups.*.<metric>`` by one rule per group; raise on any name the summary lacks."""
    groups = _group_names(summary)
    has_baseline = isinstance(summary.get("baseline"), dict)
    expanded: list[Rule] = []
    for rule in rules:
        if rule.metric.startswith(f"groups.{GROUP_WILDCARD}."):
            tail = rule.metric.removeprefix(f"groups.{GROUP_WILDCARD}.")
            matches = [f"groups.{g}.{tail}" for g in groups if f"groups.{g}.{tail}" in values]
            if not matches:
                raise _unknown(rule, sorted(values), baseline=has_baseline, groups=groups)
            expanded += [Rule(m, rule.op, rule.threshold, rule.severity, rule.source) for m in matches]
        elif rule.metric in values:
            expanded.append(rule)
        elif not has_baseline and (rule.metric.endswith(DELTA_SUFFIXES) or rule.metric.startswith("baseline.")):
            raise _needs_baseline(rule)
        elif rule.metric.startswith("groups.") and not groups:
            raise UsageError(
                f"{rule.metric!r} in {rule.source}: this run has no per-group metrics",
                hint="score with --group-by COLUMN to get groups.<value>.<metric>",
            )
        elif rule.metric in metric_catalogue("policy") and summary.get("command") != "compare":
            raise _not_computed(rule, summary.get("command") or "this run")
        else:
            raise _unknown(rule, sorted(values), baseline=has_baseline, groups=groups)
    return expanded


def _group_names(summary: dict[str, Any]) -> list[str]:
    values = (summary.get("groups") or {}).get("values")
    return [str(g) for g in values] if isinstance(values, dict) else []


def _unknown(rule: Rule, known: list[str], *, baseline: bool, groups: list[str] | None) -> UsageError:
    plain = [n for n in known if not n.startswith(("quantiles.", "transitions.", "groups.", "baseline."))]
    plain = [n for n in plain if not n.endswith(DELTA_SUFFIXES)]
    close = difflib.get_close_matches(rule.metric, known, n=3, cutoff=0.7)
    message = f"unknown metric {rule.metric!r} in {rule.source}"
    if close:
        message += f"; did you mean {' or '.join(close)}?"
    extra = []
    if any(n.startswith("quantiles.") for n in known):
        extra.append("quantiles.<column>.<p05|p25|p50|p75|p95>")
    if any(n.startswith("transitions.") for n in known):
        extra.append("transitions.<ref_correct_to_policy_incorrect ...>")
    if groups is None:
        extra.append("groups.<value>.<metric> (with --group-by)")
    elif groups:
        extra.append(f"groups.<{'|'.join(groups[:8])}{'|...' if len(groups) > 8 else ''}|*>.<metric>")
    else:
        extra.append("groups.<value>.<metric>")
    extra.append("<metric>_drop, <metric>_delta, baseline.<n_regressed|n_fixed|regressed_rate> (with --baseline)")
    return UsageError(message, hint="valid metrics: " + ", ".join(plain + extra))


def _needs_baseline(rule: Rule) -> UsageError:
    return UsageError(
        f"{rule.metric!r} in {rule.source} compares with a previous run: give --baseline DIR",
        hint="<metric>_drop = baseline - current, <metric>_delta = current - baseline",
    )


def _not_computed(rule: Rule, command: str) -> UsageError:
    return UsageError(
        f"metric {rule.metric!r} in {rule.source} is not computed by {command}",
        hint="policy metrics need `prefdiag compare`; reference metrics need --reference; put command-specific "
        "rules under [gate.compare] or [gate.audit]",
    )
