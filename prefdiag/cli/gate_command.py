"""`prefdiag gate`: re-gate a saved run (no model, no torch) through the same library calls audit and compare use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from prefdiag.cli import _options as o
from prefdiag.cli._errors import handles_errors
from prefdiag.options import DEFAULT_TOP


SavedRunArg = Annotated[
    Path,
    typer.Argument(
        metavar="RUN",
        help="summary.json of an audit or compare run, or the --output directory holding it (with pairs.* or "
        "responses.*).",
        show_default=False,
    ),
]
GateOutput = Annotated[
    Optional[Path],
    typer.Option(
        "--output", "-o", file_okay=False,
        help="Directory for the re-gated summary.json, report.md, junit.xml and report.html.",
    ),
]  # fmt: skip


@handles_errors
def gate(
    run: SavedRunArg,
    min_rules: o.MinRules = None,
    max_rules: o.MaxRules = None,
    gate_file: o.GateFile = None,
    baseline: o.Baseline = None,
    output: GateOutput = None,
    fmt: o.FormatOpt = o.OutputFormat.table,
    top: o.Top = DEFAULT_TOP,
    quiet: o.Quiet = False,
) -> None:
    """Gate a saved run: check thresholds on its summary.json with no model and no GPU.

    Score on a GPU runner with `compare --output out/`, keep out/ as a CI artifact, and gate anywhere. Rules come
    from --min/--max, a --gate TOML file or \\[tool.prefdiag.gate] in ./pyproject.toml; with none of these, the
    rules the run itself was gated with are checked again. Exit 0 passed, 1 an error rule failed, 2 bad input.

    Example: prefdiag gate out/ --min ranking_accuracy=0.6 --max negative_margin_regime_rate=0.1:warn
    """
    from prefdiag import gate as gates
    from prefdiag.baseline import load_run
    from prefdiag.cli._finish import GatePlan, finish
    from prefdiag.cli._output import setup_logging
    from prefdiag.errors import UsageError
    from prefdiag.result import RunResult, check_output_dir

    setup_logging(quiet)
    if output is not None:
        check_output_dir(output)
    saved = load_run(run)
    command = saved.summary.get("command")
    rules = gates.collect_rules(
        min_rules=min_rules or (), max_rules=max_rules or (), gate_file=gate_file, command=command
    )
    if not rules:
        rules = gates.rules_from_summary(saved.summary)
    if not rules:
        from prefdiag.unpaired import is_unpaired

        raise UsageError(
            f"{run}: no gate rules to check",
            hint=f"give {gates.RESPONSE_EXAMPLE if is_unpaired(saved.summary) else gates.EXAMPLE}, "
            "--gate FILE, or a [tool.prefdiag.gate] table in ./pyproject.toml",
        )
    summary = {k: v for k, v in saved.summary.items() if k != "gate"}
    # Without --baseline, a baseline comparison the run already made stays in the summary and can be gated.
    plan = GatePlan(rules, load_run(baseline) if baseline is not None else None)
    finish(RunResult(saved.pairs, summary), plan, output, fmt, _table_format(saved, output), top, quiet, gate_only=True)


def _table_format(saved, output: Path | None) -> str | None:
    """The pairs table goes into --output in its own format, so that directory holds a complete run."""
    if saved.pairs is None or output is None:
        return None
    for fmt in ("parquet", "csv", "jsonl"):
        if (saved.source / f"pairs.{fmt}").is_file():
            return fmt
    return None
