"""Normalisation and validation: the raw rows (Arrow or Python objects) become the pairs table ``pair_id, prompt,
chosen, rejected`` plus extra columns, every fault named by row and column."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from prefdiag.data.prompts import _looks_like_hh, _split_conversations, _split_hh, _split_strings
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
) -> PairData:
    names = list(frame.column_names if isinstance(frame, pa.Table) else map(str, frame.columns))
    available = ", ".join(names)
    for wanted in (columns.chosen, columns.rejected):
        if wanted not in names:
            raise DataError(f"{source}: missing column {wanted!r}; the columns are: {available}")
    id_column = columns.id or ("id" if "id" in names else None)
    if id_column is not None and id_column not in names:
        raise DataError(f"{source}: missing id column {id_column!r}; the columns are: {available}")
    has_prompt = columns.prompt in names
    if not has_prompt and columns.prompt != ColumnMap.prompt:  # named on purpose: its absence is no implicit prompt
        raise DataError(f"{source}: missing prompt column {columns.prompt!r}; the columns are: {available}")

    originals = {"chosen": columns.chosen, "rejected": columns.rejected, "prompt": columns.prompt}
    text = {name: _text_column(frame, original, source) for name, original in originals.items()
            if name != "prompt" or has_prompt}  # fmt: skip
    kinds = {name: _kind(array, source, originals[name]) for name, array in text.items()}

    if data_format == "conversational" or (data_format == "auto" and csv_source):
        for name, array in list(text.items()):  # message lists held as JSON text, as a CSV file must hold them
            if kinds[name] == "text":
                parsed = _parse_json_messages(array, source, originals[name], strict=data_format != "auto")
                if parsed is not None:
                    text[name], kinds[name] = parsed, "messages"
    if kinds["chosen"] != kinds["rejected"]:
        raise DataError(
            f"{source}: column {columns.chosen!r} holds {_kind_words(kinds['chosen'])} but {columns.rejected!r} "
            f"holds {_kind_words(kinds['rejected'])}; both must be strings or both lists of messages"
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
            "pair_id": _pair_ids(frame, id_column, source),
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
        table[name] = _extra_column(frame, name)
    return PairData(table, source, digest, conversational, split_kind != "column", details, split_kind)


def _text_column(frame: pa.Table | pd.DataFrame, name: str, source: str) -> pa.ChunkedArray:
    """The column as Arrow text or message lists; Python objects (JSON fallback) are checked value by value."""
    if isinstance(frame, pa.Table):
        return frame.column(name)
    values = frame[name].tolist()
    _check_python_values(values, source, name)
    try:
        return pa.chunked_array([pa.array(values)])
    except (pa.ArrowException, TypeError, ValueError) as exc:  # messages whose fields differ in type
        raise DataError(f"{source}: column {name!r}: inconsistent messages ({str(exc).splitlines()[0]})") from None


def _check_python_values(values: list, source: str, column: str) -> None:
    """Every value a string, or every value a list of {role, content} messages; else name the first bad row."""
    first_kind = None
    for row, value in enumerate(values):
        if isinstance(value, np.ndarray):
            value = values[row] = value.tolist()
        if isinstance(value, str):
            kind = "text"
        elif _is_python_messages(value):
            kind = "messages"
        else:
            raise DataError(
                f"{source}: row {row + 1}, column {column!r}: expected a string or a list of {{role, content}} "
                f"messages, got {_python_type(value)}"
            )
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise DataError(
                f"{source}: row {row + 1}, column {column!r}: expected {_kind_words(first_kind)} like the first "
                f"row, got {_kind_words(kind)}"
            )


def _is_python_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _python_type(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return type(value).__name__


def _kind(array: pa.ChunkedArray, source: str, column: str) -> str:
    """'text' or 'messages' from the Arrow type; a null or a value of another type is an error naming its row."""
    t = array.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        kind = "text"
    elif _is_message_list(t):
        kind = "messages"
    else:
        row = _first_row(pc.is_valid(array)) if array.null_count < len(array) else 0
        value = array[row].as_py() if len(array) else None
        shown = "a list that is not {role, content} messages" if isinstance(value, list) else _python_type(value)
        if _is_message_list(t, any_content=True):
            raise DataError(
                f"{source}: column {column!r}: message content is {t.value_type.field('content').type}, not text "
                "(multimodal content parts are not supported)"
            )
        raise DataError(
            f"{source}: row {row + 1}, column {column!r}: expected a string or a list of {{role, content}} "
            f"messages, got {shown}"
        )
    if array.null_count:
        row = _first_row(pc.is_null(array))
        raise DataError(f"{source}: row {row + 1}, column {column!r}: expected {_kind_words(kind)}, got null")
    if kind == "messages":
        messages = pc.list_flatten(array)
        roles = pc.struct_field(messages, "role")
        if messages.null_count or roles.null_count:
            bad = pc.or_(pc.is_null(messages), pc.is_null(roles))
            parents = pc.list_parent_indices(array.combine_chunks())
            row = int(parents[_first_row(bad)].as_py())
            raise DataError(f"{source}: row {row + 1}, column {column!r}: a message without a role")
    return kind


def _is_message_list(t: pa.DataType, any_content: bool = False) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    content = fields.get("content")
    if "role" not in fields or content is None:
        return False
    return any_content or pa.types.is_string(content) or pa.types.is_large_string(content) or pa.types.is_null(content)


def _first_row(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def _kind_words(kind: str) -> str:
    return "a list of messages" if kind == "messages" else "a string"


def _parse_json_messages(
    array: pa.ChunkedArray, source: str, column: str, *, strict: bool
) -> pa.ChunkedArray | None:
    """JSON-encoded message lists (how a CSV file holds conversations) as Arrow message lists. Not strict: None
    unless every value parses. Strict: a value that does not parse is an error naming its row."""
    if not strict and not pc.all(pc.starts_with(pc.utf8_ltrim_whitespace(array), "[")).as_py():
        return None
    values = []
    for row, text in enumerate(array.to_pylist()):
        try:
            value = json.loads(text)
            if not _is_python_messages(value):
                raise ValueError
        except ValueError:
            if not strict:
                return None
            raise DataError(
                f"{source}: row {row + 1}, column {column!r}: expected a JSON list of {{role, content}} messages"
            ) from None
        values.append(value)
    return pa.chunked_array([pa.array(values)])


def _pair_ids(frame: pa.Table | pd.DataFrame, id_column: str | None, source: str) -> pd.Series:
    n = frame.num_rows if isinstance(frame, pa.Table) else len(frame)
    if id_column is None:
        return pd.Series(np.arange(n).astype(str), dtype="str")
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


def _to_pandas(array: pa.ChunkedArray) -> pd.Series:
    t = array.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pd.Series(array.cast(pa.large_string()).to_pandas(), dtype="str")  # Arrow-backed, zero-copy
    if pa.types.is_nested(t) or pa.types.is_dictionary(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pd.Series(pd.arrays.ArrowExtensionArray(array))
    return array.to_pandas()


def with_python_objects(table: pd.DataFrame) -> pd.DataFrame:
    """The table with nested Arrow columns (message lists, structs) as Python lists and dicts. pandas cannot read
    back a Parquet file it wrote from nested ArrowDtype columns, so tables handed to users hold Python objects."""
    nested = [c for c, t in table.dtypes.items() if isinstance(t, pd.ArrowDtype) and t.pyarrow_dtype.num_fields > 0]
    if not nested:
        return table
    out = table.copy(deep=False)
    for column in nested:
        out[column] = pd.Series(out[column].array.__arrow_array__().to_pylist(), index=out.index, dtype=object)
    return out
