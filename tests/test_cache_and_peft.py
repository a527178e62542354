"""The reference cache skips a model pass, an interrupted run resumes from it, and a LoRA policy is scored on the
reference's weights with the adapter attached: every path gives the exact path's numbers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from prefdiag import api, models
from prefdiag.scoring import LogProbScorer


def _options(cache_dir, **kwargs):
    return api.RunOptions(dtype="float32", device="cpu", cache_dir=str(cache_dir), **kwargs)


@pytest.fixture
def count_loads(monkeypatch):
    loads = []
    original = models.load_model

    def counting(name, **kwargs):
        loads.append(name)
        return original(name, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return loads


def _columns(result):
    cols = ["ref_chosen_logp", "ref_rejected_logp", "policy_chosen_logp", "policy_rejected_logp"]
    return result.pairs[[c for c in cols if c in result.pairs]].to_numpy()


def test_second_run_skips_the_cached_reference(model_dirs, pairs_file, tmp_path, count_loads):
    ref, pol = str(model_dirs["llama"]), str(model_dirs["llama-policy"])
    exact = api.compare(str(pairs_file), ref, pol, _options(tmp_path, cache=False, layout="separate"))
    first = api.compare(str(pairs_file), ref, pol, _options(tmp_path))
    count_loads.clear()
    second = api.compare(str(pairs_file), ref, pol, _options(tmp_path))
    assert count_loads == []  # both models came from the cache
    assert second.summary["provenance"]["reference"]["pairs_from_cache"] == 24
    np.testing.assert_allclose(_columns(second), _columns(first), atol=0, rtol=0)
    np.testing.assert_allclose(_columns(first), _columns(exact), atol=1e-5, rtol=0)


@pytest.fixture
def count_tokenizations(monkeypatch):
    from prefdiag import tokenization

    calls = []
    original = tokenization.tokenize_pairs

    def counting(*args, **kwargs):
        calls.append(kwargs.get("max_length"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenization, "tokenize_pairs", counting)
    return calls


def test_a_rerun_reads_token_ids_and_log_probs_and_gives_the_same_table(
    model_dirs, pairs_file, tmp_path, count_loads, count_tokenizations
):
    """Regression: the cache held identical responses' log-probs before their tie was made exact, so a rerun from
    the cache could flip ref_prefers_rejected on a pair whose chosen and rejected are the same text."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    rows.append({**rows[0], "id": "same", "rejected": rows[0]["chosen"]})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref, pol = str(model_dirs["llama"]), str(model_dirs["llama-policy"])
    first = api.compare(str(data), ref, pol, _options(tmp_path))
    count_loads.clear()
    count_tokenizations.clear()
    second = api.compare(str(data), ref, pol, _options(tmp_path))
    assert count_loads == [] and count_tokenizations == []  # token ids and log-probs all from the cache
    numeric = [c for c in first.pairs.columns if first.pairs[c].dtype != object]
    pd.testing.assert_frame_equal(second.pairs[numeric], first.pairs[numeric])
    same = first.pairs["pair_id"] == "same"
    assert (first.pairs.loc[same, "ref_margin"] == 0).all() and not first.pairs.loc[same, "ref_prefers_rejected"].any()


def test_token_ids_are_not_reused_across_settings_or_from_a_damaged_file(
    model_dirs, pairs_file, tmp_path, count_tokenizations
):
    ref = str(model_dirs["gpt2"])
    api.audit(str(pairs_file), ref, _options(tmp_path))
    api.audit(str(pairs_file), ref, _options(tmp_path, max_length=20))
    assert count_tokenizations == [None, 20]  # another max_length: tokenized again
    for saved in (tmp_path / "tokens").glob("*.npz"):
        saved.write_bytes(b"not an npz")
    again = api.audit(str(pairs_file), ref, _options(tmp_path))
    assert count_tokenizations == [None, 20, None]  # a damaged file is ignored, and rewritten
    assert again.summary["provenance"]["reference"]["pairs_from_cache"] == 24


def test_no_cache_writes_nothing_and_other_settings_miss(model_dirs, pairs_file, tmp_path, count_loads):
    ref = str(model_dirs["gpt2"])
    api.audit(str(pairs_file), ref, _options(tmp_path / "none", cache=False))
    assert not (tmp_path / "none").exists()
    api.audit(str(pairs_file), ref, _options(tmp_path / "c"))
    count_loads.clear()
    truncated = api.audit(str(pairs_file), ref, _options(tmp_path / "c", max_length=20))
    assert count_loads == [ref]  # new token ids for the truncated pairs: they are scored again
    reused = truncated.summary["provenance"]["reference"]["pairs_from_cache"]
    assert reused == int((~truncated.pairs["truncated"] & ~truncated.pairs["dropped"]).sum())


@pytest.mark.parametrize("layout", ["prefix", "packed"])
def test_interrupted_run_resumes_where_it_stopped(model_dirs, pairs_file, tmp_path, monkeypatch, layout):
    ref = str(model_dirs["llama"])
    options = _options(tmp_path, batch_tokens=200, layout=layout)
    expected = api.audit(str(pairs_file), ref, _options(tmp_path / "fresh", cache=False))
    original = LogProbScorer._forward
    calls = []

    def dies_on_third_batch(self, bins):
        calls.append(sum(map(len, bins)))  # pairs in the batch
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, bins)

    monkeypatch.setattr(LogProbScorer, "_forward", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        api.audit(str(pairs_file), ref, options)
    saved = sum(calls[:2])
    monkeypatch.setattr(LogProbScorer, "_forward", original)
    resumed = api.audit(str(pairs_file), ref, options)
    assert resumed.summary["provenance"]["reference"]["pairs_from_cache"] == saved > 0
    np.testing.assert_allclose(_columns(resumed), _columns(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["prefix", "packed"])
def test_lora_policy_reuses_the_reference_weights(model_dirs, pairs_file, tmp_path, count_loads, layout):
    import torch
    from oracle import full_logits_logp, logp_close
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefdiag.tokenization import tokenize_pairs

    ref = str(model_dirs["llama"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(ref, dtype="float32")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    merged = lora.merge_and_unload().eval()

    result = api.compare(str(pairs_file), ref, str(adapter), _options(tmp_path, cache=False, layout=layout, batch_tokens=512))
    assert result.summary["provenance"]["policy"]["layout"] == layout
    assert count_loads == [ref]  # one model in memory: the adapter went onto the reference
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    tokenized = tokenize_pairs(AutoTokenizer.from_pretrained(ref), [r["prompt"] for r in rows],
                               [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    fresh_base = AutoModelForCausalLM.from_pretrained(ref, dtype="float32").eval()
    for i in range(len(rows)):
        p, c = tokenized.prompt_ids[i], tokenized.chosen_ids[i]
        assert result.pairs["ref_chosen_logp"][i] == logp_close(full_logits_logp(fresh_base, p, c)[0])
        assert result.pairs["policy_chosen_logp"][i] == logp_close(full_logits_logp(merged, p, c)[0])
    assert result.pairs["reward_margin"].abs().max() > 1e-3  # the adapter changed the policy
    assert result.summary["provenance"]["policy"]["adapter_base"] == ref


def test_a_token_cache_that_cannot_be_written_costs_speed_not_the_run(model_dirs, pairs_file, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="prefdiag")
    (tmp_path / "tokens").write_text("a file where the token cache's directory would go")
    result = api.audit(str(pairs_file), str(model_dirs["gpt2"]), _options(tmp_path))
    assert result.summary["n_scored"] == 24
    assert "cannot save token ids to the cache" in caplog.text
