"""prefdiag's per-response numbers on unpaired KTO data (prompt, completion, label) equal what TRL 1.x's KTOTrainer
computes for the same models and rows: its token ids, its reference log-probs (precompute_ref_log_probs), its
policy log-probs and the rewards/chosen, rewards/rejected it logs from evaluate().

TRL's side is built by TRL's own code (KTOTrainer._prepare_dataset, _precompute_ref_logps, its collator and
compute_ref_log_probs, evaluate()) and checked on its own first (test_trl_side_*), against an unpadded full-logits
forward, so a mismatch in the prefdiag tests below is prefdiag's (the contract: /work/notes/kto_contract.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import save_model
from oracle import full_logits_logp, logp_close

from prefdiag import api
from prefdiag.options import RunOptions

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "models"
REFERENCE, POLICY = SAMPLE / "reference", SAMPLE / "policy"  # a tiny Llama pair: BOS-adding tokenizer, no template
BETA = 0.25  # not TRL's default (0.1), so a beta that is not passed through shows

LONG_PROMPT = "Which of the capital cities of France, Germany, Italy and Spain is the largest city?"  # 24 tokens
NEARLY_FULL = "Which of the capital cities of France, Germany, Italy and Spain is the largest?"  # 23 tokens

# Several prompts with a desirable and an undesirable completion, some with only one; a completion that already ends
# with EOS (TRL adds none), a prompt ending in a space (its last token merges into the completion: TRL starts the
# completion at the common prefix), one ending in a newline, non-ASCII text, long completions that MAX_LENGTH cuts,
# one that fits MAX_LENGTH exactly (uncut), one whose prompt leaves room for one completion token, and a prompt of
# exactly MAX_LENGTH tokens (TRL drops it: it keeps prompts shorter than max_length).
STRING_ROWS = [
    {"id": "fr-good", "prompt": "What is the capital of France?", "completion": " The capital of France is Paris.",
     "label": True, "category": "geography"},
    {"id": "fr-bad", "prompt": "What is the capital of France?", "completion": " The capital of France is Lyon.",
     "label": False, "category": "geography"},
    {"id": "lock-good", "prompt": "How do I pick the lock on my neighbour's door?",
     "completion": " I can't help you pick the lock, because it could hurt other people. Instead, if you are locked "
                   "out of your own home, call a locksmith.", "label": True, "category": "safety"},
    {"id": "lock-bad", "prompt": "How do I pick the lock on my neighbour's door?",
     "completion": " Sure, that is easy and nobody will ever know. All you need to do is push a thin pin into the "
                   "lock and turn it slowly until it clicks.", "label": False, "category": "safety"},
    {"id": "math-good", "prompt": "What is 3 plus 4?", "completion": " 3 plus 4 is 7.</s>", "label": True,
     "category": "arithmetic"},
    {"id": "math-bad", "prompt": "What is 3 plus 4?", "completion": " 3 plus 4 is 9.", "label": False,
     "category": "arithmetic"},
    {"id": "space", "prompt": "Question: the ", "completion": "cat sat.", "label": True, "category": "other"},
    {"id": "newline", "prompt": "Which city is the capital of Japan?\n", "completion": "Tokyo is the capital of Japan.",
     "label": True, "category": "geography"},
    {"id": "rude", "prompt": "Can you help me with my homework?", "completion": " No. Do it yourself, I am busy.",
     "label": False, "category": "tone"},
    {"id": "long-prompt", "prompt": LONG_PROMPT, "completion": " Yes, Paris.", "label": True, "category": "geography"},
    {"id": "peru", "prompt": "Name the capital city of Peru.", "completion": " Lima is the capital of Peru.",
     "label": True, "category": "geography"},
    {"id": "nearly-full", "prompt": NEARLY_FULL, "completion": " Rome is.", "label": False, "category": "geography"},
    {"id": "vienna", "prompt": "Capital of Österreich?", "completion": " Wien — also Vienna.", "label": False,
     "category": "geography"},
]


def _conversation_rows() -> list[dict]:
    def msg(role, content):
        return {"role": role, "content": content}

    return [
        {"id": "c-fr-good", "prompt": [msg("user", "what is the capital of paris?")],
         "completion": [msg("assistant", "paris is the capital.")], "label": True},
        {"id": "c-fr-bad", "prompt": [msg("user", "what is the capital of paris?")],
         "completion": [msg("assistant", "london is the capital.")], "label": False},
        {"id": "c-system", "prompt": [msg("system", "be helpful"), msg("user", "one plus two equals what?")],
         "completion": [msg("assistant", "three, because one plus two equals three.")], "label": True},
        {"id": "c-system-bad", "prompt": [msg("system", "be helpful"), msg("user", "one plus two equals what?")],
         "completion": [msg("assistant", "no.")], "label": False},
        {"id": "c-multi", "prompt": [msg("user", "is the sky blue?"), msg("assistant", "yes it is."),
                                     msg("user", "and the sea?")],
         "completion": [msg("assistant", "the sea is blue and green.")], "label": True},
        {"id": "c-rude", "prompt": [msg("user", "please help me")],
         "completion": [msg("assistant", "no, you help you. very bad question!")], "label": False},
        {"id": "c-thanks", "prompt": [msg("user", "thanks for the help")],
         "completion": [msg("assistant", "sure, you are very welcome.")], "label": True},
        {"id": "c-where", "prompt": [msg("user", "where is rome?")],
         "completion": [msg("assistant", "rome is a big city in the sea.")], "label": False},
    ]


MAX_LENGTH = 24  # the reference tokenizer's length of LONG_PROMPT; what it does to each row is asserted below


def trl_kto(tokenizer, rows: list[dict], out_dir: Path, ref_dir: Path, policy_dir: Path, *, beta: float = BETA,
            max_length: int | None = None) -> tuple[dict[int, dict], dict[str, float]]:
    """What TRL's KTOTrainer builds and computes, per input row (0-based; rows TRL drops are absent):
    prompt_ids / completion_ids as _prepare_dataset builds them (before truncation), scored_ids (the completion
    tokens the trainer's collator keeps at max_length), label, ref_logp (precompute_ref_log_probs, summed over the
    scored tokens) and policy_logp (the trainer's own compute_ref_log_probs on the policy, over its collator's padded
    batches); and the metrics evaluate() logs (one eval batch holding every row, so each is a plain mean)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    dataset = Dataset.from_list([{"_row": i, **{k: r[k] for k in ("prompt", "completion", "label")}}
                                 for i, r in enumerate(rows)])  # fmt: skip
    args = KTOConfig(
        output_dir=str(out_dir), report_to="none", per_device_train_batch_size=2,  # > 1: the default "kto" loss
        per_device_eval_batch_size=len(rows), precompute_ref_log_probs=True, precompute_ref_batch_size=3,
        max_length=max_length, beta=beta, use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # bf16=False: KTOConfig's default autocasts on CPU too; precompute batches of 3: padding is exercised
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype="float32"),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        args=args, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer,
    )
    examples = [dict(ex) for ex in trainer.eval_dataset]
    assert [ex["_row"] for ex in examples] == sorted(ex["_row"] for ex in examples)  # filtered, never reordered
    out: dict[int, dict] = {}
    for start in range(0, len(examples), 3):
        chunk = examples[start : start + 3]
        batch = trainer.data_collator(chunk)
        policy_logps, _ = trainer.compute_ref_log_probs(trainer.model, batch)
        for j, ex in enumerate(chunk):
            mask = batch["completion_mask"][j].bool()
            out[ex["_row"]] = {
                "prompt_ids": ex["prompt_ids"], "completion_ids": ex["completion_ids"],
                "scored_ids": batch["input_ids"][j][mask].tolist(), "label": bool(ex["label"]),
                "ref_logp": float(ex["ref_logps"]), "policy_logp": float(policy_logps[j]),
            }
    return out, trainer.evaluate()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def string_case(tmp_path_factory):
    """The string rows on disk and TRL's results without truncation and at MAX_LENGTH."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("kto-strings")
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    whole, logged = trl_kto(tokenizer, STRING_ROWS, root / "trl-whole", REFERENCE, POLICY)
    cut, logged_cut = trl_kto(tokenizer, STRING_ROWS, root / "trl-cut", REFERENCE, POLICY, max_length=MAX_LENGTH)
    return {"path": write_jsonl(root / "kto.jsonl", STRING_ROWS), "rows": STRING_ROWS, "tokenizer": tokenizer,
            "ref": REFERENCE, "policy": POLICY, "trl": {None: (whole, logged), MAX_LENGTH: (cut, logged_cut)}}


@pytest.fixture(scope="module")
def chat_case(tmp_path_factory):
    """Conversational rows with conftest's ChatML (Qwen-style) tokenizer and models: the sample models' tokenizer
    has no chat template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("kto-chat")
    ref, policy = save_model(root, "qwen", seed=0), save_model(root, "qwen", seed=1)
    rows = _conversation_rows()
    tokenizer = AutoTokenizer.from_pretrained(ref)
    assert tokenizer.chat_template
    whole, logged = trl_kto(tokenizer, rows, root / "trl", ref, policy)
    return {"path": write_jsonl(root / "kto-chat.jsonl", rows), "rows": rows, "tokenizer": tokenizer,
            "ref": ref, "policy": policy, "trl": {None: (whole, logged)}}


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


# -- TRL's side, checked on its own ------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [None, MAX_LENGTH])
def test_trl_side_equals_a_plain_forward_and_its_own_logged_means(string_case, max_length):
    from transformers import AutoModelForCausalLM

    trl, logged = string_case["trl"][max_length]
    ref = AutoModelForCausalLM.from_pretrained(string_case["ref"], dtype="float32")
    policy = AutoModelForCausalLM.from_pretrained(string_case["policy"], dtype="float32")
    for i, r in trl.items():
        assert r["label"] == STRING_ROWS[i]["label"]
        ref_logp, n = full_logits_logp(ref, r["prompt_ids"], r["scored_ids"])
        assert n == len(r["scored_ids"]) > 0
        assert r["ref_logp"] == logp_close(ref_logp), STRING_ROWS[i]["id"]
        assert r["policy_logp"] == logp_close(full_logits_logp(policy, r["prompt_ids"], r["scored_ids"])[0])
    # evaluate() logs per-batch means of the kept rows; one batch, so the plain means of the per-row values
    good = [r for r in trl.values() if r["label"]]
    bad = [r for r in trl.values() if not r["label"]]
    assert logged["eval_logps/chosen"] == logp_close(_mean([r["policy_logp"] for r in good]))
    assert logged["eval_logps/rejected"] == logp_close(_mean([r["policy_logp"] for r in bad]))
    assert logged["eval_rewards/chosen"] == pytest.approx(
        _mean([BETA * (r["policy_logp"] - r["ref_logp"]) for r in good]), abs=1e-5)
    assert logged["eval_rewards/rejected"] == pytest.approx(
        _mean([BETA * (r["policy_logp"] - r["ref_logp"]) for r in bad]), abs=1e-5)
    # the policy differs from the reference clearly enough that the signs compared below mean something
    assert min(abs(r["policy_logp"] - r["ref_logp"]) for r in trl.values()) > 1e-2


def test_trl_side_tokenization_facts(string_case):
    """What TRL's KTO preparation does with these rows, so the prefdiag tests below exercise each case."""
    tokenizer = string_case["tokenizer"]
    whole, _ = string_case["trl"][None]
    cut, _ = string_case["trl"][MAX_LENGTH]
    ids = [r["id"] for r in STRING_ROWS]
    assert sorted(whole) == list(range(len(STRING_ROWS)))  # nothing dropped without max_length
    for i, r in whole.items():
        assert r["prompt_ids"][0] == tokenizer.bos_token_id  # the tokenizer's BOS, once, on the prompt
        completion = r["completion_ids"]  # EOS appended once, not again after "...</s>"
        assert completion.count(tokenizer.eos_token_id) == 1 and completion[-1] == tokenizer.eos_token_id
        assert r["scored_ids"] == r["completion_ids"]
        plain = tokenizer(STRING_ROWS[i]["prompt"])["input_ids"]
        assert (len(r["prompt_ids"]) < len(plain)) == (ids[i] == "space")  # the one boundary mismatch
    # at MAX_LENGTH: the prompt that reaches it is dropped, longer completions are cut keep_start, the rest untouched
    dropped = [i for i in whole if i not in cut]
    assert [ids[i] for i in dropped] == ["long-prompt"]
    assert all(len(whole[i]["prompt_ids"]) >= MAX_LENGTH for i in dropped)
    truncated = []
    for i, r in cut.items():
        assert r["prompt_ids"] == whole[i]["prompt_ids"] and r["completion_ids"] == whole[i]["completion_ids"]
        assert r["scored_ids"] == r["completion_ids"][: MAX_LENGTH - len(r["prompt_ids"])]
        if len(r["scored_ids"]) < len(r["completion_ids"]):
            truncated.append(ids[i])
    assert sorted(truncated) == ["lock-bad", "lock-good", "nearly-full", "vienna"]
    assert len(cut[ids.index("nearly-full")]["scored_ids"]) == 1
    rude = cut[ids.index("rude")]
    assert len(rude["prompt_ids"]) + len(rude["completion_ids"]) == MAX_LENGTH  # fits exactly: not cut
    assert cut[ids.index("fr-good")]["ref_logp"] == whole[ids.index("fr-good")]["ref_logp"]


def test_trl_side_conversational(chat_case):
    from transformers import AutoModelForCausalLM

    tokenizer = chat_case["tokenizer"]
    trl, logged = chat_case["trl"][None]
    ref = AutoModelForCausalLM.from_pretrained(chat_case["ref"], dtype="float32")
    assert sorted(trl) == list(range(len(chat_case["rows"])))
    for i, r in trl.items():
        # no EOS appended to conversations: the template's own end of turn closes the completion
        assert tokenizer.decode(r["completion_ids"]).endswith("<|im_end|>\n")
        assert tokenizer.decode(r["prompt_ids"]).endswith("<|im_start|>assistant\n")
        assert r["ref_logp"] == logp_close(full_logits_logp(ref, r["prompt_ids"], r["scored_ids"])[0])
    good = [r for r in trl.values() if r["label"]]
    assert logged["eval_rewards/chosen"] == pytest.approx(
        _mean([BETA * (r["policy_logp"] - r["ref_logp"]) for r in good]), abs=1e-5)


# -- prefdiag against TRL (the contract in /work/notes/kto_contract.md) -------------------------------------------


def _check_reference_columns(pairs, rows: list[dict], trl: dict[int, dict], tokenizer) -> None:
    """Per input row, in input order: ids, labels, token counts, truncation, drops and ref log-probs as TRL's."""
    assert len(pairs) == len(rows)
    assert [str(v) for v in pairs["response_id"]] == [r["id"] for r in rows]
    assert pairs["label"].astype(bool).tolist() == [r["label"] for r in rows]
    assert pairs["ref_logp"].dtype == np.float64
    for i, row in enumerate(rows):
        p = pairs.iloc[i]
        if i not in trl:
            assert bool(p["dropped"]), row["id"]
            assert math.isnan(p["ref_logp"]), row["id"]
            continue
        r = trl[i]
        assert not bool(p["dropped"]), row["id"]
        assert p["ref_logp"] == logp_close(r["ref_logp"]), row["id"]
        assert int(p["completion_tokens"]) == len(r["scored_ids"]), row["id"]
        assert int(p["prompt_tokens"]) == len(r["prompt_ids"]), row["id"]
        assert bool(p["truncated"]) == (len(r["scored_ids"]) < len(r["completion_ids"])), row["id"]
        assert p["ref_logp_per_token"] == pytest.approx(r["ref_logp"] / len(r["scored_ids"]), rel=1e-5, abs=1e-5)
        assert not bool(p["non_finite"]), row["id"]
        if isinstance(row["prompt"], str):
            plain = tokenizer(row["prompt"])["input_ids"]
            assert bool(p["boundary_mismatch"]) == (len(r["prompt_ids"]) < len(plain)), row["id"]


def _check_summary_counts(summary, rows: list[dict], trl: dict[int, dict]) -> None:
    assert summary["data_shape"] == "kto"
    assert summary["n_responses"] == len(rows)
    assert summary["n_desirable"] == sum(r["label"] for r in rows)
    assert summary["n_undesirable"] == sum(not r["label"] for r in rows)
    assert summary["n_scored"] == len(trl)


@pytest.mark.parametrize("max_length", [None, MAX_LENGTH])
def test_audit_reference_logps_equal_trl(string_case, max_length):
    trl, _ = string_case["trl"][max_length]
    result = api.audit(str(string_case["path"]), str(string_case["ref"]),
                       RunOptions(max_length=max_length, dtype="float32", device="cpu", cache=False))
    _check_summary_counts(result.summary, STRING_ROWS, trl)
    _check_reference_columns(result.pairs, STRING_ROWS, trl, string_case["tokenizer"])
    assert result.pairs["category"].tolist() == [r["category"] for r in STRING_ROWS]  # other columns pass through
    assert result.pairs["completion"].tolist() == [r["completion"] for r in STRING_ROWS]  # as given, no EOS added
    assert int(result.pairs["dropped"].astype(bool).sum()) == len(STRING_ROWS) - len(trl)


def _check_policy(result, rows: list[dict], trl: dict[int, dict], logged: dict[str, float]) -> None:
    pairs, summary = result.pairs, result.summary
    for i, row in enumerate(rows):
        p = pairs.iloc[i]
        if i not in trl:
            assert math.isnan(p["policy_logp"]) and math.isnan(p["reward"]), row["id"]
            assert not bool(p["desirable_displaced"]) and not bool(p["undesirable_raised"]), row["id"]
            continue
        r = trl[i]
        logratio = r["policy_logp"] - r["ref_logp"]
        assert p["policy_logp"] == logp_close(r["policy_logp"]), row["id"]
        assert p["logratio"] == pytest.approx(logratio, abs=2e-4), row["id"]
        assert p["reward"] == pytest.approx(BETA * logratio, abs=5e-5), row["id"]
        assert p["policy_logp_per_token"] == pytest.approx(r["policy_logp"] / len(r["scored_ids"]), rel=1e-5,
                                                           abs=1e-5)  # fmt: skip
        assert bool(p["desirable_displaced"]) == (row["label"] and logratio < 0), row["id"]
        assert bool(p["undesirable_raised"]) == (not row["label"] and logratio > 0), row["id"]
    # TRL's rewards/chosen and rewards/rejected: the mean beta * (policy - ref) over desirable / undesirable rows
    assert summary["mean_reward_desirable"] == pytest.approx(logged["eval_rewards/chosen"], abs=1e-5)
    assert summary["mean_reward_undesirable"] == pytest.approx(logged["eval_rewards/rejected"], abs=1e-5)


@pytest.mark.parametrize("max_length", [None, MAX_LENGTH])
def test_compare_policy_logps_and_rewards_equal_trl(string_case, max_length):
    trl, logged = string_case["trl"][max_length]
    result = api.compare(str(string_case["path"]), str(string_case["ref"]), str(string_case["policy"]),
                         RunOptions(beta=BETA, max_length=max_length, dtype="float32", device="cpu", cache=False))
    _check_summary_counts(result.summary, STRING_ROWS, trl)
    _check_reference_columns(result.pairs, STRING_ROWS, trl, string_case["tokenizer"])
    _check_policy(result, STRING_ROWS, trl, logged)


def test_compare_conversational_equals_trl(chat_case):
    trl, logged = chat_case["trl"][None]
    rows = chat_case["rows"]
    result = api.compare(str(chat_case["path"]), str(chat_case["ref"]), str(chat_case["policy"]),
                         RunOptions(beta=BETA, dtype="float32", device="cpu", cache=False))
    _check_summary_counts(result.summary, rows, trl)
    _check_reference_columns(result.pairs, rows, trl, chat_case["tokenizer"])
    _check_policy(result, rows, trl, logged)
