"""Tokenization identical to TRL 1.x DPOTrainer: EOS appended to string completions, prompt and prompt+completion
tokenized separately with the tokenizer's special tokens, the completion starting at their common prefix, and
keep_start truncation of prompt+chosen and prompt+rejected at ``max_length`` (pairs whose prompt fills it dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefdiag.errors import DataError, ModelError, first_line

SCHEME = "trl-1.x"  # the tokenization rules followed; recorded in provenance and in the token cache key


@dataclass
class TokenizedPairs:
    """Token ids of every pair as TRL lays them out, plus what truncation did to each."""

    prompt_ids: list[list[int]]  # the shared prompt (TRL's prompt_ids[:prompt_len])
    chosen_ids: list[list[int]]  # completion ids after truncation
    rejected_ids: list[list[int]]
    chosen_full_tokens: np.ndarray  # completion lengths before truncation
    rejected_full_tokens: np.ndarray
    boundary_mismatch: np.ndarray  # tokenized prompt is not a prefix of tokenized prompt+completion
    truncated: np.ndarray  # some completion token was cut by max_length
    dropped: np.ndarray  # the prompt alone reaches max_length: TRL drops the pair, we report it unscored
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def prompt_tokens(self) -> np.ndarray:
        return np.fromiter((len(p) for p in self.prompt_ids), dtype=np.int64, count=len(self))

    @property
    def chosen_tokens(self) -> np.ndarray:
        return np.fromiter((len(c) for c in self.chosen_ids), dtype=np.int64, count=len(self))

    @property
    def rejected_tokens(self) -> np.ndarray:
        return np.fromiter((len(r) for r in self.rejected_ids), dtype=np.int64, count=len(self))


def is_conversation(value: Any) -> bool:
    """True for a list of {role, content} messages (TRL's conversational format)."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _chat_ids(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool, rows: list[int]):
    """Token ids of each conversation: ``apply_chat_template`` on the whole batch, which renders each one and
    tokenizes them together (the same ids as one call per conversation, several times faster). A conversation the
    template rejects is named by its row."""

    def render(batch):
        return tokenizer.apply_chat_template(
            batch, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )["input_ids"]

    try:
        return [list(ids) for ids in render(conversations)]
    except Exception:
        for row, conversation in zip(rows, conversations):
            try:
                render([conversation])
            except Exception as exc:
                raise DataError(
                    f"row {row + 1}: the chat template cannot render this conversation "
                    f"({first_line(exc, with_type=True)})",
                    hint="check the roles and content of that row, or pass --tokenizer with another chat template",
                ) from None
        raise


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[Any],
    chosen: Sequence[Any],
    rejected: Sequence[Any],
    *,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> TokenizedPairs:
    """Tokenize pairs exactly as TRL's DPOTrainer does (see module docstring); strings and conversations mixed.
    ``progress(n)`` is called as chunks of pairs are done."""
    n = len(prompts)
    conversational = [is_conversation(p) or is_conversation(c) for p, c in zip(prompts, chosen)]
    if any(conversational) and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the data is conversational but the tokenizer has no chat template",
            hint="pass --tokenizer with a chat template, or use standard-format (string) data",
        )
    eos = tokenizer.eos_token

    prompt_ids: list[list[int]] = [[] for _ in range(n)]
    full_chosen: list[list[int]] = [[] for _ in range(n)]
    full_rejected: list[list[int]] = [[] for _ in range(n)]

    string_rows = [i for i in range(n) if not conversational[i]]
    for rows in _chunks(string_rows):  # batches big enough for the tokenizer's threads, small enough to show progress
        texts_p = [prompts[i] for i in rows]
        texts_c = [_with_eos(chosen[i], eos) for i in rows]
        texts_r = [_with_eos(rejected[i], eos) for i in rows]
        enc_p = tokenizer(texts_p)["input_ids"]
        enc_c = tokenizer([p + c for p, c in zip(texts_p, texts_c)])["input_ids"]
        enc_r = tokenizer([p + r for p, r in zip(texts_p, texts_r)])["input_ids"]
        for k, i in enumerate(rows):
            prompt_ids[i], full_chosen[i], full_rejected[i] = list(enc_p[k]), list(enc_c[k]), list(enc_r[k])
        if progress is not None:
            progress(len(rows))
    for rows in _chunks([i for i in range(n) if conversational[i]]):
        chat_prompts = [list(prompts[i]) for i in rows]
        enc_p = _chat_ids(tokenizer, chat_prompts, True, rows)
        enc_c = _chat_ids(tokenizer, [p + list(chosen[i]) for p, i in zip(chat_prompts, rows)], False, rows)
        enc_r = _chat_ids(tokenizer, [p + list(rejected[i]) for p, i in zip(chat_prompts, rows)], False, rows)
        for k, i in enumerate(rows):
            prompt_ids[i], full_chosen[i], full_rejected[i] = enc_p[k], enc_c[k], enc_r[k]
        if progress is not None:
            progress(len(rows))

    shared, chosen_ids, rejected_ids = [], [], []
    chosen_full = np.zeros(n, dtype=np.int64)
    rejected_full = np.zeros(n, dtype=np.int64)
    mismatch = np.zeros(n, dtype=bool)
    truncated = np.zeros(n, dtype=bool)
    dropped = np.zeros(n, dtype=bool)
    for i in range(n):
        p = prompt_ids[i]
        prompt_len = min(common_prefix_length(p, full_chosen[i]), common_prefix_length(p, full_rejected[i]))
        mismatch[i] = prompt_len < len(p)
        c, r = full_chosen[i][prompt_len:], full_rejected[i][prompt_len:]
        chosen_full[i], rejected_full[i] = len(c), len(r)
        if max_length is not None:
            room = max(0, max_length - prompt_len)
            dropped[i] = prompt_len >= max_length
            truncated[i] = not dropped[i] and (len(c) > room or len(r) > room)
            c, r = c[:room], r[:room]
        shared.append(p[:prompt_len])
        chosen_ids.append(c)
        rejected_ids.append(r)

    settings = {
        "scheme": SCHEME,
        "max_length": max_length,
        "truncation_mode": "keep_start",
        "eos_token": eos,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "chat_template_sha256": _sha256(getattr(tokenizer, "chat_template", None)),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
    }
    return TokenizedPairs(
        shared, chosen_ids, rejected_ids, chosen_full, rejected_full, mismatch, truncated, dropped, settings
    )


def tokenization_key(tokenizer, prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any], *,
                     max_length: int | None = None) -> str | None:
    """A hash of everything that decides the token ids: the tokenizer's full definition, chat template and special
    tokens, the settings, the library versions and every pair's text. None for a tokenizer without a serialisable
    (fast) backend, whose ids are then never reused."""
    import hashlib
    import json

    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    header = {
        "scheme": SCHEME,
        "max_length": max_length,
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "split_special_tokens": getattr(tokenizer, "split_special_tokens", None),
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(backend.to_str().encode())
    for row in zip(prompts, chosen, rejected):
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


def _chunks(rows: list[int], size: int = 4096) -> list[list[int]]:
    return [rows[k : k + size] for k in range(0, len(rows), size)]


def _with_eos(text: str, eos: str | None) -> str:
    if eos and not text.endswith(eos):
        return text + eos
    return text


def _sha256(text: str | None) -> str | None:
    if not text:
        return None
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
