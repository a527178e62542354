"""Unpaired (KTO) data: the per-response table, its flags, the summary and the verdict's findings (pandas only, no
torch). A row is one response to a prompt, labelled desirable or undesirable, as TRL's KTOTrainer reads it; there
is no pair, so no margin, no DPO loss and no pair flag.

- ``ref_logp``: the summed log-prob of the completion under the reference (TRL's tokenization, as for DPO).
- **Favoured by the reference**: the response's per-token log-prob is above ``ref_logp_per_token_median``, the
  median over all scored responses (a description of the reference's prior, not KTO's reference point z0, which is
  a KL estimate and is 0 before training). ``ref_favoured_desirable_rate`` and ``ref_favoured_undesirable_rate``
  are the shares of each label so favoured: how much of what KTO must raise the reference already rates above the
  typical response, and how much of what it must lower.
- ``ref_desirable_auc``: the chance that a random desirable response has a higher per-token log-prob than a random
  undesirable one (ties count half; 0.5 is no separation). ``ref_prompt_accuracy``: among prompts that have both
  labels, the share where the desirable responses' mean per-token log-prob is the higher.
- With a policy: ``logratio`` = policy_logp - ref_logp and ``reward`` = beta x logratio (TRL's rewards/chosen and
  rewards/rejected are the means of ``reward`` over desirable and undesirable responses); ``desirable_displaced``
  (a desirable response became less likely: likelihood displacement) and ``undesirable_raised``. ``reward_auc`` is
  the AUC of ``reward``, desirable against undesirable: what the training objective separates, as DPO's reward
  accuracy; ``policy_desirable_auc`` ranks the policy's own per-token likelihoods, as DPO's ranking accuracy.
- A response is scored when it was not dropped, its log-probs are finite and it has a completion token.
- Weights: Ethayarajh et al. (2024, arXiv 2402.01306, section 4) recommend desirable_weight x n_desirable /
  (undesirable_weight x n_undesirable) in [1, 4/3]; the summary gives the desirable_weight range that meets it
  with undesirable_weight 1.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from prefdiag import flags
from prefdiag.diagnostics import EXAMPLES, PairList, _mean, _rate, list_adder
from prefdiag.findings import LEVELS, _finding, _v
from prefdiag.formatting import plural

log = logging.getLogger(__name__)

SHAPE = "kto"  # summary["data_shape"] of an unpaired run
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


def table_name(summary: dict[str, Any] | None) -> str:
    """What a run's per-row table is called on disk (``<name>.parquet``): "responses" for KTO rows, else "pairs"."""
    return "responses" if is_unpaired(summary) else "pairs"


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
        for name in ("truncated", "dropped", "boundary_mismatch"):
            out[name] = scores[name].to_numpy(bool)
        logps = out[["ref_logp"] + (["policy_logp"] if policy else [])].to_numpy(float)
        out["non_finite"] = ~out["dropped"].to_numpy() & ~np.isfinite(logps).all(axis=1)
        good = _scored(out).to_numpy()
        point = np.median(out.loc[good, "ref_logp_per_token"]) if good.any() else np.nan
        out["ref_favoured"] = good & (out["ref_logp_per_token"].to_numpy() > point)
        if policy:
            out["desirable_displaced"] = good & label & (out["logratio"].to_numpy() < 0)
            out["undesirable_raised"] = good & ~label & (out["logratio"].to_numpy() > 0)
    out = pd.concat([out, pd.DataFrame(_data_checks(features, label))], axis=1)
    out["prompt"] = pairs["prompt"].reset_index(drop=True)  # the loaded column's own type (Arrow text, messages)
    out["completion"] = pairs["chosen"].reset_index(drop=True)
    extras = pairs.drop(columns=["pair_id", "prompt", "chosen", "rejected", "label"]).reset_index(drop=True)
    clashing = {name: f"data_{name}" for name in extras.columns if name in out.columns or name in COLUMN_ORDER}
    if clashing:  # the data's own column named like one of prefdiag's: kept, renamed
        log.warning("data columns renamed so as not to clash with prefdiag's: %s",
                    ", ".join(f"{a} -> {b}" for a, b in clashing.items()))  # fmt: skip
        extras = extras.rename(columns=clashing)
    out = pd.concat([out, extras], axis=1)
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
    """Responses with numbers: not dropped, finite log-probs, at least one completion token."""
    if "ref_logp" not in table.columns:
        return pd.Series(False, index=table.index)
    return ~table["dropped"].astype(bool) & ~table["non_finite"].astype(bool) & (table["completion_tokens"] > 0)


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
    kept = desirable[~table["dropped"].astype(bool)] if "dropped" in table.columns else desirable  # what TRL trains on
    kept_d, kept_u = int(kept.sum()), int((~kept).sum())
    if kept_d and kept_u:
        ratio = kept_u / kept_d
        s["desirable_weight_min"], s["desirable_weight_max"] = WEIGHT_RATIO[0] * ratio, WEIGHT_RATIO[1] * ratio
    s["n_prompts"] = int(pd.Series(_prompt_keys(table)).nunique())
    if "ref_logp" in table.columns:
        s["n_scored"] = int(scored.sum())
        s["n_non_finite"] = int(table["non_finite"].sum())
        s["n_ref_favoured"] = int(table["ref_favoured"].sum())
        good = table[scored]
        good_d = desirable[scored]
        if "response_id" in table.columns:  # the whole table's (a group's rows keep the whole table's flags)
            s["ref_logp_per_token_median"] = float(good["ref_logp_per_token"].median()) if len(good) else None
        s["ref_favoured_desirable_rate"] = _rate(table["ref_favoured"] & desirable, scored & desirable)
        s["ref_favoured_undesirable_rate"] = _rate(table["ref_favoured"] & ~desirable, scored & ~desirable)
        s["ref_desirable_auc"] = _auc(good["ref_logp_per_token"], good_d)
        s["n_prompts_both_labels"], s["ref_prompt_accuracy"] = _prompt_accuracy(table, "ref_logp_per_token", scored)
        s["mean_ref_logp_desirable"] = _mean(good.loc[good_d, "ref_logp"])
        s["mean_ref_logp_undesirable"] = _mean(good.loc[~good_d, "ref_logp"])
    if "policy_logp" in table.columns:
        good = table[scored]
        good_d = desirable[scored]
        s["reward_auc"] = _auc(good["reward"], good_d)
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
        if flag.name in table.columns and flag.kind in ("data", "token"):  # rates over every response
            s[f"n_{flag.name}"] = int(table[flag.name].sum())
            s[f"{flag.name}_rate"] = _rate(table[flag.name], everyone)
    if "response_id" not in table.columns:  # a group's numbers only (diagnostics.summarize_groups)
        return s
    lists = response_lists(table, EXAMPLES)
    examples = {item.id: [str(v) for v in item.rows["response_id"]] for item in lists}
    for item in lists:
        if item.id.startswith("ref_"):  # the reference's view of each label: counted too
            s[f"n_{item.id}"] = item.n
    for flag in flags.RESPONSE_FLAGS:  # every other flag: its first responses in table order
        if flag.name not in examples and flag.name in table.columns and table[flag.name].any():
            ids = table.loc[table[flag.name].astype(bool), "response_id"]
            examples[flag.name] = [str(v) for v in ids.head(EXAMPLES)]
    if examples:
        s["pair_examples"] = examples
    return s


def response_lists(table: pd.DataFrame, n: int = 10) -> list[PairList]:
    """The responses behind each finding, cut to ``n`` and ordered by a per-token measure."""
    lists: list[PairList] = []
    add = list_adder(table, n, lists)
    desirable = table["label"].astype(bool)
    scored = _scored(table)

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
    out: list[dict[str, Any]] = []

    def add(finding_id: str, level: str, text: str, keys: list[str], n: int = 0) -> None:
        out.append(_finding(s, finding_id, level, text, keys, n))

    if s.get("n_non_finite"):
        add("non_finite", "fail", f"{plural(s['n_non_finite'], 'scored response')} got a NaN or infinite log-prob: "
            "they are left out of every rate and mean.", ["n_non_finite"], s["n_non_finite"])  # fmt: skip
    if "policy_unchanged_rate" in s:
        _policy_findings(s, add)
    elif "ref_favoured_desirable_rate" in s:
        _reference_findings(s, add)
    for flag in flags.RESPONSE_FLAGS:
        count = s.get(f"n_{flag.name}") or 0
        level = "warn" if flag.hard or flag.name in ("dropped", "boundary_mismatch") else "ok"
        if count and (flag.hard or flag.kind == "token"):
            add(flag.name, level, f"{plural(count, 'response')} flagged {flag.label}: {flag.description}.",
                [f"n_{flag.name}"], count)
    if s.get("desirable_weight_min") is not None:
        inside = s["desirable_weight_min"] <= 1.0 <= s["desirable_weight_max"]
        add("kto_weights", "ok" if inside else "warn", f"{_v(s, 'n_desirable')} desirable and "
            f"{_v(s, 'n_undesirable')} undesirable responses: KTO's recommended balance of the responses it trains "
            f"on needs desirable_weight between {_v(s, 'desirable_weight_min')} and "
            f"{_v(s, 'desirable_weight_max')} (undesirable_weight at its default), which the default desirable_weight "
            f"is {'inside' if inside else 'outside'}.",
            ["n_desirable", "n_undesirable", "desirable_weight_min", "desirable_weight_max"])  # fmt: skip
    elif s.get("n_responses"):
        only = "desirable" if s.get("n_desirable") else "undesirable"
        add("one_label", "warn", f"Every one of the {_v(s, 'n_responses')} responses is {only}: KTO learns from "
            "both labels.", ["n_responses"])
    return sorted(out, key=lambda f: LEVELS.index(f["level"]))


def _policy_findings(s: dict[str, Any], add) -> None:
    gap = s.get("mean_reward_gap")
    if s.get("policy_unchanged_rate") == 1:
        add("policy_unchanged", "fail", "The policy scores every response exactly as the reference: it is the "
            "reference, or was not trained.", ["policy_unchanged_rate"])  # fmt: skip
    elif gap is not None and gap <= 0:
        add("reward_gap", "fail", f"The implicit reward does not separate the labels: desirable responses average "
            f"{_v(s, 'mean_reward_desirable')}, undesirable ones {_v(s, 'mean_reward_undesirable')}.",
            ["mean_reward_desirable", "mean_reward_undesirable"])  # fmt: skip
    changes = [(key, words) for key, words in (
        ("desirable_displaced_rate", "of desirable responses less likely (likelihood displacement)"),
        ("undesirable_raised_rate", "of undesirable ones more likely")) if s.get(key) is not None]  # fmt: skip
    if changes:
        level = "warn" if any(s[key] >= 0.5 for key, _ in changes) else "ok"
        add("desirable_displaced", level, "The policy made " + " and ".join(f"{_v(s, key)} {words}" for key, words
            in changes) + ".", [key for key, _ in changes], s.get("n_desirable_displaced") or 0)  # fmt: skip
    reward = s.get("mean_reward_desirable")
    if reward is not None and reward < 0:
        add("desirable_reward_negative", "warn", f"Desirable responses average a reward of "
            f"{_v(s, 'mean_reward_desirable')}: below zero, where KTO's reference point (a KL estimate) never goes, "
            "so on average they sit on the losing side of KTO's loss.", ["mean_reward_desirable"])  # fmt: skip
    if s.get("reward_auc") is not None and s.get("policy_desirable_auc") is not None:
        auc, likelihood, ref = s["reward_auc"], s["policy_desirable_auc"], s.get("ref_desirable_auc")
        keys = ["reward_auc", "policy_desirable_auc"] + (["ref_desirable_auc"] if ref is not None else [])
        text = (f"The implicit reward ranks a desirable response above an undesirable one with AUC "
                f"{_v(s, 'reward_auc')}; by per-token likelihood the policy does with AUC "
                f"{_v(s, 'policy_desirable_auc')}" + (f", the reference {_v(s, 'ref_desirable_auc')}" if ref is not None
                                                      else "") + ".")  # fmt: skip
        if auc > 0.5 > likelihood:
            text += (" The loss sees the labels apart while the policy still makes undesirable responses the likelier: "
                     "KTO's counterpart of the negative-margin regime.")
        level = "warn" if auc <= 0.5 or likelihood < 0.5 or (ref is not None and likelihood < ref) else "ok"
        add("reward_auc", level, text, keys)


def _reference_findings(s: dict[str, Any], add) -> None:
    auc = s.get("ref_desirable_auc")
    keys = [key for key in ("ref_favoured_desirable_rate", "ref_favoured_undesirable_rate") if s.get(key) is not None]
    words = {"ref_favoured_desirable_rate": "of desirable responses",
             "ref_favoured_undesirable_rate": "of undesirable ones"}
    text = ("The reference already favours " + " and ".join(f"{_v(s, key)} {words[key]}" for key in keys)
            + " (per-token log-prob above the median of all responses).")  # fmt: skip
    if auc is not None:
        text += (f" Ranked by it, a desirable response beats an undesirable one with AUC {_v(s, 'ref_desirable_auc')}"
                 " (one half: no separation).")
        keys.append("ref_desirable_auc")
    add("ref_favours_undesirable", "warn" if auc is not None and auc < 0.5 else "ok", text, keys,
        s.get("n_ref_favours_undesirable") or 0)
    if s.get("ref_prompt_accuracy") is not None:
        add("ref_prompt_accuracy", "ok", f"On the {_v(s, 'n_prompts_both_labels')} prompts with both labels, the "
            f"reference gives the desirable responses the higher per-token log-prob on {_v(s, 'ref_prompt_accuracy')}.",
            ["n_prompts_both_labels", "ref_prompt_accuracy"])
