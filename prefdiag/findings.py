"""The verdict's findings: each a level (ok / warn / fail), a sentence that quotes only numbers of the summary
(written by prefdiag.formatting, as the reports write them), the summary keys it rests on and the pairs behind it.
Pure Python on a summary dict: no pandas, no torch."""

from __future__ import annotations

from typing import Any

from prefdiag import flags
from prefdiag.formatting import format_value, plural

LEVELS = ("fail", "warn", "ok")  # most severe first
SHOWN_IDS = 3  # pair ids named in a finding before "and N more"
ID_LIMIT = 40  # characters of each id named


def _get(summary: dict[str, Any], key: str) -> Any:
    """A summary value by key, nested keys by dotted path (None when absent)."""
    value: Any = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _v(summary: dict[str, Any], key: str) -> str:
    """A summary value as the reports write it."""
    return format_value(key, _get(summary, key))


def pairs_text(ids: list[str], n: int) -> str:
    """"p1, p2, p3 and 12 more" (the first few ids of the ``n`` pairs behind a finding)."""
    shown = [str(i) if len(str(i)) <= ID_LIMIT else str(i)[: ID_LIMIT - 1] + "…" for i in ids[:SHOWN_IDS]]
    if not shown:
        return ""
    rest = n - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def _finding(
    summary: dict[str, Any], finding_id: str, level: str, text: str, keys: list[str], n: int = 0
) -> dict[str, Any]:
    """One finding: its sentence, the summary numbers it quotes, and the first ids of the ``n`` pairs behind it
    (the summary's ``pair_examples`` under the finding's id)."""
    ids = list((summary.get("pair_examples") or {}).get(finding_id, []))
    return {
        "id": finding_id,
        "level": level,
        "text": text,
        "numbers": {key: _get(summary, key) for key in keys},
        "pairs": ids,
        "n_pairs": n,
        "pairs_text": pairs_text(ids, n),
    }


def findings(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finding a summary supports, most severe first (a stable order within a level)."""
    from prefdiag import unpaired  # imports this module: loaded when first asked

    if unpaired.is_unpaired(summary):  # unpaired rows: per-response findings
        return unpaired.findings(summary)
    found = _model_findings(summary) + _data_findings(summary)
    if not found:
        found.append(_finding(summary, "no_model", "ok", f"{_v(summary, 'n_pairs')} pairs loaded; no model was "
                              "scored and no data check flagged a pair.", ["n_pairs"]))  # fmt: skip
    return sorted(found, key=lambda f: LEVELS.index(f["level"]))


def _model_findings(s: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    n_bad = s.get("n_non_finite") or 0
    if n_bad:
        models = [m for m in ("reference", "policy") if s.get(f"n_non_finite_{m}")]
        keys = ["n_non_finite", *(f"n_non_finite_{m}" for m in models)]
        where = " and ".join(f"the {m}'s log-probs ({_v(s, f'n_non_finite_{m}')})" for m in models)
        out.append(_finding(s, "non_finite", "fail", f"{plural(n_bad, 'scored pair')} got a NaN or infinite "
                            f"log-prob, in {where}: they are left out of every rate and mean.", keys, n=n_bad))
    if s.get("ranking_accuracy") is not None:
        out += _policy_findings(s)
    elif s.get("ref_ranking_accuracy") is not None:
        ref_wrong = s.get("ref_prefers_rejected_rate") or 0
        out.append(_finding(
            s, "ref_prefers_rejected", "warn" if ref_wrong >= 0.3 else "ok",
            f"The reference prefers the rejected answer on {_v(s, 'ref_prefers_rejected_rate')} of pairs: DPO "
            f"starts them on the wrong side, and a pair flips only once its loss falls below its flip_loss "
            f"(idealised ranking accuracy {_v(s, 'idealised_ranking_accuracy')}). Score a policy to see how many "
            "it fixed.",
            ["ref_prefers_rejected_rate", "idealised_ranking_accuracy"], n=s.get("n_ref_prefers_rejected") or 0,
        ))  # fmt: skip
    return out


def _policy_findings(s: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    reward, ranking, ref = s.get("reward_accuracy"), s["ranking_accuracy"], s.get("ref_ranking_accuracy")
    if s.get("policy_unchanged_rate") == 1:
        out.append(_finding(
            s, "policy_equals_reference", "fail",
            "The policy scores every pair exactly as the reference does (every reward margin is zero): reward "
            f"accuracy {_v(s, 'reward_accuracy')}, mean DPO loss {_v(s, 'mean_dpo_loss')}, the loss of a policy "
            "that did not move. Is --policy the reference checkpoint, or an untrained copy of it?",
            ["policy_unchanged_rate", "reward_accuracy", "mean_dpo_loss"],
        ))  # fmt: skip
        return out  # nothing else a policy that did not move can tell
    nmr = s.get("negative_margin_regime_rate")
    if nmr is not None and nmr >= 0.05:
        out.append(_finding(
            s, "negative_margin_regime", "fail" if nmr >= 0.15 else "warn",
            f"{_v(s, 'negative_margin_regime_rate')} of pairs are in the negative-margin regime: DPO's loss counts "
            "them as learned while the policy still prefers the rejected answer (reward accuracy "
            f"{_v(s, 'reward_accuracy')}, ranking accuracy {_v(s, 'ranking_accuracy')}).",
            ["negative_margin_regime_rate", "reward_accuracy", "ranking_accuracy"],
            n=s.get("n_negative_margin_regime") or 0,
        ))  # fmt: skip
    if reward is not None and reward < 0.5:
        out.append(_finding(
            s, "reward_accuracy_below_half", "fail",
            f"Reward accuracy is {_v(s, 'reward_accuracy')}, below a half: on most pairs the policy moved toward "
            "the rejected answer relative to the reference.", ["reward_accuracy"],
        ))  # fmt: skip
    elif reward is not None and ranking < 0.6 and reward - ranking >= 0.1:
        out.append(_finding(
            s, "reward_overstates_ranking", "warn",
            f"Reward accuracy is {_v(s, 'reward_accuracy')} but the policy ranks only {_v(s, 'ranking_accuracy')} "
            "of pairs correctly: the loss curve overstates what was learned.",
            ["reward_accuracy", "ranking_accuracy"],
        ))  # fmt: skip
    if ref is not None and ranking < ref:
        out.append(_finding(
            s, "ranking_below_reference", "fail" if ref - ranking >= 0.05 else "warn",
            f"The policy ranks {_v(s, 'ranking_accuracy')} of pairs correctly, fewer than the reference "
            f"({_v(s, 'ref_ranking_accuracy')}).", ["ranking_accuracy", "ref_ranking_accuracy"],
        ))  # fmt: skip
    broken = (s.get("transitions") or {}).get("ref_correct_to_policy_incorrect") or 0
    if broken:
        key = "transitions.ref_correct_to_policy_incorrect"
        out.append(_finding(
            s, "broken_by_training", "warn" if (s.get("break_rate") or 0) >= 0.05 else "ok",
            f"The policy broke {_v(s, 'break_rate')} of the pairs the reference ranked correctly "
            f"({_v(s, key)} pairs).", ["break_rate", key], n=broken,
        ))  # fmt: skip
    if (s.get("likely_mislabeled_rate") or 0) > 0:
        out.append(_finding(
            s, "likely_mislabeled", "warn" if s["likely_mislabeled_rate"] >= 0.1 else "ok",
            f"{_v(s, 'likely_mislabeled_rate')} of pairs look mislabeled: after training the implicit reward still "
            "clearly prefers the rejected answer.", ["likely_mislabeled_rate"], n=s.get("n_likely_mislabeled") or 0,
        ))  # fmt: skip
    displaced = s.get("chosen_displaced_rate")
    if displaced is not None and displaced >= 0.5:
        out.append(_finding(
            s, "chosen_displaced", "warn",
            f"The chosen answer's likelihood fell on {_v(s, 'chosen_displaced_rate')} of pairs (likelihood "
            f"displacement), though ranking accuracy is {_v(s, 'ranking_accuracy')}.",
            ["chosen_displaced_rate", "ranking_accuracy"], n=s.get("n_chosen_displaced") or 0,
        ))  # fmt: skip
    if s.get("ref_prefers_rejected_rate") and s.get("flip_rate") is not None:
        out.append(_finding(
            s, "ref_prefers_rejected", "ok",
            f"The reference prefers the rejected answer on {_v(s, 'ref_prefers_rejected_rate')} of pairs; the "
            f"policy fixed {_v(s, 'flip_rate')} of them.", ["ref_prefers_rejected_rate", "flip_rate"],
            n=s.get("n_ref_prefers_rejected") or 0,
        ))  # fmt: skip
    out.append(_finding(
        s, "ranking", "ok",
        f"The policy ranks {_v(s, 'ranking_accuracy')} of pairs correctly (reference {_v(s, 'ref_ranking_accuracy')}"
        f"), with {_v(s, 'negative_margin_regime_rate')} in the negative-margin regime.",
        ["ranking_accuracy", "ref_ranking_accuracy", "negative_margin_regime_rate"],
    ))  # fmt: skip
    return out


# Data and token flags worth a finding of their own (the hard data flags share one: pairs to fix before training).
_SOFT_DATA = {"boundary_mismatch": "warn", "dropped": "warn", "truncated": "ok", "near_identical": "ok",
              "length_ratio": "ok"}  # fmt: skip


def _data_findings(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The data problems, with or without a model: the hard ones in one finding, the others one each."""
    out = []
    hard = [(name, s[f"n_{name}"]) for name in flags.hard_data_flags() if s.get(f"n_{name}")]
    if hard:
        hard.sort(key=lambda item: -item[1])
        listed = ", ".join(f"{_v(s, f'n_{name}')} {flags.REGISTRY[name].noun()}" for name, n in hard)
        out.append(_finding(s, "data_problems", "warn", f"{_v(s, 'n_pairs')} pairs loaded; pairs to fix before "
                            f"training: {listed}.", ["n_pairs", *(f"n_{name}" for name, _ in hard)],
                            n=s.get("n_data_problems") or 0))  # fmt: skip
    for name, level in _SOFT_DATA.items():
        n = s.get(f"n_{name}") or 0
        if n:
            out.append(_finding(s, name, level, f"{_v(s, f'n_{name}')} of {_v(s, 'n_pairs')} pairs flagged: "
                                f"{flags.label(name)}.", [f"n_{name}", "n_pairs"], n=n))  # fmt: skip
    return out
