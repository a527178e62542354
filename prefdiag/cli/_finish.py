"""The steps every command shares around the library: read the gate rules and the baseline before any model
loads, then gate, write and print a finished run (prefdiag.result does the work)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from prefdiag.cli._errors import EXIT_GATE_FAILED


@dataclass
class GatePlan:
    """What a run checks once scored: its rules, and the previous run to compare with."""

    rules: list = field(default_factory=list)
    baseline: Any = None  # prefdiag.baseline.SavedRun


def prepare(
    command: str,
    mode: str,
    min_rules: list[str] | None,
    max_rules: list[str] | None,
    gate_file: Path | None,
    baseline: Path | None,
) -> GatePlan:
    """Parse and check the rules and read the baseline before any model loads, so a typo fails in a second."""
    from prefdiag import gate
    from prefdiag.baseline import load_run

    rules = gate.collect_rules(
        min_rules=min_rules or (), max_rules=max_rules or (), gate_file=gate_file, command=command
    )
    gate.check_rules(rules, mode, baseline=baseline is not None, command=f"prefdiag {command}")
    return GatePlan(rules, load_run(baseline) if baseline is not None else None)


def finish(
    result, plan: GatePlan, output: Path | None, fmt: Any, table_format: str | None, top: int, quiet: bool = False,
    gate_only: bool = False,
) -> None:
    """Compare with the baseline, gate, write every output, print the report (``gate_only``: the gate table and
    the verdict alone); exit 1 when an error rule failed. A rule the finished summary cannot evaluate still leaves
    the outputs written before it exits 2."""
    from prefdiag.cli._output import emit, other_rank, write

    if other_rank():  # under torchrun every rank holds the whole result; rank 0 alone writes and prints it
        output, quiet = None, True
    if plan.baseline is not None:
        result.compare_with_baseline(plan.baseline)
    try:
        outcome = result.apply_gate(plan.rules)
    except Exception:
        if output is not None:
            write(result, output, table_format, top, quiet)
        raise
    if output is not None:
        write(result, output, table_format, top, quiet)
    if not other_rank():
        result.append_step_summary(top)
        emit(result.pairs, result.summary, fmt, top, gate_only)
    if not outcome["passed"]:
        raise typer.Exit(EXIT_GATE_FAILED)
