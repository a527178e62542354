"""CHES (Razin et al. 2024, arXiv 2410.08847): the centered hidden embedding similarity of each pair under the
reference, its dataset percentiles, the ``high_ches`` flag and its summary keys (numpy/pandas only, no torch).

The scoring engine sums, per response, the reference's last hidden states (those the LM head sees) at the positions
that predict the response's tokens: S_w over the chosen tokens, S_l over the rejected ones. Then

- ``ches = <S_w, S_l> - ||S_w||^2``
- ``ches_norm = <S_w, S_l> / (|y_w| |y_l|) - ||S_w||^2 / |y_w|^2`` (|y| the number of scored response tokens)

High CHES predicts that DPO lowers the chosen response's likelihood on that pair; Razin et al. filter the top by
``ches_norm``. Columns added by :func:`add_ches_columns`: ``ches_percentile``, ``ches_norm_percentile`` (0-100, over
the pairs where the value is finite; NaN elsewhere) and ``high_ches`` (bool: ``ches_norm_percentile`` in the top
``HIGH_CHES_TOP_SHARE``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from prefdiag.options import HIGH_CHES_SHARE

# The share of pairs flagged high_ches: the top 5% by ches_norm (SCIENCE.md).
HIGH_CHES_TOP_SHARE = HIGH_CHES_SHARE  # defined once, in prefdiag.options
CHES_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def ches_from_sums(
    chosen_sums: np.ndarray, rejected_sums: np.ndarray, chosen_tokens: np.ndarray, rejected_tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ches, ches_norm) per pair from the summed hidden states [n, D] of each response and their token counts [n],
    in float64; NaN where a response has no scored token."""
    s_w = np.asarray(chosen_sums, dtype=np.float64)
    s_l = np.asarray(rejected_sums, dtype=np.float64)
    n_w = np.asarray(chosen_tokens, dtype=np.float64)
    n_l = np.asarray(rejected_tokens, dtype=np.float64)
    cross = np.einsum("nd,nd->n", s_w, s_l)
    own = np.einsum("nd,nd->n", s_w, s_w)
    with np.errstate(invalid="ignore", divide="ignore"):
        ches = np.where((n_w > 0) & (n_l > 0), cross - own, np.nan)
        ches_norm = np.where((n_w > 0) & (n_l > 0), cross / (n_w * n_l) - own / (n_w * n_w), np.nan)
    return ches, ches_norm


class ResponseSums:
    """Summed hidden states of the responses scored so far, held per output slot (2*pair for the chosen response,
    2*pair+1 for the rejected one) until both responses of a pair are in."""

    def __init__(self) -> None:
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, int] = {}

    def add(self, slots: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
        """Add the sums [k, D] and token counts [k] of the given slots."""
        for slot, vector, count in zip(slots.tolist(), sums, counts.tolist()):
            if slot in self._sums:
                self._sums[slot] = self._sums[slot] + vector
                self._counts[slot] += count
            else:
                self._sums[slot] = np.asarray(vector, dtype=np.float64)
                self._counts[slot] = count

    def finish(self, pairs: np.ndarray, tied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ches, ches_norm) of the given finished pairs, whose sums are then forgotten. A tied pair (identical
        responses, ``tied`` True) takes its chosen sum for both sides, so its CHES is exactly 0 as its margin is."""
        dim = next((len(v) for v in self._sums.values()), 0)
        s_w = np.zeros((len(pairs), dim))
        s_l = np.zeros((len(pairs), dim))
        n_w = np.zeros(len(pairs))
        n_l = np.zeros(len(pairs))
        for k, (pair, tie) in enumerate(zip(pairs.tolist(), tied.tolist())):
            chosen, rejected = 2 * pair, 2 * pair + 1
            if chosen in self._sums:
                s_w[k], n_w[k] = self._sums.pop(chosen), self._counts.pop(chosen)
            if rejected in self._sums:
                s_l[k], n_l[k] = self._sums.pop(rejected), self._counts.pop(rejected)
            if tie:
                s_l[k], n_l[k] = s_w[k], n_w[k]
        return ches_from_sums(s_w, s_l, n_w, n_l)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Percentile (0-100] of each value among the finite ones (ties share their mean rank); NaN elsewhere."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(len(values), np.nan)
    finite = np.isfinite(values)
    if finite.any():
        ranks = pd.Series(values[finite]).rank(method="average").to_numpy()
        out[finite] = 100.0 * ranks / finite.sum()
    return out


def add_ches_columns(table: pd.DataFrame, top_share: float = HIGH_CHES_TOP_SHARE) -> pd.DataFrame:
    """Add ``ches_percentile``, ``ches_norm_percentile`` and ``high_ches`` (the top ``top_share`` of pairs by
    ches_norm) to a table with ``ches``/``ches_norm`` columns (returns a copy; unchanged without them)."""
    if not 0.0 <= top_share <= 1.0:
        raise ValueError(f"the high_ches share must be between 0 and 1, got {top_share}")
    out = table.copy()
    if "ches" not in out.columns or "ches_norm" not in out.columns:
        return out
    out["ches_percentile"] = percentile_ranks(out["ches"].to_numpy(float))
    out["ches_norm_percentile"] = percentile_ranks(out["ches_norm"].to_numpy(float))
    with np.errstate(invalid="ignore"):
        out["high_ches"] = out["ches_norm_percentile"].to_numpy(float) > 100.0 * (1.0 - top_share)
    return out


def summarize_ches(table: pd.DataFrame, top_share: float = HIGH_CHES_TOP_SHARE) -> dict[str, Any]:
    """Summary keys for CHES: ``n_ches`` (pairs with a finite ches_norm), ``high_ches_rate`` and ``n_high_ches``
    (over those pairs), ``high_ches_top_share``, ``mean_ches_norm`` and ``ches_norm_quantiles`` ({"q05": ...});
    {} when the table has no CHES."""
    if "ches_norm" not in table.columns:
        return {}
    if "high_ches" not in table.columns:
        table = add_ches_columns(table, top_share)
    values = table["ches_norm"].to_numpy(float)
    finite = np.isfinite(values)
    n = int(finite.sum())
    flagged = table["high_ches"].to_numpy(bool) & finite
    return {
        "n_ches": n,
        "n_high_ches": int(flagged.sum()),
        "high_ches_rate": float(flagged.sum() / n) if n else None,
        "high_ches_top_share": float(top_share),
        "mean_ches_norm": float(values[finite].mean()) if n else None,
        "ches_norm_quantiles": {
            f"q{round(100 * q):02d}": (float(np.quantile(values[finite], q)) if n else None) for q in CHES_QUANTILES
        },
    }
