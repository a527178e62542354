"""Model rows for the scoring engine, numpy only: each pair laid out in one of the layouts, the tokens each row
scores, batch planning under a padded-token budget and bin packing of rows into fixed-length packed rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prefdiag.options import LAYOUTS
from prefdiag.tokenization import TokenizedPairs

# Segment codes inside a packed row.
_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


@dataclass
class _Row:
    """One model input row and the completion tokens it scores."""

    input_ids: np.ndarray  # [L]
    position_ids: np.ndarray  # [L]
    segments: np.ndarray  # [L] segment code per token
    predict_at: np.ndarray  # [N] row index whose hidden state predicts the token
    targets: np.ndarray  # [N] token id predicted
    slots: np.ndarray  # [N] output slot: 2*pair (chosen) or 2*pair+1 (rejected)
    pair: int  # the pair this row belongs to


def _completion_targets(start: int, ids: Sequence[int], first_predictor: int, slot: int):
    """Targets for completion tokens laid at row[start:start+len(ids)], the first predicted from first_predictor."""
    n = len(ids)
    predict_at = np.arange(start - 1, start + n - 1, dtype=np.int64)
    if n:
        predict_at[0] = first_predictor
    targets = np.asarray(ids, dtype=np.int64)
    keep = predict_at >= 0  # a sequence's first token has no predictor (TRL never scores it either)
    return predict_at[keep], targets[keep], np.full(int(keep.sum()), slot, dtype=np.int64)


def build_rows(tokenized: TokenizedPairs, layout: str = "prefix", pairs: Sequence[int] | None = None) -> list[_Row]:
    """Lay the given pairs (default: all) out as model rows for the chosen layout; dropped pairs get no row. A
    rejected completion whose ids equal the chosen one's is not laid out: the engine gives a tie the chosen side's
    numbers for both (so identical pairs, and unpaired KTO rows, cost one completion, not two)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    rows: list[_Row] = []
    tied = tokenized.tied
    for i in range(len(tokenized)) if pairs is None else pairs:
        if tokenized.dropped[i]:
            continue
        prompt = tokenized.prompt_ids[i]
        chosen = tokenized.chosen_ids[i]
        rejected = tokenized.rejected_ids[i]
        if tied[i]:
            rejected = []  # a tie: scored once, copied to the rejected side by the engine
        p = len(prompt)
        if layout == "separate":
            for side, completion in ((0, chosen), (1, rejected))[: 2 if len(rejected) else 1]:
                ids = np.asarray(list(prompt) + list(completion), dtype=np.int64)
                segments = np.full(len(ids), _PROMPT, dtype=np.int8)
                segments[p:] = _CHOSEN
                pa, tg, sl = _completion_targets(p, completion, p - 1, 2 * i + side)
                rows.append(_Row(ids, np.arange(len(ids), dtype=np.int64), segments, pa, tg, sl, i))
        else:
            c, r = len(chosen), len(rejected)
            ids = np.asarray(list(prompt) + list(chosen) + list(rejected), dtype=np.int64)
            positions = np.concatenate(
                [np.arange(p + c, dtype=np.int64), np.arange(p, p + r, dtype=np.int64)]
            )
            segments = np.concatenate(
                [
                    np.full(p, _PROMPT, dtype=np.int8),
                    np.full(c, _CHOSEN, dtype=np.int8),
                    np.full(r, _REJECTED, dtype=np.int8),
                ]
            )
            pa_c, tg_c, sl_c = _completion_targets(p, chosen, p - 1, 2 * i)
            pa_r, tg_r, sl_r = _completion_targets(p + c, rejected, p - 1, 2 * i + 1)
            rows.append(
                _Row(
                    ids,
                    positions,
                    segments,
                    np.concatenate([pa_c, pa_r]),
                    np.concatenate([tg_c, tg_r]),
                    np.concatenate([sl_c, sl_r]),
                    i,
                )
            )
    return rows


def next_batch(
    rows: list[_Row], order: list[int], start: int, batch_tokens: int, max_padding: float = 0.1
) -> list[int]:
    """The rows order[start:stop] that fit the padded token budget (rows x longest row), at least one, none shorter
    than the longest by more than ``max_padding`` of it: a long outlier does not pad a batch of short rows."""
    stop = start + 1
    longest = len(rows[order[start]].input_ids)  # order is longest first: the first row sets the padded length
    shortest = longest * (1 - max_padding)
    while (
        stop < len(order)
        and longest * (stop - start + 1) <= batch_tokens
        and len(rows[order[stop]].input_ids) >= shortest
    ):
        stop += 1
    return order[start:stop]


def pack_rows(lengths: Sequence[int], order: list[int], capacity: int) -> list[list[int]]:
    """Fill bins of ``capacity`` tokens with the rows in ``order`` (longest first), in linear time: each bin takes
    rows from the long end while they fit, then tops up from the short end."""
    bins, i, j = [], 0, len(order) - 1
    while i <= j:
        current, used = [order[i]], lengths[order[i]]
        i += 1
        while i <= j and used + lengths[order[i]] <= capacity:
            current.append(order[i])
            used += lengths[order[i]]
            i += 1
        while i <= j and used + lengths[order[j]] <= capacity:
            current.append(order[j])
            used += lengths[order[j]]
            j -= 1
        bins.append(current)
    return bins


def _longest_first(rows: list[_Row], batches: list[list[list[int]]] | None = None) -> list[int]:
    """Indices of the rows (all, or those in ``batches``), longest first, ties in index order."""
    indices = range(len(rows)) if batches is None else [k for batch in batches for b in batch for k in b]
    return sorted(indices, key=lambda k: (-len(rows[k].input_ids), k))
