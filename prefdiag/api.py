"""Library entry points: ``audit`` (a dataset against a reference) and ``compare`` (reference vs DPO policy).
Each loads data and models, tokenizes as TRL does, scores, and returns the per-pair table with its summary.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from prefdiag import __version__
from prefdiag import checks
from prefdiag.data import DATA_FORMATS, ColumnMap, PairData, load_pairs, with_python_objects
from prefdiag.diagnostics import SCHEMA_VERSION, add_pair_metrics, summarize, summarize_groups, verdict
from prefdiag.errors import UsageError

log = logging.getLogger(__name__)

# progress(kind, total) returns an advance(n) callback; the CLI plugs a rich progress bar in here.
ProgressFactory = Callable[[str, int], Callable[[float], None]]


@dataclass
class RunOptions:
    """Everything about a run that is not the data or the model names."""

    beta: float = 0.1
    dtype: str = "auto"
    device: str = "auto"
    max_length: int | None = None
    batch_tokens: int | None = None  # None: a default per device
    shard: bool = False  # spread each model over every visible GPU (device_map="auto"), for models larger than one
    layout: str = "prefix"  # prefix | packed | separate (see prefdiag.scoring); never changes the numbers
    tokenizer: str | None = None
    reference_revision: str | None = None
    policy_revision: str | None = None
    trust_remote_code: bool = False
    split: str | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)
    cache: bool = True  # reuse and save per-pair log-probs on disk (see prefdiag.cache)
    cache_dir: str | None = None
    data_format: str = "auto"  # auto | standard | conversational | hh (see prefdiag.data)
    group_by: str | None = None  # a data column: summary["groups"] holds the metrics per value

    def validate(self) -> None:
        if self.data_format not in DATA_FORMATS:
            raise UsageError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if not self.beta > 0:
            raise UsageError(f"--beta must be > 0, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise UsageError(f"--batch-tokens must be positive, got {self.batch_tokens}")
        if self.layout != RunOptions.layout:
            from prefdiag.scoring import LAYOUTS  # imports torch: only when a layout was asked for

            if self.layout not in LAYOUTS:
                raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")


@dataclass
class RunResult:
    """The per-pair table (one row per input pair, input order) and the summary written to summary.json."""

    pairs: pd.DataFrame
    summary: dict[str, Any]


def audit(
    data: str | PairData,
    reference: str | None = None,
    options: RunOptions | None = None,
    progress: ProgressFactory | None = None,
) -> RunResult:
    """Score a preference dataset under a reference model (model-free checks only when reference is None)."""
    return _run("audit", data, reference, None, options or RunOptions(), progress)


def compare(
    data: str | PairData,
    reference: str,
    policy: str,
    options: RunOptions | None = None,
    progress: ProgressFactory | None = None,
) -> RunResult:
    """Score a preference dataset under a reference model and a DPO-trained policy."""
    return _run("compare", data, reference, policy, options or RunOptions(), progress)


def _run(
    command: str,
    data: str | PairData,
    reference: str | None,
    policy: str | None,
    options: RunOptions,
    progress: ProgressFactory | None,
) -> RunResult:
    options.validate()
    pairs = data if isinstance(data, PairData) else load_pairs(
        data, split=options.split, columns=options.columns, data_format=options.data_format
    )
    _check_group_column(pairs.table, options.group_by)
    features = checks.text_features(pairs.table)  # model-free checks: before any model is loaded
    table = pairs.table[["pair_id"]].copy()
    provenance: dict[str, Any] = {"dataset": pairs.provenance()}
    tokens = None
    if reference is not None:
        scores, model_provenance = _score(pairs, reference, policy, options, progress)
        table = pd.concat([table, scores], axis=1)
        provenance.update(model_provenance)
        tokens = (scores["chosen_tokens"].to_numpy(), scores["rejected_tokens"].to_numpy())
    table = pd.concat([table, checks.run_checks(pairs.table, features, tokens)], axis=1)
    extras = pairs.table.drop(columns=["pair_id"])
    table = pd.concat([table, extras], axis=1)
    table = add_pair_metrics(table, options.beta)
    summary = summarize(table, options.beta)
    summary["verdict"] = verdict(summary)
    if options.group_by is not None:
        summary["groups"] = summarize_groups(table, options.group_by, options.beta)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        **summary,
        "provenance": {
            "prefdiag_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            **provenance,
            "options": _options_record(options),
        },
    }
    return RunResult(with_python_objects(_order_columns(table)), summary)


def _score(
    pairs: PairData,
    reference: str,
    policy: str | None,
    options: RunOptions,
    progress: ProgressFactory | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Tokenize once, score under the reference (and the policy), return the log-prob columns and provenance."""
    from prefdiag import models

    device = models.resolve_device(options.device)
    dtype = models.resolve_dtype(options.dtype, device)
    models.check_model_path(reference, "reference")
    adapter = policy if policy is not None and models.is_adapter(policy) else None
    if policy is not None and adapter is None:
        models.check_model_path(policy, "policy")
    tokenizer = models.load_tokenizer(
        options.tokenizer or reference,
        revision=None if options.tokenizer else options.reference_revision,
        trust_remote_code=options.trust_remote_code,
    )
    if policy is not None and adapter is None:
        models.check_same_vocabulary(
            reference, policy, tokenizer, reference_revision=options.reference_revision,
            policy_revision=options.policy_revision, trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
    tokenized = _tokenize(tokenizer, pairs.table, options, progress)
    columns = pd.DataFrame(
        {
            "prompt_tokens": tokenized.prompt_tokens,
            "chosen_tokens": tokenized.chosen_tokens,
            "rejected_tokens": tokenized.rejected_tokens,
        }
    )
    scorer = _ModelPasses(tokenized, options, device, dtype, progress)
    provenance: dict[str, Any] = {"tokenization": tokenized.settings, "device": str(device)}
    provenance["reference"] = scorer.run("reference", reference, options.reference_revision)
    if policy is not None:
        if adapter is not None:
            provenance["policy"] = scorer.run("policy", reference, options.reference_revision, adapter=adapter)
        else:
            provenance["policy"] = scorer.run("policy", policy, options.policy_revision)
    scorer.release()
    columns["ref_chosen_logp"], columns["ref_rejected_logp"] = scorer.results["reference"]
    if policy is not None:
        columns["policy_chosen_logp"], columns["policy_rejected_logp"] = scorer.results["policy"]
    columns["truncated"] = tokenized.truncated
    columns["dropped"] = tokenized.dropped
    columns["boundary_mismatch"] = tokenized.boundary_mismatch
    return columns, provenance


def _tokenize(tokenizer, table: pd.DataFrame, options: RunOptions, progress: ProgressFactory | None):
    """The pairs tokenized as TRL does, or the ids a previous run saved for the same tokenizer, settings and text."""
    from prefdiag.cache import default_cache_dir, load_tokenized, save_tokenized
    from prefdiag.tokenization import tokenization_key, tokenize_pairs

    texts = (list(table["prompt"]), list(table["chosen"]), list(table["rejected"]))
    key = tokenization_key(tokenizer, *texts, max_length=options.max_length) if options.cache else None
    path = None if key is None else Path(options.cache_dir or default_cache_dir()) / "tokens" / f"{key}.npz"
    if path is not None and (cached := load_tokenized(path)) is not None and len(cached) == len(table):
        log.info("token ids read from the cache (%s)", path.name)
        return cached
    advance = progress("tokenizing", len(table)) if progress else None
    tokenized = tokenize_pairs(tokenizer, *texts, max_length=options.max_length, progress=advance)
    if path is not None:
        try:
            save_tokenized(path, tokenized)
        except OSError as exc:  # a cache that cannot be written costs speed, not the run
            log.warning("cannot save token ids to the cache: %s", exc)
    return tokenized


class _ModelPasses:
    """One scoring pass per model, through the on-disk cache: cached pairs are not scored again, finished batches
    are saved as they complete (so an interrupted run resumes), and a fully cached model is never loaded. A LoRA
    policy reuses the reference's weights already in memory, with the adapter attached."""

    def __init__(self, tokenized, options: RunOptions, device, dtype, progress: ProgressFactory | None) -> None:
        from prefdiag.cache import pair_keys

        self.tokenized, self.options, self.device, self.dtype, self.progress = (
            tokenized, options, device, dtype, progress
        )  # fmt: skip
        self.keys = pair_keys(tokenized.prompt_ids, tokenized.chosen_ids, tokenized.rejected_ids)
        self.results: dict[str, tuple[Any, Any]] = {}
        self.loaded = None  # the model in memory, kept for a LoRA policy on the same base

    def run(self, label: str, name: str, revision: str | None, adapter: str | None = None) -> dict[str, Any]:
        import numpy as np

        from prefdiag import models
        from prefdiag.cache import LogProbCache, default_cache_dir, model_key
        from prefdiag.scoring import LogProbScorer, ScoreSettings

        options, tokenized = self.options, self.tokenized
        identity = models.model_identity(
            name, dtype=self.dtype, device=self.device, revision=revision,
            trust_remote_code=options.trust_remote_code, adapter=adapter,
        )  # fmt: skip
        n = len(tokenized)
        chosen, rejected = np.full(n, np.nan), np.full(n, np.nan)
        cache = None
        if options.cache:
            cache = LogProbCache(Path(options.cache_dir or default_cache_dir()), model_key(identity), identity)
            cached = cache.load()
            for i, key in enumerate(self.keys):
                if key in cached and not tokenized.dropped[i]:
                    chosen[i], rejected[i] = cached[key]
        todo = np.flatnonzero(np.isnan(chosen) & ~tokenized.dropped)
        record: dict[str, Any] = {
            **identity,
            "device": str(self.device),
            "pairs_from_cache": int(n - tokenized.dropped.sum() - len(todo)),
        }
        self.results[label] = (chosen, rejected)
        if len(todo) == 0:
            log.info("%s: all %d pairs found in the cache; model not loaded", label, n)
            return record

        if self.loaded is None or self.loaded.name != name or adapter is None:
            self.release()
            self.loaded = models.load_model(
                name, dtype=self.dtype, device=self.device, revision=revision,
                trust_remote_code=options.trust_remote_code, what=label, shard=options.shard,
            )  # fmt: skip
        model = models.attach_adapter(self.loaded, adapter) if adapter is not None else self.loaded
        record.update(model.provenance())
        settings = ScoreSettings(
            batch_tokens=options.batch_tokens or (16384 if self.device.type == "cuda" else 4096),
            layout=options.layout,
        )
        advance = self.progress(f"scoring {label}", len(todo)) if self.progress else None

        def save(done, done_chosen, done_rejected, extras) -> None:
            if cache is not None:
                cache.add([self.keys[i] for i in done], done_chosen, done_rejected)

        scorer = LogProbScorer(model.model, settings)
        try:
            scored_c, scored_r = scorer.score(tokenized, advance, todo, save)
        finally:
            if cache is not None:
                cache.flush()
        computed = scorer.tokens["computed"]
        record.update(
            layout=scorer.settings.layout,
            batch_tokens=scorer.settings.batch_tokens,  # smaller than asked for after an out-of-memory
            first_batch_seconds=round(scorer.first_batch_seconds, 3),
            padding_fraction=round(1 - scorer.tokens["real"] / computed, 4) if computed else 0.0,
        )
        chosen[todo], rejected[todo] = scored_c[todo], scored_r[todo]
        return record

    def release(self) -> None:
        """Free the model in memory (and the GPU cache) before the next one is loaded."""
        if self.loaded is None:
            return
        device = self.loaded.device
        self.loaded = None
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


MAX_GROUPS = 1000


def _check_group_column(table: pd.DataFrame, column: str | None) -> None:
    """--group-by must name a data column of plain values with at most MAX_GROUPS distinct values."""
    if column is None:
        return
    if column not in table.columns:
        raise UsageError(
            f"--group-by: no column {column!r}; the columns are: {', '.join(map(str, table.columns))}"
        )
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


def _options_record(options: RunOptions) -> dict[str, Any]:
    record = asdict(options)
    record["columns"] = asdict(options.columns)
    return record


_LEADING = [
    "pair_id",
    "prompt_tokens",
    "chosen_tokens",
    "rejected_tokens",
    "ref_chosen_logp",
    "ref_rejected_logp",
    "ref_margin",
    "ref_prefers_rejected",
    "policy_chosen_logp",
    "policy_rejected_logp",
    "policy_margin",
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "dpo_loss",
    "negative_margin_regime",
    "chosen_displaced",
    "both_displaced",
    "likely_mislabeled",
    "mislabel_score",
    "truncated",
    "dropped",
    "boundary_mismatch",
    *checks.CHECKS,
    *checks.SCORES,
]


def _order_columns(table: pd.DataFrame) -> pd.DataFrame:
    leading = [c for c in _LEADING if c in table.columns]
    return table[leading + [c for c in table.columns if c not in leading]]
