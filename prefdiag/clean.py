"""`prefdiag clean`: the dataset written back in its own format and columns, minus the pairs the chosen rules
remove, with a manifest of which pairs were removed and by which rule.

Rules are boolean per-pair flags. By default the broken pairs go: ``identical``, ``empty_response``,
``empty_prompt``, ``boundary_mismatch`` (when a tokenizer was run), ``duplicate`` (every copy but the first) and
``conflict``. Any other boolean column of the per-pair table may be named (``reversed_pair``, ``likely_mislabeled``,
``ref_prefers_rejected``, ``high_ches``...): those come from a saved run (``from_run``, its pairs.parquet joined by
pair_id) or from scoring here with a reference (and policy). Cleaning a cleaned file with the model-free rules
removes nothing (one copy of each duplicate stays).

Unpaired KTO rows are cleaned by their per-response flags (prefdiag.unpaired): by default ``empty_response``,
``empty_prompt``, ``boundary_mismatch``, ``duplicate`` (the same prompt, completion and label; every copy but the
first) and ``conflicting_label``; or any boolean column of the responses table (``desirable_displaced``...), a
saved run's responses.parquet joined by response_id."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefdiag import checks
from prefdiag.data import ColumnMap, PairData, load_pairs
from prefdiag.data.writeback import input_kind, write_file_atomically, write_rows
from prefdiag.errors import DataError, UsageError, first_line
from prefdiag.unpaired import SHAPE, later_copies, response_table

DEFAULT_RULES = ("identical", "empty_response", "empty_prompt", "boundary_mismatch", "duplicate", "conflict")
RESPONSE_DEFAULT_RULES = ("empty_response", "empty_prompt", "boundary_mismatch", "duplicate", "conflicting_label")
TOKENIZER_RULES = ("boundary_mismatch", "truncated", "dropped")  # flags a tokenizer gives
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
# The text a saved run's table holds for each row, as the data's columns: compared with the data read now, so flags
# joined by pair_id (response_id) are this row's. Saved column -> column of the loaded data.table.
PAIR_TEXT = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
RESPONSE_TEXT = {"prompt": "prompt", "completion": "chosen", "label": "label"}  # KTO rows: chosen is the completion
# RunOptions fields that only change scoring here, and the flag that sets each: with --from they have no effect.
SCORING_FLAGS = {"beta": "--beta", "max_length": "--max-length", "dtype": "--dtype", "device": "--device",
                 "tokenizer": "--tokenizer", "reference_revision": "--reference-revision",
                 "trust_remote_code": "--trust-remote-code", "chat_template": "--chat-template",
                 "compat": "--compat", "max_prompt_length": "--max-prompt-length", "cache": "--no-cache",
                 "cache_dir": "--cache-dir"}  # fmt: skip

log = logging.getLogger(__name__)


@dataclass
class CleanResult:
    """What clean wrote: the output, its manifest, and the removed pairs with the rules that removed each."""

    output: Path
    manifest: Path
    n_pairs: int  # rows of the data as read: pairs, or responses for unpaired KTO rows
    removed: dict[str, list[str]] = field(default_factory=dict)  # pair_id (response_id) -> rules
    skipped_rules: dict[str, str] = field(default_factory=dict)  # rule -> why it did not run
    unit: str = "pair"  # "response" for unpaired KTO rows

    @property
    def n_removed(self) -> int:
        return len(self.removed)


def manifest_path(output: Path) -> Path:
    """Where the manifest of a cleaned output is written: beside it, named after it."""
    return output.with_name(output.name + MANIFEST_SUFFIX)


def clean(
    source: str,
    output: str,
    *,
    rules: tuple[str, ...] | None = None,
    from_run: str | None = None,
    reference: str | None = None,
    policy: str | None = None,
    options: Any | None = None,
    split: str | None = None,
    columns: ColumnMap | None = None,
    data_format: str = "auto",
    progress: Any | None = None,
) -> CleanResult:
    """Write ``source`` to ``output`` without the pairs the rules flag, and the manifest beside it.

    ``rules``: flags to remove by (default DEFAULT_RULES); ``from_run``: a saved run's output directory whose per-pair
    table gives the flags; ``reference`` (and ``policy``) with ``options`` (api.RunOptions): score here instead.
    ``options`` also says how the data is read (split, columns, data format, binarize seed); without it, ``split``,
    ``columns`` and ``data_format`` do, and rated data is binarised with ``from_run``'s recorded seed (else the
    default). With ``from_run``, data read into other pairs than the run's (another shape, rated data binarised
    with another seed, or text other than the run's table holds: another file, the file edited, other column or
    format options) is refused: the flags joined by pair_id would be another pair's. Scoring options given with it
    have no effect and are named in one warning."""
    source_path, output_path = Path(source), Path(output)
    input_kind(source_path)  # a local file or save_to_disk directory, else one clear line now
    if output_path.resolve() == source_path.resolve():
        raise UsageError(f"--output {output}: is the input itself; write the cleaned data elsewhere")
    recorded = _recorded_dataset(Path(from_run)) if from_run is not None else {}
    read: dict[str, Any] = {"split": split, "columns": columns, "data_format": data_format}
    if options is not None:
        options.validate()
        if from_run is not None:
            _warn_ignored(options, policy, from_run)
        read = {"split": options.split, "columns": options.columns, "data_format": options.data_format,
                "binarize_seed": options.binarize_seed}  # fmt: skip
    elif "binarize_seed" in recorded:
        read["binarize_seed"] = recorded["binarize_seed"]
    data = load_pairs(source, **read)
    unpaired = data.details.get("shape") == SHAPE
    if unpaired and data.details.get("unpaired_from_pairs"):
        raise UsageError(f"clean {source}: paired data read as KTO rows cannot be written back row by row; clean it "
                         "as pairs (without --data-format kto)")  # fmt: skip
    if from_run is not None:
        _check_same_pairs(data, recorded, from_run)
    requested = tuple(dict.fromkeys(rules or (RESPONSE_DEFAULT_RULES if unpaired else DEFAULT_RULES)))
    table, origin = _flags(data, from_run, reference, policy, options, progress)
    removed, skipped = _removals(data, table, requested, default=rules is None, origin=origin)

    keep = np.ones(_n_input_rows(data), dtype=bool)
    rows = data.input_rows()
    ids = data.table["pair_id"].tolist()
    for position, pair_id in enumerate(ids):
        if pair_id in removed:
            keep[rows[position]] = False
    write_rows(source_path, output_path, keep, data.details.get("split"))
    result = CleanResult(output_path, manifest_path(output_path), len(ids), removed, skipped,
                         "response" if unpaired else "pair")  # fmt: skip
    _write_manifest(result, source, requested, origin, ids, rows)
    return result


def _warn_ignored(options: Any, policy: str | None, from_run: str) -> None:
    """One warning naming the scoring options given (set off their RunOptions defaults) that --from makes moot."""
    defaults = {f.name: f.default for f in dataclass_fields(options) if f.name in SCORING_FLAGS}
    ignored = [flag for name, flag in SCORING_FLAGS.items() if getattr(options, name) != defaults[name]]
    if policy is not None:
        ignored.append("--policy")
    if ignored:
        log.warning("--from %s: ignoring %s: the flags come from the saved run, nothing is scored here", from_run,
                    ", ".join(ignored))  # fmt: skip


def _n_input_rows(data: PairData) -> int:
    return int(data.details.get("n_input_rows", len(data.table)))


def _flags(
    data: PairData, from_run: str | None, reference: str | None, policy: str | None, options: Any, progress: Any
):
    """The per-pair flags, aligned with data.table, and where they came from."""
    if from_run is not None:
        if reference is not None:
            raise UsageError("--from reads a saved run's flags; give it or --reference, not both")
        return _saved_run(data, Path(from_run)), f"run {from_run}"
    if reference is not None:
        from prefdiag import api

        if policy:
            result = api.compare(data, reference, policy, options, progress)
        else:
            result = api.audit(data, reference, options, progress)
        return result.pairs.reset_index(drop=True), "scored with " + " and ".join(filter(None, (reference, policy)))
    if data.details.get("shape") == SHAPE:
        return response_table(data.table, checks.text_features(data.table), None, beta=1.0), "model-free checks"
    return checks.run_checks(data.table), "model-free checks"


def recorded_binarize_seed(from_run: str) -> int | None:
    """The seed a saved run binarised its data with, as its summary.json records it; None without one."""
    return _recorded_dataset(Path(from_run)).get("binarize_seed")


def _recorded_dataset(out_dir: Path) -> dict[str, Any]:
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


def _check_same_pairs(data: PairData, recorded: dict[str, Any], from_run: str) -> None:
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


def _saved_run(data: PairData, out_dir: Path) -> pd.DataFrame:
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


def _removals(
    data: PairData, table: pd.DataFrame, rules: tuple[str, ...], *, default: bool, origin: str
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """pair_id -> the rules that remove it, and the rules that could not run (with why)."""
    ids = data.table["pair_id"].tolist()
    unpaired = data.details.get("shape") == SHAPE
    removed: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for rule in rules:
        if rule == "duplicate" and unpaired:
            flags = later_copies(checks.text_features(data.table), data.table["label"].to_numpy(bool))
        elif rule == "duplicate":
            flags = checks.later_copies(checks.text_features(data.table))
        elif rule in table.columns and _is_flag(table[rule]):
            flags = table[rule].fillna(False).to_numpy(bool)
        elif rule in checks.CHECKS and not unpaired:
            flags = checks.run_checks(data.table)[rule].to_numpy(bool)
        elif default and rule in TOKENIZER_RULES:
            skipped[rule] = "needs a tokenizer: give --reference or --from a run with a model"
            continue
        else:
            available = sorted(c for c in table.columns if _is_flag(table[c])) + ["duplicate"]
            raise UsageError(f"clean: no boolean flag {rule!r} in the per-{'response' if unpaired else 'pair'} table "
                             f"({origin}); flags: "
                             f"{', '.join(sorted(set(available)))}")  # fmt: skip
        for position in np.flatnonzero(flags):
            removed.setdefault(ids[position], []).append(rule)
    return removed, skipped


def _is_flag(column: pd.Series) -> bool:
    return pd.api.types.is_bool_dtype(column) or (
        column.dtype == object and column.dropna().map(lambda v: isinstance(v, (bool, np.bool_))).all()
    )


def _write_manifest(
    result: CleanResult, source: str, rules: tuple[str, ...], origin: str, ids: list[str], rows: np.ndarray
) -> None:
    counts = {rule: sum(rule in r for r in result.removed.values()) for rule in rules
              if rule not in result.skipped_rules}  # fmt: skip
    position = {pair_id: i for i, pair_id in enumerate(ids)}
    in_order = sorted(result.removed, key=position.__getitem__)
    key = f"{result.unit}_id"
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "source": str(source),
        "output": str(result.output),
        "flags_from": origin,
        "rules": list(rules),
        "skipped_rules": result.skipped_rules,
        f"n_{result.unit}s": result.n_pairs,
        "n_removed": result.n_removed,
        "n_kept": result.n_pairs - result.n_removed,
        "removed_by_rule": counts,
        "removed": [
            {key: pair_id, "row": int(rows[position[pair_id]]) + 1, "rules": result.removed[pair_id]}
            for pair_id in in_order
        ],
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    write_file_atomically(result.manifest, lambda out: out.write(text.encode("utf-8")))
