"""prefdiag's numbers equal the ones TRL's DPOTrainer.evaluate() logs for the same models and data."""

from __future__ import annotations

import json

import pytest
from oracle import make_trainer

from prefdiag import api


@pytest.mark.parametrize("style,data", [("llama", "pairs_file"), ("gpt2", "pairs_file"), ("qwen", "chat_file")])
def test_compare_matches_trl_evaluate(model_dirs, style, data, request, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(data)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ref_dir, policy_dir = model_dirs[style], model_dirs[f"{style}-policy"]
    beta = 0.25
    result = api.compare(str(path), str(ref_dir), str(policy_dir),
                         api.RunOptions(beta=beta, dtype="float32", device="cpu"))

    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = make_trainer(
        AutoTokenizer.from_pretrained(ref_dir), dataset, tmp_path, beta=beta,
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype="float32"),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
    )
    logged = trainer.evaluate()
    pairs, summary = result.pairs, result.summary
    assert len(rows) % 4 == 0  # equal eval batches, so TRL's mean of batch means is the plain mean
    assert pairs["policy_chosen_logp"].mean() == pytest.approx(logged["eval_logps/chosen"], rel=1e-5, abs=1e-4)
    assert pairs["policy_rejected_logp"].mean() == pytest.approx(logged["eval_logps/rejected"], rel=1e-5, abs=1e-4)
    assert summary["mean_reward_chosen"] == pytest.approx(logged["eval_rewards/chosen"], abs=1e-5)
    assert summary["mean_reward_rejected"] == pytest.approx(logged["eval_rewards/rejected"], abs=1e-5)
    assert summary["mean_reward_margin"] == pytest.approx(logged["eval_rewards/margins"], abs=1e-5)
    assert summary["reward_accuracy"] == pytest.approx(logged["eval_rewards/accuracies"], abs=1e-9)
    assert summary["mean_dpo_loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
