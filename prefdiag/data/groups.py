"""The --group-by column: the data column a user's name means, checked to hold at most MAX_GROUPS plain values."""

from __future__ import annotations

from typing import Any

import pandas as pd

from prefdiag.errors import UsageError

MAX_GROUPS = 1000


def group_column(table: pd.DataFrame, options: Any, id_column: str = "pair_id") -> str | None:
    """The table column --group-by names: a data column, or an input column's name as the user knows it (``id``, or
    the --id/--prompt/--chosen/--rejected-column names, for pair_id (``id_column``), prompt, chosen, rejected)."""
    column = options.group_by
    if column is None or column in table.columns:
        return column
    columns = options.columns
    aliases = {columns.id or "id": id_column, columns.prompt: "prompt", columns.chosen: "chosen",
               columns.rejected: "rejected"}  # fmt: skip
    return aliases.get(column, column)


def response_view(table: pd.DataFrame) -> pd.DataFrame:
    """Unpaired (KTO) rows under the names their per-response table gives them (response_id, completion)."""
    return table.rename(columns={"pair_id": "response_id", "chosen": "completion"}).drop(columns=["rejected"])


def check_group_column(table: pd.DataFrame, column: str | None) -> None:
    """--group-by must name a data column of plain values with at most MAX_GROUPS distinct values."""
    if column is None:
        return
    if column not in table.columns:
        import difflib

        names = list(map(str, table.columns))
        close = difflib.get_close_matches(column, names, n=1, cutoff=0.6)
        suggestion = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"--group-by: no column {column!r}; the columns are: {', '.join(names)}{suggestion}")
    values = table[column]
    nested = isinstance(values.dtype, pd.ArrowDtype) and values.dtype.pyarrow_dtype.num_fields > 0
    try:
        distinct = None if nested else values.nunique(dropna=False)
    except TypeError:  # unhashable Python objects
        distinct = None
    if distinct is None:
        raise UsageError(f"--group-by: column {column!r} holds lists or objects; choose a column of plain values")
    if distinct > MAX_GROUPS:
        raise UsageError(
            f"--group-by: column {column!r} has {distinct:,} distinct values; at most {MAX_GROUPS} groups are allowed"
        )
