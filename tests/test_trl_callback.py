"""PrefdiagCallback inside a real TRL DPOTrainer: its logged numbers equal TRL's own and prefdiag compare's on the
checkpoint saved at the same step."""

from __future__ import annotations

import json

import pytest
import torch

from prefdiag import api
from prefdiag.integrations.trl import LOGGED, PREFIX

RATES = ("reward_accuracy", "ranking_accuracy", "ranking_accuracy_per_token", "negative_margin_regime_rate",
         "negative_margin_regime_per_token_rate", "chosen_displaced_rate", "flip_rate", "break_rate", "mean_dpo_loss")


def dpo_config(tmp_path, **overrides):
    from trl import DPOConfig

    settings = dict(
        output_dir=str(tmp_path / "run"), report_to=[], per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, learning_rate=5e-3,
        max_length=None, beta=0.5, use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        logging_steps=2, save_only_model=True,
    )  # fmt: skip
    settings.update(overrides)
    return DPOConfig(**settings)


def text_dataset(path):
    from datasets import Dataset

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def logged_steps(log_history):
    """{step: merged log entries of that step}"""
    steps: dict[int, dict] = {}
    for entry in log_history:
        steps.setdefault(entry["step"], {}).update(entry)
    return steps


def assert_matches_compare(summary, logged):
    for key, name in LOGGED.items():
        if key in RATES and summary.get(key) is not None:
            assert logged[PREFIX + name] == pytest.approx(summary[key], abs=1e-6), key


def test_callback_logs_trl_and_compare_numbers(model_dirs, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefdiag.integrations.trl import PrefdiagCallback

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    policy = AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32")
    trainer = DPOTrainer(
        model=policy, ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=dpo_config(tmp_path), train_dataset=dataset, eval_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(ref_dir),
    )  # fmt: skip
    callback = PrefdiagCallback(trainer, output_dir=tmp_path / "pairs")
    trainer.add_callback(callback)
    trainer.train()
    steps = logged_steps(trainer.state.log_history)
    assert [h["step"] for h in callback.history] == [2, 4]

    policy.train()
    policy.model.layers[0].eval()  # a mixed state must come back as it was, module by module
    callback.score(99)
    assert policy.training and not policy.model.layers[0].training and policy.model.layers[1].training
    assert all(p.requires_grad for p in policy.parameters()) and torch.is_grad_enabled()
    moved = False
    for step in (2, 4):
        logged = steps[step]
        assert logged[PREFIX + "reward_accuracy"] == pytest.approx(logged["eval_rewards/accuracies"], abs=1e-9)
        assert logged[PREFIX + "dpo_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
        result = api.compare(str(pairs_file), str(ref_dir), str(tmp_path / "run" / f"checkpoint-{step}"),
                             api.RunOptions(beta=0.5, dtype="float32", device="cpu", cache=False))
        assert_matches_compare(result.summary, logged)
        assert (tmp_path / "pairs" / f"pairs-step-{step}.parquet").exists()
        moved |= abs(logged[PREFIX + "policy_margin"] - result.summary["mean_ref_margin"]) > 0.1
    assert moved  # training moved the margins: the comparison above is not between identical models


def test_callback_gate_stops_training(model_dirs, pairs_file, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefdiag.integrations.trl import PrefdiagCallback

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=dpo_config(tmp_path, eval_strategy="no", save_strategy="no", max_steps=6), train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(ref_dir),
    )  # fmt: skip
    callback = PrefdiagCallback(trainer, dataset, every_n_steps=2, gate_min=["ranking_accuracy=1.01"])
    trainer.add_callback(callback)
    with caplog.at_level("WARNING", logger="prefdiag"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert "loss" in logged_steps(trainer.state.log_history)[2]  # TRL's own training log of that step still happened
    assert callback.history[-1][PREFIX + "gate_passed"] == 0.0
    assert "ranking_accuracy >= 1.01 failed" in caplog.text


def test_callback_with_a_lora_policy(model_dirs, pairs_file, tmp_path):
    """One model in memory: the reference is the policy with its adapter disabled, as in TRL."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefdiag.integrations.trl import PrefdiagCallback

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=dpo_config(tmp_path, learning_rate=5e-2),
        train_dataset=dataset, eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )  # fmt: skip
    assert trainer.ref_model is None
    callback = PrefdiagCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    steps = logged_steps(trainer.state.log_history)
    moved = False
    for step in (2, 4):
        logged = steps[step]
        assert logged[PREFIX + "reward_accuracy"] == pytest.approx(logged["eval_rewards/accuracies"], abs=1e-9)
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").exists()
        result = api.compare(str(pairs_file), str(ref_dir), str(checkpoint),
                             api.RunOptions(beta=0.5, dtype="float32", device="cpu", cache=False))
        assert_matches_compare(result.summary, logged)
        moved |= abs(logged[PREFIX + "policy_margin"] - result.summary["mean_ref_margin"]) > 0.1
    assert moved


def test_callback_with_precomputed_reference_log_probs(model_dirs, pairs_file, tmp_path):
    """No reference model in memory: the reference log-probs TRL precomputed for the eval set are used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefdiag.integrations.trl import PrefdiagCallback

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=dpo_config(tmp_path, max_steps=2, precompute_ref_log_probs=True), train_dataset=dataset,
        eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir),
    )  # fmt: skip
    assert trainer.ref_model is None
    callback = PrefdiagCallback(trainer)
    assert callback.ref_logps is not None
    trainer.add_callback(callback)
    trainer.train()
    logged = logged_steps(trainer.state.log_history)[2]
    assert logged[PREFIX + "reward_accuracy"] == pytest.approx(logged["eval_rewards/accuracies"], abs=1e-9)
    result = api.compare(str(pairs_file), str(ref_dir), str(tmp_path / "run" / "checkpoint-2"),
                         api.RunOptions(beta=0.5, dtype="float32", device="cpu", cache=False))
    assert_matches_compare(result.summary, logged)


def test_callback_refuses_a_trainer_without_a_reference(model_dirs, pairs_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from prefdiag.integrations.trl import PrefdiagCallback

    ref_dir = model_dirs["llama"]
    dataset = text_dataset(pairs_file)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=dpo_config(tmp_path, precompute_ref_log_probs=True, eval_strategy="no", save_strategy="no"),
        train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir),
    )  # fmt: skip
    with pytest.raises(ValueError, match="no reference to score against"):
        PrefdiagCallback(trainer, dataset)  # a dataset TRL did not precompute reference log-probs for
    with pytest.raises(ValueError, match="needs an eval set"):
        PrefdiagCallback(trainer)
