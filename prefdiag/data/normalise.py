"""Normalisation: the raw rows (Arrow or Python objects) become the pairs table ``pair_id, prompt, chosen, rejected``
plus extra columns; a missing column, a bad id or a column of the wrong kind is named (checks in data.validate)."""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from prefdiag.data.objects import python_columns
from prefdiag.data.prompts import _looks_like_hh, _split_conversations, _split_hh, _split_strings
from prefdiag.data.validate import (
    check_python_values,
    column_kind,
    is_text_type,
    kind_words,
    messages_column,
    parse_json_messages,
)
from prefdiag.errors import DataError, UsageError

log = logging.getLogger(__name__)


@dataclass
class PairData:
    """The pairs table and where it came from."""

    table: pd.DataFrame
    source: str
    content_hash: str
    conversational: bool
    implicit_prompt: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    prompt_split: str = "column"  # column | extract_prompt | hh: where the prompt came from
    rows: np.ndarray | None = None  # the input row (0-based) of each pair where it is not the pair's own position

    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "content_sha256": self.content_hash,
            "n_rows": len(self.table),
            "format": "conversational" if self.conversational else "standard",
            "implicit_prompt": self.implicit_prompt,
            "prompt_split": self.prompt_split,
            **self.details,
        }

    def input_rows(self) -> np.ndarray:
        """The input row (0-based, in file order) each pair of the table came from."""
        return np.arange(len(self.table)) if self.rows is None else self.rows


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns hold the prompt, the responses and the pair id."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = None  # None: use "id" when present, else the row index


def _normalise(
    frame: pa.Table | pd.DataFrame,
    source: str,
    digest: str,
    columns: ColumnMap,
    details: dict,
    data_format: str = "auto",
    csv_source: bool = False,
    json_path: Path | None = None,
) -> PairData:
    """``json_path``: the JSON or JSON Lines file the frame came from, read again for what Arrow cannot hold."""
    names = list(frame.column_names if isinstance(frame, pa.Table) else map(str, frame.columns))
    for wanted in (columns.chosen, columns.rejected):
        if wanted not in names:
            raise DataError(f"{source}: missing column {wanted!r}{_did_you_mean(wanted, names)}")
    id_column = columns.id or ("id" if "id" in names else None)
    if id_column is not None and id_column not in names:
        raise DataError(f"{source}: missing id column {id_column!r}{_did_you_mean(id_column, names)}")
    has_prompt = columns.prompt in names
    if not has_prompt and columns.prompt != ColumnMap.prompt:  # named on purpose: its absence is no implicit prompt
        raise DataError(f"{source}: missing prompt column {columns.prompt!r}{_did_you_mean(columns.prompt, names)}")

    originals = {"chosen": columns.chosen, "rejected": columns.rejected, "prompt": columns.prompt}
    objects = python_columns(frame, json_path, tuple(originals.values()), id_column, csv_source)
    text = {name: _text_column(frame, original, source, objects) for name, original in originals.items()
            if name != "prompt" or has_prompt}  # fmt: skip
    kinds = {name: column_kind(array, source, originals[name]) for name, array in text.items()}

    if data_format == "conversational" or (data_format == "auto" and csv_source):
        for name, array in list(text.items()):  # message lists held as JSON text, as a CSV file must hold them
            if kinds[name] == "text":
                parsed = parse_json_messages(array, source, originals[name], strict=data_format != "auto")
                if parsed is not None:
                    text[name], kinds[name] = parsed, "messages"
    if kinds["chosen"] != kinds["rejected"]:
        raise DataError(
            f"{source}: column {columns.chosen!r} holds {kind_words(kinds['chosen'])} but {columns.rejected!r} "
            f"holds {kind_words(kinds['rejected'])}; both must be strings or both lists of messages"
        )
    conversational = kinds["chosen"] == "messages"
    if data_format == "standard" and conversational:
        raise DataError(f"{source}: --data-format standard, but column {columns.chosen!r} holds lists of messages")
    if data_format == "conversational" and not conversational:
        raise DataError(f"{source}: --data-format conversational, but column {columns.chosen!r} holds plain strings")

    ignored_prompt = None
    if has_prompt and kinds["prompt"] != kinds["chosen"]:
        if not conversational:
            raise DataError(
                f"{source}: column {columns.prompt!r} holds lists of messages but {columns.chosen!r} holds strings"
            )
        # TRL's maybe_extract_prompt: a string prompt beside conversational responses is ignored and the prompt is
        # extracted from the conversations; the string is kept as an extra column.
        ignored_prompt = text.pop("prompt")
        has_prompt = False

    if data_format == "hh":
        if has_prompt:
            raise UsageError(
                f"{source}: --data-format hh splits prompt-less HH transcripts, but the data has a prompt column "
                f"{columns.prompt!r}; use --data-format standard"
            )
        if conversational:
            raise DataError(f"{source}: --data-format hh expects HH transcripts as strings, got lists of messages")
    if has_prompt:
        prompt, chosen, rejected, split_kind = text["prompt"], text["chosen"], text["rejected"], "column"
    elif conversational:
        prompt, chosen, rejected = _split_conversations(text["chosen"], text["rejected"])
        split_kind = "extract_prompt"
    else:
        split_kind = "extract_prompt"
        if data_format == "hh" or (data_format == "auto" and _looks_like_hh(text["chosen"], text["rejected"])):
            split = _split_hh(text["chosen"], text["rejected"], source, strict=data_format == "hh")
            if split is not None:
                (prompt, chosen, rejected), split_kind = split, "hh"
        if split_kind != "hh":
            prompt, chosen, rejected = _split_strings(text["chosen"], text["rejected"])

    table = pd.DataFrame(
        {
            "pair_id": _pair_ids(frame, id_column, source, objects),
            "prompt": _to_pandas(prompt),
            "chosen": _to_pandas(chosen),
            "rejected": _to_pandas(rejected),
        }
    )
    used = {columns.chosen, columns.rejected, id_column} | ({columns.prompt} if columns.prompt in names else set())
    if ignored_prompt is not None:
        table["original_prompt"] = _to_pandas(ignored_prompt)
    for name in names:
        if name in used or name in table.columns:
            continue  # an input column named like one of ours (e.g. "prompt" when --prompt-column is another)
        table[name] = pd.Series(objects[name], dtype=object) if name in objects else _extra_column(frame, name)
    return PairData(table, source, digest, conversational, split_kind != "column", details, split_kind)


def _did_you_mean(wanted: str, names: list[str]) -> str:
    close = difflib.get_close_matches(wanted, names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; the columns are: {', '.join(names)}"


def _text_column(
    frame: pa.Table | pd.DataFrame, name: str, source: str, objects: dict[str, list]
) -> pa.ChunkedArray | list:
    """The column as Arrow text or plain message lists, or as Python message lists where Arrow cannot hold the
    messages as written (checked value by value)."""
    if name not in objects and isinstance(frame, pa.Table):
        return frame.column(name)
    values = objects[name] if name in objects else frame[name].tolist()
    kind = check_python_values(values, source, name)
    if kind == "messages":
        return messages_column(values)
    return pa.chunked_array([pa.array(values, pa.large_string())])


def _pair_ids(
    frame: pa.Table | pd.DataFrame, id_column: str | None, source: str, objects: dict[str, list]
) -> pd.Series:
    """The ids as text in their written form (numbers read from the file's text), unique and never missing."""
    n = frame.num_rows if isinstance(frame, pa.Table) else len(frame)
    if id_column is None:
        return pd.Series(np.arange(n).astype(str), dtype="str")
    if id_column in objects:
        ids = pd.Series([v if isinstance(v, str) or v is None else json.dumps(v) for v in objects[id_column]],
                        dtype="str")  # fmt: skip
    else:
        ids = _extra_column(frame, id_column)
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0])
        raise DataError(f"{source}: row {row + 1}, id column {id_column!r}: missing value")
    ids = ids.astype("str")
    duplicated = ids.duplicated()
    if duplicated.any():
        first = ids[duplicated].iloc[0]
        raise DataError(
            f"{source}: id column {id_column!r} has duplicate value {first!r}; pair ids must be unique",
            hint="choose another column with --id-column",
        )
    return ids.reset_index(drop=True)


def _extra_column(frame: pa.Table | pd.DataFrame, name: str) -> pd.Series:
    """A passed-through column: Arrow-backed where it came from Arrow (nested values stay Arrow lists/structs).
    Python objects of mixed types, which no Parquet column can hold, become text (JSON for non-strings)."""
    if isinstance(frame, pa.Table):
        return _to_pandas(frame.column(name))
    column = frame[name].reset_index(drop=True)
    if column.dtype != object:
        return column
    try:
        return _to_pandas(pa.chunked_array([pa.array(column.tolist(), from_pandas=True)]))
    except (pa.ArrowException, TypeError, ValueError):
        log.warning("column %r mixes value types; it is passed through as text", name)
        text = [v if isinstance(v, str) or v is None else json.dumps(_plain(v), ensure_ascii=False, default=str)
                for v in column]
        return pd.Series(text, dtype="str")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _to_pandas(array: pa.ChunkedArray | list) -> pd.Series:
    if isinstance(array, list):  # Python message lists, as written
        return pd.Series(array, dtype=object)
    t = array.type
    if is_text_type(t):
        return pd.Series(array.cast(pa.large_string()).to_pandas(), dtype="str")  # Arrow-backed, zero-copy
    if pa.types.is_nested(t) or pa.types.is_dictionary(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pd.Series(pd.arrays.ArrowExtensionArray(array))
    return array.to_pandas()


def with_python_objects(table: pd.DataFrame) -> pd.DataFrame:
    """The table with nested Arrow columns (message lists, structs) as Python lists and dicts. pandas cannot read
    back a Parquet file it wrote from nested ArrowDtype columns, so tables handed to users hold Python objects.
    A column of Python objects no Arrow type holds (tool-call arguments whose values differ in type from row to
    row) becomes JSON text, one value per row, so the table can always be written."""
    nested = [c for c, t in table.dtypes.items() if isinstance(t, pd.ArrowDtype) and t.pyarrow_dtype.num_fields > 0]
    mixed = [c for c, t in table.dtypes.items() if t == object and not _arrow_holds(table[c])]
    if not nested and not mixed:
        return table
    out = table.copy(deep=False)
    for column in nested:
        out[column] = pd.Series(out[column].array.__arrow_array__().to_pylist(), index=out.index, dtype=object)
    for column in mixed:
        log.warning("column %r holds values of differing types; it is written as JSON text", column)
        out[column] = pd.Series([v if v is None else json.dumps(_plain(v), ensure_ascii=False, default=str)
                                 for v in out[column]], index=out.index, dtype="str")  # fmt: skip
    return out


def _arrow_holds(column: pd.Series) -> bool:
    try:
        pa.array(column.tolist(), from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return False
    return True
