"""The published formats: summary.json's JSON Schema and the column types of the per-pair table and of the
per-response table of unpaired KTO runs (package data)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def summary_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every summary.json of this schema_version satisfies."""
    return json.loads(resources.files(__name__).joinpath("summary.schema.json").read_text(encoding="utf-8"))


def pair_columns() -> dict[str, str]:
    """The per-pair table's columns and their types (pandas / Arrow names), for the columns prefdiag computes."""
    return _columns("pairs.columns.json")


def response_columns() -> dict[str, str]:
    """The same for the per-response table (responses.parquet) of a run on unpaired KTO rows."""
    return _columns("responses.columns.json")


def _columns(name: str) -> dict[str, str]:
    return json.loads(resources.files(__name__).joinpath(name).read_text(encoding="utf-8"))["columns"]
