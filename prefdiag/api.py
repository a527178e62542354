"""Library entry points: ``audit`` (a dataset against a reference) and ``compare`` (reference vs DPO policy).
Each loads data and models, tokenizes as TRL does, scores, and returns the per-pair table with its summary.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from prefdiag import __version__
from prefdiag.data import ColumnMap, PairData, load_pairs
from prefdiag.diagnostics import SCHEMA_VERSION, add_pair_metrics, summarize, verdict
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
    layout: str = "prefix"
    tokenizer: str | None = None
    reference_revision: str | None = None
    policy_revision: str | None = None
    trust_remote_code: bool = False
    split: str | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)

    def validate(self) -> None:
        if not self.beta > 0:
            raise UsageError(f"--beta must be > 0, got {self.beta}")
        if self.max_length is not None and self.max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise UsageError(f"--batch-tokens must be positive, got {self.batch_tokens}")


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
    pairs = data if isinstance(data, PairData) else load_pairs(data, split=options.split, columns=options.columns)
    table = pairs.table[["pair_id"]].copy()
    provenance: dict[str, Any] = {"dataset": pairs.provenance()}
    if reference is not None:
        scores, model_provenance = _score(pairs, reference, policy, options, progress)
        table = pd.concat([table, scores], axis=1)
        provenance.update(model_provenance)
    extras = pairs.table.drop(columns=["pair_id"])
    table = pd.concat([table, extras], axis=1)
    table = add_pair_metrics(table, options.beta)
    summary = summarize(table, options.beta)
    summary["verdict"] = verdict(summary)
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
    return RunResult(_order_columns(table), summary)


def _score(
    pairs: PairData,
    reference: str,
    policy: str | None,
    options: RunOptions,
    progress: ProgressFactory | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Tokenize once, score under the reference (and the policy), return the log-prob columns and provenance."""
    import torch

    from prefdiag import models
    from prefdiag.scoring import LogProbScorer, ScoreSettings
    from prefdiag.tokenization import tokenize_pairs

    device = models.resolve_device(options.device)
    dtype = models.resolve_dtype(options.dtype, device)
    models.check_model_path(reference, "reference")
    if policy is not None:
        models.check_model_path(policy, "policy")
    tokenizer = models.load_tokenizer(
        options.tokenizer or reference,
        revision=None if options.tokenizer else options.reference_revision,
        trust_remote_code=options.trust_remote_code,
    )
    table = pairs.table
    tokenized = tokenize_pairs(
        tokenizer, list(table["prompt"]), list(table["chosen"]), list(table["rejected"]), max_length=options.max_length
    )
    settings = ScoreSettings(
        batch_tokens=options.batch_tokens or (16384 if device.type == "cuda" else 4096), layout=options.layout
    )
    columns = pd.DataFrame(
        {
            "prompt_tokens": tokenized.prompt_tokens,
            "chosen_tokens": tokenized.chosen_tokens,
            "rejected_tokens": tokenized.rejected_tokens,
        }
    )
    if policy is not None:
        models.check_same_vocabulary(
            reference, policy, tokenizer, reference_revision=options.reference_revision,
            policy_revision=options.policy_revision, trust_remote_code=options.trust_remote_code,
        )  # fmt: skip
    runs = [("ref", reference, options.reference_revision)]
    if policy is not None:
        runs.append(("policy", policy, options.policy_revision))
    provenance: dict[str, Any] = {"tokenization": tokenized.settings, "device": str(device)}
    for prefix, name, revision in runs:
        loaded = models.load_model(
            name,
            dtype=dtype,
            device=device,
            revision=revision,
            trust_remote_code=options.trust_remote_code,
            what="reference" if prefix == "ref" else "policy",
        )
        label = "reference" if prefix == "ref" else "policy"
        advance = progress(f"scoring {label}", len(tokenized)) if progress else None
        chosen, rejected = LogProbScorer(loaded.model, settings).score(tokenized, advance)
        columns[f"{prefix}_chosen_logp"] = chosen
        columns[f"{prefix}_rejected_logp"] = rejected
        provenance["reference" if prefix == "ref" else "policy"] = loaded.provenance()
        del loaded  # free one model before the next is loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    columns["truncated"] = tokenized.truncated
    columns["dropped"] = tokenized.dropped
    columns["boundary_mismatch"] = tokenized.boundary_mismatch
    return columns, provenance


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
    "truncated",
    "dropped",
    "boundary_mismatch",
]


def _order_columns(table: pd.DataFrame) -> pd.DataFrame:
    leading = [c for c in _LEADING if c in table.columns]
    return table[leading + [c for c in table.columns if c not in leading]]
