"""Per-pair metrics and flags, the dataset summary and its verdict (the findings of prefdiag.findings), computed
from a table of log-probs alone (pure pandas/numpy: no torch). Definitions: the README's per-pair table and summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prefdiag import flags
from prefdiag.checks import CHECKS

SCHEMA_VERSION = 1

# Chen et al. 2024, Cor. 3.3: unanimous labels approximated by this share of raters preferring the chosen answer.
UNANIMOUS_SHARE = 1 - 1e-3
# Likely mislabeled: after training the implicit reward still clearly prefers the rejected answer.
MISLABEL_REWARD_MARGIN = -1.0
MISLABEL_LOSS_QUANTILE = 0.95

# Flag names by kind, from the one registry (prefdiag.flags). A flag missing from a table is skipped.
REFERENCE_FLAGS = tuple(name for name in flags.names("reference") if name != "non_finite")
POLICY_FLAGS = flags.names("policy")
TOKEN_FLAGS = flags.names("token")
DATA_FLAGS = CHECKS + TOKEN_FLAGS  # no model needed (token flags need only a tokenizer); rates over all pairs
# A data problem that makes a pair useless or contradictory for training, whatever the model.
HARD_DATA_FLAGS = flags.hard_data_flags()
LOGP_COLUMNS = {"reference": ("ref_chosen_logp", "ref_rejected_logp"),
                "policy": ("policy_chosen_logp", "policy_rejected_logp")}  # fmt: skip
# The policy "equals" the reference on a pair when neither log-prob moved by more than this (nats).
UNCHANGED_NATS = 1e-6
EXAMPLES = 5  # pair ids kept in the summary per finding


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)), stable for large |x|."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.logaddexp(0.0, x)


def has_policy(table: pd.DataFrame) -> bool:
    """The table holds the policy's log-probs."""
    return "policy_chosen_logp" in table.columns


def has_reference(table: pd.DataFrame) -> bool:
    """The table holds the reference's log-probs."""
    return "ref_chosen_logp" in table.columns


def non_finite_by_model(table: pd.DataFrame) -> dict[str, pd.Series]:
    """Per model (reference, policy): scored pairs (not ``dropped``) with a NaN or infinite log-prob."""
    dropped = table["dropped"].astype(bool) if "dropped" in table.columns else pd.Series(False, index=table.index)
    out = {}
    for model, columns in LOGP_COLUMNS.items():
        if columns[0] in table.columns:
            values = table[list(columns)].to_numpy(float)
            out[model] = pd.Series(~np.isfinite(values).all(axis=1), index=table.index) & ~dropped
    return out


def add_pair_metrics(table: pd.DataFrame, beta: float) -> pd.DataFrame:
    """Add margins, rewards, DPO loss and the boolean flags to a table of summed log-probs (returns a copy).
    A pair with a NaN/inf log-prob is flagged ``non_finite`` and carries no other model flag."""
    out = table.copy()
    if not has_reference(out):
        return out
    ref_c, ref_r = out["ref_chosen_logp"].to_numpy(float), out["ref_rejected_logp"].to_numpy(float)
    n_c = out["chosen_tokens"].to_numpy(float)
    n_r = out["rejected_tokens"].to_numpy(float)
    bad = non_finite_by_model(out)
    non_finite = np.logical_or.reduce([mask.to_numpy() for mask in bad.values()])
    out["non_finite"] = non_finite
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out["ref_margin"] = ref_c - ref_r
        out["ref_margin_per_token"] = ref_c / n_c - ref_r / n_r
        out["ref_prefers_rejected"] = (out["ref_margin"] < 0) & ~non_finite
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
        # The implicit reward model's probability that the label is flipped, P(rejected > chosen).
        out["mislabel_score"] = np.exp(-softplus(out["reward_margin"].to_numpy()))
    finite = ~non_finite
    reward_margin = out["reward_margin"]
    out["negative_margin_regime"] = (reward_margin > 0) & (out["policy_margin"] < 0) & finite
    # The paper's undesirable space U (Yang et al. 2026, arXiv 2605.20834) on mean per-token log-probs: the policy
    # still prefers the rejected answer but by less than the reference did. On summed margins this is the rule above.
    margin_per_token = out["policy_margin_per_token"]
    out["negative_margin_regime_per_token"] = (
        (margin_per_token < 0) & (margin_per_token > out["ref_margin_per_token"]) & finite
    )
    out["chosen_displaced"] = (out["chosen_logratio"] < 0) & finite
    out["both_displaced"] = out["chosen_displaced"] & (out["rejected_logratio"] < 0)
    losses = out["dpo_loss"][finite & out["dpo_loss"].notna()]
    loss_tail = losses.quantile(MISLABEL_LOSS_QUANTILE) if len(losses) else np.inf
    out["likely_mislabeled"] = (
        (reward_margin < MISLABEL_REWARD_MARGIN) | ((out["dpo_loss"] >= loss_tail) & (reward_margin < 0))
    ) & finite
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


def scored_pairs(table: pd.DataFrame) -> pd.Series:
    """The pairs every rate and mean is computed on: both log-probs of every model present, all finite."""
    mask = table["ref_chosen_logp"].notna() & table["ref_rejected_logp"].notna()
    if "non_finite" in table.columns:
        mask &= ~table["non_finite"].astype(bool)
    return mask


def summarize(table: pd.DataFrame, beta: float) -> dict[str, Any]:
    """Dataset-level metrics of a table that went through add_pair_metrics; every value is a plain number (and,
    under ``pair_examples``, a few pair ids per finding)."""
    summary: dict[str, Any] = {"n_pairs": int(len(table)), "beta": float(beta)}
    for flag in DATA_FLAGS:
        if flag in table.columns:
            summary[f"{flag}_rate"] = float(table[flag].mean()) if len(table) else None
            summary[f"n_{flag}"] = int(table[flag].sum())
    hard = [flag for flag in HARD_DATA_FLAGS if flag in table.columns]
    if hard:
        summary["n_data_problems"] = int(table[hard].astype(bool).any(axis=1).sum())
    if has_reference(table):
        scored = scored_pairs(table)
        t = table[scored]
        length_diff = (t["chosen_tokens"] - t["rejected_tokens"]).astype(float)
        _reference_metrics(summary, table, scored, beta)
        quantiles = {"ref_margin": _quantiles(t["ref_margin"])}
        if has_policy(table):
            _policy_metrics(summary, table, scored)
            summary["reward_margin_length_correlation"] = _correlation(t["reward_margin"], length_diff)
            quantiles.update({c: _quantiles(t[c]) for c in ("policy_margin", "reward_margin", "dpo_loss")})
        else:
            summary["ref_margin_length_correlation"] = _correlation(t["ref_margin"], length_diff)
        summary["quantiles"] = quantiles
    _add_examples(summary, table)
    return summary


def _share(mask: pd.Series) -> float | None:
    """The share of True values (None for no pairs)."""
    return float(mask.mean()) if len(mask) else None


def _reference_metrics(summary: dict[str, Any], table: pd.DataFrame, scored: pd.Series, beta: float) -> None:
    """What the reference's log-probs alone tell, on the scored pairs (non-finite counts on all of them)."""
    summary["n_scored"] = int(scored.sum())
    if "non_finite" in table.columns:
        summary["n_non_finite"] = int(table["non_finite"].sum())
        for model, mask in non_finite_by_model(table).items():
            summary[f"n_non_finite_{model}"] = int(mask.sum())
        not_dropped = int((~table["dropped"].astype(bool)).sum()) if "dropped" in table.columns else len(table)
        summary["non_finite_rate"] = summary["n_non_finite"] / not_dropped if not_dropped else None
    t = table[scored]
    summary["ref_ranking_accuracy"] = _share(t["ref_margin"] > 0)
    unanimous_margin = -math.log(UNANIMOUS_SHARE / (1 - UNANIMOUS_SHARE)) / beta
    summary["idealised_ranking_accuracy"] = _share(t["ref_margin"] > unanimous_margin)
    for column in ("ref_margin", "ref_margin_per_token", "ref_chosen_logp", "ref_rejected_logp"):
        summary[f"mean_{column}"] = _mean(t[column])
    for column in ("chosen_tokens", "rejected_tokens"):
        summary[f"mean_{column}"] = _mean(t[column].astype(float))
    summary["chosen_longer_rate"] = _share(t["chosen_tokens"] > t["rejected_tokens"])
    _flag_rates(summary, table, REFERENCE_FLAGS, scored)


def _policy_metrics(summary: dict[str, Any], table: pd.DataFrame, scored: pd.Series) -> None:
    """Accuracies, means, flag rates and ranking transitions from reference to policy, on the scored pairs."""
    t = table[scored]
    ref_correct, policy_correct = t["ref_margin"] > 0, t["policy_margin"] > 0
    summary["reward_accuracy"] = _share(t["reward_margin"] > 0)
    summary["ranking_accuracy"] = _share(policy_correct)
    # Yang et al. 2026 measure absolute preference on mean per-token log-probs; strict, as ranking_accuracy.
    summary["ranking_accuracy_per_token"] = _share(t["policy_margin_per_token"] > 0)
    unchanged = (t["chosen_logratio"].abs() <= UNCHANGED_NATS) & (t["rejected_logratio"].abs() <= UNCHANGED_NATS)
    summary["policy_unchanged_rate"] = _share(unchanged)
    for column in ("dpo_loss", "reward_margin", "reward_chosen", "reward_rejected", "policy_margin",
                   "policy_margin_per_token", "policy_chosen_logp", "policy_rejected_logp", "chosen_logratio",
                   "rejected_logratio"):  # fmt: skip
        summary[f"mean_{column}"] = _mean(t[column])
    _flag_rates(summary, table, POLICY_FLAGS, scored)
    transitions = {
        f"ref_{ref}_to_policy_{policy}": int((ref_mask & policy_mask).sum())
        for ref, ref_mask in (("correct", ref_correct), ("incorrect", ~ref_correct))
        for policy, policy_mask in (("correct", policy_correct), ("incorrect", ~policy_correct))
    }
    summary["transitions"] = transitions
    misranked, correct = int((~ref_correct).sum()), int(ref_correct.sum())
    summary["flip_rate"] = transitions["ref_incorrect_to_policy_correct"] / misranked if misranked else None
    summary["break_rate"] = transitions["ref_correct_to_policy_incorrect"] / correct if correct else None
    moved = t["chosen_logratio"] != 0
    ratio = t["rejected_logratio"][moved] / t["chosen_logratio"][moved]
    summary["median_displacement_ratio"] = float(ratio.median()) if len(ratio) else None


def _flag_rates(summary: dict[str, Any], table: pd.DataFrame, names: tuple[str, ...], scored: pd.Series) -> None:
    for flag in names:
        if flag in table.columns:
            mask = table[flag].astype(bool)
            summary[f"{flag}_rate"] = _rate(mask, scored)
            summary[f"n_{flag}"] = int((mask & scored).sum())


def _add_examples(summary: dict[str, Any], table: pd.DataFrame) -> None:
    if "pair_id" not in table.columns:
        return
    examples = {item.id: [str(v) for v in item.rows["pair_id"]] for item in pair_lists(table, EXAMPLES)}
    for flag in flags.names():  # every other flag: its first pairs in table order
        if flag not in examples and flag in table.columns and table[flag].dtype == bool and table[flag].any():
            examples[flag] = [str(v) for v in table.loc[table[flag], "pair_id"].head(EXAMPLES)]
    if examples:
        summary["pair_examples"] = examples


def summarize_groups(
    table: pd.DataFrame, column: str, beta: float, summarizer: Any = None, keep: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``{"column": column, "values": {value: flat metrics of that group}}``: every scalar key summarize() gives the
    whole table, computed on the group's pairs (flags computed on the whole table, e.g. the DPO-loss tail, keep their
    whole-table meaning). Groups are keyed by str(value), missing values as "null", in sorted order.
    ``summarizer(table, beta)`` replaces summarize() (unpaired data), with the text columns ``keep`` it reads."""
    summarizer = summarizer or summarize
    keys = table[column]
    try:
        names = keys.astype("str").where(keys.notna(), "null").tolist()
    except UnicodeEncodeError:  # a lone surrogate (object column): Arrow strings cannot hold it
        names = [str(v) if pd.notna(v) else "null" for v in keys]
    numbers = table.select_dtypes(include=["number", "bool"])  # what summarize() reads; not the text
    numbers = pd.concat([numbers, table[list(keep)]], axis=1) if keep else numbers
    indices: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        indices.setdefault(name, []).append(i)
    values = {}
    for name, rows in sorted(indices.items()):
        group = summarizer(numbers.iloc[rows], beta)
        values[str(name)] = {k: v for k, v in group.items() if not isinstance(v, (dict, list))}
    return {"column": column, "values": values}


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """The findings, most severe first (``findings``), and the headline: the worst finding's ``level`` (ok, warn,
    fail) and sentence (``text``)."""
    from prefdiag.findings import findings

    found = findings(summary)
    return {"level": found[0]["level"], "text": found[0]["text"], "findings": found}


# -- pairs worth a look --------------------------------------------------------------------------------------------


@dataclass
class PairList:
    """Pairs behind one finding: ``id`` (the finding's), a title saying what they are, the ordering, the rows."""

    id: str
    title: str
    order: str  # what the rows are ordered by, in words
    n: int  # pairs the list holds before the cut
    rows: pd.DataFrame


def list_adder(table: pd.DataFrame, n: int, lists: list[PairList]):
    """``add(list_id, title, mask, key, order)``: append to ``lists`` the rows ``mask`` selects (if any), ordered
    by ``key`` ascending (table order when None) and cut to ``n``; shared by the pair and the response lists."""

    def add(list_id: str, title: str, mask: pd.Series, key: pd.Series | None, order: str) -> None:
        mask = mask.fillna(False).astype(bool)
        if not mask.any():
            return
        rows = table[mask]
        if key is not None:
            rows = rows.loc[key[mask].sort_values(kind="stable", na_position="last").index]
        lists.append(PairList(list_id, title, order, int(mask.sum()), rows.head(n)))

    return add


def _per_token_reward(table: pd.DataFrame) -> pd.Series:
    return table["policy_margin_per_token"] - table["ref_margin_per_token"]


def pair_lists(table: pd.DataFrame, n: int = 10) -> list[PairList]:
    """One list per finding with pairs behind it (non-finite, negative-margin regime, likely mislabeled, broken by
    training, reference prefers rejected without a policy, data problems), each cut to ``n`` rows and ordered by a
    per-token measure so that a long response alone does not put a pair first."""
    lists: list[PairList] = []
    add = list_adder(table, n, lists)

    def add_flag(flag: str, what: str, key: pd.Series, order: str) -> None:
        """The pairs a flag marks, titled with its label (the registry's) and what that means."""
        label = flags.label(flag)
        add(flag, f"{label[:1].upper()}{label[1:]}: {what}", table[flag], key, order)

    if "non_finite" in table.columns:
        add("non_finite", "Pairs with a NaN or infinite log-prob (left out of every rate)", table["non_finite"], None,
            "table order")  # fmt: skip
    if has_policy(table):
        add_flag("negative_margin_regime", "reward margin > 0 but the policy prefers rejected",
                 table["policy_margin_per_token"], "policy margin per token, lowest first")
        add_flag("likely_mislabeled", "the implicit reward still prefers rejected", _per_token_reward(table),
                 "reward margin per token, lowest first")
        broken = (table["ref_margin"] > 0) & (table["policy_margin"] <= 0) & scored_pairs(table)
        add("broken_by_training", "Broken by training: the reference ranked these correctly, the policy does not",
            broken, table["policy_margin_per_token"], "policy margin per token, lowest first")  # fmt: skip
    elif has_reference(table):
        add_flag("ref_prefers_rejected", "DPO starts these on the wrong side", table["ref_margin_per_token"],
                 "reference margin per token, lowest first")
    problems = [f for f in HARD_DATA_FLAGS if f in table.columns]
    if problems:
        flagged = table[problems].astype(bool)
        add("data_problems", "Data problems: " + ", ".join(flags.label(f) for f in problems if flagged[f].any()),
            flagged.any(axis=1), -flagged.sum(axis=1), "number of problems, most first")  # fmt: skip
    return lists


def worst_pairs(table: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The pairs most in need of a look: negative-margin-regime pairs first, then by how much the model prefers
    the rejected answer per token (so that length alone does not rank a pair first)."""
    if has_policy(table):
        key = table["policy_margin_per_token"] - 1e6 * table["negative_margin_regime"].astype(float)
    elif has_reference(table):
        key = table["ref_margin_per_token"]
    else:
        return table.head(0)
    return table.loc[key.sort_values(kind="stable").index[:n].tolist()]
