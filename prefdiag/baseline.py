"""Regression against a previous run (``--baseline DIR``): per-metric deltas and the pairs, joined by pair_id,
that went from correctly ranked to misranked ("regressed") or back ("fixed"). Pure pandas: no torch.

``<metric>_delta`` = current - baseline and ``<metric>_drop`` = baseline - current, for every metric both summaries
have (see prefdiag.gate.metric_values). A pair is "correctly ranked" when policy_margin > 0 if both runs scored a
policy, else when ref_margin > 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefdiag import __version__
from prefdiag.diagnostics import SCHEMA_VERSION
from prefdiag.errors import DataError, UsageError
from prefdiag.gate import metric_values
from prefdiag.options import TABLE_FORMATS
from prefdiag.unpaired import SHAPE, table_name

READABLE_SCHEMA_VERSIONS = (SCHEMA_VERSION,)  # the summary.json schema versions gate and --baseline accept
LISTED_PAIRS = 50  # regressed / fixed pairs listed in summary.json (all are marked in the pairs table)


@dataclass
class SavedRun:
    """A previous run read back from its --output directory: summary.json and, when present, the pairs table."""

    summary: dict[str, Any]
    pairs: pd.DataFrame | None
    source: Path


def load_run(path: Path) -> SavedRun:
    """Read a saved run: ``path`` is its summary.json or the --output directory holding it; the pairs table
    (pairs.parquet, .csv or .jsonl beside it) is optional."""
    import json

    path = Path(path)
    summary_path = path / "summary.json" if path.is_dir() else path
    if not summary_path.is_file():
        where = f"{path}: no summary.json in this directory" if path.is_dir() else f"{path}: no such file"
        raise DataError(where, hint="give a previous run's --output directory or its summary.json")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{summary_path}: not a readable summary.json ({exc})") from None
    if not isinstance(summary, dict) or ("n_pairs" not in summary and "n_responses" not in summary):
        raise DataError(f"{summary_path}: not a prefdiag summary.json (no n_pairs)")
    check_schema_version(summary, summary_path)
    pairs = None
    for fmt in TABLE_FORMATS:  # the formats a run writes its pairs table in
        table_path = summary_path.parent / f"{table_name(summary)}.{fmt}"
        if table_path.is_file():
            pairs = _read_table(table_path, fmt)
            break
    return SavedRun(summary, pairs, summary_path.parent)


def check_schema_version(summary: dict[str, Any], where: Path | str) -> None:
    """Refuse a summary written in a schema this prefdiag does not read (or with none), in one line."""
    version = summary.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        found = "has no schema_version" if version is None else f"has schema_version {version!r}"
        readable = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise DataError(
            f"{where}: this summary.json {found}; this prefdiag ({__version__}) reads schema_version {readable}",
            hint="rerun the scoring with this prefdiag, or gate it with the prefdiag that wrote it",
        )


def _read_table(path: Path, fmt: str) -> pd.DataFrame:
    """A saved per-pair table (or per-response table, responses.*: its ids are response_id)."""
    id_column = "response_id" if path.stem == "responses" else "pair_id"
    try:
        if fmt == "parquet":
            table = pd.read_parquet(path)
        elif fmt == "csv":
            table = pd.read_csv(path, dtype={id_column: str})
        else:
            table = pd.read_json(path, lines=True, dtype={id_column: str})
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        raise DataError(f"{path}: cannot read the {path.stem} table ({type(exc).__name__}: {exc})") from None
    if id_column not in table.columns:
        raise DataError(f"{path}: the {path.stem} table has no {id_column} column")
    return table


def ranking_column(current: pd.DataFrame, baseline: pd.DataFrame) -> str | None:
    """The margin both runs have that decides "correctly ranked": the policy's, else the reference's."""
    for column in ("policy_margin", "ref_margin"):
        if column in current.columns and column in baseline.columns:
            return column
    return None


def compare_with_baseline(
    pairs: pd.DataFrame | None, summary: dict[str, Any], baseline: SavedRun
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """The ``summary["baseline"]`` record and the pairs table with ``baseline_margin`` and ``ranking_change``
    ("regressed", "fixed", "unchanged", or "unmatched" for a pair the baseline lacks or either run left
    unscored) added. Runs on unpaired (KTO) rows get the metric deltas only; a KTO run against a pairs run is
    refused."""
    shapes = (summary.get("data_shape"), baseline.summary.get("data_shape"))
    if shapes[0] != shapes[1]:
        words = {None: "preference pairs", SHAPE: "unpaired (KTO) rows"}
        raise UsageError(f"--baseline {baseline.source}: the baseline ran on {words.get(shapes[1], shapes[1])}, this "
                         f"run on {words.get(shapes[0], shapes[0])}: their metrics are not comparable")
    record: dict[str, Any] = {
        "source": str(baseline.source),
        "command": baseline.summary.get("command"),
        "created_at": (baseline.summary.get("provenance") or {}).get("created_at"),
        "same_dataset": _same_dataset(summary, baseline.summary),
        "metrics": _metric_deltas(summary, baseline.summary),
    }
    if pairs is None or baseline.pairs is None or shapes[0] == SHAPE:  # responses: no ranking to compare
        record["ranking_column"] = None
        return record, pairs
    column = ranking_column(pairs, baseline.pairs)
    record["ranking_column"] = column
    if column is None:
        return record, pairs
    _check_unique(pairs, "this run")
    _check_unique(baseline.pairs, str(baseline.source))
    before = baseline.pairs.assign(_key=baseline.pairs["pair_id"].astype(str)).set_index("_key")[column]
    keys = pairs["pair_id"].astype(str)
    baseline_margin = keys.map(before).astype(float)
    margin = pairs[column].astype(float)
    joined = baseline_margin.notna() & margin.notna()
    was_correct, is_correct = baseline_margin > 0, margin > 0
    change = pd.Series(np.where(joined, "unchanged", "unmatched"), index=pairs.index, dtype=object)
    change[joined & was_correct & ~is_correct] = "regressed"
    change[joined & ~was_correct & is_correct] = "fixed"
    out = pairs.copy()
    out["baseline_margin"] = baseline_margin.to_numpy()
    out["ranking_change"] = change.to_numpy()
    n_joined = int(joined.sum())
    regressed, fixed = change == "regressed", change == "fixed"
    record.update(
        n_joined=n_joined,
        n_only_current=int(len(pairs) - keys.isin(before.index).sum()),
        n_only_baseline=int(len(before) - before.index.isin(keys).sum()),
        n_regressed=int(regressed.sum()),
        n_fixed=int(fixed.sum()),
        regressed_rate=float(regressed.sum() / n_joined) if n_joined else None,
        fixed_rate=float(fixed.sum() / n_joined) if n_joined else None,
        regressed=_listed(out[regressed], column, ascending=True),
        fixed=_listed(out[fixed], column, ascending=False),
    )
    return record, out


def _listed(rows: pd.DataFrame, column: str, ascending: bool) -> list[dict[str, Any]]:
    rows = rows.sort_values(column, ascending=ascending, kind="stable").head(LISTED_PAIRS)
    return [
        {"pair_id": str(r["pair_id"]), "baseline_margin": float(r["baseline_margin"]), "margin": float(r[column])}
        for _, r in rows.iterrows()
    ]


def _metric_deltas(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    now = metric_values({k: v for k, v in current.items() if k != "baseline"})
    before = metric_values({k: v for k, v in baseline.items() if k != "baseline"})
    deltas = {}
    for name, value in now.items():
        if name not in before:
            continue
        old = before[name]
        known = value is not None and old is not None
        deltas[name] = {
            "baseline": old,
            "current": value,
            "delta": value - old if known else None,
            "drop": old - value if known else None,
        }
    return deltas


def _same_dataset(current: dict[str, Any], baseline: dict[str, Any]) -> bool | None:
    a = ((current.get("provenance") or {}).get("dataset") or {}).get("content_sha256")
    b = ((baseline.get("provenance") or {}).get("dataset") or {}).get("content_sha256")
    return None if a is None or b is None else a == b


def _check_unique(pairs: pd.DataFrame, where: str) -> None:
    duplicated = pairs["pair_id"].astype(str).duplicated()
    if duplicated.any():
        example = pairs["pair_id"][duplicated].iloc[0]
        raise DataError(f"pair_id is not unique in {where} (e.g. {example!r}): cannot join with the baseline")
