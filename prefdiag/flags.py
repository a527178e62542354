"""The one registry of per-pair flags: name, kind, label, one-line description and score column. The checks, the
diagnostics, the gate catalogue and every report read it (no torch, no pandas).

Kinds: ``data`` (model-free checks of the text), ``token`` (need only a tokenizer), ``reference`` (need the
reference's log-probs), ``policy`` (need the policy's too). A flag is a boolean column of the pairs table named
``name``; the summary holds ``<name>_rate`` and ``n_<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("data", "token", "reference", "policy")


@dataclass(frozen=True)
class Flag:
    """One per-pair flag as the registry describes it."""

    name: str
    kind: str  # one of KINDS
    label: str  # a few words for tables and chips
    description: str  # one line: what it means
    score: str | None = None  # a float column that ranks the flagged pairs, when there is one
    hard: bool = False  # a data problem that makes the pair useless or contradictory whatever the model
    counted: str | None = None  # the words after a count of flagged pairs: "4 conflicting", "2 with an empty prompt"

    def noun(self) -> str:
        """What flagged pairs are called after their count in a sentence."""
        return self.counted or f"flagged {self.label}"


FLAGS: tuple[Flag, ...] = (
    # -- data: prefdiag.checks, no model -----------------------------------------------------------------------
    Flag("identical", "data", "identical responses", "chosen == rejected after whitespace normalisation", hard=True,
         counted="with identical responses"),
    Flag("near_identical", "data", "near-identical responses",
         "responses a few edits apart (similarity >= 0.9, DPOP's failure mode)", "near_identical_score"),
    Flag("duplicate", "data", "duplicated pair", "the same (prompt, chosen, rejected) appears more than once",
         hard=True, counted="duplicated"),
    Flag("conflict", "data", "conflicting pair",
         "for one prompt, a response is chosen in one pair and rejected in another", hard=True,
         counted="conflicting"),
    Flag("empty_response", "data", "empty response", "chosen or rejected is empty", hard=True,
         counted="with an empty response"),
    Flag("empty_prompt", "data", "empty prompt", "the prompt is empty", hard=True,
         counted="with an empty prompt"),
    Flag("length_ratio", "data", "length ratio > 4x", "one response is over 4x longer than the other",
         "length_ratio_score"),
    Flag("reversed_pair", "data", "reversed pair", "the pair also appears with chosen and rejected swapped",
         hard=True, counted="reversed"),
    # -- token: a tokenizer ------------------------------------------------------------------------------------
    Flag("truncated", "token", "truncated at --max-length", "prompt+chosen or prompt+rejected was cut at max_length"),
    Flag("dropped", "token", "dropped (prompt fills --max-length)",
         "the prompt alone reaches max_length: TRL drops the pair, it is not scored"),
    Flag("boundary_mismatch", "token", "token boundary mismatch",
         "the prompt's tokens are not a prefix of prompt+completion's tokens"),
    # -- reference: the reference's log-probs -----------------------------------------------------------------
    Flag("non_finite", "reference", "non-finite log-prob",
         "a scored pair with a NaN or infinite log-prob: left out of every rate and mean"),
    Flag("ref_prefers_rejected", "reference", "reference prefers rejected", "ref_margin < 0", "ref_margin"),
    Flag("high_ches", "reference", "high CHES (top 5%)",
         "length-normalised CHES in the dataset's top 5%: DPO will likely lower the chosen likelihood",
         "ches_norm_percentile"),
    # -- policy: the policy's log-probs too -------------------------------------------------------------------
    Flag("negative_margin_regime", "policy", "negative-margin regime",
         "reward_margin > 0 but policy_margin < 0: the loss counts the pair as learned, the policy prefers rejected",
         "policy_margin_per_token"),
    Flag("negative_margin_regime_per_token", "policy", "negative-margin regime per token",
         "the negative-margin regime on per-token (length-normalised) margins", "policy_margin_per_token"),
    Flag("chosen_displaced", "policy", "chosen displaced", "policy_chosen_logp < ref_chosen_logp",
         "chosen_logratio"),
    Flag("both_displaced", "policy", "both displaced", "both log-probs fell from reference to policy"),
    Flag("likely_mislabeled", "policy", "likely mislabeled",
         "the implicit reward still clearly prefers rejected (reward_margin < -1, or the top 5% of DPO loss)",
         "mislabel_score"),
)  # fmt: skip
# Flags of unpaired (KTO) rows, one per response (prefdiag.unpaired): a separate registry, as no pair flag applies.
RESPONSE_FLAGS: tuple[Flag, ...] = (
    Flag("duplicate", "data", "duplicated response", "the same prompt, completion and label appear more than once",
         hard=True),
    Flag("conflicting_label", "data", "conflicting label",
         "the same prompt and completion are labelled both desirable and undesirable", hard=True),
    Flag("empty_response", "data", "empty completion", "the completion is empty", hard=True),
    Flag("empty_prompt", "data", "empty prompt", "the prompt is empty", hard=True),
    Flag("truncated", "token", "truncated at --max-length", "prompt+completion was cut at max_length"),
    Flag("dropped", "token", "dropped (prompt fills --max-length)",
         "the prompt alone reaches max_length: TRL drops the row, it is not scored"),
    Flag("boundary_mismatch", "token", "token boundary mismatch",
         "the prompt's tokens are not a prefix of prompt+completion's tokens"),
    Flag("non_finite", "reference", "non-finite log-prob", "a NaN or infinite log-prob: left out of every rate"),
    Flag("ref_favoured", "reference", "favoured by the reference",
         "per-token log-prob above the median of all responses under the reference"),
    Flag("desirable_displaced", "policy", "desirable displaced", "a desirable response the policy made less likely"),
    Flag("undesirable_raised", "policy", "undesirable raised", "an undesirable response the policy made more likely"),
)  # fmt: skip
RESPONSE_LABELS: dict[str, str] = {flag.name: flag.label for flag in RESPONSE_FLAGS}
REGISTRY: dict[str, Flag] = {flag.name: flag for flag in FLAGS}
LABELS: dict[str, str] = {flag.name: flag.label for flag in FLAGS}


def names(*kinds: str) -> tuple[str, ...]:
    """The flag names of the given kinds (all kinds when none is given), in registry order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown flag kind(s) {sorted(unknown)}; expected {KINDS}")
    return tuple(flag.name for flag in FLAGS if not kinds or flag.kind in kinds)


def hard_data_flags() -> tuple[str, ...]:
    """Data problems that make a pair useless or contradictory for training, whatever the model."""
    return tuple(flag.name for flag in FLAGS if flag.hard)


def label(name: str) -> str:
    """The label of a flag, or the name itself when it is not registered."""
    return LABELS.get(name, name)


def response_label(name: str) -> str:
    """The label of an unpaired (KTO) response flag, or the name itself when it is not registered."""
    return RESPONSE_LABELS.get(name, name)
