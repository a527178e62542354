"""prefdiag inside TRL 1.x: ``PrefdiagCallback`` scores an eval set with the live policy and the trainer's reference
at each evaluation (or every N steps) and logs the diagnosis; ``ConstrainedDPOTrainer`` trains with a loss that
targets the policy's own margin (clip, cpo, dpop). The only module of prefdiag that imports trl.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from prefdiag import distributed
from prefdiag.data.writeback import write_file_atomically
from prefdiag.integrations.live import LIVE_BATCH_TOKENS, score_live, tokenize_eval_pairs
from prefdiag.integrations.losses import ConstraintSettings, constrained_loss

log = logging.getLogger(__name__)

PREFIX = "prefdiag/"
# summary key -> logged name (after PREFIX)
LOGGED = {
    "reward_accuracy": "reward_accuracy",
    "ranking_accuracy": "ranking_accuracy",
    "ranking_accuracy_per_token": "ranking_accuracy_per_token",
    "negative_margin_regime_rate": "negative_margin_regime_rate",
    "negative_margin_regime_per_token_rate": "negative_margin_regime_rate_per_token",
    "chosen_displaced_rate": "chosen_displaced_rate",
    "flip_rate": "flip_rate",
    "break_rate": "break_rate",
    "mean_dpo_loss": "dpo_loss",
    "mean_policy_margin": "policy_margin",
    "mean_chosen_logratio": "chosen_logratio",
}


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class PrefdiagCallback(TrainerCallback):
    """Diagnose a DPO run while it trains. ``trainer.add_callback(PrefdiagCallback(trainer))``.

    At each evaluation (and every ``every_n_steps`` steps, and at the start with ``at_start``) it scores
    ``eval_dataset`` (default: the trainer's; a dataset with ``prompt``/``chosen``/``rejected``) with the live policy
    against the trainer's reference (its ``ref_model``; for a PEFT policy the same model with the adapter disabled,
    or its "ref" adapter; TRL's precomputed reference log-probs when it has them) and logs ``prefdiag/<metric>``
    into the trainer's log history (so W&B, TensorBoard, MLflow and the console show them). ``output_dir``: write
    each evaluation's per-pair table as ``pairs-step-<N>.parquet``. ``gate_min``/``gate_max``: rules as given to
    ``prefdiag gate --min/--max`` (``METRIC=VALUE[:warn]``); when an error rule fails, training stops and the log
    says why. ``prefix`` names the logged keys (one callback per eval set: give each its own prefix). With several
    processes each rank scores its share; every rank gets the same numbers.
    """

    def __init__(
        self,
        trainer: DPOTrainer,
        eval_dataset=None,
        *,
        every_n_steps: int | None = None,
        at_start: bool = False,
        on_evaluate: bool = True,
        beta: float | None = None,
        output_dir: str | os.PathLike | None = None,
        gate_min: tuple[str, ...] | list[str] = (),
        gate_max: tuple[str, ...] | list[str] = (),
        batch_tokens: int = LIVE_BATCH_TOKENS,
        prefix: str = PREFIX,
    ) -> None:
        from prefdiag import gate

        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.at_start, self.score_on_evaluate = at_start, on_evaluate
        self.beta = float(trainer.beta if beta is None else beta)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.rules = [gate.parse_cli_rule(r, "min") for r in gate_min]
        self.rules += [gate.parse_cli_rule(r, "max") for r in gate_max]
        self.batch_tokens, self.prefix = batch_tokens, prefix
        self.history: list[dict[str, Any]] = []  # the logged metrics of each scoring, with "step"
        dataset = trainer.eval_dataset if eval_dataset is None else eval_dataset
        if dataset is None:
            raise ValueError("PrefdiagCallback needs an eval set: pass eval_dataset= or give the trainer one")
        if isinstance(dataset, dict):
            raise ValueError("the trainer has several eval sets: pass the one to diagnose as eval_dataset=")
        self.ref_logps = None
        if trainer.ref_model is None and not _is_peft(trainer.model):
            columns = getattr(dataset, "column_names", [])
            if not (trainer.precompute_ref_logps and "ref_chosen_logps" in columns):
                raise ValueError(
                    "no reference to score against: the trainer has no ref_model and no precomputed reference "
                    "log-probs for this eval set (pass the trainer's own eval_dataset, or give it a ref_model)"
                )
        if trainer.precompute_ref_logps and "ref_chosen_logps" in getattr(dataset, "column_names", []):
            self.ref_logps = (np.asarray(dataset["ref_chosen_logps"]), np.asarray(dataset["ref_rejected_logps"]))
        self.pair_ids = list(dataset["id"]) if "id" in dataset.column_names else None
        self.tokenized = tokenize_eval_pairs(
            trainer.processing_class, dataset["prompt"], dataset["chosen"], dataset["rejected"], trainer.args.max_length
        )

    # -- the scoring -------------------------------------------------------------------------------------------

    def _reference(self) -> tuple[torch.nn.Module | None, Any]:
        """(reference module or None for "the policy itself", a context factory that makes the policy the reference)."""
        unwrap = self.trainer.accelerator.unwrap_model
        if self.trainer.ref_model is not None:
            return unwrap(self.trainer.ref_model), contextlib.nullcontext
        peft_model = unwrap(self.trainer.model)
        adapter = "ref" if "ref" in peft_model.peft_config else None
        return None, lambda: use_adapter(peft_model, adapter)

    def score(self, step: int) -> dict[str, float]:
        """Score the eval set now; log, write and gate as configured; returns the logged metrics."""
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
        policy_lm = policy.get_base_model() if _is_peft(policy) else policy
        reference, context = (None, contextlib.nullcontext) if self.ref_logps is not None else self._reference()
        table, summary = score_live(
            policy_lm, self.tokenized, self.beta, reference=reference, reference_context=context,
            ref_logps=self.ref_logps, pair_ids=self.pair_ids, batch_tokens=self.batch_tokens,
        )  # fmt: skip
        if self.ref_logps is None and not getattr(self.trainer.args, "sync_ref_model", False):
            # The reference is frozen: score it once per callback (every rank holds the gathered values).
            self.ref_logps = (table["ref_chosen_logp"].to_numpy(), table["ref_rejected_logp"].to_numpy())
        logs = {self.prefix + name: float(summary[key]) for key, name in LOGGED.items() if summary.get(key) is not None}
        if self.rules:
            logs.update(self._gate(summary, step))
        if self.output_dir is not None and distributed.is_main():
            path = self.output_dir / f"pairs-step-{step}.parquet"
            write_file_atomically(path, lambda out: table.to_parquet(out, index=False))
        control = self.trainer.control
        pending = control.should_log  # on_log clears it: TRL's own log of this step must still happen
        Trainer.log(self.trainer, dict(logs))  # Trainer's own log: DPOTrainer.log would flush TRL's pending metrics
        control.should_log = pending
        self.history.append({"step": step, **logs})
        return logs

    def _gate(self, summary: dict[str, Any], step: int) -> dict[str, float]:
        from prefdiag import gate

        record = gate.evaluate(summary, self.rules)
        for rule in record["rules"]:
            if not rule["passed"]:
                log.warning(
                    "prefdiag gate at step %d: %s %s %g failed (observed %s)%s", step, rule["metric"],
                    ">=" if rule["op"] == "min" else "<=", rule["threshold"], rule["observed"],
                    "" if rule["severity"] == "error" else " [warn]",
                )  # fmt: skip
        if not record["passed"]:
            log.warning("prefdiag gate failed at step %d: stopping training", step)
            self.trainer.control.should_training_stop = True
        return {self.prefix + "gate_passed": float(record["passed"])}

    # -- TrainerCallback events --------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start and state.global_step == 0:
            self.score(0)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.score(state.global_step)
            control.should_training_stop |= self.trainer.control.should_training_stop
        return control

    def on_evaluate(self, args, state, control, **kwargs):
        if self.score_on_evaluate and not (self.history and self.history[-1]["step"] == state.global_step):
            self.score(state.global_step)
            control.should_training_stop |= self.trainer.control.should_training_stop
        return control


_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


class ConstrainedDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with a loss that targets the policy's own margin (see prefdiag.integrations.losses):
    ``constraint="clip" | "cpo" | "dpop" | "none"`` (none: DPO), ``margin="mean"`` (per-token, the paper's code) or
    ``"sum"`` (TRL's), and ``gamma``, ``tau``, ``alpha`` (cpo), ``dpop_lambda`` (dpop). Everything else is
    DPOTrainer's (reference handling, precomputed reference log-probs, PEFT); it logs TRL's ``rewards/*`` and
    ``logps/*`` plus ``u_rate``, the share of the batch inside the paper's U on the margins it trains on.
    Supports TRL's default sigmoid-loss setup (no ld_alpha, f-divergence, WPO weighting or MoE aux loss)."""

    def __init__(self, *args, constraint: str = "clip", margin: str = "mean", gamma: float = 0.5, tau: float = 2.0,
                 alpha: float = 1.0, dpop_lambda: float = 50.0, **kwargs) -> None:
        self.constraint = ConstraintSettings(constraint, margin, gamma, tau, alpha, dpop_lambda)
        self.constraint.validate()
        super().__init__(*args, **kwargs)
        unsupported = {
            "loss_type other than sigmoid": list(self.loss_types) != ["sigmoid"],
            "ld_alpha": self.ld_alpha is not None,
            "f_divergence_type other than reverse_kl": self.f_divergence_type != "reverse_kl",
            "use_weighting": self.use_weighting,
            "a MoE auxiliary loss": self.aux_loss_enabled,
        }
        bad = [name for name, used in unsupported.items() if used]
        if bad:
            raise ValueError(f"ConstrainedDPOTrainer does not support {', '.join(bad)}")

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -shift_mask.size(1):].sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else self.model, inputs
            )
        chosen_tokens, rejected_tokens = shift_mask.sum(dim=1).chunk(2, dim=0)
        per_pair, in_u = constrained_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, self.beta,
            self.constraint,
        )  # fmt: skip
        loss = per_pair.mean()

        gather = self.accelerator.gather
        chosen_rewards = self.beta * (chosen_logps - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected).detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        metrics["u_rate"].append(gather(in_u.float()).mean().item())
        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss
