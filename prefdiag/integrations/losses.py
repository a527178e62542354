"""Constrained DPO losses that target the policy's own margin (Yang et al. 2026, arXiv 2605.20834; DPOP, Pal et al.
2024), per pair, from summed log-probs and completion lengths; torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONSTRAINTS = ("none", "clip", "cpo", "dpop")
MARGINS = ("mean", "sum")


@dataclass(frozen=True)
class ConstraintSettings:
    """Which objective and its parameters. ``margin="mean"``: margins of mean per-token log-probs (the paper's code);
    ``"sum"``: of summed log-probs (TRL's convention). ``constraint="none"`` is plain DPO (TRL's sigmoid loss)."""

    constraint: str = "clip"
    margin: str = "mean"
    gamma: float = 0.5  # cpo: the margin the policy must reach where the reference's is below it
    tau: float = 2.0  # cpo: sharpness of the soft hinge softplus_tau
    alpha: float = 1.0  # cpo: the penalty is weighted beta / alpha
    dpop_lambda: float = 50.0  # dpop: weight of max(0, -chosen_logratio)

    def validate(self) -> None:
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r}")
        if self.margin not in MARGINS:
            raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {self.margin!r}")
        if not (self.tau > 0 and self.alpha > 0):
            raise ValueError(f"tau and alpha must be > 0, got tau={self.tau}, alpha={self.alpha}")


def softplus_tau(z: torch.Tensor, tau: float) -> torch.Tensor:
    """log(1 + exp(tau z)) / tau: a hinge max(z, 0) smoothed by tau (stable for large |z|)."""
    return F.softplus(tau * z) / tau


def margins(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    margin: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy margin, reference margin, chosen log-ratio, rejected log-ratio) from summed log-probs, each divided
    by its completion length first when ``margin="mean"``."""
    if margin == "mean":
        nc = chosen_tokens.clamp(min=1).to(policy_chosen.dtype)
        nr = rejected_tokens.clamp(min=1).to(policy_chosen.dtype)
        policy_chosen, policy_rejected = policy_chosen / nc, policy_rejected / nr
        ref_chosen, ref_rejected = ref_chosen / nc, ref_rejected / nr
    elif margin != "sum":
        raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {margin!r}")
    return (
        policy_chosen - policy_rejected,
        ref_chosen - ref_rejected,
        policy_chosen - ref_chosen,
        policy_rejected - ref_rejected,
    )


def in_undesirable_space(policy_margin: torch.Tensor, ref_margin: torch.Tensor) -> torch.Tensor:
    """The paper's U: the policy prefers the rejected answer, by less than the reference did."""
    return (policy_margin < 0) & (policy_margin > ref_margin)


def constrained_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    settings: ConstraintSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss and the per-pair U mask (both on the margins of ``settings.margin``):

    - none: ``-log σ(β (Δπ - Δref))`` (DPO);
    - clip: ``-log σ(β (Δπ - max(Δref, 0)))``;
    - cpo: ``-log σ(β (Δπ - Δref) - (β/α) softplus_τ(γ - Δref))``;
    - dpop: ``-log σ(β (Δc - Δr - λ max(0, -Δc)))`` with Δc, Δr the chosen and rejected log-ratios.
    """
    settings.validate()
    policy_margin, ref_margin, chosen_ratio, rejected_ratio = margins(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, settings.margin
    )
    if settings.constraint == "none":
        logits = beta * (policy_margin - ref_margin)
    elif settings.constraint == "clip":
        logits = beta * (policy_margin - ref_margin.clamp(min=0))
    elif settings.constraint == "cpo":
        penalty = (beta / settings.alpha) * softplus_tau(settings.gamma - ref_margin, settings.tau)
        logits = beta * (policy_margin - ref_margin) - penalty
    else:  # dpop
        logits = beta * (chosen_ratio - rejected_ratio - settings.dpop_lambda * (-chosen_ratio).clamp(min=0))
    return -F.logsigmoid(logits), in_undesirable_space(policy_margin.detach(), ref_margin.detach())
