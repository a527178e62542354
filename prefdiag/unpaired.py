"""Unpaired (KTO) data: the per-response table, its flags, the summary and the verdict's findings (pandas only, no
torch). A row is one response to a prompt, labelled desirable or undesirable, as TRL's KTOTrainer reads it; there
is no pair, so no margin, no DPO loss and no pair flag.

- ``ref_logp``: the summed log-prob of the completion under the reference (TRL's tokenization, as for DPO).
- **Favoured by the reference**: the response's per-token log-prob is above the reference point, the median
  per-token log-prob of all scored responses. ``ref_favoured_desirable_rate`` and ``ref_favoured_undesirable_rate``
  are the shares of each label so favoured: KTO starts well where the first is high and the second low.
- ``ref_desirable_auc``: the chance that a random desirable response has a higher per-token log-prob than a random
  undesirable one (ties count half; 0.5 is no separation). ``ref_prompt_accuracy``: among prompts that have both
  labels, the share where the desirable responses' mean per-token log-prob is the higher.
- With a policy: ``logratio`` = policy_logp - ref_logp and ``reward`` = beta x logratio (TRL's rewards/chosen and
  rewards/rejected are the means of ``reward`` over desirable and undesirable responses); ``desirable_displaced``
  (a desirable response became less likely: likelihood displacement) and ``undesirable_raised``.
- Weights: Ethayarajh et al. (2024, arXiv 2402.01306, section 4) recommend desirable_weight x n_desirable /
  (undesirable_weight x n_undesirable) in [1, 4/3]; the summary gives the desirable_weight range that meets it
  with undesirable_weight 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from prefdiag import flags
from prefdiag.diagnostics import PairList, _mean, _rate
from prefdiag.findings import LEVELS, _finding, _v
from prefdiag.formatting import plural

SHAPE = "kto"  # summary["data_shape"] of an unpaired run
EXAMPLES = 20  # response ids kept per finding in the summary
WEIGHT_RATIO = (1.0, 4.0 / 3.0)  # desirable_weight n_D / (undesirable_weight n_U), KTO paper section 4

# The per-response table's leading columns, in order (those a run has); the data's own columns follow.
COLUMN_ORDER = [
    "response_id", "label", "prompt_tokens", "completion_tokens", "ref_logp", "ref_logp_per_token", "ref_favoured",
    "policy_logp", "policy_logp_per_token", "logratio", "reward", "desirable_displaced", "undesirable_raised",
    "truncated", "dropped", "boundary_mismatch", "non_finite", "duplicate", "conflicting_label", "empty_response",
    "empty_prompt", "prompt", "completion",
]  # fmt: skip


def is_unpaired(summary: dict[str, Any] | None) -> bool:
    """True for the summary of a run on unpaired (KTO) data."""
    return bool(summary) and summary.get("data_shape") == SHAPE


def response_table(pairs: pd.DataFrame, features: Any, scores: pd.DataFrame | None, beta: float) -> pd.DataFrame:
    """The per-response table from the loaded rows (chosen = rejected = the completion, a ``label`` column), their
    text features (prefdiag.checks.text_features) and, when models were scored, prefdiag.api's score columns."""
    label = pairs["label"].astype(bool).to_numpy()
    out = pd.DataFrame({"response_id": pairs["pair_id"].to_numpy(), "label": label})
    if scores is not None:
        out["prompt_tokens"] = scores["prompt_tokens"].to_numpy()
        out["completion_tokens"] = scores["chosen_tokens"].to_numpy()
        tokens = np.where(out["completion_tokens"] > 0, out["completion_tokens"], np.nan)
        out["ref_logp"] = scores["ref_chosen_logp"].to_numpy(float)
        out["ref_logp_per_token"] = out["ref_logp"] / tokens
        policy = "policy_chosen_logp" in scores.columns
        if policy:
            out["policy_logp"] = scores["policy_chosen_logp"].to_numpy(float)
            out["policy_logp_per_token"] = out["policy_logp"] / tokens
            out["logratio"] = out["policy_logp"] - out["ref_logp"]
            out["reward"] = beta * out["logratio"]
        logps = out[["ref_logp"] + (["policy_logp"] if policy else [])].to_numpy(float)
        scored = ~scores["dropped"].to_numpy(bool)
        out["non_finite"] = scored & ~np.isfinite(logps).all(axis=1)
        good = scored & ~out["non_finite"].to_numpy()
        point = np.median(out.loc[good, "ref_logp_per_token"]) if good.any() else np.nan
        out["ref_favoured"] = good & (out["ref_logp_per_token"].to_numpy() > point)
        if policy:
            out["desirable_displaced"] = good & label & (out["logratio"].to_numpy() < 0)
            out["undesirable_raised"] = good & ~label & (out["logratio"].to_numpy() > 0)
        for name in ("truncated", "dropped", "boundary_mismatch"):
            out[name] = scores[name].to_numpy(bool)
    out = pd.concat([out, pd.DataFrame(_data_checks(features, label))], axis=1)
    out["prompt"] = pairs["prompt"].to_numpy()
    out["completion"] = pairs["chosen"].to_numpy()
    extras = pairs.drop(columns=["pair_id", "prompt", "chosen", "rejected", "label"])
    out = pd.concat([out, extras.reset_index(drop=True)], axis=1)
    leading = [c for c in COLUMN_ORDER if c in out.columns]
    return out[leading + [c for c in out.columns if c not in leading]]


def _row_keys(features: Any, label: np.ndarray) -> tuple[pd.Series, pd.Series]:
    """Per row: a hash of its normalised (prompt, completion), and of (prompt, completion, label)."""
    from prefdiag.checks import _combine

    text = pd.Series(_combine(features.prompt_key, features.chosen_key))
    return text, text.astype(str) + np.where(label, "+", "-")


def later_copies(features: Any, label: np.ndarray) -> np.ndarray:
    """Every copy of a duplicated (prompt, completion, label) but the first: what removing duplicates drops."""
    return _row_keys(features, label)[1].duplicated(keep="first").to_numpy()


def _data_checks(features: Any, label: np.ndarray) -> dict[str, np.ndarray]:
    """The model-free checks of unpaired rows, from the hashes of their normalised text."""
    text, row = _row_keys(features, label)
    labels_per_text = pd.Series(label).groupby(text.to_numpy()).transform("nunique").to_numpy()
    return {
        "duplicate": row.duplicated(keep=False).to_numpy(),
        "conflicting_label": labels_per_text > 1,
        "empty_response": features.chosen_chars == 0,
        "empty_prompt": features.prompt_chars == 0,
    }


def _scored(table: pd.DataFrame) -> pd.Series:
    if "ref_logp" not in table.columns:
        return pd.Series(False, index=table.index)
    return ~table["dropped"].astype(bool) & ~table["non_finite"].astype(bool)


def _auc(values: pd.Series, desirable: pd.Series) -> float | None:
    """P(a random desirable value > a random undesirable one), ties counting half (Mann-Whitney)."""
    n_d, n_u = int(desirable.sum()), int((~desirable).sum())
    if n_d == 0 or n_u == 0:
        return None
    ranks = values.rank(method="average")
    return float((ranks[desirable].sum() - n_d * (n_d + 1) / 2) / (n_d * n_u))


def _prompt_accuracy(table: pd.DataFrame, column: str, scored: pd.Series) -> tuple[int, float | None]:
    """(prompts with both labels among scored rows, share of them where desirable responses score higher)."""
    rows = table.loc[scored, ["label", column]].assign(prompt=_prompt_keys(table)[scored.to_numpy()])
    means = rows.groupby(["prompt", "label"])[column].mean().unstack("label")
    if True not in means.columns or False not in means.columns:
        return 0, None
    both = means.dropna()
    return len(both), (float((both[True] > both[False]).mean()) if len(both) else None)


def _prompt_keys(table: pd.DataFrame) -> np.ndarray:
    return table["prompt"].map(lambda p: p if isinstance(p, str) else repr(p)).to_numpy()


def summarize(table: pd.DataFrame, beta: float) -> dict[str, Any]:
    """The run's summary: counts, the reference's (and the policy's) view of each label, flag rates, examples."""
    desirable = table["label"].astype(bool)
    n, n_d = len(table), int(desirable.sum())
    scored = _scored(table)
    s: dict[str, Any] = {"data_shape": SHAPE, "n_responses": n, "n_desirable": n_d, "n_undesirable": n - n_d,
                         "desirable_rate": n_d / n if n else None, "beta": beta}  # fmt: skip
    if n_d and n - n_d:
        ratio = (n - n_d) / n_d
        s["desirable_weight_min"], s["desirable_weight_max"] = WEIGHT_RATIO[0] * ratio, WEIGHT_RATIO[1] * ratio
    s["n_prompts"] = int(pd.Series(_prompt_keys(table)).nunique())
    if "ref_logp" in table.columns:
        s["n_scored"] = int(scored.sum())
        s["n_non_finite"] = int(table["non_finite"].sum())
        s["n_ref_favoured"] = int(table["ref_favoured"].sum())
        good = table[scored]
        good_d = desirable[scored]
        s["ref_reference_point"] = float(good["ref_logp_per_token"].median()) if len(good) else None
        s["ref_favoured_desirable_rate"] = _rate(table["ref_favoured"] & desirable, scored & desirable)
        s["ref_favoured_undesirable_rate"] = _rate(table["ref_favoured"] & ~desirable, scored & ~desirable)
        s["ref_desirable_auc"] = _auc(good["ref_logp_per_token"], good_d)
        s["n_prompts_both_labels"], s["ref_prompt_accuracy"] = _prompt_accuracy(table, "ref_logp_per_token", scored)
        s["mean_ref_logp_desirable"] = _mean(good.loc[good_d, "ref_logp"])
        s["mean_ref_logp_undesirable"] = _mean(good.loc[~good_d, "ref_logp"])
    if "policy_logp" in table.columns:
        good = table[scored]
        good_d = desirable[scored]
        s["policy_desirable_auc"] = _auc(good["policy_logp_per_token"], good_d)
        s["policy_prompt_accuracy"] = _prompt_accuracy(table, "policy_logp_per_token", scored)[1]
        s["mean_logps_desirable"] = _mean(good.loc[good_d, "policy_logp"])  # TRL: logps/chosen
        s["mean_logps_undesirable"] = _mean(good.loc[~good_d, "policy_logp"])  # logps/rejected
        s["mean_reward_desirable"] = _mean(good.loc[good_d, "reward"])  # rewards/chosen
        s["mean_reward_undesirable"] = _mean(good.loc[~good_d, "reward"])  # rewards/rejected
        both = s["mean_reward_desirable"] is not None and s["mean_reward_undesirable"] is not None
        s["mean_reward_gap"] = s["mean_reward_desirable"] - s["mean_reward_undesirable"] if both else None
        s["policy_unchanged_rate"] = _rate(table["logratio"] == 0, scored)
        for name, subset in (("desirable_displaced", desirable), ("undesirable_raised", ~desirable)):
            s[f"n_{name}"] = int(table[name].sum())
            s[f"{name}_rate"] = _rate(table[name], scored & subset)  # of the scored responses with that label
    everyone = pd.Series(True, index=table.index)
    for flag in flags.RESPONSE_FLAGS:
        if flag.name in table.columns and flag.kind in ("data", "token"):
            s[f"n_{flag.name}"] = int(table[flag.name].sum())
            s[f"{flag.name}_rate"] = _rate(table[flag.name], scored if flag.kind == "reference" else everyone)
    if "response_id" not in table.columns:  # a group's numbers only (diagnostics.summarize_groups)
        return s
    lists = response_lists(table, EXAMPLES)
    examples = {item.id: [str(v) for v in item.rows["response_id"]] for item in lists}
    for item in lists:
        if item.id.startswith("ref_"):  # the reference's view of each label: counted too
            s[f"n_{item.id}"] = item.n
    for flag in flags.RESPONSE_FLAGS:  # every other flag: its first responses in table order
        if flag.name not in examples and flag.name in table.columns and table[flag.name].any():
            examples[flag.name] = [str(v) for v in table.loc[table[flag.name].astype(bool), "response_id"].head(EXAMPLES)]
    if examples:
        s["pair_examples"] = examples
    return s


def response_lists(table: pd.DataFrame, n: int = 10) -> list[PairList]:
    """The responses behind each finding, cut to ``n`` and ordered by a per-token measure."""
    lists = []
    desirable = table["label"].astype(bool)
    scored = _scored(table)

    def add(list_id: str, title: str, mask: pd.Series, key: pd.Series | None, order: str) -> None:
        mask = mask.fillna(False).astype(bool)
        if mask.any():
            rows = table[mask]
            if key is not None:
                rows = rows.loc[key[mask].sort_values(kind="stable", na_position="last").index]
            lists.append(PairList(list_id, title, order, int(mask.sum()), rows.head(n)))

    if "non_finite" in table.columns:
        add("non_finite", "Responses with a NaN or infinite log-prob (left out of every rate)", table["non_finite"],
            None, "table order")  # fmt: skip
    if "logratio" in table.columns:
        per_token = table["logratio"] / table["completion_tokens"].where(table["completion_tokens"] > 0)
        add("desirable_displaced", "Desirable responses the policy made less likely (likelihood displacement)",
            table["desirable_displaced"], per_token, "log-ratio per token, lowest first")
        add("undesirable_raised", "Undesirable responses the policy made more likely", table["undesirable_raised"],
            -per_token, "log-ratio per token, highest first")  # fmt: skip
    elif "ref_logp" in table.columns:
        add("ref_disfavours_desirable", "Desirable responses the reference disfavours (per-token log-prob below the "
            "median)", scored & desirable & ~table["ref_favoured"], table["ref_logp_per_token"],
            "reference log-prob per token, lowest first")  # fmt: skip
        add("ref_favours_undesirable", "Undesirable responses the reference favours (per-token log-prob above the "
            "median)", scored & ~desirable & table["ref_favoured"], -table["ref_logp_per_token"],
            "reference log-prob per token, highest first")  # fmt: skip
    problems = [f.name for f in flags.RESPONSE_FLAGS if f.hard and f.name in table.columns]
    flagged = table[problems].astype(bool)
    if problems and flagged.any(axis=None):
        add("data_problems", "Data problems: " + ", ".join(flags.response_label(f) for f in problems
            if flagged[f].any()), flagged.any(axis=1), -flagged.sum(axis=1), "number of problems, most first")
    return lists


def findings(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict's findings on an unpaired run, most severe first (each quotes only the summary's numbers)."""
    out = []

    def add(finding_id: str, level: str, text: str, keys: list[str], n: int = 0) -> None:
        out.append(_finding(s, finding_id, level, text, keys, n))

    if s.get("n_non_finite"):
        add("non_finite", "fail", f"{plural(s['n_non_finite'], 'scored response')} got a NaN or infinite log-prob: "
            "they are left out of every rate and mean.", ["n_non_finite"], s["n_non_finite"])  # fmt: skip
    if s.get("mean_reward_gap") is not None:
        if s.get("policy_unchanged_rate") == 1:
            add("policy_unchanged", "fail", "The policy scores every response exactly as the reference: it is the "
                "reference, or was not trained.", ["policy_unchanged_rate"])  # fmt: skip
        elif s["mean_reward_gap"] <= 0:
            add("reward_gap", "fail", f"The implicit reward does not separate the labels: desirable responses "
                f"average {_v(s, 'mean_reward_desirable')}, undesirable ones {_v(s, 'mean_reward_undesirable')}.",
                ["mean_reward_desirable", "mean_reward_undesirable"])  # fmt: skip
        displaced = s.get("desirable_displaced_rate") or 0
        add("desirable_displaced", "warn" if displaced >= 0.5 else "ok", f"The policy made "
            f"{_v(s, 'desirable_displaced_rate')} of desirable responses less likely (likelihood displacement) and "
            f"{_v(s, 'undesirable_raised_rate')} of undesirable ones more likely.",
            ["desirable_displaced_rate", "undesirable_raised_rate"], s.get("n_desirable_displaced", 0))
        if None not in (s.get("policy_desirable_auc"), s.get("ref_desirable_auc")):
            worse = s["policy_desirable_auc"] < s["ref_desirable_auc"]
            add("policy_auc", "warn" if worse else "ok", f"Ranked by per-token log-prob, a desirable response beats an "
                f"undesirable one with AUC {_v(s, 'policy_desirable_auc')} under the policy and "
                f"{_v(s, 'ref_desirable_auc')} under the reference.", ["policy_desirable_auc", "ref_desirable_auc"])
    elif s.get("ref_desirable_auc") is not None or s.get("ref_favoured_desirable_rate") is not None:
        auc = s.get("ref_desirable_auc")
        text = (f"The reference already favours {_v(s, 'ref_favoured_desirable_rate')} of desirable and "
                f"{_v(s, 'ref_favoured_undesirable_rate')} of undesirable responses (per-token log-prob above the "
                "median).")  # fmt: skip
        if auc is not None:
            text += (f" Ranked by it, a desirable response beats an undesirable one with AUC {_v(s, 'ref_desirable_auc')}"
                     " (one half: no separation).")
        keys = ["ref_favoured_desirable_rate", "ref_favoured_undesirable_rate"] + (["ref_desirable_auc"] if auc
                                                                                    is not None else [])
        add("ref_favours_undesirable", "warn" if auc is not None and auc < 0.5 else "ok", text, keys,
            s.get("n_ref_favours_undesirable", 0))
        if s.get("ref_prompt_accuracy") is not None:
            add("ref_prompt_accuracy", "ok", f"On the {_v(s, 'n_prompts_both_labels')} prompts with both labels, "
                f"the reference gives the desirable responses the higher per-token log-prob on "
                f"{_v(s, 'ref_prompt_accuracy')}.", ["n_prompts_both_labels", "ref_prompt_accuracy"])
    for flag in flags.RESPONSE_FLAGS:
        count = s.get(f"n_{flag.name}") or 0
        if flag.hard and count:
            add(flag.name, "warn", f"{plural(count, 'response')} flagged {flag.label}: {flag.description}.",
                [f"n_{flag.name}"], count)
    if s.get("desirable_weight_min") is not None:
        ratio = s["n_desirable"] / s["n_undesirable"]
        level = "ok" if WEIGHT_RATIO[0] <= ratio <= WEIGHT_RATIO[1] else "warn"
        add("kto_weights", level, f"{_v(s, 'n_desirable')} desirable and {_v(s, 'n_undesirable')} undesirable "
            f"responses: KTO's recommended balance needs desirable_weight between {_v(s, 'desirable_weight_min')} "
            f"and {_v(s, 'desirable_weight_max')} (undesirable_weight at its default).",
            ["n_desirable", "n_undesirable", "desirable_weight_min", "desirable_weight_max"])
    elif s.get("n_responses"):
        only = "desirable" if s.get("n_desirable") else "undesirable"
        add("one_label", "warn", f"Every one of the {_v(s, 'n_responses')} responses is {only}: KTO learns from "
            "both labels.", ["n_responses"])
    return sorted(out, key=lambda f: LEVELS.index(f["level"]))
