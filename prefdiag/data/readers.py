"""Readers: a file (JSONL, JSON, CSV, Parquet, compressed text), a save_to_disk directory or a hub dataset, as a
pyarrow Table where Arrow can read the data faithfully, else a pandas DataFrame of Python objects."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from prefdiag.errors import DataError, first_line

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".zst")  # around a text format, e.g. HH-RLHF's train.jsonl.gz


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, in hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSIONS
    suffix = (suffixes[-2] if len(suffixes) > 1 else "") if compressed else path.suffix.lower()
    kind = FILE_FORMATS.get(suffix)
    if kind is None or (compressed and kind == "parquet"):
        known = ", ".join(sorted(FILE_FORMATS))
        shown = "".join(path.suffixes[-2:]) if compressed else path.suffix
        raise DataError(
            f"{path}: unknown file extension {shown!r}; expected one of {known} "
            f"(text formats may end in {', '.join(COMPRESSIONS)})"
        )
    return kind


def _open_text(path: Path) -> io.TextIOWrapper:
    """The file as UTF-8 text, decompressed when its name ends in .gz, .bz2 or .zst."""
    return io.TextIOWrapper(pa.input_stream(str(path), compression="detect"), encoding="utf-8", newline="")


def _read_file(path: Path) -> tuple[pa.Table | pd.DataFrame, str]:
    kind = _file_kind(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    with ThreadPoolExecutor(1) as pool:  # hashing releases the GIL: it overlaps the read
        digest = pool.submit(file_sha256, path)
        try:
            frame = readers[kind](path)
        except UnicodeDecodeError:
            raise DataError(utf8_fault(path)) from None
        except (EOFError, OSError) as exc:
            if not _compressed(path):
                raise
            raise DataError(f"{path}: the compressed file ends early or is corrupt ({first_line(exc)})") from None
        return frame, digest.result()


def _compressed(path: Path) -> bool:
    return path.suffix.lower() in COMPRESSIONS


def utf8_fault(path: Path) -> str:
    """Where the file stops being UTF-8: "FILE:LINE:COLUMN: not UTF-8 text (byte 0x..)"."""
    try:
        with io.BufferedReader(pa.input_stream(str(path), compression="detect")) as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    column = len(raw[: exc.start].decode("utf-8", "replace")) + 1
                    return f"{path}:{number}:{column}: not UTF-8 text (byte 0x{raw[exc.start]:02x})"
    except (EOFError, OSError) as exc:
        return f"{path}: the compressed file ends early or is corrupt ({first_line(exc)})"
    return f"{path}: not UTF-8 text"


def _read_jsonl(path: Path) -> pa.Table | pd.DataFrame:
    """Arrow's streaming JSON reader (fast, lean); on anything it refuses, Python's json for an exact line number."""
    import pyarrow.json as pj

    options = pj.ReadOptions(block_size=4 << 20)
    try:
        table = pj.open_json(path, read_options=options).read_all()
    except pa.ArrowInvalid as exc:
        if "changed from" not in str(exc) and "unexpected field" not in str(exc):
            return _read_jsonl_python(path)  # a syntax error: find its line
        try:  # a type or field that first appears after the first block: infer the schema over the whole file
            table = pj.read_json(path, read_options=options)
        except pa.ArrowInvalid:
            return _read_jsonl_python(path)  # mixed types in a column: Python objects, validated later
    except (pa.ArrowException, OSError):
        return _read_jsonl_python(path)  # not UTF-8, a compressed file that ends early...: named by the Python pass
    if _has_timestamp(table.schema):  # Arrow turns ISO-date strings into timestamps: read them back as text
        schema = pa.schema([pa.field(f.name, _timestamps_as_text(f.type)) for f in table.schema])
        parse = pj.ParseOptions(explicit_schema=schema)
        table = pj.open_json(path, read_options=options, parse_options=parse).read_all()
    if table.num_columns == 0:
        raise DataError(f"{path}: the file holds no rows")
    try:
        table.validate(full=True)  # Arrow's JSON reader does not check that strings are UTF-8
    except pa.ArrowInvalid:
        raise DataError(utf8_fault(path)) from None
    return table


def _has_timestamp(schema_or_type) -> bool:
    types = [f.type for f in schema_or_type] if isinstance(schema_or_type, pa.Schema) else [schema_or_type]
    for t in types:
        if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
            return True
        if pa.types.is_struct(t) and _has_timestamp(pa.schema(list(t))):
            return True
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _has_timestamp(t.value_type):
            return True
    return False


def _timestamps_as_text(t: pa.DataType) -> pa.DataType:
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return pa.string()
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _timestamps_as_text(f.type)) for f in t])
    if pa.types.is_list(t):
        return pa.list_(_timestamps_as_text(t.value_type))
    if pa.types.is_large_list(t):
        return pa.large_list(_timestamps_as_text(t.value_type))
    return t


def json_records(path: Path, decoder: json.JSONDecoder | None = None):
    """The objects of a JSON Lines file, one per non-blank line, as Python values (UnicodeDecodeError propagates)."""
    decode = (decoder or json.JSONDecoder()).decode
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = decode(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {_json_type(record)}")
            yield record


def _read_jsonl_python(path: Path) -> pd.DataFrame:
    records = list(json_records(path))
    if not records:
        raise DataError(f"{path}: the file holds no rows")
    return pd.DataFrame.from_records(records)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _read_json(path: Path) -> pd.DataFrame | pa.Table:
    """A JSON array of objects, {"data": [...]}, a dict of columns, or JSON Lines saved as .json (datasets' to_json)."""
    if _is_json_lines(path):
        return _read_jsonl(path)  # one object per line: JSON Lines
    return pd.DataFrame.from_records(json_array_records(path))


def _is_json_lines(path: Path) -> bool:
    with _open_text(path) as handle:
        first = handle.readline()
        second = handle.readline()
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return bool(second.strip())


def json_array_records(path: Path, decoder: json.JSONDecoder | None = None) -> list[dict]:
    """The rows of a JSON file that is not JSON Lines: an array of objects, {"data": [...]} or a dict of columns."""
    try:
        with _open_text(path) as handle:
            payload = (decoder or json.JSONDecoder()).decode(handle.read())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(payload, dict):  # {"data": [...]}, or a dict of columns
        lists = [v for v in payload.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(payload) == 1 and lists:
            payload = lists[0]
        elif payload and all(isinstance(v, list) for v in payload.values()):
            if len({len(v) for v in payload.values()}) != 1:
                raise DataError(f"{path}: the columns of this JSON object have different lengths")
            names = list(payload)
            return [dict(zip(names, values)) for values in zip(*payload.values())]
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines, one object per line)")
    if not payload:
        raise DataError(f"{path}: the file holds no rows")
    return payload


def json_rows(path: Path, decoder: json.JSONDecoder | None = None):
    """The rows of a JSON or JSON Lines file as Python values, in file order."""
    if _file_kind(path) == "jsonl" or _is_json_lines(path):
        return json_records(path, decoder)
    return iter(json_array_records(path, decoder))


def _read_csv(path: Path) -> pa.Table:
    """Every column as text, exactly as written: no type inference, empty cells stay empty strings."""
    import pyarrow.csv as pcsv

    try:
        with _open_text(path) as handle:
            header = next(csv.reader(handle), None)
        if header:
            header[0] = header[0].removeprefix("\ufeff")  # a UTF-8 byte-order mark
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV file: {exc}") from None
    if not header:
        raise DataError(f"{path}: the file holds no rows")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: the header repeats column {repeated[0]!r}")
    convert = pcsv.ConvertOptions(
        column_types={name: pa.string() for name in header}, strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )  # fmt: skip
    try:
        return pcsv.read_csv(
            path, parse_options=pcsv.ParseOptions(newlines_in_values=True), convert_options=convert
        )
    except (pa.ArrowException, OSError) as exc:
        message = first_line(exc)
        if "UTF8" in message or "UTF-8" in message:
            raise DataError(utf8_fault(path)) from None
        if _compressed(path) and isinstance(exc, OSError):
            raise
        if "Expected" in message and "columns, got" in message:
            raise DataError(_csv_fault(path, len(header))) from None
        raise DataError(f"{path}: not a readable CSV file: {message}") from None


def _csv_fault(path: Path, width: int) -> str:
    """The first CSV record whose number of values differs from the header's, by its line."""
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        for record in reader:
            if len(record) != width and record:
                return (f"{path}: not a readable CSV file: line {reader.line_num} has {len(record)} values, "
                        f"the header {width}")
    return f"{path}: a CSV record does not have {width} values like the header"


def _read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:  # in batches: decoding a whole column chunk at once costs a second copy of the data in memory
        parquet = pq.ParquetFile(path)
        return pa.Table.from_batches(list(parquet.iter_batches(batch_size=1 << 16)), schema=parquet.schema_arrow)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {first_line(exc)}") from None


def _read_saved_dataset(path: Path, split: str | None) -> tuple[pa.Table, str, dict]:
    import datasets

    return _read_dataset(lambda: datasets.load_from_disk(str(path)), str(path), split,
                         "not a dataset saved with save_to_disk")  # fmt: skip


def _read_hub_dataset(name: str, split: str | None) -> tuple[pa.Table, str, dict]:
    import datasets

    return _read_dataset(lambda: datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name),
                         name, split, "cannot load the hub dataset")  # fmt: skip


def _read_dataset(load, where: str, split: str | None, failure: str) -> tuple[pa.Table, str, dict]:
    """(rows as an Arrow table, memory-mapped where the dataset is, in its row order; its fingerprint; the split)
    of the dataset ``load()`` returns; a failure to load is one line naming ``where``."""
    try:
        loaded = load()
    except Exception as exc:
        raise DataError(f"{where}: {failure}: {first_line(exc)}") from None
    dataset, chosen_split = _pick_split(loaded, split, where)
    return dataset.with_format("arrow")[:], dataset._fingerprint, {"split": chosen_split}


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

