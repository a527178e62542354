"""The published formats: summary.json's JSON Schema and the per-pair table's column types (package data)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def summary_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) every summary.json of this schema_version satisfies."""
    return json.loads(resources.files(__name__).joinpath("summary.schema.json").read_text(encoding="utf-8"))


def pair_columns() -> dict[str, str]:
    """The per-pair table's columns and their types (pandas / Arrow names), for the columns prefdiag computes."""
    doc = json.loads(resources.files(__name__).joinpath("pairs.columns.json").read_text(encoding="utf-8"))
    return doc["columns"]
