"""The tokenization conventions of older tools, so their logs and published numbers can be matched (``--compat``):

- ``trl0``: TRL 0.x's DPOTrainer (the 0.13-0.29 ``tokenize_row`` and ``concatenated_forward``): conversations are
  first rendered to text (prompt with the generation prompt, each completion the text after the common prefix of
  the renders); prompt, chosen and rejected are tokenized separately with ``add_special_tokens=False``; EOS is
  appended to both completions (always; no BOS is added for a decoder-only model); the prompt keeps its last
  ``max_prompt_length`` tokens (default 512); with ``max_length``, prompt+completion is cut from the start
  (``keep_end``), the same number of leading tokens from both rows of a pair (a row whose prompt is cut away
  entirely has its first completion token unscored, as TRL's shifted labels leave it).
- ``rewardbench``: RewardBench's DPO scorer (``rewardbench/dpo.py`` with ``prepare_dialogue_from_tokenizer``): the
  prompt is the chat-template render of the user turn(s) without a generation prompt, each answer the render of
  the whole conversation; both are tokenized without special tokens from ``prompt + answer``, the answer starting
  where the prompt's tokens end (one token earlier when the last prompt token merged); BOS (EOS when the tokenizer
  has none) is prepended to the prompt and EOS appended to the answer, always; when prompt+longer answer exceeds
  ``max_length`` (2048) the prompt keeps its last ``max_prompt_length`` (128) tokens, and if still too long the
  answers keep their first ``max_length - max_prompt_length``.

Truncation is computed per pair (TRL 0.x cut a padded batch, so with several pairs per batch its cut also depends
on the longest pair of the batch: the numbers match a run with one pair per batch, and any run where no pair
needed cutting). A pair that no shared prompt can represent is reported unscored (``dropped``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefdiag.chat_templates import chat_text
from prefdiag.errors import DataError, ModelError

TRL0_MAX_PROMPT_LENGTH = 512  # TRL 0.x DPOConfig.max_prompt_length default
REWARDBENCH_MAX_LENGTH = 2048  # rewardbench DPOInference.max_length
REWARDBENCH_MAX_PROMPT_LENGTH = 128  # rewardbench DPOInference.max_prompt_length


def _common_text_prefix(*texts: str) -> str:
    n = min(len(t) for t in texts)
    for i in range(n):
        if any(t[i] != texts[0][i] for t in texts[1:]):
            return texts[0][:i]
    return texts[0][:n]


def trl0_texts(tokenizer, prompt: Any, chosen: Any, rejected: Any, row: int, kwargs: dict) -> tuple[str, str, str]:
    """A conversational pair rendered to text the way TRL 0.x's ``maybe_apply_chat_template`` did before
    tokenizing; strings pass unchanged."""
    if isinstance(prompt, str):
        return prompt, chosen, rejected
    last_role = prompt[-1].get("role")
    if last_role not in ("user", "tool", "assistant"):
        raise DataError(f"row {row + 1}: --compat trl0 needs a prompt whose last message is a user, tool or "
                        f"assistant turn, got {last_role!r}")
    generation = last_role in ("user", "tool")
    text_p = chat_text(tokenizer, list(prompt), row, add_generation_prompt=generation,
                       continue_final_message=not generation, **kwargs)
    text_c = chat_text(tokenizer, list(prompt) + list(chosen), row, **kwargs)
    text_r = chat_text(tokenizer, list(prompt) + list(rejected), row, **kwargs)
    text_p = _common_text_prefix(text_p, text_c, text_r)
    return text_p, text_c[len(text_p):], text_r[len(text_p):]


def tokenize_trl0(tokenizer, prompts, chosen, rejected, kwargs: Sequence[dict], *, max_length: int | None,
                  max_prompt_length: int | None):
    """(prompt, chosen, rejected, chosen_full, rejected_full, mismatch, truncated, dropped) lists, TRL 0.x rules."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ModelError("--compat trl0 appends the tokenizer's EOS token to each completion, but it has none")
    keep = TRL0_MAX_PROMPT_LENGTH if max_prompt_length is None else max_prompt_length
    texts = [trl0_texts(tokenizer, p, c, r, i, kwargs[i]) for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))]
    enc = [tokenizer([t[k] for t in texts], add_special_tokens=False)["input_ids"] if texts else [] for k in range(3)]
    out = _empty(len(texts))
    for i in range(len(texts)):
        p = list(enc[0][i])[-keep:] if keep else list(enc[0][i])
        c, r = list(enc[1][i]) + [eos_id], list(enc[2][i]) + [eos_id]
        out["chosen_full"].append(len(c))
        out["rejected_full"].append(len(r))
        cut = 0 if max_length is None else max(0, len(p) + max(len(c), len(r)) - max_length)
        into = max(0, cut - len(p))  # completion tokens cut too: with the prompt gone, a row's first token is
        c, r = c[into:], r[into:]  # never scored (no predictor), as with an empty prompt here
        dropped = not c or not r
        out["prompt"].append(p[cut:])
        out["chosen"].append(c)
        out["rejected"].append(r)
        out["mismatch"].append(False)
        out["truncated"].append(cut >= len(p) and cut > 0)
        out["dropped"].append(dropped)
    return out


def _rewardbench_messages(prompt: Any, answer: Any, row: int, side: str) -> tuple[list[dict], str]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:  # RewardBench alternates user/assistant by position and keeps only each message's content
        messages = [{"role": "user" if k % 2 == 0 else "assistant", "content": m.get("content")}
                    for k, m in enumerate(prompt)]
        if messages[-1]["role"] != "user":
            raise DataError(f"row {row + 1}: --compat rewardbench gives the prompt's messages the roles user, "
                            f"assistant, user... by position, so a prompt needs an odd number of them "
                            f"(a system message counts), got {len(messages)}")
    if isinstance(answer, str):
        return messages, answer
    if len(answer) != 1 or not isinstance(answer[0].get("content"), str):
        raise DataError(f"row {row + 1}, column '{side}': --compat rewardbench scores one assistant message per "
                        f"response, got {len(answer)}")
    return messages, answer[0]["content"]


def tokenize_rewardbench(tokenizer, prompts, chosen, rejected, *, max_length: int | None,
                         max_prompt_length: int | None):
    """(prompt, chosen, rejected, ...) lists laid out as RewardBench's DPO scorer tokenizes them."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("--compat rewardbench renders every pair with the tokenizer's chat template, and it has none",
                         hint="pass --chat-template FILE")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ModelError("--compat rewardbench appends the tokenizer's EOS token to each answer, but it has none")
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token is not None else eos_id  # rewardbench: bos := eos
    total = REWARDBENCH_MAX_LENGTH if max_length is None else max_length
    keep = REWARDBENCH_MAX_PROMPT_LENGTH if max_prompt_length is None else max_prompt_length
    out = _empty(len(prompts))
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        messages, answer_c = _rewardbench_messages(p, c, i, "chosen")
        _, answer_r = _rewardbench_messages(p, r, i, "rejected")
        text_p = chat_text(tokenizer, messages, i)
        text_c = chat_text(tokenizer, messages + [{"role": "assistant", "content": answer_c}], i)
        text_r = chat_text(tokenizer, messages + [{"role": "assistant", "content": answer_r}], i)
        prompt_ids = tokenizer(text_p, add_special_tokens=False)["input_ids"]
        sides = [_rewardbench_answer(tokenizer, text_p, prompt_ids, text, bos_id, eos_id) for text in (text_c, text_r)]
        longer = max(len(a) for _, a in sides)
        cut_sides = []
        for side_prompt, answer in sides:
            if len(side_prompt) + longer > total:
                side_prompt = side_prompt[-keep:]  # Python slicing as in the source (0 keeps everything)
            if len(side_prompt) + longer > total:
                answer = answer[: total - keep]
            cut_sides.append((side_prompt, answer))
        (pc, ac), (pr, ar) = cut_sides
        differ = pc != pr  # the last prompt token merged on one side only: no prompt both can share
        out["prompt"].append([] if differ else pc)
        out["chosen"].append([] if differ else ac)
        out["rejected"].append([] if differ else ar)
        out["chosen_full"].append(len(sides[0][1]))
        out["rejected_full"].append(len(sides[1][1]))
        out["mismatch"].append(differ or any(len(s[0]) != len(prompt_ids) + 1 for s in sides))
        out["truncated"].append(len(ac) < len(sides[0][1]) or len(ar) < len(sides[1][1]))
        out["dropped"].append(differ)
    return out


def _rewardbench_answer(tokenizer, text_p: str, prompt_ids: list[int], answer: str, bos_id: int, eos_id: int):
    full = tokenizer(text_p + answer, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if list(prompt_ids) != list(full[:start]):
        start -= 1
    return [bos_id] + list(full[:start]), list(full[start:]) + [eos_id]


def _empty(n: int) -> dict[str, list]:
    return {k: [] for k in ("prompt", "chosen", "rejected", "chosen_full", "rejected_full", "mismatch", "truncated",
                            "dropped")}
