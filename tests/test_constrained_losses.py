"""Each constrained loss against its formula on hand-made numbers (two pairs, both margin conventions)."""

from __future__ import annotations

import math

import pytest
import torch

from prefdiag.integrations.losses import ConstraintSettings, constrained_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# pair 1: summed margins policy +2, reference +6; per token (2 and 4 tokens) policy -2, reference -0.5.
# pair 2: summed margins policy +2, reference -4; per token policy -1, reference -3 (inside U per token).
POLICY_C, POLICY_R = torch.tensor([-10.0, -6.0]), torch.tensor([-12.0, -8.0])
REF_C, REF_R = torch.tensor([-8.0, -8.0]), torch.tensor([-14.0, -4.0])
N_C, N_R = torch.tensor([2, 2]), torch.tensor([4, 4])
BETA = 0.5

EXPECTED = {
    # -log sigmoid(z) = softplus(-z)
    ("none", "sum"): [softplus(-BETA * (2 - 6)), softplus(-BETA * (2 + 4))],
    ("clip", "sum"): [softplus(-BETA * (2 - 6)), softplus(-BETA * (2 - 0))],
    ("cpo", "sum"): [
        softplus(-(BETA * (2 - 6) - BETA * math.log1p(math.exp(2 * (0.5 - 6))) / 2)),
        softplus(-(BETA * (2 + 4) - BETA * math.log1p(math.exp(2 * (0.5 + 4))) / 2)),
    ],
    # chosen log-ratios -2 and +2, rejected log-ratios +2 and -4 (summed)
    ("dpop", "sum"): [softplus(-BETA * (-2 - 2 - 50 * 2)), softplus(-BETA * (2 + 4 - 0))],
    ("none", "mean"): [softplus(-BETA * (-2 + 0.5)), softplus(-BETA * (-1 + 3))],
    ("clip", "mean"): [softplus(-BETA * (-2 - 0)), softplus(-BETA * (-1 - 0))],
    ("cpo", "mean"): [
        softplus(-(BETA * (-2 + 0.5) - BETA * math.log1p(math.exp(2 * (0.5 + 0.5))) / 2)),
        softplus(-(BETA * (-1 + 3) - BETA * math.log1p(math.exp(2 * (0.5 + 3))) / 2)),
    ],
    # per-token chosen log-ratios -1 and +1, rejected +0.5 and -1
    ("dpop", "mean"): [softplus(-BETA * (-1 - 0.5 - 50 * 1)), softplus(-BETA * (1 + 1))],
}


@pytest.mark.parametrize("constraint,margin", sorted(EXPECTED))
def test_loss_matches_its_formula(constraint, margin):
    loss, in_u = constrained_loss(
        POLICY_C.double(), POLICY_R.double(), REF_C.double(), REF_R.double(), N_C, N_R, BETA,
        ConstraintSettings(constraint, margin),
    )  # fmt: skip
    assert loss.tolist() == pytest.approx(EXPECTED[(constraint, margin)], rel=1e-12)
    assert in_u.tolist() == ([False, True] if margin == "mean" else [False, False])


def test_cpo_parameters_change_the_target():
    settings = ConstraintSettings("cpo", "sum", gamma=3.0, tau=0.5, alpha=2.0)
    loss, _ = constrained_loss(POLICY_C.double(), POLICY_R.double(), REF_C.double(), REF_R.double(), N_C, N_R, BETA,
                               settings)
    penalty = (BETA / 2.0) * math.log1p(math.exp(0.5 * (3.0 + 4))) / 0.5
    assert loss[1].item() == pytest.approx(softplus(-(BETA * 6 - penalty)), rel=1e-12)


def test_gradient_flows_to_the_policy_only():
    policy_c = POLICY_C.clone().requires_grad_()
    loss, _ = constrained_loss(policy_c, POLICY_R, REF_C, REF_R, N_C, N_R, BETA, ConstraintSettings("clip", "mean"))
    loss.sum().backward()
    assert (policy_c.grad < 0).all()  # raising the chosen log-prob lowers the loss


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="constraint must be one of"):
        ConstraintSettings("hinge").validate()
    with pytest.raises(ValueError, match="margin must be one of"):
        ConstraintSettings("clip", "median").validate()
