"""--compat trl0 / rewardbench: token ids equal those built here from the rules as their sources state them
(TRL 0.x: huggingface/trl trl/trainer/dpo_trainer.py tokenize_row + concatenated_forward, DPOConfig defaults;
RewardBench: allenai/reward-bench rewardbench/dpo.py DPOInference.tokenize_row, rewardbench/utils.py
prepare_dialogue_from_tokenizer, scripts/run_dpo.py), and the count of pairs over TRL's default max_length."""

from __future__ import annotations

import pytest
from conftest import build_tokenizer, make_conversations, make_pairs

from prefdiag.errors import DataError, ModelError, UsageError
from prefdiag.tokenization import tokenization_key, tokenize_pairs


def _enc(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _run(tokenizer, rows, **kw):
    return tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows], **kw)


def _scored_after_keep_end(prompt, chosen, rejected, max_length):
    """TRL 0.x concatenated_forward for one pair: rows prompt+completion, flushed left and padded to the longest,
    the last max_length columns kept; a completion token is scored when its label position survives and is not
    the first column (labels are the inputs shifted by one)."""
    rows = [prompt + chosen, prompt + rejected]
    masks = [[0] * len(prompt) + [1] * len(chosen), [0] * len(prompt) + [1] * len(rejected)]
    width = max(len(r) for r in rows)
    start = max(0, width - max_length)
    kept = [(r + [None] * (width - len(r)))[start:] for r in rows]
    kept_masks = [(m + [0] * (width - len(m)))[start:] for m in masks]
    scored = [[tok for j, (tok, m) in enumerate(zip(row, mask)) if m and j > 0] for row, mask in zip(kept, kept_masks)]
    context = [[tok for tok, m in zip(row, mask) if tok is not None and not m] for row, mask in zip(kept, kept_masks)]
    return context, scored


def test_trl0_tokenizes_each_part_without_special_tokens_and_appends_eos():
    tokenizer = build_tokenizer("llama")  # adds BOS with special tokens: TRL 0.x's prompts had none
    rows = make_pairs()
    rows[0] = dict(rows[0], chosen=rows[0]["chosen"] + tokenizer.eos_token)  # already ends with EOS: EOS added again
    ours = _run(tokenizer, rows, compat="trl0")
    eos = tokenizer.eos_token_id
    for i, r in enumerate(rows):
        assert ours.prompt_ids[i] == _enc(tokenizer, r["prompt"])[-512:]
        assert ours.chosen_ids[i] == _enc(tokenizer, r["chosen"]) + [eos]
        assert ours.rejected_ids[i] == _enc(tokenizer, r["rejected"]) + [eos]
    assert ours.prompt_ids[0][0] != tokenizer.bos_token_id
    assert ours.chosen_ids[0][-2:] == [eos, eos]
    assert ours.settings["scheme"] == "trl-0.x" and ours.settings["truncation_mode"] == "keep_end"
    assert ours.settings["max_prompt_length"] == 512
    assert not ours.dropped.any() and not ours.boundary_mismatch.any()


def test_trl0_keeps_the_end_of_the_prompt_and_of_prompt_plus_completion():
    tokenizer = build_tokenizer("gpt2")
    prompts = ["a b c d e f g h i j k l", "q: what is the capital", "x"]
    chosen = [" the cat sat on the mat.", " paris", " cat dog bird sky sea sun moon red blue green big"]
    rejected = [" no.", " london is the capital of it all", " yes it is so"]
    ours = tokenize_pairs(tokenizer, prompts, chosen, rejected, compat="trl0", max_prompt_length=6, max_length=12)
    eos = tokenizer.eos_token_id
    for i in range(3):
        p = _enc(tokenizer, prompts[i])[-6:]
        c, r = _enc(tokenizer, chosen[i]) + [eos], _enc(tokenizer, rejected[i]) + [eos]
        context, (scored_c, scored_r) = _scored_after_keep_end(p, c, r, 12)
        assert ours.prompt_ids[i] == context[0] == context[1]
        first = 0 if ours.prompt_ids[i] else 1  # the engine never scores the first token of a row
        assert ours.chosen_ids[i][first:] == scored_c and ours.rejected_ids[i][first:] == scored_r
        assert ours.chosen_full_tokens[i] == len(c)
    assert ours.truncated.tolist() == [False, False, True] and not ours.dropped.any()
    assert ours.prompt_ids[2] == [] and len(ours.chosen_ids[2]) == 12
    assert len(ours.prompt_ids[0]) < 6  # the prompt lost its start to make room


def test_trl0_renders_conversations_to_text_first():
    tokenizer = build_tokenizer("qwen")
    rows = make_conversations()
    ours = _run(tokenizer, rows, compat="trl0")
    eos = tokenizer.eos_token_id
    for i, r in enumerate(rows):
        text_p = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        text_c = tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        text_r = tokenizer.apply_chat_template(r["prompt"] + r["rejected"], tokenize=False)
        assert text_c.startswith(text_p) and text_r.startswith(text_p)  # this template renders prompts alike
        assert ours.prompt_ids[i] == _enc(tokenizer, text_p)
        assert ours.chosen_ids[i] == _enc(tokenizer, text_c[len(text_p):]) + [eos]
        assert ours.rejected_ids[i] == _enc(tokenizer, text_r[len(text_p):]) + [eos]
        assert ours.chosen_ids[i][-1] == ours.chosen_ids[i][-3] == eos  # <|im_end|>\n then EOS again


def test_rewardbench_answer_is_the_whole_rendered_conversation_after_the_prompt():
    tokenizer = build_tokenizer("qwen")  # no BOS: RewardBench uses EOS in its place
    rows = [r for r in make_conversations() if len(r["prompt"]) == 1]
    rows[0] = dict(rows[0], prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                                    {"role": "user", "content": "and then"}])
    ours = _run(tokenizer, rows, compat="rewardbench")
    eos = tokenizer.eos_token_id
    for i, r in enumerate(rows):
        turns = [{"role": m["role"], "content": m["content"]} for m in r["prompt"]]
        text_p = tokenizer.apply_chat_template(turns, tokenize=False)  # no generation prompt
        text_c = tokenizer.apply_chat_template(turns + r["chosen"], tokenize=False)
        text_r = tokenizer.apply_chat_template(turns + r["rejected"], tokenize=False)
        prompt = _enc(tokenizer, text_p)
        full_c, full_r = _enc(tokenizer, text_p + text_c), _enc(tokenizer, text_p + text_r)
        assert full_c[: len(prompt)] == prompt  # no merge at this boundary: the answer starts after the prompt
        assert ours.prompt_ids[i] == [eos] + prompt
        assert ours.chosen_ids[i] == full_c[len(prompt):] + [eos]
        assert ours.rejected_ids[i] == full_r[len(prompt):] + [eos]
        assert ours.chosen_ids[i][: len(prompt)] == prompt  # the prompt is scored again inside each answer
    assert ours.settings["scheme"] == "rewardbench" and ours.settings["max_prompt_length"] == 128


def test_rewardbench_strings_become_a_user_turn_and_truncate_prompt_then_answers():
    tokenizer = build_tokenizer("llama")
    tokenizer.chat_template = build_tokenizer("qwen").chat_template
    rows = make_pairs()[:4]
    ours = _run(tokenizer, rows, compat="rewardbench", max_length=24, max_prompt_length=5)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for i, r in enumerate(rows):
        turns = [{"role": "user", "content": r["prompt"]}]
        text_p = tokenizer.apply_chat_template(turns, tokenize=False)
        answers = []
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": r[side]}], tokenize=False)
            answers.append(_enc(tokenizer, text_p + text)[len(_enc(tokenizer, text_p)):] + [eos])
        prompt = [bos] + _enc(tokenizer, text_p)
        longer = max(len(a) for a in answers)
        if len(prompt) + longer > 24:
            prompt = prompt[-5:]
        if len(prompt) + longer > 24:
            answers = [a[: 24 - 5] for a in answers]
        assert ours.prompt_ids[i] == prompt
        assert [ours.chosen_ids[i], ours.rejected_ids[i]] == answers
    assert ours.truncated.any()


def test_rewardbench_refuses_what_it_cannot_render():
    tokenizer = build_tokenizer("gpt2")
    with pytest.raises(ModelError, match="chat template"):
        tokenize_pairs(tokenizer, ["q"], [" a"], [" b"], compat="rewardbench")
    tokenizer = build_tokenizer("qwen")
    rows = [r for r in make_conversations() if len(r["prompt"]) == 1][:1]
    rows[0] = dict(rows[0], chosen=rows[0]["chosen"] * 2)
    with pytest.raises(DataError, match="row 1, column 'chosen'"):
        _run(tokenizer, rows, compat="rewardbench")
    system = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    with pytest.raises(DataError, match="row 1: --compat rewardbench .* odd number of them .* got 2"):
        tokenize_pairs(tokenizer, [system], [[{"role": "assistant", "content": "a"}]],
                       [[{"role": "assistant", "content": "b"}]], compat="rewardbench")


def test_unknown_compat_and_the_scheme_in_the_cache_key():
    tokenizer = build_tokenizer("gpt2")
    with pytest.raises(UsageError, match="unknown --compat 'trl2'"):
        tokenize_pairs(tokenizer, ["q"], [" a"], [" b"], compat="trl2")
    for compat, limit in (("trl1", 8), ("trl0", 0)):
        with pytest.raises(UsageError, match="--max-prompt-length must be a positive .* got"):
            tokenize_pairs(tokenizer, ["q"], [" a"], [" b"], compat=compat, max_prompt_length=limit)
    texts = (["q"], [" a"], [" b"])
    keys = {tokenization_key(tokenizer, *texts, compat=c) for c in ("trl1", "trl0", "rewardbench")}
    keys.add(tokenization_key(tokenizer, *texts, compat="trl0", max_prompt_length=8))
    assert len(keys) == 4


def test_pairs_over_trl_default_max_length_are_counted_without_max_length():
    tokenizer = build_tokenizer("gpt2")
    long = " ".join(["the cat"] * 400)  # well over 1024 tokens with the prompt
    prompts, chosen, rejected = ["q:", "q: " + long, "q:"], [" a", " b", " " + long + long], [" c", " d", " e"]
    ours = tokenize_pairs(tokenizer, prompts, chosen, rejected)
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(ours.prompt_ids, ours.chosen_ids, ours.rejected_ids)]
    assert ours.settings["n_over_trl_default_max_length"] == sum(n > 1024 for n in lengths) == 2
    assert tokenize_pairs(tokenizer, prompts, chosen, rejected, max_length=2048).settings[
        "n_over_trl_default_max_length"] is None


def test_trl0_refuses_a_prompt_ending_in_a_role_it_cannot_continue():
    tokenizer = build_tokenizer("qwen")
    prompt = [{"role": "user", "content": "hi"}, {"role": "system", "content": "be kind"}]
    with pytest.raises(DataError, match="row 1: --compat trl0 .* got 'system'"):
        tokenize_pairs(tokenizer, [prompt], [[{"role": "assistant", "content": "a"}]],
                       [[{"role": "assistant", "content": "b"}]], compat="trl0")


def test_trl0_keep_end_scores_equal_trl0s_truncated_rows(model_dirs):
    """The engine's log-probs on the trl0 layout equal log p of the completion tokens TRL 0.x's keep_end rows leave
    scored (one pair per batch), including a pair whose prompt is cut away entirely."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefdiag.scoring import LogProbScorer, ScoreSettings

    tokenizer = build_tokenizer("gpt2")
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"]).float().eval()
    prompts = ["a b c d e f g h i j k l", "q: what is the capital", "x"]
    chosen = [" the cat sat on the mat.", " paris", " cat dog bird sky sea sun moon red blue green big"]
    rejected = [" no.", " london is the capital of it all", " yes it is so"]
    ours = tokenize_pairs(tokenizer, prompts, chosen, rejected, compat="trl0", max_prompt_length=6, max_length=12)
    got_c, got_r = LogProbScorer(model, ScoreSettings(batch_tokens=64)).score(ours)
    eos = tokenizer.eos_token_id
    for i in range(3):
        p = _enc(tokenizer, prompts[i])[-6:]
        for side, text, got in (("chosen", chosen[i], got_c[i]), ("rejected", rejected[i], got_r[i])):
            other = rejected[i] if side == "chosen" else chosen[i]
            c = _enc(tokenizer, text) + [eos]
            start = max(0, len(p) + max(len(c), len(_enc(tokenizer, other)) + 1) - 12)
            row = (p + c)[start:]
            mask = ([0] * len(p) + [1] * len(c))[start:]
            with torch.no_grad():
                logps = torch.log_softmax(model(torch.tensor([row])).logits[0].double(), -1)
            expected = sum(float(logps[j - 1, row[j]]) for j in range(1, len(row)) if mask[j])
            assert got == pytest.approx(expected, abs=1e-4), (i, side)
