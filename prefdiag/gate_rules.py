"""Gate rules and where they come from: ``--min`` / ``--max``, a ``--gate`` TOML file, ``[tool.prefdiag.gate]`` in
pyproject.toml, or a saved summary. Parsing only; prefdiag.gate evaluates them.

Rules come from three places, merged in this order (a later rule on the same ``(op, metric)`` replaces an earlier
one): the ``[tool.prefdiag.gate]`` table of ``pyproject.toml`` in the working directory (skipped when a ``--gate``
file is given), the ``[gate]`` table of a ``--gate`` TOML file, then ``--min`` / ``--max`` on the command line.

TOML::

    [tool.prefdiag.gate]                       # or [gate] in a file given with --gate
    min_ranking_accuracy = 0.6                 # error severity: a failure exits 1
    max_negative_margin_regime_rate = { value = 0.1, severity = "warn" }   # reported, never fails the run
    max_ranking_accuracy_drop = 0.02           # needs --baseline
    "min_groups.*.ranking_accuracy" = 0.5      # every group of --group-by

    [tool.prefdiag.gate.compare]               # applies to one command only (also: audit)
    min_reward_accuracy = 0.7

Command line: ``--min ranking_accuracy=0.6 --max negative_margin_regime_rate=0.1:warn``.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefdiag.errors import UsageError

OPS = {"min": ">=", "max": "<="}
SEVERITIES = ("error", "warn")
COMMANDS = ("audit", "compare")
DELTA_SUFFIXES = ("_delta", "_drop")
BASELINE_METRICS = ("n_joined", "n_regressed", "n_fixed", "regressed_rate", "fixed_rate")
GROUP_WILDCARD = "*"
# Top-level summary keys that are not metrics (or are handled on their own).
NOT_METRICS = frozenset({"schema_version", "command", "verdict", "provenance", "gate", "baseline", "groups"})
CLI_SYNTAX = "METRIC=VALUE or METRIC=VALUE:warn"
EXAMPLE = "--min ranking_accuracy=0.6 --max negative_margin_regime_rate=0.1:warn"
RESPONSE_EXAMPLE = "--min reward_auc=0.6 --max desirable_displaced_rate=0.5:warn"  # unpaired (KTO) runs


@dataclass(frozen=True)
class Rule:
    """One threshold: ``op`` is "min" (observed >= threshold) or "max" (observed <= threshold)."""

    metric: str
    op: str
    threshold: float
    severity: str = "error"
    source: str = "command line"

    @property
    def key(self) -> tuple[str, str]:
        return (self.op, self.metric)

    def describe(self) -> str:
        return f"{self.metric} {OPS[self.op]} {self.threshold:g}"


def parse_cli_rule(text: str, op: str, source: str | None = None) -> Rule:
    """``METRIC=VALUE[:SEVERITY]`` as given to ``--min`` / ``--max``."""
    flag = f"--{op}"
    name, sep, rest = text.partition("=")
    value, _, severity = rest.partition(":")
    if not sep or not name.strip() or not value.strip():
        raise UsageError(f"{flag} {text!r}: expected {CLI_SYNTAX}", hint=f"for example {EXAMPLE}")
    where = source or f"{flag} {text}"
    return Rule(
        name.strip(), op, _threshold(value.strip(), where), _severity(severity.strip() or "error", where), where
    )


def rules_from_table(table: dict[str, Any], source: str, command: str | None = None) -> list[Rule]:
    """The rules of a ``[gate]`` table: ``min_<metric>`` / ``max_<metric>`` keys holding a number or
    ``{value = N, severity = "warn"}``; a ``[gate.audit]`` / ``[gate.compare]`` subtable adds or replaces rules
    for that command only."""
    rules: dict[tuple[str, str], Rule] = {}
    for key, value in table.items():
        if key in COMMANDS:
            continue
        for rule in _rules_from_key(key, value, source):
            rules[rule.key] = rule
    per_command = table.get(command) if command else None
    if per_command is not None:
        if not isinstance(per_command, dict):
            raise UsageError(f"{source}: [{command}] must be a table of min_/max_ keys")
        for key, value in per_command.items():
            for rule in _rules_from_key(key, value, f"{source} [{command}]"):
                rules[rule.key] = rule
    return list(rules.values())


def load_gate_file(path: Path, command: str | None = None) -> list[Rule]:
    """Rules from the ``[gate]`` table (or ``[tool.prefdiag.gate]``) of a TOML file given with ``--gate``."""
    data = _read_toml(path, f"--gate {path}")
    table = data.get("gate", data.get("tool", {}).get("prefdiag", {}).get("gate"))
    if not isinstance(table, dict):
        raise UsageError(
            f"--gate {path}: no [gate] table",
            hint='write for example: [gate] then min_ranking_accuracy = 0.6 on the next line',
        )
    return rules_from_table(table, f"--gate {path.name}", command)


def load_pyproject_rules(directory: Path, command: str | None = None) -> list[Rule]:
    """Rules from ``[tool.prefdiag.gate]`` in ``directory/pyproject.toml``; none when either is absent."""
    path = directory / "pyproject.toml"
    if not path.is_file():
        return []
    table = _read_toml(path, str(path)).get("tool", {}).get("prefdiag", {}).get("gate")
    if table is None:
        return []
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.prefdiag.gate] must be a table of min_/max_ keys")
    return rules_from_table(table, "pyproject.toml [tool.prefdiag.gate]", command)


def collect_rules(
    *,
    min_rules: Iterable[str] = (),
    max_rules: Iterable[str] = (),
    gate_file: Path | None = None,
    command: str | None = None,
    cwd: Path | None = None,
) -> list[Rule]:
    """All rules of a run: pyproject.toml (unless a --gate file is given), the --gate file, then --min/--max."""
    if gate_file is not None:
        base = load_gate_file(gate_file, command)
    else:
        base = load_pyproject_rules(cwd if cwd is not None else Path.cwd(), command)
    merged = {rule.key: rule for rule in base}
    for op, texts in (("min", min_rules), ("max", max_rules)):
        for text in texts or ():
            rule = parse_cli_rule(text, op)
            merged[rule.key] = rule
    return list(merged.values())


def rules_from_summary(summary: dict[str, Any]) -> list[Rule]:
    """The rules a saved summary was gated with (wildcards already expanded)."""
    rules = (summary.get("gate") or {}).get("rules") or []
    return [
        Rule(r["metric"], r["op"], float(r["threshold"]), r.get("severity", "error"), r.get("source", "summary.json"))
        for r in rules
    ]


def _rules_from_key(key: str, value: Any, source: str) -> Iterator[Rule]:
    op, _, metric = key.partition("_")
    if op not in OPS or not metric:
        raise UsageError(
            f"{source}: gate key {key!r} must be min_<metric> or max_<metric>",
            hint='for example min_ranking_accuracy = 0.6 or max_dpo_loss = { value = 0.7, severity = "warn" }',
        )
    for name, spec in _leaves(metric, value):
        where = f"{source} {op}_{name}"
        if isinstance(spec, dict):
            unknown = set(spec) - {"value", "severity"}
            if unknown or "value" not in spec:
                raise UsageError(
                    f"{where}: a rule table takes value and severity, got {', '.join(sorted(spec))}",
                    hint='for example { value = 0.1, severity = "warn" }',
                )
            severity = _severity(spec.get("severity", "error"), where)
            yield Rule(name, op, _threshold(spec["value"], where), severity, source)
        else:
            yield Rule(name, op, _threshold(spec, where), "error", source)


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Undo TOML's dotted keys: ``max_groups.math.x = 1`` parses as nested tables; a rule table stops the walk."""
    if isinstance(value, dict) and not ({"value", "severity"} & set(value)):
        for key, inner in value.items():
            yield from _leaves(f"{prefix}.{key}", inner)
    else:
        yield prefix, value


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise UsageError(f"{where}: the threshold must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(
            f"{where}: the threshold must be a number, got {value!r}", hint=f"for example {EXAMPLE}"
        ) from None
    if not math.isfinite(number):
        raise UsageError(f"{where}: the threshold must be finite, got {value!r}")
    return number


def _severity(value: Any, where: str) -> str:
    if value not in SEVERITIES:
        raise UsageError(f"{where}: severity must be error or warn, got {value!r}")
    return value


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot read: {exc}") from None
