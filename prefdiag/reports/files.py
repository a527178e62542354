"""Writing run outputs atomically: every file is staged and moved into place only once all were written."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from prefdiag.errors import UsageError
from prefdiag.options import TABLE_FORMATS  # defined once, in options


def clean_json(value: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively, so the JSON is standard."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps_summary(summary: dict[str, Any]) -> str:
    """summary.json's text: standard JSON (no NaN), indented, non-ASCII kept."""
    return json.dumps(clean_json(summary), indent=2, ensure_ascii=False) + "\n"


def write_table(table: pd.DataFrame, path: Path, fmt: str) -> None:
    """Write the per-pair table in one of TABLE_FORMATS (message lists stay nested in Parquet and JSONL)."""
    if fmt == "parquet":
        table.to_parquet(path, index=False)
    elif fmt == "csv":
        flat = table.copy()
        for column in flat.columns:
            if flat[column].map(lambda v: isinstance(v, (list, dict))).any():
                flat[column] = flat[column].map(lambda v: json.dumps(v, ensure_ascii=False))
        flat.to_csv(path, index=False)
    elif fmt == "jsonl":
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        raise UsageError(f"unknown table format {fmt!r}; expected one of {', '.join(TABLE_FORMATS)}")


def write_atomically(out_dir: Path, writers: dict[str, Callable[[Path], None]]) -> list[Path]:
    """Call each writer on a staging path, then move all files into out_dir; on failure nothing is left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prefdiag-", dir=out_dir))
    try:
        for name, writer in writers.items():
            writer(staging / name)
        written = []
        for name in writers:
            os.replace(staging / name, out_dir / name)
            written.append(out_dir / name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_text(text: str) -> Callable[[Path], None]:
    """A writer (for write_atomically) of ``text`` as UTF-8."""
    return lambda path: path.write_text(text, encoding="utf-8")
