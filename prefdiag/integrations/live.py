"""Scoring a live policy (and reference) already in memory, through the library's own path: the pairs tokenized
as TRL does once, LogProbScorer on each module in turn, then diagnostics; under torch.distributed each process scores
its share of the pairs through prefdiag.parallel.DistributedScorer, as prefdiag compare does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from prefdiag import parallel
from prefdiag.diagnostics import add_pair_metrics, summarize
from prefdiag.scoring import LogProbScorer, ScoreSettings
from prefdiag.tokenization import TokenizedPairs, tokenize_pairs

LIVE_BATCH_TOKENS = 2048  # padded tokens per scoring forward: small, so scoring adds little memory to training


def tokenize_eval_pairs(
    tokenizer, prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any], max_length: int | None
) -> TokenizedPairs:
    """The eval pairs tokenized once, as TRL's DPOTrainer tokenizes them (token ids do not change in training)."""
    return tokenize_pairs(tokenizer, list(prompts), list(chosen), list(rejected), max_length=max_length)


@contextlib.contextmanager
def scoring_mode(module: torch.nn.Module):
    """Eval mode (no dropout) for the duration; the module's train/eval mode of every submodule is restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def score_live(
    policy: torch.nn.Module,
    tokenized: TokenizedPairs,
    beta: float,
    *,
    reference: torch.nn.Module | None = None,
    reference_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ref_logps: tuple[np.ndarray, np.ndarray] | None = None,
    pair_ids: Sequence[Any] | None = None,
    batch_tokens: int = LIVE_BATCH_TOKENS,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-pair table and summary of ``policy`` against a reference: a module (``reference``, or ``policy`` itself
    inside ``reference_context()``, e.g. a PEFT model with its adapter disabled) or precomputed ``ref_logps``.
    Under torch.distributed each rank scores its token-balanced share and every rank gets the same full result.
    The numbers are those of ``prefdiag compare`` on the same weights (see api.compare)."""
    n = len(tokenized)
    settings = ScoreSettings(batch_tokens=batch_tokens)
    gathered: dict[str, np.ndarray] = {}
    with scoring_mode(policy):
        gathered["policy_chosen_logp"], gathered["policy_rejected_logp"] = _score_shared(policy, tokenized, settings)
        if ref_logps is None:
            with reference_context():
                module = reference if reference is not None else policy
                with scoring_mode(module):
                    gathered["ref_chosen_logp"], gathered["ref_rejected_logp"] = _score_shared(
                        module, tokenized, settings
                    )
    if ref_logps is not None:
        gathered["ref_chosen_logp"] = np.asarray(ref_logps[0], dtype=np.float64)
        gathered["ref_rejected_logp"] = np.asarray(ref_logps[1], dtype=np.float64)
    table = pd.DataFrame(
        {
            "pair_id": list(pair_ids) if pair_ids is not None else np.arange(n),
            "prompt_tokens": tokenized.prompt_tokens,
            "chosen_tokens": tokenized.chosen_tokens,
            "rejected_tokens": tokenized.rejected_tokens,
            "ref_chosen_logp": gathered["ref_chosen_logp"],
            "ref_rejected_logp": gathered["ref_rejected_logp"],
            "policy_chosen_logp": gathered["policy_chosen_logp"],
            "policy_rejected_logp": gathered["policy_rejected_logp"],
            "truncated": tokenized.truncated,
            "dropped": tokenized.dropped,
            "boundary_mismatch": tokenized.boundary_mismatch,
        }
    )
    table = add_pair_metrics(table, beta)
    return table, summarize(table, beta)


def _score_shared(module: torch.nn.Module, tokenized: TokenizedPairs, settings: ScoreSettings):
    """Every pair's log-probs under ``module``, each rank scoring its share: prefdiag compare's DistributedScorer
    (prefdiag.parallel) around the engine, so the callback and the CLI split and gather the same way."""
    return parallel.distribute(LogProbScorer(module, settings)).score(tokenized)
