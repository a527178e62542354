"""What a text column holds, strings or lists of ``{role, content}`` messages, read from its Arrow type or checked
value by value for Python objects; every fault is named by row and column."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefdiag.errors import DataError


def messages_column(values: list) -> pa.ChunkedArray | list:
    """Conversations as Arrow lists when every message is exactly {role, content} (strings), else the Python lists
    (Arrow would add every other row's keys to each message)."""
    plain = all(len(m) == 2 and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for value in values for m in value)  # fmt: skip
    return pa.chunked_array([pa.array(values)]) if plain else values


def check_python_values(values: list, source: str, column: str) -> str:
    """Every value a string, or every value a list of valid messages; else name the first bad row. Returns the
    kind: "text" or "messages"."""
    first_kind = None
    for row, value in enumerate(values):
        if isinstance(value, np.ndarray):
            value = values[row] = value.tolist()
        if isinstance(value, str):
            kind = "text"
        elif is_python_messages(value):
            kind = "messages"
            fault = message_fault(value)
            if fault:
                raise DataError(f"{source}: row {row + 1}, column {column!r}: {fault}")
        else:
            raise DataError(
                f"{source}: row {row + 1}, column {column!r}: expected a string or a list of {{role, content}} "
                f"messages, got {python_type(value)}"
            )
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise DataError(
                f"{source}: row {row + 1}, column {column!r}: expected {kind_words(first_kind)} like the first "
                f"row, got {kind_words(kind)}"
            )
    return first_kind or "text"


def message_fault(messages: list[dict]) -> str | None:
    """What is wrong with a conversation: a message needs a string role, and string content unless it carries
    tool_calls (then content may be absent or null)."""
    for number, message in enumerate(messages, start=1):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            return f"message {number} has no role" if role is None else f"message {number}: role is not a string"
        if isinstance(content, str) or (content is None and message.get("tool_calls")):
            continue
        if content is None:
            return f"message {number} ({role}) has no content (only a message with tool_calls may omit it)"
        if isinstance(content, list):
            return f"message {number} ({role}): content is a list (multimodal content parts are not supported)"
        return f"message {number} ({role}): content is {python_type(content)}, not a string"
    return None


def is_python_messages(value: Any) -> bool:
    """A list of dicts: a conversation as Python objects (its messages still to be checked)."""
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def python_type(value: Any) -> str:
    """The type of a value as an error message names it (None and NaN: "null")."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return type(value).__name__


def column_kind(array: pa.ChunkedArray, source: str, column: str) -> str:
    """'text' or 'messages' from the Arrow type; a null or a value of another type is an error naming its row.
    Python message lists were validated as they were read."""
    if isinstance(array, list):
        return "messages"
    t = array.type
    if is_text_type(t):
        kind = "text"
    elif _is_message_list(t):
        kind = "messages"
    else:
        row = _first_row(pc.is_valid(array)) if array.null_count < len(array) else 0
        value = array[row].as_py() if len(array) else None
        shown = "a list that is not {role, content} messages" if isinstance(value, list) else python_type(value)
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
        raise DataError(f"{source}: row {row + 1}, column {column!r}: expected {kind_words(kind)}, got null")
    if kind == "messages":
        messages = pc.list_flatten(array)
        roles = pc.struct_field(messages, "role")
        if messages.null_count or roles.null_count:
            bad = pc.or_(pc.is_null(messages), pc.is_null(roles))
            parents = pc.list_parent_indices(array.combine_chunks())
            row = int(parents[_first_row(bad)].as_py())
            raise DataError(f"{source}: row {row + 1}, column {column!r}: a message without a role")
    return kind


def is_text_type(t: pa.DataType | None) -> bool:
    """An Arrow string type (string, large string or string view)."""
    return t is not None and (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def message_fields(t: pa.DataType) -> dict[str, pa.DataType] | None:
    """The fields of a list-of-structs type (a message list, if it has role and content), else None."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return None
    return {f.name: f.type for f in t.value_type}


def _is_message_list(t: pa.DataType, any_content: bool = False) -> bool:
    fields = message_fields(t)
    if fields is None:
        return False
    content = fields.get("content")
    if "role" not in fields or content is None:
        return False
    return any_content or pa.types.is_string(content) or pa.types.is_large_string(content) or pa.types.is_null(content)


def _first_row(mask) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def kind_words(kind: str) -> str:
    """"a string" or "a list of messages", for an error message."""
    return "a list of messages" if kind == "messages" else "a string"


def parse_json_messages(
    array: pa.ChunkedArray, source: str, column: str, *, strict: bool
) -> pa.ChunkedArray | list | None:
    """JSON-encoded message lists (how a CSV file holds conversations) as message lists. Not strict: None
    unless every value parses. Strict: a value that does not parse is an error naming its row."""
    if not strict and not pc.all(pc.starts_with(pc.utf8_ltrim_whitespace(array), "[")).as_py():
        return None
    values = []
    for row, text in enumerate(array.to_pylist()):
        try:
            value = json.loads(text)
            if not is_python_messages(value):
                raise ValueError
        except ValueError:
            if not strict:
                return None
            raise DataError(
                f"{source}: row {row + 1}, column {column!r}: expected a JSON list of {{role, content}} messages"
            ) from None
        fault = message_fault(value)
        if fault:
            raise DataError(f"{source}: row {row + 1}, column {column!r}: {fault}")
        values.append(value)
    return messages_column(values)
