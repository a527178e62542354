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

import functools
import json
import logging
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefdiag import checks, saved_flags
from prefdiag.data import ColumnMap, PairData, load_pairs
from prefdiag.data.writeback import input_kind, write_file_atomically, write_rows
from prefdiag.errors import UsageError
from prefdiag.unpaired import SHAPE, later_copies, response_table

DEFAULT_RULES = ("identical", "empty_response", "empty_prompt", "boundary_mismatch", "duplicate", "conflict")
RESPONSE_DEFAULT_RULES = ("empty_response", "empty_prompt", "boundary_mismatch", "duplicate", "conflicting_label")
TOKENIZER_RULES = ("boundary_mismatch", "truncated", "dropped")  # flags a tokenizer gives
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1
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
    recorded = saved_flags.recorded_dataset(Path(from_run)) if from_run is not None else {}
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
        saved_flags.check_same_pairs(data, recorded, from_run)
    requested = tuple(dict.fromkeys(rules or (RESPONSE_DEFAULT_RULES if unpaired else DEFAULT_RULES)))
    features = functools.cache(lambda: checks.text_features(data.table))  # the text's hashes, computed once if needed
    table, origin = _flags(data, features, from_run, reference, policy, options, progress)
    removed, skipped = _removals(data, features, table, requested, default=rules is None, origin=origin)

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
    data: PairData, features: Callable[[], Any], from_run: str | None, reference: str | None, policy: str | None,
    options: Any, progress: Any,
):
    """The per-pair flags, aligned with data.table, and where they came from."""
    if from_run is not None:
        if reference is not None:
            raise UsageError("--from reads a saved run's flags; give it or --reference, not both")
        return saved_flags.saved_run_table(data, Path(from_run)), f"run {from_run}"
    if reference is not None:
        from prefdiag import api

        if policy:
            result = api.compare(data, reference, policy, options, progress)
        else:
            result = api.audit(data, reference, options, progress)
        return result.pairs.reset_index(drop=True), "scored with " + " and ".join(filter(None, (reference, policy)))
    if data.details.get("shape") == SHAPE:
        return response_table(data.table, features(), None, beta=1.0), "model-free checks"
    return checks.run_checks(data.table, features()), "model-free checks"


def _removals(
    data: PairData, features: Callable[[], Any], table: pd.DataFrame, rules: tuple[str, ...], *, default: bool,
    origin: str,
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """pair_id -> the rules that remove it, and the rules that could not run (with why)."""
    ids = data.table["pair_id"].tolist()
    unpaired = data.details.get("shape") == SHAPE
    removed: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    model_free = functools.cache(lambda: checks.run_checks(data.table, features()))  # a check a saved run lacks
    for rule in rules:
        if rule == "duplicate" and unpaired:
            flags = later_copies(features(), data.table["label"].to_numpy(bool))
        elif rule == "duplicate":
            flags = checks.later_copies(features())
        elif rule in table.columns and _is_flag(table[rule]):
            flags = table[rule].fillna(False).to_numpy(bool)
        elif rule in checks.CHECKS and not unpaired:
            flags = model_free()[rule].to_numpy(bool)
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
