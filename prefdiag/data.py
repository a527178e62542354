"""Loading preference pairs from JSONL, JSON, CSV, Parquet, a `datasets.save_to_disk` directory or a hub dataset,
into one validated table: ``pair_id, prompt, chosen, rejected`` (strings or lists of messages) plus extra columns.

Every shape TRL accepts is read, detected automatically or forced with ``data_format``:

- standard (strings) or conversational (lists of ``{role, content}`` messages);
- an explicit ``prompt`` column, or an implicit prompt: chosen and rejected hold the whole text or conversation and
  the shared prefix becomes the prompt, exactly as TRL's ``extract_prompt`` splits it (a string prompt next to
  conversational responses is ignored, as TRL's ``maybe_extract_prompt`` does);
- Anthropic HH transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``), split after the LAST ``"\\n\\nAssistant:"``
  both responses share, not at the first difference (TRL issue 1858).

The text stays in Arrow memory (pandas ``str`` columns and ``ArrowDtype`` message lists) rather than one Python object
per value: reading and validating a million pairs costs about the data's own size in memory. Python objects exist a
chunk of rows at a time (implicit-prompt splitting), or for the whole file only where Arrow cannot read it (a JSON
array, a JSONL file whose column types conflict).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from prefdiag.errors import DataError, UsageError

log = logging.getLogger(__name__)

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".zst")  # around a text format, e.g. HH-RLHF's train.jsonl.gz
DATA_FORMATS = ("auto", "standard", "conversational", "hh")
REQUIRED = ("chosen", "rejected")
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_CHUNK_ROWS = 100_000  # rows per Python pass (prompt extraction), to bound the Python objects alive at once


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


def load_pairs(
    source: str,
    *,
    split: str | None = None,
    columns: ColumnMap | None = None,
    data_format: str = "auto",
) -> PairData:
    """Load and validate preference pairs from a file, a save_to_disk directory or a hub dataset id.

    ``data_format``: auto (detect), standard, conversational (also parses JSON-encoded message lists, as a CSV file
    holds them) or hh (split Anthropic HH transcripts at the last shared "\\n\\nAssistant:")."""
    if data_format not in DATA_FORMATS:
        raise UsageError(f"unknown data format {data_format!r}; expected one of {', '.join(DATA_FORMATS)}")
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
    if (frame.num_rows if isinstance(frame, pa.Table) else len(frame)) == 0:
        raise DataError(f"{source}: the data holds no rows")
    csv_source = not path.is_dir() and path.exists() and _file_kind(path) == "csv"
    pairs = _normalise(frame, source, digest, columns, details, data_format, csv_source)
    del frame
    pa.default_memory_pool().release_unused()  # the readers' buffers: give them back before the checks run
    return pairs


# -- readers: a pyarrow Table where Arrow can read the data, else a pandas DataFrame of Python objects ---------------


def file_sha256(path: Path) -> str:
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
        frame = readers[kind](path)
        return frame, digest.result()


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
        return _read_jsonl_python(path)
    if _has_timestamp(table.schema):  # Arrow turns ISO-date strings into timestamps: read them back as text
        schema = pa.schema([pa.field(f.name, _timestamps_as_text(f.type)) for f in table.schema])
        parse = pj.ParseOptions(explicit_schema=schema)
        table = pj.open_json(path, read_options=options, parse_options=parse).read_all()
    if table.num_columns == 0:
        raise DataError(f"{path}: the file holds no rows")
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


def _read_jsonl_python(path: Path) -> pd.DataFrame:
    records = []
    with _open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {_json_type(record)}")
                records.append(record)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (line {number + 1})") from None
    if not records:
        raise DataError(f"{path}: the file holds no rows")
    return pd.DataFrame.from_records(records)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _read_json(path: Path) -> pd.DataFrame | pa.Table:
    """A JSON array of objects, {"data": [...]}, a dict of columns, or JSON Lines saved as .json (datasets' to_json)."""
    try:
        with _open_text(path) as handle:
            first = handle.readline()
            second = handle.readline()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    try:
        json.loads(first)
        if second.strip():
            return _read_jsonl(path)  # one object per line: JSON Lines
    except json.JSONDecodeError:
        pass
    try:
        with _open_text(path) as handle:
            payload = json.loads(handle.read())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if isinstance(payload, dict):  # {"data": [...]}, or a dict of columns
        lists = [v for v in payload.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(payload) == 1 and lists:
            payload = lists[0]
        elif payload and all(isinstance(v, list) for v in payload.values()):
            if len({len(v) for v in payload.values()}) != 1:
                raise DataError(f"{path}: the columns of this JSON object have different lengths")
            return pd.DataFrame(payload)
    if not isinstance(payload, list) or not all(isinstance(r, dict) for r in payload):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines, one object per line)")
    if not payload:
        raise DataError(f"{path}: the file holds no rows")
    return pd.DataFrame.from_records(payload)


def _read_csv(path: Path) -> pa.Table:
    """Every column as text, exactly as written: no type inference, empty cells stay empty strings."""
    import pyarrow.csv as pcsv

    try:
        with _open_text(path) as handle:
            header = next(csv.reader(handle), None)
        if header:
            header[0] = header[0].removeprefix("\ufeff")  # a UTF-8 byte-order mark
    except (UnicodeDecodeError, csv.Error) as exc:
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
        raise DataError(f"{path}: not a readable CSV file: {str(exc).splitlines()[0]}") from None


def _read_parquet(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    try:  # in batches: decoding a whole column chunk at once costs a second copy of the data in memory
        parquet = pq.ParquetFile(path)
        return pa.Table.from_batches(list(parquet.iter_batches(batch_size=1 << 16)), schema=parquet.schema_arrow)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file: {str(exc).splitlines()[0]}") from None


def _read_saved_dataset(path: Path, split: str | None) -> tuple[pa.Table, str, dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {str(exc).splitlines()[0]}") from None
    dataset, chosen_split = _pick_split(loaded, split, str(path))
    return _dataset_table(dataset), dataset._fingerprint, {"split": chosen_split}


def _read_hub_dataset(name: str, split: str | None) -> tuple[pa.Table, str, dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as exc:
        raise DataError(f"{name}: cannot load the hub dataset: {str(exc).splitlines()[0]}") from None
    dataset, chosen_split = _pick_split(loaded, split, name)
    return _dataset_table(dataset), dataset._fingerprint, {"split": chosen_split}


def _dataset_table(dataset) -> pa.Table:
    """The dataset's rows as an Arrow table (memory-mapped where the dataset is), in the dataset's row order."""
    return dataset.with_format("arrow")[:]


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


def _chunks(*arrays: pa.ChunkedArray):
    """Aligned slices of at most _CHUNK_ROWS rows, as Python lists."""
    n = len(arrays[0])
    for start in range(0, n, _CHUNK_ROWS):
        yield start, [a.slice(start, _CHUNK_ROWS).to_pylist() for a in arrays]


# -- implicit prompts ---------------------------------------------------------------------------------------------


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


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings, by binary search on C-level comparisons."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid
    return lo


def extract_prompt_index(chosen: str, rejected: str) -> int:
    """Where TRL's extract_prompt splits two strings (may be -1, as TRL's own index may be), without its
    character-by-character loop."""
    shortest = min(len(chosen), len(rejected))
    k = common_prefix_length(chosen, rejected)
    if k == shortest:  # no differing character: TRL's loop ends on its last index
        return max(shortest - 1, 0)
    return k - 1 if chosen[k - 1] == " " else k


def _split_strings(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray):
    prompts, chosen_out, rejected_out = [], [], []
    for _, (cs, rs) in _chunks(chosen, rejected):
        idx = [extract_prompt_index(c, r) for c, r in zip(cs, rs)]
        prompts.append(pa.array([c[:i] for c, i in zip(cs, idx)], pa.large_string()))
        chosen_out.append(pa.array([c[i:] for c, i in zip(cs, idx)], pa.large_string()))
        rejected_out.append(pa.array([r[i:] for r, i in zip(rs, idx)], pa.large_string()))
    return tuple(pa.chunked_array(parts, pa.large_string()) for parts in (prompts, chosen_out, rejected_out))


def _split_conversations(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray):
    prompts, chosen_out, rejected_out = [], [], []
    for _, (cs, rs) in _chunks(chosen, rejected):
        split = [extract_prompt(c, r) for c, r in zip(cs, rs)]
        prompts.append(pa.array([s[0] for s in split], chosen.type))
        chosen_out.append(pa.array([s[1] for s in split], chosen.type))
        rejected_out.append(pa.array([s[2] for s in split], rejected.type))
    return pa.chunked_array(prompts, chosen.type), pa.chunked_array(chosen_out, chosen.type), pa.chunked_array(
        rejected_out, rejected.type
    )


def _looks_like_hh(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray) -> bool:
    """Every transcript starts with "\\n\\nHuman:" and has an "\\n\\nAssistant:" turn."""
    return all(
        pc.all(pc.starts_with(column, HH_HUMAN)).as_py() and pc.all(pc.match_substring(column, HH_ASSISTANT)).as_py()
        for column in (chosen, rejected)
    )


def hh_split_index(chosen: str, rejected: str) -> int:
    """End of the last "\\n\\nAssistant:" that lies inside the prefix both transcripts share; -1 if there is none."""
    shared = common_prefix_length(chosen, rejected)
    at = chosen.rfind(HH_ASSISTANT, 0, shared)
    return at + len(HH_ASSISTANT) if at >= 0 else -1


def _split_hh(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray, source: str, *, strict: bool):
    """HH transcripts split after their last shared Assistant turn; None (not strict) if some pair has none."""
    prompts, chosen_out, rejected_out = [], [], []
    for start, (cs, rs) in _chunks(chosen, rejected):
        idx = [hh_split_index(c, r) for c, r in zip(cs, rs)]
        if min(idx) < 0:
            if not strict:
                log.info("%s: not every pair shares an HH Assistant turn; using TRL's extract_prompt", source)
                return None
            row = start + idx.index(-1)
            raise DataError(
                f"{source}: row {row + 1}: chosen and rejected share no {HH_ASSISTANT!r} turn to split the HH "
                "transcript at"
            )
        prompts.append(pa.array([c[:i] for c, i in zip(cs, idx)], pa.large_string()))
        chosen_out.append(pa.array([c[i:] for c, i in zip(cs, idx)], pa.large_string()))
        rejected_out.append(pa.array([r[i:] for r, i in zip(rs, idx)], pa.large_string()))
    return tuple(pa.chunked_array(parts, pa.large_string()) for parts in (prompts, chosen_out, rejected_out))
