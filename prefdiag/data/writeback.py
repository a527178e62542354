"""Writing a dataset back in its own format (JSONL, JSON, CSV, Parquet, save_to_disk) with some of its rows left
out: the original rows, every column, in input order, never our normalised table. Every write is atomic (a
temporary file or directory beside the output, renamed over it)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefdiag.data.readers import _file_kind, _is_json_lines, _open_text
from prefdiag.errors import DataError, UsageError


def input_kind(source: Path) -> str:
    """jsonl, json-lines (JSON Lines named .json), json, csv, parquet or saved (a save_to_disk directory)."""
    if source.is_dir():
        return "saved"
    if not source.exists():
        raise UsageError(f"{source}: clean writes local data back; no such file or directory")
    kind = _file_kind(source)
    return "json-lines" if kind == "json" and _is_json_lines(source) else kind


def write_rows(source: Path, output: Path, keep: np.ndarray, split: str | None = None) -> None:
    """Write the input's rows whose ``keep`` entry is true (one entry per input row, in file order) to ``output``,
    in the input's format."""
    kind = input_kind(source)
    writers: dict[str, Callable[[Path, Path, np.ndarray], None]] = {
        "jsonl": _write_lines, "json-lines": _write_lines, "json": _write_json, "csv": _write_csv,
        "parquet": _write_parquet,
    }  # fmt: skip
    if kind == "saved":
        _write_saved(source, output, keep, split)
        return
    if output.suffix.lower() in (".bz2", ".zst"):
        raise UsageError(f"--output {output}: clean compresses with gzip only (.gz)")
    expected = _file_kind(output) if output.suffix else None
    if expected != ("json" if kind == "json-lines" else kind):
        raise UsageError(f"--output {output}: expected a {kind.replace('-lines', '')} file name like the input "
                         f"{source.name}")  # fmt: skip
    writers[kind](source, output, keep)


def write_file_atomically(output: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write`` on a binary handle to a temporary file beside ``output`` (gzip-compressed when ``output`` ends
    in .gz), then rename it over ``output``; on any failure the temporary is removed and ``output`` is untouched."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(handle, "wb") as raw:
            if output.suffix.lower() == ".gz":
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
                    write(packed)
            else:
                write(raw)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_count(source: Path, n_rows: int, keep: np.ndarray) -> None:
    if n_rows != len(keep):
        raise DataError(f"{source}: read {n_rows} rows to write back, but the pairs table has {len(keep)}")


def _write_lines(source: Path, output: Path, keep: np.ndarray) -> None:
    """JSON Lines: the kept lines byte for byte (blank lines are no rows: left out)."""
    with _open_text(source) as handle:
        lines = [line for line in handle if line.strip()]
    _check_count(source, len(lines), keep)
    kept = [line if line.endswith("\n") else line + "\n" for line, k in zip(lines, keep) if k]
    write_file_atomically(output, lambda out: out.write("".join(kept).encode("utf-8")))


def _write_json(source: Path, output: Path, keep: np.ndarray) -> None:
    """A JSON file in the container it came in: an array, {"key": [...]}, or a dict of columns."""
    with _open_text(source) as handle:
        payload = json.loads(handle.read())
    if isinstance(payload, list):
        _check_count(source, len(payload), keep)
        result = [row for row, k in zip(payload, keep) if k]
    elif len(payload) == 1 and isinstance(next(iter(payload.values())), list) and payload and isinstance(
            next(iter(payload.values()))[0], dict):  # fmt: skip
        key, rows = next(iter(payload.items()))
        _check_count(source, len(rows), keep)
        result = {key: [row for row, k in zip(rows, keep) if k]}
    else:  # a dict of columns
        lengths = {len(v) for v in payload.values()}
        _check_count(source, lengths.pop(), keep)
        result = {name: [v for v, k in zip(values, keep) if k] for name, values in payload.items()}
    text = json.dumps(result, ensure_ascii=False, indent=1)
    write_file_atomically(output, lambda out: out.write(text.encode("utf-8")))


def _write_csv(source: Path, output: Path, keep: np.ndarray) -> None:
    """CSV: the header and the kept records, every cell the text it was (quoting may be normalised)."""
    with _open_text(source) as handle:
        records = [r for r in csv.reader(handle) if r]
    header, rows = records[0], records[1:]
    _check_count(source, len(rows), keep)
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(row for row, k in zip(rows, keep) if k)
    write_file_atomically(output, lambda out: out.write(text.getvalue().encode("utf-8")))


def _write_parquet(source: Path, output: Path, keep: np.ndarray) -> None:
    """Parquet: the kept rows with the file's own schema and metadata."""
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    _check_count(source, table.num_rows, keep)
    kept = table.take(pa.array(np.flatnonzero(keep)))

    def write(out) -> None:
        pq.write_table(kept, out)

    write_file_atomically(output, write)


def _write_saved(source: Path, output: Path, keep: np.ndarray, split: str | None) -> None:
    """A save_to_disk directory: the same dataset (or DatasetDict, other splits untouched) without the rows."""
    import datasets

    loaded = datasets.load_from_disk(str(source))
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        split = split or (names[0] if len(names) == 1 else "train")
        _check_count(source, loaded[split].num_rows, keep)
        loaded[split] = loaded[split].select(np.flatnonzero(keep))
    else:
        _check_count(source, loaded.num_rows, keep)
        loaded = loaded.select(np.flatnonzero(keep))
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        loaded.save_to_disk(str(temporary))
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            os.replace(output, old)
            os.replace(temporary, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
