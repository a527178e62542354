"""Tokenization equals TRL's DPOTrainer, token for token, for Llama-, GPT-2- and Qwen-style tokenizers."""

from __future__ import annotations

import pytest
from conftest import build_tokenizer, make_conversations, make_pairs
from oracle import trl_tokenize

from prefdiag.data import extract_prompt
from prefdiag.tokenization import tokenize_pairs


@pytest.mark.parametrize("style", ["llama", "gpt2", "qwen"])
def test_completion_boundaries_equal_trl(style, tmp_path):
    tokenizer = build_tokenizer(style)
    rows = make_conversations() if style == "qwen" else make_pairs()
    expected = trl_tokenize(tokenizer, rows, tmp_path)
    ours = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                          [r["rejected"] for r in rows])
    for i, ex in enumerate(expected):
        assert ours.prompt_ids[i] == ex["prompt_ids"]
        assert ours.chosen_ids[i] == ex["chosen_ids"]
        assert ours.rejected_ids[i] == ex["rejected_ids"]
    if style == "llama":
        assert all(p[0] == tokenizer.bos_token_id for p in ours.prompt_ids)
    if style != "qwen":
        assert all(c[-1] == tokenizer.eos_token_id for c in ours.chosen_ids)


def test_boundary_mismatch_when_tokens_merge_across_the_prompt_end():
    tokenizer = build_tokenizer("gpt2")
    # "the" + " cat" tokenize as ["the", " cat"], but a prompt ending in a space merges into the completion.
    ours = tokenize_pairs(tokenizer, ["Question: the "], ["cat sat."], ["dog."])
    prompt_alone = tokenizer("Question: the ")["input_ids"]
    assert ours.boundary_mismatch[0]
    assert ours.prompt_ids[0] == prompt_alone[:-1]  # the trailing-space token belongs to the completion
    full = tokenizer("Question: the cat sat." + tokenizer.eos_token)["input_ids"]
    assert ours.prompt_ids[0] + ours.chosen_ids[0] == full


def test_truncation_is_keep_start_per_sequence_and_drops_prompts_that_fill_max_length():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    tokenizer = build_tokenizer("llama")
    prompts = ["Question: what is the capital", "Q:", "a b c d e f g h i j k l m n o p q r s t u v w"]
    chosen = [" the capital is paris because it is.", " yes", " x"]
    rejected = [" no.", " one two three four five six seven eight nine ten.", " y"]
    ours = tokenize_pairs(tokenizer, prompts, chosen, rejected, max_length=14)
    whole = tokenize_pairs(tokenizer, prompts, chosen, rejected)
    collator = DataCollatorForPreference(pad_token_id=0, max_length=14)
    for i in range(2):
        batch = collator([{"prompt_ids": whole.prompt_ids[i], "chosen_ids": whole.chosen_ids[i],
                           "rejected_ids": whole.rejected_ids[i]}])
        for side, row in (("chosen", 0), ("rejected", 1)):
            mask = batch["completion_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == getattr(ours, f"{side}_ids")[i]
    lengths = [(len(p), max(len(c), len(r))) for p, c, r in zip(whole.prompt_ids, whole.chosen_ids, whole.rejected_ids)]
    assert ours.truncated.tolist() == [p < 14 < p + c for p, c in lengths]
    assert ours.dropped.tolist() == [False, False, True]
    assert ours.truncated[1]
    assert ours.chosen_full_tokens[0] == len(whole.chosen_ids[0])


def test_extract_prompt_matches_trl():
    from trl.data_utils import extract_prompt as trl_extract

    cases = [
        ("Human: hi there Assistant: hello", "Human: hi there Assistant: bye"),
        ("same text", "same text"),
        ("abc", "abd"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]),
    ]
    for chosen, rejected in cases:
        expected = trl_extract({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
