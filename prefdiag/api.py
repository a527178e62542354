"""Library entry points: ``audit`` (a dataset against a reference) and ``compare`` (reference vs DPO policy).
Each loads the data, tokenizes as TRL does, scores every model through the on-disk cache, and returns a
:class:`RunResult` (the per-pair table and its summary) that can be gated and written without the CLI.

A model is a directory or hub id, or a model object already in memory (a ``PreTrainedModel`` or a ``PeftModel``),
scored in place. A PEFT policy's reference can be the same model with its adapter disabled: pass
``reference=AdapterDisabled(policy)`` (or ``reference=None``). The tokenizer is a name or an object; by default the
reference's (for an in-memory model, the directory it was loaded from).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from prefdiag import __version__
from prefdiag import checks
from prefdiag.ches import add_ches_columns, summarize_ches
from prefdiag.data import PairData, groups, load_pairs, with_python_objects
from prefdiag.diagnostics import SCHEMA_VERSION, add_pair_metrics, summarize, summarize_groups, verdict
from prefdiag.errors import ModelError, UsageError
from prefdiag.options import RunOptions, default_batch_tokens
from prefdiag.phases import phase
from prefdiag.result import RunResult, order_columns
from prefdiag import unpaired as unpaired_rows
from prefdiag.unpaired import SHAPE

__all__ = ["AdapterDisabled", "RunOptions", "RunResult", "audit", "compare"]

log = logging.getLogger(__name__)

# progress(kind, total) returns an advance(n) callback; the CLI plugs a rich progress bar in here. A factory that
# also takes a third argument is told what it counts ("responses" for unpaired KTO rows; "pairs" otherwise).
ProgressFactory = Callable[[str, int], Callable[[float], None]]
Model = Any  # a directory or hub id (str), a PreTrainedModel / PeftModel object, or an AdapterDisabled wrapper


def __getattr__(name: str):  # AdapterDisabled lives with the torch-side sources; import it only when asked for
    if name == "AdapterDisabled":
        from prefdiag.sources import AdapterDisabled

        return AdapterDisabled
    raise AttributeError(name)


def audit(
    data: str | PairData,
    reference: Model | None = None,
    options: RunOptions | None = None,
    progress: ProgressFactory | None = None,
    *,
    tokenizer: Any = None,
) -> RunResult:
    """Score a preference dataset under a reference model (model-free checks only when reference is None)."""
    return _run("audit", data, reference, None, options or RunOptions(), progress, tokenizer)


def compare(
    data: str | PairData,
    reference: Model | None,
    policy: Model,
    options: RunOptions | None = None,
    progress: ProgressFactory | None = None,
    *,
    tokenizer: Any = None,
) -> RunResult:
    """Score a preference dataset under a reference model and a DPO-trained policy. ``reference`` None (or
    ``AdapterDisabled(policy)``) with a PEFT policy object: the reference is the policy with its adapter disabled."""
    if reference is None:
        from prefdiag.sources import AdapterDisabled, is_peft_model

        if not is_peft_model(policy):
            raise UsageError("compare needs a reference (None is only for a PEFT policy: its adapter disabled)")
        reference = AdapterDisabled(policy)
    return _run("compare", data, reference, policy, options or RunOptions(), progress, tokenizer)


def _run(
    command: str,
    data: str | PairData,
    reference: Model | None,
    policy: Model | None,
    options: RunOptions,
    progress: ProgressFactory | None,
    tokenizer: Any,
) -> RunResult:
    options.validate()
    with phase("load_data"):
        pairs = data if isinstance(data, PairData) else load_pairs(
            data, split=options.split, columns=options.columns, data_format=options.data_format,
            binarize_seed=options.binarize_seed,
        )  # fmt: skip
    unpaired = pairs.details.get("shape") == SHAPE
    grouped = unpaired and options.group_by is not None
    view = groups.response_view(pairs.table) if grouped else pairs.table  # the names the user's table will have
    group_column = groups.group_column(view, options, "response_id" if unpaired else "pair_id")
    groups.check_group_column(view, group_column)
    with phase("model_free_checks"):
        features = checks.text_features(pairs.table)  # model-free checks: before any model is loaded
    provenance: dict[str, Any] = {"dataset": pairs.provenance()}
    scores, notes = None, {}
    if unpaired:  # rows are ties (chosen = rejected = the completion), scored once; CHES needs two responses
        options = dataclasses.replace(options, ches=False)
    if reference is not None:
        bars = _counting(progress, "responses") if unpaired else progress
        scores, model_provenance = _score(pairs, reference, policy, options, bars, tokenizer)
        notes = _tokenization_notes(model_provenance["tokenization"], "row" if unpaired else "pair")
        provenance.update(model_provenance)
    with phase("diagnostics"):
        if unpaired:
            table = unpaired_rows.response_table(pairs.table, features, scores, options.beta)
            summary = unpaired_rows.summarize(table, options.beta)
        else:
            table = _pair_table(pairs, features, scores, options)
            summary = summarize(table, options.beta)
            summary.update(summarize_ches(table, options.high_ches_share))
        summary.update(notes)
        summary["verdict"] = verdict(summary)
        if options.group_by is not None and unpaired:
            renamed = f"data_{group_column}"  # a data column named like one of prefdiag's was renamed
            column = renamed if renamed in table.columns else group_column
            summary["groups"] = summarize_groups(table, column, options.beta, unpaired_rows.summarize, ("prompt",))
        elif options.group_by is not None:
            summary["groups"] = summarize_groups(table, group_column, options.beta)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        **summary,
        "provenance": {
            "prefdiag_version": __version__,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            **provenance,
            "options": options.record(),
        },
    }
    return RunResult(with_python_objects(table if unpaired else order_columns(table)), summary)


def _counting(progress: ProgressFactory | None, unit: str) -> ProgressFactory | None:
    """The progress factory, told the unit it counts in when it takes one (see ProgressFactory)."""
    import inspect

    try:
        takes_unit = progress is not None and len(inspect.signature(progress).parameters) >= 3
    except (TypeError, ValueError):
        takes_unit = False
    return (lambda kind, total: progress(kind, total, unit)) if takes_unit else progress


def _pair_table(pairs: PairData, features, scores: pd.DataFrame | None, options: RunOptions) -> pd.DataFrame:
    """The per-pair table: ids, the scores, the data checks, the data's own columns, pair metrics and CHES."""
    table = pairs.table[["pair_id"]].copy()
    tokens = None
    if scores is not None:
        table = pd.concat([table, scores], axis=1)
        tokens = (scores["chosen_tokens"].to_numpy(), scores["rejected_tokens"].to_numpy())
    table = pd.concat([table, checks.run_checks(pairs.table, features, tokens)], axis=1)
    table = pd.concat([table, pairs.table.drop(columns=["pair_id"])], axis=1)
    table = add_pair_metrics(table, options.beta)
    return add_ches_columns(table, options.high_ches_share)


def _score(
    pairs: PairData,
    reference: Model,
    policy: Model | None,
    options: RunOptions,
    progress: ProgressFactory | None,
    tokenizer: Any,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Tokenize once, score under the reference (and the policy), return the log-prob columns and provenance."""
    from prefdiag import models
    from prefdiag.sources import LoadedModels

    from prefdiag import parallel

    device = models.resolve_device(options.device)
    parallel.init_from_launcher(device.type)  # under torchrun / accelerate launch: join the process group
    device = parallel.local_device(device)
    parallel.check_tp(options.tp)
    dtype = models.resolve_dtype(options.dtype, device)
    loaded = LoadedModels(options, device, dtype)
    sources = {"reference": _source("reference", reference, None, options, loaded)}
    if policy is not None:
        sources["policy"] = _source("policy", policy, reference, options, loaded)
    with phase("load_tokenizer"):
        given = tokenizer is not None and not isinstance(tokenizer, (str, Path))
        tokenizer = _tokenizer(tokenizer, reference, options)
        if options.chat_template:
            import copy

            from prefdiag.chat_templates import use_chat_template

            tokenizer = copy.deepcopy(tokenizer) if given else tokenizer  # the caller's object keeps its template
            use_chat_template(tokenizer, options.chat_template)
        _check_vocabularies(sources, tokenizer, options)
    tokenized = _tokenize(tokenizer, pairs.table, options, progress)
    columns = pd.DataFrame(
        {
            "prompt_tokens": tokenized.prompt_tokens,
            "chosen_tokens": tokenized.chosen_tokens,
            "rejected_tokens": tokenized.rejected_tokens,
        }
    )
    first = next(iter(sources.values()))
    provenance: dict[str, Any] = {"tokenization": tokenized.settings, "device": str(first.device)}
    provenance["world_size"] = parallel.world_size()
    passes = _ModelPasses(tokenized, options, progress)
    try:
        for label, source in sources.items():
            scores, extras, provenance[label] = passes.run(label, source)
            columns[f"{_PREFIX[label]}_chosen_logp"], columns[f"{_PREFIX[label]}_rejected_logp"] = scores
            for name in ("ches", "ches_norm"):
                if name in extras:
                    columns[name] = extras[name]
    finally:
        loaded.release()
    columns["truncated"] = tokenized.truncated
    columns["dropped"] = tokenized.dropped
    columns["boundary_mismatch"] = tokenized.boundary_mismatch
    return columns, provenance


_PREFIX = {"reference": "ref", "policy": "policy"}


def _tokenization_notes(settings: dict[str, Any], unit: str = "pair") -> dict[str, Any]:
    """Summary keys on how the tokenization may differ from the user's TRL run: ``n_over_trl_default_max_length``
    (None when --max-length was given) and ``tokenization_notes`` (one line each)."""
    from prefdiag.tokenization import settings_notes

    return {
        "n_over_trl_default_max_length": settings.get("n_over_trl_default_max_length"),
        "tokenization_notes": settings_notes(settings, unit),
    }


def _source(label: str, model: Model, reference: Model | None, options: RunOptions, loaded):
    """What to score for ``model``: an object in memory, a LoRA adapter directory on the reference's weights, or a
    directory / hub id (checked to exist before anything loads)."""
    from prefdiag import models
    from prefdiag.sources import AdapterDisabled, InMemoryModel, PathModel, is_in_memory

    if isinstance(model, AdapterDisabled):
        return InMemoryModel(label, model.model, adapter_disabled=True, hash_weights=options.hash_weights)
    if is_in_memory(model):
        return InMemoryModel(label, model, hash_weights=options.hash_weights)
    if not isinstance(model, (str, Path)):
        raise UsageError(f"{label}: expected a directory, a hub id or a model object, got {type(model).__name__}")
    name = str(model)
    if label == "policy" and isinstance(reference, (str, Path)) and models.is_adapter(name):
        return PathModel(label, str(reference), options.reference_revision, loaded, adapter=name)
    models.check_model_path(name, label)
    models.check_model_dir(name, label)
    revision = options.reference_revision if label == "reference" else options.policy_revision
    return PathModel(label, name, revision, loaded)


def _tokenizer(tokenizer: Any, reference: Model, options: RunOptions):
    """The tokenizer object given, else the one named (tokenizer=, options.tokenizer), else the reference's."""
    from prefdiag import models
    from prefdiag.sources import AdapterDisabled, is_in_memory

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    name = tokenizer or options.tokenizer
    revision = None
    if name is None and not is_in_memory(reference):
        name, revision = str(reference), options.reference_revision
    elif name is None:
        model = reference.model if isinstance(reference, AdapterDisabled) else reference
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        if not name or not Path(name).is_dir():
            raise ModelError(
                "an in-memory reference needs a tokenizer", hint="pass tokenizer= (a tokenizer object or a name)"
            )
    return models.load_tokenizer(str(name), revision=revision, trust_remote_code=options.trust_remote_code)


def _check_vocabularies(sources: dict[str, Any], tokenizer, options: RunOptions) -> None:
    """Refuse a policy whose vocabulary differs from the reference's (checked from configs when both are paths,
    from the embeddings when in memory), before any model is loaded."""
    from prefdiag import models
    from prefdiag.sources import InMemoryModel

    reference, policy = sources["reference"], sources.get("policy")
    if policy is None or getattr(policy, "adapter", None) is not None:
        return
    if not isinstance(reference, InMemoryModel) and not isinstance(policy, InMemoryModel):
        models.check_same_vocabulary(
            reference.name, policy.name, tokenizer, reference_revision=options.reference_revision,
            policy_revision=options.policy_revision, trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
        return
    sizes = {}
    for label, source in (("reference", reference), ("policy", policy)):
        if isinstance(source, InMemoryModel):
            sizes[label] = models.vocabulary_size(source.causal_lm)
        else:
            sizes[label] = models.config_vocabulary_size(source.name, trust_remote_code=options.trust_remote_code)
    if None not in sizes.values() and sizes["reference"] != sizes["policy"]:
        raise ModelError(
            f"the policy has a vocabulary of {sizes['policy']} tokens but the reference has {sizes['reference']}: "
            "log-probs are not comparable"
        )


def _tokenize(tokenizer, table: pd.DataFrame, options: RunOptions, progress: ProgressFactory | None):
    """The pairs tokenized as TRL does, or the ids a previous run saved for the same tokenizer, settings and text."""
    from prefdiag.cache import default_cache_dir, load_tokenized, save_tokenized
    from prefdiag.tokenization import template_columns, tokenization_key, tokenize_pairs

    with phase("tokenize"):
        texts = (list(table["prompt"]), list(table["chosen"]), list(table["rejected"]))
        extra = dict(template_columns(table), compat=options.compat, max_prompt_length=options.max_prompt_length)
        key = tokenization_key(tokenizer, *texts, max_length=options.max_length, **extra) if options.cache else None
    path = None if key is None else Path(options.cache_dir or default_cache_dir()) / "tokens" / f"{key}.npz"
    if path is not None:
        with phase("cache_io"):
            cached = load_tokenized(path)
        if cached is not None and len(cached) == len(table):
            log.info("token ids read from the cache (%s)", path.name)
            return cached
    advance = progress("tokenizing", len(table)) if progress else None
    with phase("tokenize"):
        tokenized = tokenize_pairs(tokenizer, *texts, max_length=options.max_length, progress=advance, **extra)
    if path is not None:
        try:
            with phase("cache_io"):
                save_tokenized(path, tokenized)
        except OSError as exc:  # a cache that cannot be written costs speed, not the run
            log.warning("cannot save token ids to the cache: %s", exc)
    return tokenized


class _ModelPasses:
    """One scoring pass per model, read top to bottom: the model's cache identity, the engine on the model
    (loaded only if some pair is not cached), the cache around it, the scores and the pass's report record."""

    def __init__(self, tokenized, options: RunOptions, progress: ProgressFactory | None) -> None:
        from prefdiag.cache import pair_keys

        self.tokenized, self.options, self.progress = tokenized, options, progress
        with phase("cache_io"):
            self.keys = pair_keys(tokenized.prompt_ids, tokenized.chosen_ids, tokenized.rejected_ids)

    def run(self, label: str, source) -> tuple[tuple[Any, Any], dict[str, Any], dict[str, Any]]:
        """Score every pair under ``source``; returns (chosen, rejected), the engine's further per-pair columns
        (CHES, on the reference pass) and the provenance record."""
        from prefdiag.cache import LogProbCache, default_cache_dir, model_key
        from prefdiag.scorers import CachedScorer, ModelScorer
        from prefdiag.scoring import ScoreSettings

        options = self.options
        settings = ScoreSettings(
            batch_tokens=options.batch_tokens or default_batch_tokens(source.device.type), layout=options.layout,
            ches=options.ches and label == "reference",  # CHES is the reference's, from the same forward pass
        )  # fmt: skip
        bar = (lambda total: self.progress(f"scoring {label}", total)) if self.progress else None
        engine = ModelScorer(source, settings, bar)
        identity = source.identity()
        scorer = engine
        if options.cache and identity is not None:
            cache = LogProbCache(Path(options.cache_dir or default_cache_dir()), model_key(identity), identity)
            scorer = CachedScorer(engine, cache, self.keys, extras=_wanted_extras(settings))
        elif options.cache:
            log.info("%s: an in-memory model too large to fingerprint cheaply is not cached", label)
        from prefdiag import parallel

        scorer = parallel.distribute(scorer, bar, options.tp)  # several processes: each scores its share
        scores = scorer.score(self.tokenized)
        if not engine.record:
            log.info("%s: all %d pairs found in the cache; model not loaded", label, len(self.tokenized))
        record = {
            **(identity or {}),
            "device": str(source.device),
            "pairs_from_cache": getattr(scorer, "pairs_from_cache", 0),
            **(getattr(scorer, "record", None) or engine.record),
            "tensor_parallel_size": options.tp,
        }
        return scores, dict(scorer.extras), record


def _wanted_extras(settings) -> tuple[str, ...]:
    """The engine's further per-pair columns these settings ask for (CHES when the engine computes it)."""
    return ("ches", "ches_norm") if getattr(settings, "ches", False) else ()
