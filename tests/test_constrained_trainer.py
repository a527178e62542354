"""ConstrainedDPOTrainer: with no constraint it is TRL's DPO to the digit; with each constraint it trains end to end."""

from __future__ import annotations

import pytest
import torch
from test_trl_callback import dpo_config, logged_steps, text_dataset


def make(trainer_class, model_dirs, pairs_file, tmp_path, max_steps=4, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    return trainer_class(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dirs["llama-policy"], dtype="float32"),
        args=dpo_config(tmp_path, eval_strategy="no", save_strategy="no", logging_steps=1, max_steps=max_steps),
        train_dataset=dataset, eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir), **kwargs,
    )  # fmt: skip


def test_no_constraint_with_summed_margins_is_trl_dpo(model_dirs, pairs_file, tmp_path):
    from trl import DPOTrainer

    from prefdiag.integrations.trl import ConstrainedDPOTrainer

    ours = make(ConstrainedDPOTrainer, model_dirs, pairs_file, tmp_path / "a", constraint="none", margin="sum")
    theirs = make(DPOTrainer, model_dirs, pairs_file, tmp_path / "b").evaluate()
    mine = ours.evaluate()
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key
    assert 0 <= mine["eval_u_rate"] <= 1


@pytest.mark.parametrize("constraint", ["clip", "cpo", "dpop"])
def test_each_constraint_trains(model_dirs, pairs_file, tmp_path, constraint):
    from prefdiag.integrations.trl import ConstrainedDPOTrainer

    trainer = make(ConstrainedDPOTrainer, model_dirs, pairs_file, tmp_path, max_steps=2, constraint=constraint,
                   margin="mean")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    steps = logged_steps(trainer.state.log_history)
    losses = [steps[s]["loss"] for s in (1, 2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(0 <= steps[s]["u_rate"] <= 1 and "rewards/accuracies" in steps[s] for s in (1, 2))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_unsupported_trl_options_are_refused(model_dirs, pairs_file, tmp_path):
    from prefdiag.integrations.trl import ConstrainedDPOTrainer

    with pytest.raises(ValueError, match="constraint must be one of"):
        make(ConstrainedDPOTrainer, model_dirs, pairs_file, tmp_path, constraint="nope")


def test_constraint_with_a_lora_policy_and_no_reference_model(model_dirs, pairs_file, tmp_path):
    """The reference is the policy with its adapter disabled (TRL's PEFT path), inside the constrained loss too."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefdiag.integrations.trl import ConstrainedDPOTrainer

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    trainer = ConstrainedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=dpo_config(tmp_path, eval_strategy="no", save_strategy="no", logging_steps=1, max_steps=2,
                        learning_rate=5e-2),
        train_dataset=dataset, eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        constraint="clip", margin="mean",
    )  # fmt: skip
    assert trainer.ref_model is None
    first = trainer.evaluate()
    assert first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the reference
    trainer.train()
    assert trainer.evaluate()["eval_rewards/margins"] != pytest.approx(0.0, abs=1e-4)


def test_precomputed_reference_log_probs_are_used(model_dirs, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefdiag.integrations.trl import ConstrainedDPOTrainer

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)

    def build(trainer_class, out, **kwargs):
        return trainer_class(
            model=AutoModelForCausalLM.from_pretrained(model_dirs["llama-policy"], dtype="float32"),
            ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
            args=dpo_config(out, eval_strategy="no", save_strategy="no", precompute_ref_log_probs=True),
            train_dataset=dataset, eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir),
            **kwargs,
        )  # fmt: skip

    ours = build(ConstrainedDPOTrainer, tmp_path / "a", constraint="none", margin="sum")
    assert "ref_chosen_logps" in ours.eval_dataset.column_names
    mine, theirs = ours.evaluate(), build(DPOTrainer, tmp_path / "b").evaluate()
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key
