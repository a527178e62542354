"""Python values read faithfully where Arrow cannot represent the data as written: message dicts whose keys differ
from row to row (Arrow fills the missing keys with nulls), the chat-template columns, and ids in their written form.

Plain conversations (every message exactly ``{role, content}`` with string values) and all plain text stay in Arrow:
only the columns that need it are read again as Python objects, from the file's own JSON for JSON and JSON Lines.
Parquet and Arrow datasets cannot tell a missing key from a null, so there a null-valued key of a nested dict is
read as absent (the writer, pandas, pyarrow or datasets, added it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from prefdiag.data.readers import json_rows
from prefdiag.data.validate import is_text_type, message_fields

# Columns the chat template receives as TRL 1.x passes them: always Python objects, exactly as written.
TEMPLATE_COLUMNS = ("tools", "documents", "chat_template_kwargs")
_TEXT_DECODER = json.JSONDecoder(parse_int=str, parse_float=str)  # numbers as the text they were written as


def python_columns(
    frame: pa.Table | pd.DataFrame,
    path: Path | None,
    message_columns: tuple[str, ...],
    id_column: str | None,
    csv_source: bool = False,
) -> dict[str, list]:
    """Name -> Python values (one per row) for the columns Arrow would not hold as written; {} for plain data.
    ``path``: the JSON or JSON Lines file the frame was read from, else None (Parquet, datasets, CSV). In a CSV
    file the template columns are JSON text: parsed."""
    names = list(frame.column_names if isinstance(frame, pa.Table) else map(str, frame.columns))
    nested = [n for n in message_columns if n in names and _needs_python(frame, n)]
    nested += [n for n in TEMPLATE_COLUMNS if n in names and n not in nested]
    as_text = id_column if id_column in names and _numeric_ids(frame, id_column) else None
    if not nested and as_text is None:
        return {}
    if path is not None:
        return _from_json(path, nested, as_text)
    if csv_source:
        return {n: [_parse_json_text(v) for v in _pylist(frame, n)] for n in nested}
    values = {n: [_drop_null_keys(v) for v in _pylist(frame, n)] for n in nested}
    if as_text is not None:
        values[as_text] = [_natural_text(v) for v in _pylist(frame, as_text)]
    return values


def _pylist(frame: pa.Table | pd.DataFrame, name: str) -> list:
    if isinstance(frame, pa.Table):
        return frame.column(name).to_pylist()
    return [_none_for_nan(v) for v in frame[name].tolist()]


def _none_for_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _needs_python(frame: pa.Table | pd.DataFrame, name: str) -> bool:
    """A message-list column Arrow holds with keys that may not be in the file (or not plain {role, content})."""
    if not isinstance(frame, pa.Table):
        return False  # already Python objects from the file's own JSON
    array = frame.column(name)
    fields = message_fields(array.type)
    if fields is None:
        return False
    content = fields.get("content")
    if content is not None and not (is_text_type(content) or pa.types.is_null(content)):
        return False  # multimodal content parts: refused by validation as they are
    plain = set(fields) == {"role", "content"} and is_text_type(fields["role"]) and is_text_type(content)
    return not plain or not _no_nulls_inside(pc.list_flatten(array))


def _no_nulls_inside(array: pa.ChunkedArray) -> bool:
    return all(pc.struct_field(array, f.name).null_count == 0 for f in array.type)


def _numeric_ids(frame: pa.Table | pd.DataFrame, name: str) -> bool:
    """Ids whose string form may not be what was written: floats (1 read as 1.0), or Python numbers."""
    if isinstance(frame, pa.Table):
        t = frame.column(name).type
        return pa.types.is_floating(t) or pa.types.is_decimal(t)
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in frame[name].tolist())


def _from_json(path: Path, nested: list[str], as_text: str | None) -> dict[str, list]:
    values: dict[str, list] = {n: [] for n in nested}
    if nested:
        for row in json_rows(path):
            for n in nested:
                values[n].append(row.get(n))
    if as_text is not None:
        values[as_text] = [row.get(as_text) for row in json_rows(path, _TEXT_DECODER)]
    return values


def _parse_json_text(value: Any) -> Any:
    """A CSV cell holding JSON (an object or an array) as its value; an empty cell as None; other text as it is."""
    if not isinstance(value, str) or not value.strip():
        return None if value == "" else value
    try:
        return json.loads(value) if value.lstrip()[:1] in "[{" else value
    except json.JSONDecodeError:
        return value


def _natural_text(value: Any) -> str | None:
    """A stored id's natural string: integers without ".0" (an int column, or a whole float), others as stored."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def _drop_null_keys(value: Any) -> Any:
    """Dicts without their null-valued keys, at every depth (how Parquet and Arrow spell a missing key)."""
    if isinstance(value, dict):
        return {k: _drop_null_keys(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_null_keys(v) for v in value]
    return value
