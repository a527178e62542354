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

Nothing is added or dropped (prefdiag.data.objects): conversations whose messages are not exactly ``{role, content}``
(tool calls, whose keys differ from row to row) and the ``tools``, ``documents`` and ``chat_template_kwargs`` columns
are Python objects read from the file's own JSON, and numeric ids keep their written text. A message needs a string
``role``, and a string ``content`` unless it carries ``tool_calls``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from prefdiag.data.normalise import ColumnMap, PairData, _normalise, with_python_objects
from prefdiag.data.prompts import (
    HH_ASSISTANT,
    HH_HUMAN,
    common_prefix_length,
    extract_prompt,
    extract_prompt_index,
    hh_split_index,
)
from prefdiag.data.readers import (
    COMPRESSIONS,
    FILE_FORMATS,
    _file_kind,
    _looks_like_hub_dataset,
    _read_file,
    _read_hub_dataset,
    _read_saved_dataset,
    file_sha256,
)
from prefdiag.data.shapes import detect_shape, to_pairs, unpair
from prefdiag.errors import DataError, UsageError
from prefdiag.options import DATA_FORMATS, SHAPED_FORMATS

REQUIRED = ("chosen", "rejected")

__all__ = [
    "COMPRESSIONS", "DATA_FORMATS", "FILE_FORMATS", "HH_ASSISTANT", "HH_HUMAN", "REQUIRED", "ColumnMap", "PairData",
    "common_prefix_length", "extract_prompt", "extract_prompt_index", "file_sha256", "hh_split_index", "load_pairs",
    "with_python_objects",
]


def load_pairs(
    source: str,
    *,
    split: str | None = None,
    columns: ColumnMap | None = None,
    data_format: str = "auto",
    binarize_seed: int = 0,
) -> PairData:
    """Load and validate preference pairs from a file, a save_to_disk directory or a hub dataset id.

    ``data_format``: auto (detect), standard, conversational (also parses JSON-encoded message lists, as a CSV file
    holds them), hh (split Anthropic HH transcripts at the last shared "\\n\\nAssistant:"), or a shape turned into
    pairs first (prefdiag.data.shapes): rated (UltraFeedback's completions, binarised with ``binarize_seed``),
    rated-best-worst, shp (two responses and a label), kto (unpaired rows: prompt, completion, label; paired data
    read as kto is unpaired as TRL's KTOTrainer does). KTO data keeps the table's form with chosen and rejected
    both the completion, a boolean ``label`` column and ``details["shape"] == "kto"``."""
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
    kind = _file_kind(path) if not path.is_dir() and path.exists() else None
    json_path = path if kind in ("json", "jsonl") else None
    names = list(frame.column_names if isinstance(frame, pa.Table) else map(str, frame.columns))
    shape = data_format if data_format in SHAPED_FORMATS else detect_shape(names) if data_format == "auto" else None
    paired_as_kto = shape == "kto" and ("chosen" in names or "rejected" in names or columns.chosen in names)
    if paired_as_kto:
        shape, data_format = None, "auto"
    if shape is not None:
        frame, shape_details, rows = to_pairs(frame, shape, source, json_path, binarize_seed, columns.id,
                                              columns.prompt)  # fmt: skip
        details = {**details, **shape_details}
        columns, data_format, json_path = ColumnMap(id=columns.id), "auto", None
    try:
        pairs = _normalise(frame, source, digest, columns, details, data_format, kind == "csv", json_path)
    except DataError as exc:
        if shape != "kto":
            raise
        raise DataError(str(exc).replace("column 'chosen'", "column 'completion'"), hint=exc.hint) from None
    if shape is not None:
        pairs.rows = np.asarray(rows, dtype=np.int64)
    if paired_as_kto:
        pairs = unpair(pairs)
    del frame
    pa.default_memory_pool().release_unused()  # the readers' buffers: give them back before the checks run
    return pairs
