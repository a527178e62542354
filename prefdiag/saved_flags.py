"""A saved run's flags for `prefdiag clean --from`: how the run read its data (shape, binarize seed), its per-pair
table (per-response for unpaired KTO rows) joined by id, and the check that the joined rows hold this data's text
(ids are often row numbers: a run on another file, or read with other options, would join silently)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefdiag.data import PairData
from prefdiag.errors import DataError, UsageError, first_line
from prefdiag.unpaired import SHAPE

log = logging.getLogger(__name__)

# The text a saved run's table holds for each row, as the data's columns: compared with the data read now, so flags
# joined by pair_id (response_id) are this row's. Saved column -> column of the loaded data.table.
PAIR_TEXT = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
RESPONSE_TEXT = {"prompt": "prompt", "completion": "chosen", "label": "label"}  # KTO rows: chosen is the completion

def recorded_binarize_seed(from_run: str) -> int | None:
    """The seed a saved run binarised its data with, as its summary.json records it; None without one."""
    return recorded_dataset(Path(from_run)).get("binarize_seed")


def recorded_dataset(out_dir: Path) -> dict[str, Any]:
    """How a saved run read its data: its shape (absent for prompt/chosen/rejected data), data format and binarize
    seed, from its summary.json (provenance: dataset, options); {} when the directory has none."""
    path = out_dir / "summary.json"
    if not path.is_file():
        return {}
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))["provenance"]
        dataset, options = provenance.get("dataset", {}), provenance.get("options", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable prefdiag summary.json: {first_line(exc)}") from None
    recorded = {key: options[key] for key in ("data_format", "binarize_seed") if key in options}
    if "binarize_seed" in dataset:  # the seed the shape was made with: the options' unless the data came loaded
        recorded["binarize_seed"] = dataset["binarize_seed"]
    if dataset.get("shape") is not None:
        recorded["shape"] = dataset["shape"]
    return recorded


def check_same_pairs(data: PairData, recorded: dict[str, Any], from_run: str) -> None:
    """Refuse a saved run whose pairs are not these: pair ids are input rows (or ids), the same whatever the shape
    or the seed, so the join by pair_id would succeed and give each pair another pair's flags."""
    if not recorded:
        return
    shape, saved_shape = data.details.get("shape"), recorded.get("shape")
    if shape != saved_shape:
        words = {None: "prompt/chosen/rejected"}
        raise UsageError(f"--from {from_run}: the run read the data as {words.get(saved_shape, saved_shape)} pairs "
                         f"(--data-format {recorded.get('data_format', 'auto')}), this clean as "
                         f"{words.get(shape, shape)} pairs; give the run's --data-format")  # fmt: skip
    seed, saved_seed = data.details.get("binarize_seed"), recorded.get("binarize_seed")
    if shape == "rated" and saved_seed is not None and seed != saved_seed:
        raise UsageError(f"--from {from_run}: the run binarised the rated data with --binarize-seed {saved_seed}, "
                         f"this clean with --binarize-seed {seed}: other pairs; give the run's seed (or leave "
                         "--binarize-seed out)")  # fmt: skip


def saved_run_table(data: PairData, out_dir: Path) -> pd.DataFrame:
    """The saved run's per-pair table (per-response for KTO rows), in the order of data.table; refused when its text
    is not the data's (another file, the file edited, or read with other options: the same ids, other pairs)."""
    unpaired = data.details.get("shape") == SHAPE
    name, key = ("responses", "response_id") if unpaired else ("pairs", "pair_id")
    text = RESPONSE_TEXT if unpaired else PAIR_TEXT
    as_read = {column: object for column in text if column != "label"}  # strings or message lists, as written
    candidates = [out_dir / f"{name}.{ext}" for ext in ("parquet", "jsonl", "csv")]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise UsageError(f"--from {out_dir}: no {name}.parquet (nor {name}.jsonl, {name}.csv) from a prefdiag run")
    try:
        if path.suffix == ".parquet":
            pairs = pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            pairs = pd.read_json(path, lines=True, dtype={key: str, **as_read})
        else:
            pairs = pd.read_csv(path, dtype={key: str, **as_read}, keep_default_na=False)
    except Exception as exc:  # a corrupt table: pandas and pyarrow raise many types
        raise DataError(f"{path}: not a readable {name} table: {first_line(exc)}") from None
    if key not in pairs.columns:
        raise DataError(f"{path}: no {key} column to join the data by")
    pairs[key] = pairs[key].astype(str)
    ids = data.table["pair_id"].astype(str)
    missing = ~ids.isin(pairs[key])
    if missing.any():
        raise DataError(f"{path}: {int(missing.sum())} of the data's {len(ids)} {key.replace('_', ' ')}s are not in "
                        f"this run (first: {ids[missing].iloc[0]!r}); was it run on this data?")  # fmt: skip
    first = np.flatnonzero(~pairs[key].duplicated().to_numpy())  # a repeated id: its first row, as before
    positions = first[pd.Index(pairs[key].iloc[first]).get_indexer(ids)]
    aligned = pairs.iloc[positions].reset_index(drop=True)
    saved_text = {column: aligned[column] for column in text if column in pairs.columns}
    if path.suffix == ".parquet":  # message lists read again as Arrow, compared without a Python object per message
        nested = [column for column, values in saved_text.items() if values.dtype == object]
        if nested:
            arrow = pq.read_table(path, columns=nested)
            for column in nested:
                values = arrow[column].combine_chunks().take(pa.array(positions))
                saved_text[column] = pd.Series(pd.arrays.ArrowExtensionArray(values))
    _check_same_text(data, saved_text, text, path, out_dir, unit=name[:-1])
    return aligned


def _check_same_text(
    data: PairData, saved: dict[str, pd.Series], text: dict[str, str], path: Path, out_dir: Path, unit: str
) -> None:
    """Refuse a saved table whose text columns (aligned with data.table) differ from the data read now; a table
    without them (an older run) is not checked, with a warning."""
    present = [column for column in text if column in saved]
    missing = [column for column in text if column not in saved]
    if missing:
        log.warning("--from %s: %s has no %s column%s: %s", out_dir, path.name, ", ".join(missing),
                    "s" if len(missing) > 1 else "", "cannot check that its rows are this data's"
                    if not present else "checking its other text columns only")  # fmt: skip
    if not present:
        return
    differs = {column: _differs(saved[column], data.table[text[column]]) for column in present}
    anywhere = np.logical_or.reduce(list(differs.values()))
    if anywhere.any():
        first = int(np.argmax(anywhere))
        column = next(c for c in present if differs[c][first])
        raise DataError(f"--from {out_dir}: {int(anywhere.sum())} of {len(anywhere)} {unit}s in {path.name} differ "
                        f"from the data in this run (first: {unit} {str(data.table['pair_id'].iloc[first])!r}, column "
                        f"{column!r}); was it run on this file with the same options?")  # fmt: skip


def _differs(saved: pd.Series, current: pd.Series) -> np.ndarray:
    """Per row: the saved value is not the current one. Strings and booleans compare as arrays; message lists (and
    other nested values) in depth as Arrow arrays, where a dict's absent key equals a None one, so a Parquet round
    trip's numpy arrays of dicts (with None for the keys other messages have) equal the lists read now."""
    kinds = [pd.api.types.infer_dtype(s, skipna=True) for s in (saved, current)]
    if all(kind in ("string", "empty") for kind in kinds):
        return saved.to_numpy(dtype=object, na_value=None) != current.to_numpy(dtype=object, na_value=None)
    if pd.api.types.is_bool_dtype(saved) and pd.api.types.is_bool_dtype(current):
        return saved.to_numpy(bool) != current.to_numpy(bool)
    if kinds[0] == "string":  # a CSV table writes message lists as JSON
        saved = saved.map(_json_value)
    try:
        return _arrow_differs(_arrow(saved), _arrow(current))
    except (pa.ArrowException, TypeError, ValueError):  # values Arrow cannot type (mixed kinds): as Python values
        pairs = zip(saved.to_numpy(dtype=object), current.to_numpy(dtype=object))
        return np.fromiter((_plain(a) != _plain(b) for a, b in pairs), dtype=bool, count=len(saved))


def _json_value(value: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _arrow(series: pd.Series) -> pa.Array:
    array = pa.array(series, from_pandas=True)  # Arrow-backed columns as they are; Python values typed
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _arrow_differs(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Per row: a's value is not b's, lists element by element and structs field by field (a field one side lacks
    equals nulls), every level as whole arrays."""
    a_null = a.is_null().to_numpy(zero_copy_only=False)
    b_null = b.is_null().to_numpy(zero_copy_only=False)
    differs = a_null != b_null
    both = ~(a_null | b_null)
    if not both.any():
        return differs
    lists = [pa.types.is_list(t) or pa.types.is_large_list(t) for t in (a.type, b.type)]
    structs = [pa.types.is_struct(t) for t in (a.type, b.type)]
    if any(lists) or any(structs):
        if lists != [True, True] and structs != [True, True]:
            return differs | both  # a list against a value
    if all(lists):
        a_len = pc.fill_null(pc.list_value_length(a), 0).to_numpy(zero_copy_only=False)
        b_len = pc.fill_null(pc.list_value_length(b), 0).to_numpy(zero_copy_only=False)
        differs |= both & (a_len != b_len)
        rows = np.flatnonzero(both & (a_len == b_len))
        if len(rows):
            a_rows, b_rows = a.take(rows), b.take(rows)
            inner = _arrow_differs(pc.list_flatten(a_rows), pc.list_flatten(b_rows))
            parents = pc.list_parent_indices(a_rows).to_numpy(zero_copy_only=False)
            differs[rows[np.unique(parents[inner])]] = True
        return differs
    if all(structs):
        names = dict.fromkeys([f.name for f in a.type] + [f.name for f in b.type])
        for name in names:
            a_field = pc.struct_field(a, name) if a.type.get_field_index(name) >= 0 else None
            b_field = pc.struct_field(b, name) if b.type.get_field_index(name) >= 0 else None
            if a_field is None or b_field is None:  # absent on one side: equal where the other is null
                inner = (b_field if a_field is None else a_field).is_valid().to_numpy(zero_copy_only=False)
            else:
                inner = _arrow_differs(a_field, b_field)
            differs |= both & inner
        return differs
    if a.type != b.type:
        if pa.types.is_null(a.type) or pa.types.is_null(b.type):
            return differs
        common = pa.large_string() if all(pa.types.is_string(t) or pa.types.is_large_string(t)
                                          for t in (a.type, b.type)) else a.type  # fmt: skip
        a, b = a.cast(common), b.cast(common)
    equal = pc.fill_null(pc.equal(a, b), False).to_numpy(zero_copy_only=False)
    return differs | (both & ~equal)


def _plain(value: Any) -> Any:
    """A value as plain Python: arrays as lists, numpy scalars as Python ones, a dict without its None values (the
    keys a struct column gives messages that lack them), NaN as None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
