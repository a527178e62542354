"""Per-pair metrics and flags, the dataset summary and its one-sentence verdict, computed from a table of
log-probs alone (pure pandas/numpy: no torch). Definitions follow docs/metrics.md (from SCIENCE.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from prefdiag.checks import CHECKS

SCHEMA_VERSION = 1

# Chen et al. 2024, Cor. 3.3: unanimous labels approximated by this share of raters preferring the chosen answer.
UNANIMOUS_SHARE = 1 - 1e-3
# Likely mislabeled: after training the implicit reward still clearly prefers the rejected answer.
MISLABEL_REWARD_MARGIN = -1.0
MISLABEL_LOSS_QUANTILE = 0.95

REFERENCE_FLAGS = ("ref_prefers_rejected",)
POLICY_FLAGS = (
    "negative_margin_regime",
    "negative_margin_regime_per_token",
    "chosen_displaced",
    "both_displaced",
    "likely_mislabeled",
)
TOKEN_FLAGS = ("truncated", "dropped", "boundary_mismatch")
DATA_FLAGS = CHECKS + TOKEN_FLAGS  # no model needed (token flags need only a tokenizer); rates over all pairs
# A data problem that makes a pair useless or contradictory for training, whatever the model.
HARD_DATA_FLAGS = ("identical", "duplicate", "conflict", "empty_response", "empty_prompt")
_DATA_FLAG_WORDS = {
    "identical": "with identical responses",
    "duplicate": "duplicated",
    "conflict": "conflicting",
    "empty_response": "with an empty response",
    "empty_prompt": "with an empty prompt",
}


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    return np.logaddexp(0.0, x)


def has_policy(table: pd.DataFrame) -> bool:
    return "policy_chosen_logp" in table.columns


def has_reference(table: pd.DataFrame) -> bool:
    return "ref_chosen_logp" in table.columns


def add_pair_metrics(table: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Add margins, rewards, DPO loss and the boolean flags to a table of summed log-probs (returns a copy)."""
    out = table.copy()
    if not has_reference(out):
        return out
    ref_c, ref_r = out["ref_chosen_logp"].to_numpy(float), out["ref_rejected_logp"].to_numpy(float)
    n_c = out["chosen_tokens"].to_numpy(float)
    n_r = out["rejected_tokens"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["ref_margin"] = ref_c - ref_r
        out["ref_margin_per_token"] = ref_c / n_c - ref_r / n_r
        out["ref_prefers_rejected"] = out["ref_margin"] < 0
        # Loss a pair must reach before its ranking flips (Chen et al. Thm 4.1): -log sigmoid(-beta * ref_margin).
        out["flip_loss"] = softplus(beta * out["ref_margin"].to_numpy())
        if not has_policy(out):
            return out
        pol_c, pol_r = out["policy_chosen_logp"].to_numpy(float), out["policy_rejected_logp"].to_numpy(float)
        out["policy_margin"] = pol_c - pol_r
        out["policy_margin_per_token"] = pol_c / n_c - pol_r / n_r
        out["chosen_logratio"] = pol_c - ref_c
        out["rejected_logratio"] = pol_r - ref_r
        out["reward_chosen"] = beta * out["chosen_logratio"]
        out["reward_rejected"] = beta * out["rejected_logratio"]
        out["reward_margin"] = out["reward_chosen"] - out["reward_rejected"]
        out["dpo_loss"] = softplus(-out["reward_margin"].to_numpy())
    reward_margin = out["reward_margin"]
    out["negative_margin_regime"] = (reward_margin > 0) & (out["policy_margin"] < 0)
    # The paper's undesirable space U (Yang et al. 2026, arXiv 2605.20834) on mean per-token log-probs: the policy
    # still prefers the rejected answer but by less than the reference did. On summed margins this is the rule above.
    margin_per_token = out["policy_margin_per_token"]
    out["negative_margin_regime_per_token"] = (margin_per_token < 0) & (margin_per_token > out["ref_margin_per_token"])
    out["chosen_displaced"] = out["chosen_logratio"] < 0
    out["both_displaced"] = out["chosen_displaced"] & (out["rejected_logratio"] < 0)
    loss_tail = out["dpo_loss"].quantile(MISLABEL_LOSS_QUANTILE) if out["dpo_loss"].notna().any() else np.inf
    out["likely_mislabeled"] = (reward_margin < MISLABEL_REWARD_MARGIN) | (
        (out["dpo_loss"] >= loss_tail) & (reward_margin < 0)
    )
    # The implicit reward model's probability that the label is flipped, P(rejected > chosen) = sigmoid(-margin).
    out["mislabel_score"] = np.exp(-softplus(reward_margin.to_numpy()))
    return out


def _rate(mask: pd.Series, scored: pd.Series) -> float | None:
    n = int(scored.sum())
    return float((mask & scored).sum() / n) if n else None


def _mean(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(values.mean()) if len(values) else None


def _quantiles(values: pd.Series) -> dict[str, float] | None:
    values = values.dropna()
    if not len(values):
        return None
    qs = values.quantile([0.05, 0.25, 0.5, 0.75, 0.95]).to_numpy()
    return {f"p{int(q * 100):02d}": float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), qs)}


def _correlation(a: pd.Series, b: pd.Series) -> float | None:
    frame = pd.DataFrame({"a": a, "b": b}).dropna()
    if len(frame) < 3 or frame["a"].std() == 0 or frame["b"].std() == 0:
        return None
    return float(frame["a"].corr(frame["b"]))


def summarize(table: pd.DataFrame, beta: float) -> dict[str, Any]:
    """Dataset-level metrics of a table that went through add_pair_metrics; every value is a plain number."""
    summary: dict[str, Any] = {"n_pairs": int(len(table)), "beta": float(beta)}
    for flag in DATA_FLAGS:
        if flag in table.columns:
            summary[f"{flag}_rate"] = float(table[flag].mean()) if len(table) else None
            summary[f"n_{flag}"] = int(table[flag].sum())
    if not has_reference(table):
        return summary
    scored = table["ref_chosen_logp"].notna() & table["ref_rejected_logp"].notna()
    summary["n_scored"] = int(scored.sum())
    t = table[scored]
    ref_correct = t["ref_margin"] > 0
    summary["ref_ranking_accuracy"] = float(ref_correct.mean()) if len(t) else None
    summary["idealised_ranking_accuracy"] = (
        float((t["ref_margin"] > -math.log(UNANIMOUS_SHARE / (1 - UNANIMOUS_SHARE)) / beta).mean()) if len(t) else None
    )
    summary["mean_ref_margin"] = _mean(t["ref_margin"])
    summary["mean_ref_margin_per_token"] = _mean(t["ref_margin_per_token"])
    summary["mean_ref_chosen_logp"] = _mean(t["ref_chosen_logp"])
    summary["mean_ref_rejected_logp"] = _mean(t["ref_rejected_logp"])
    summary["mean_chosen_tokens"] = _mean(t["chosen_tokens"].astype(float))
    summary["mean_rejected_tokens"] = _mean(t["rejected_tokens"].astype(float))
    summary["chosen_longer_rate"] = float((t["chosen_tokens"] > t["rejected_tokens"]).mean()) if len(t) else None
    length_diff = (t["chosen_tokens"] - t["rejected_tokens"]).astype(float)
    for flag in REFERENCE_FLAGS:
        summary[f"{flag}_rate"] = _rate(table[flag], scored)
    quantiles = {"ref_margin": _quantiles(t["ref_margin"])}
    if not has_policy(table):
        summary["ref_margin_length_correlation"] = _correlation(t["ref_margin"], length_diff)
        summary["quantiles"] = quantiles
        return summary

    policy_correct = t["policy_margin"] > 0
    summary["reward_accuracy"] = float((t["reward_margin"] > 0).mean()) if len(t) else None
    summary["ranking_accuracy"] = float(policy_correct.mean()) if len(t) else None
    # Yang et al. 2026 measure absolute preference on mean per-token log-probs; strict, as ranking_accuracy.
    summary["ranking_accuracy_per_token"] = float((t["policy_margin_per_token"] > 0).mean()) if len(t) else None
    summary["mean_dpo_loss"] = _mean(t["dpo_loss"])
    summary["mean_reward_margin"] = _mean(t["reward_margin"])
    summary["mean_reward_chosen"] = _mean(t["reward_chosen"])
    summary["mean_reward_rejected"] = _mean(t["reward_rejected"])
    summary["mean_policy_margin"] = _mean(t["policy_margin"])
    summary["mean_policy_margin_per_token"] = _mean(t["policy_margin_per_token"])
    summary["mean_policy_chosen_logp"] = _mean(t["policy_chosen_logp"])
    summary["mean_policy_rejected_logp"] = _mean(t["policy_rejected_logp"])
    summary["mean_chosen_logratio"] = _mean(t["chosen_logratio"])
    summary["mean_rejected_logratio"] = _mean(t["rejected_logratio"])
    for flag in POLICY_FLAGS:
        summary[f"{flag}_rate"] = _rate(table[flag], scored)
    transitions = {
        "ref_correct_to_policy_correct": int((ref_correct & policy_correct).sum()),
        "ref_correct_to_policy_incorrect": int((ref_correct & ~policy_correct).sum()),
        "ref_incorrect_to_policy_correct": int((~ref_correct & policy_correct).sum()),
        "ref_incorrect_to_policy_incorrect": int((~ref_correct & ~policy_correct).sum()),
    }
    summary["transitions"] = transitions
    misranked = int((~ref_correct).sum())
    correct = int(ref_correct.sum())
    summary["flip_rate"] = transitions["ref_incorrect_to_policy_correct"] / misranked if misranked else None
    summary["break_rate"] = transitions["ref_correct_to_policy_incorrect"] / correct if correct else None
    moved = t["chosen_logratio"] != 0
    ratio = t["rejected_logratio"][moved] / t["chosen_logratio"][moved]
    summary["median_displacement_ratio"] = float(ratio.median()) if len(ratio) else None
    summary["reward_margin_length_correlation"] = _correlation(t["reward_margin"], length_diff)
    quantiles.update(
        {
            "policy_margin": _quantiles(t["policy_margin"]),
            "reward_margin": _quantiles(t["reward_margin"]),
            "dpo_loss": _quantiles(t["dpo_loss"]),
        }
    )
    summary["quantiles"] = quantiles
    return summary


def summarize_groups(table: pd.DataFrame, column: str, beta: float) -> dict[str, Any]:
    """``{"column": column, "values": {value: flat metrics of that group}}``: every scalar key summarize() gives the
    whole table, computed on the group's pairs (flags computed on the whole table, e.g. the DPO-loss tail, keep their
    whole-table meaning). Groups are keyed by str(value), missing values as "null", in sorted order."""
    keys = table[column]
    names = keys.astype("str").where(keys.notna(), "null")
    numbers = table.select_dtypes(include=["number", "bool"])  # what summarize() reads; not the text
    values = {}
    for name, rows in sorted(names.groupby(names, sort=False).indices.items()):
        group = summarize(numbers.iloc[rows], beta)
        values[str(name)] = {k: v for k, v in group.items() if not isinstance(v, (dict, list))}
    return {"column": column, "values": values}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def verdict(summary: dict[str, Any]) -> dict[str, str]:
    """One sentence on the most serious finding, with a level: ok, warn or fail."""
    nmr = summary.get("negative_margin_regime_rate")
    ranking, reward = summary.get("ranking_accuracy"), summary.get("reward_accuracy")
    displaced = summary.get("chosen_displaced_rate")
    ref_wrong = summary.get("ref_prefers_rejected_rate")
    if nmr is not None and nmr >= 0.05:
        return {
            "level": "fail" if nmr >= 0.15 else "warn",
            "text": f"{_pct(nmr)} of pairs are in the negative-margin regime: DPO's loss counts them as learned "
            f"while the policy still prefers the rejected answer (reward accuracy {_pct(reward)}, "
            f"ranking accuracy {_pct(ranking)}).",
        }
    if ranking is not None and reward is not None and ranking < 0.6 and reward - ranking >= 0.1:
        return {
            "level": "warn",
            "text": f"Reward accuracy is {_pct(reward)} but the policy ranks only {_pct(ranking)} of pairs correctly: "
            "the loss curve overstates what was learned.",
        }
    if displaced is not None and displaced >= 0.5:
        return {
            "level": "warn",
            "text": f"The chosen answer's likelihood fell on {_pct(displaced)} of pairs (likelihood displacement), "
            f"though ranking accuracy is {_pct(ranking)}.",
        }
    if ranking is not None:
        return {
            "level": "ok",
            "text": f"The policy ranks {_pct(ranking)} of pairs correctly (reference {_pct(summary['ref_ranking_accuracy'])}"
            f"), with {_pct(nmr or 0)} in the negative-margin regime.",
        }
    if ref_wrong is not None:
        level = "warn" if ref_wrong >= 0.3 else "ok"
        ideal = summary.get("idealised_ranking_accuracy")
        return {
            "level": level,
            "text": f"The reference prefers the rejected answer on {_pct(ref_wrong)} of pairs: DPO starts these on "
            f"the wrong side and rarely flips them (idealised ranking accuracy {_pct(ideal)}).",
        }
    hard = {flag: summary[f"n_{flag}"] for flag in HARD_DATA_FLAGS if summary.get(f"n_{flag}")}
    if hard:
        worst = sorted(hard.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{n} {_DATA_FLAG_WORDS[flag]}" for flag, n in worst)
        return {
            "level": "warn",
            "text": f"{summary['n_pairs']} pairs loaded; pairs to fix before training: {listed}.",
        }
    return {"level": "ok", "text": f"{summary['n_pairs']} pairs loaded; no model was scored."}


def worst_pairs(table: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The pairs most in need of a look: negative-margin-regime pairs first, then by how much the model prefers
    the rejected answer."""
    if has_policy(table):
        key = table["policy_margin"] - 1e6 * table["negative_margin_regime"].astype(float)
    elif has_reference(table):
        key = table["ref_margin"]
    else:
        return table.head(0)
    return table.loc[key.sort_values(kind="stable").index[:n].tolist()]
