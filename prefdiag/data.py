"""Loading preference pairs from JSONL, JSON, CSV, Parquet, a `datasets.save_to_disk` directory or a hub dataset,
into one validated table: ``pair_id, prompt, chosen, rejected`` (strings or lists of messages) plus extra columns.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefdiag.errors import DataError

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
REQUIRED = ("chosen", "rejected")


@dataclass
class PairData:
    """The pairs table and where it came from."""

    table: pd.DataFrame
    source: str
    content_hash: str
    conversational: bool
    implicit_prompt: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "content_sha256": self.content_hash,
            "n_rows": len(self.table),
            "format": "conversational" if self.conversational else "standard",
            "implicit_prompt": self.implicit_prompt,
            **self.details,
        }


@dataclass(frozen=True)
class ColumnMap:
    """Which input columns hold the prompt, the responses and the pair id."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = None  # None: use "id" when present, else the row index


def load_pairs(
    source: str, *, split: str | None = None, columns: ColumnMap | None = None
) -> PairData:
    """Load and validate preference pairs from a file, a save_to_disk directory or a hub dataset id."""
    columns = columns or ColumnMap()
    path = Path(source)
    if path.is_dir():
        frame, digest, details = _read_saved_dataset(path, split)
    elif path.exists():
        frame, digest = _read_file(path)
        details = {}
    elif _looks_like_hub_dataset(source):
        frame, digest, details = _read_hub_dataset(source, split)
    else:
        raise DataError(f"{source}: no such file or directory")
    return _normalise(frame, source, digest, columns, details)


# -- readers ------------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_file(path: Path) -> tuple[pd.DataFrame, str]:
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(sorted(FILE_FORMATS))
        raise DataError(f"{path}: unknown file extension {path.suffix!r}; expected one of {known}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    digest = file_sha256(path)
    if kind == "jsonl":
        frame = _read_jsonl(path)
    elif kind == "json":
        frame = _read_json(path)
    elif kind == "csv":
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise DataError(f"{path}: not a readable CSV file: {str(exc).splitlines()[0]}") from None
    else:
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    if len(frame) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return frame, digest


def _read_jsonl(path: Path) -> pd.DataFrame:
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise DataError(f"{path}: the file holds no rows")
    return pd.DataFrame.from_records(records)


def _read_json(path: Path) -> pd.DataFrame:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(payload, dict):  # {"data": [...]}, or a dict of columns
        lists = [v for v in payload.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(payload) == 1 and lists:
            payload = lists[0]
        elif all(isinstance(v, list) for v in payload.values()):
            return pd.DataFrame(payload)
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines with a .jsonl extension)")
    return pd.DataFrame.from_records(payload)


def _read_saved_dataset(path: Path, split: str | None) -> tuple[pd.DataFrame, str, dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {str(exc).splitlines()[0]}") from None
    dataset, chosen_split = _pick_split(loaded, split, str(path))
    return dataset.to_pandas(), dataset._fingerprint, {"split": chosen_split}


def _read_hub_dataset(name: str, split: str | None) -> tuple[pd.DataFrame, str, dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(f"{name}: cannot load the hub dataset: {str(exc).splitlines()[0]}") from None
    dataset, chosen_split = _pick_split(loaded, split, name)
    return dataset.to_pandas(), dataset._fingerprint, {"split": chosen_split}


def _pick_split(loaded, split: str | None, where: str):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            if len(names) == 1:
                split = names[0]
            elif "train" in names:
                split = "train"
            else:
                raise DataError(f"{where}: several splits ({', '.join(names)}); choose one with --split")
        if split not in loaded:
            raise DataError(f"{where}: no split {split!r}; splits are {', '.join(names)}")
        return loaded[split], split
    return loaded, split


def _looks_like_hub_dataset(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/")) and "." not in parts[1][-9:]


# -- validation ---------------------------------------------------------------------------------------------------


def _normalise(
    frame: pd.DataFrame, source: str, digest: str, columns: ColumnMap, details: dict
) -> PairData:
    rename = {columns.chosen: "chosen", columns.rejected: "rejected"}
    if columns.prompt in frame.columns:
        rename[columns.prompt] = "prompt"
    for wanted in (columns.chosen, columns.rejected):
        if wanted not in frame.columns:
            available = ", ".join(map(str, frame.columns))
            raise DataError(f"{source}: missing column {wanted!r}; the columns are: {available}")
    id_column = columns.id or ("id" if "id" in frame.columns else None)
    if id_column is not None and id_column not in frame.columns:
        available = ", ".join(map(str, frame.columns))
        raise DataError(f"{source}: missing id column {id_column!r}; the columns are: {available}")

    clashes = [c for c in ("prompt", "chosen", "rejected", "pair_id") if c in frame.columns and c not in rename]
    extras = frame.drop(columns=[c for c in frame.columns if c in rename or c in clashes or c == id_column])
    table = pd.DataFrame(index=range(len(frame)))
    table["pair_id"] = (
        frame[id_column].astype(str).to_numpy() if id_column else np.arange(len(frame)).astype(str)
    )
    for original, name in rename.items():
        table[name] = [_normalise_value(v, source, row, original) for row, v in enumerate(frame[original])]

    implicit = "prompt" not in table.columns
    if implicit:
        prompts, chosen, rejected = zip(*(extract_prompt(c, r) for c, r in zip(table["chosen"], table["rejected"])))
        table["prompt"], table["chosen"], table["rejected"] = list(prompts), list(chosen), list(rejected)

    conversational = _check_shapes(table, source)
    duplicated = table["pair_id"].duplicated()
    if duplicated.any():
        first = table["pair_id"][duplicated].iloc[0]
        raise DataError(
            f"{source}: id column {id_column!r} has duplicate value {first!r}; pair ids must be unique",
            hint="choose another column with --id-column",
        )
    table = table[["pair_id", "prompt", "chosen", "rejected"]]
    for name in extras.columns:
        table[str(name)] = extras[name].to_numpy()
    return PairData(table, source, digest, conversational, implicit, details)


def _normalise_value(value: Any, source: str, row: int, column: str) -> Any:
    """Strings stay; arrays of messages (Parquet, datasets) become lists of dicts; anything else is an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [dict(m) for m in value]
    shown = "null" if value is None or (isinstance(value, float) and np.isnan(value)) else type(value).__name__
    raise DataError(
        f"{source}: row {row + 1}, column {column!r}: expected a string or a list of {{role, content}} messages, "
        f"got {shown}"
    )


def _check_shapes(table: pd.DataFrame, source: str) -> bool:
    """All rows must be standard (strings) or all conversational (messages); returns which."""
    kinds = {name: table[name].map(lambda v: isinstance(v, list)) for name in ("prompt", "chosen", "rejected")}
    conversational = bool(kinds["chosen"].iloc[0])
    for name, is_list in kinds.items():
        bad = is_list != conversational
        if name == "prompt" and conversational:
            bad = ~is_list & (table["prompt"].map(len) > 0)  # an empty string prompt is tolerated
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            want = "a list of messages" if conversational else "a string"
            raise DataError(
                f"{source}: row {row + 1}, column {name!r}: expected {want} like the first row, got "
                f"{'a list of messages' if is_list.iloc[row] else 'a string'}"
            )
    return conversational


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off a pair exactly as TRL's extract_prompt does: the longest common prefix of
    messages for conversations; of characters, stepped back before a space, for strings. Like TRL, when one side is
    a prefix of the other the split falls one element before the end of the shorter one."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if isinstance(chosen, str) and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]
