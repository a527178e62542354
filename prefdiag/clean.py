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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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
    default). With ``from_run``, data read into other pairs than the run's (another shape, or rated data binarised
    with another seed) is refused: the flags joined by pair_id would be another pair's."""
    source_path, output_path = Path(source), Path(output)
    input_kind(source_path)  # a local file or save_to_disk directory, else one clear line now
    if output_path.resolve() == source_path.resolve():
        raise UsageError(f"--output {output}: is the input itself; write the cleaned data elsewhere")
    recorded = _recorded_dataset(Path(from_run)) if from_run is not None else {}
    read: dict[str, Any] = {"split": split, "columns": columns, "data_format": data_format}
    if options is not None:
        options.validate()
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
    """The saved run's per-pair table (per-response for KTO rows), in the order of data.table."""
    name, key = ("responses", "response_id") if data.details.get("shape") == SHAPE else ("pairs", "pair_id")
    candidates = [out_dir / f"{name}.{ext}" for ext in ("parquet", "jsonl", "csv")]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise UsageError(f"--from {out_dir}: no {name}.parquet (nor {name}.jsonl, {name}.csv) from a prefdiag run")
    try:
        if path.suffix == ".parquet":
            pairs = pd.read_parquet(path)
        elif path.suffix == ".jsonl":
            pairs = pd.read_json(path, lines=True, dtype={key: str})
        else:
            pairs = pd.read_csv(path, dtype={key: str}, keep_default_na=False)
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
    return pairs.drop_duplicates(key).set_index(key).loc[ids.tolist()].reset_index()


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
