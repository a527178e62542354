"""Tokenization identical to TRL 1.x DPOTrainer: EOS appended to string completions, prompt and prompt+completion
tokenized separately with the tokenizer's special tokens (conversations through the chat template, with each row's
``tools`` and ``chat_template_kwargs``), the completion starting at their common prefix, and keep_start truncation
of prompt+chosen and prompt+rejected at ``max_length`` (pairs whose prompt fills it dropped). Older conventions
(``compat="trl0"``, ``"rewardbench"``) live in prefdiag.tokenization_compat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prefdiag.chat_templates import chat_ids, count_present, group_by_kwargs, row_template_kwargs
from prefdiag.errors import ModelError, UsageError
from prefdiag.formatting import plural

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

    @property
    def tied(self) -> np.ndarray:
        """Pairs whose chosen and rejected completions have the same token ids (every unpaired KTO row is one)."""
        return np.fromiter((c == r for c, r in zip(self.chosen_ids, self.rejected_ids)), dtype=bool, count=len(self))


def is_conversation(value: Any) -> bool:
    """True for a list of {role, content} messages (TRL's conversational format)."""
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def common_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


COMPAT_SCHEMES = {"trl1": SCHEME, "trl0": "trl-0.x", "rewardbench": "rewardbench"}  # --compat: scheme recorded
TRL_DEFAULT_MAX_LENGTH = 1024  # DPOConfig.max_length in TRL 1.x (and 0.x): a run with defaults truncates there


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[Any],
    chosen: Sequence[Any],
    rejected: Sequence[Any],
    *,
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    template_kwargs: Sequence[Any] | None = None,
    compat: str = "trl1",
    max_prompt_length: int | None = None,
) -> TokenizedPairs:
    """Tokenize pairs exactly as TRL's DPOTrainer does (see module docstring); strings and conversations mixed.
    ``tools`` / ``template_kwargs`` are per-row values of the ``tools`` and ``chat_template_kwargs`` columns (None
    rows allowed), passed to the chat template as TRL 1.x passes them; ``documents`` (a ``documents`` column) is
    not rendered, as TRL 1.x's DPOTrainer does not pass it (its rows are counted in the settings). ``compat``
    ("trl1", "trl0", "rewardbench") picks the conventions (prefdiag.tokenization_compat); ``max_prompt_length``
    applies to trl0 / rewardbench. ``progress(n)`` is called as chunks of pairs are done."""
    if compat not in COMPAT_SCHEMES:
        raise UsageError(f"unknown --compat {compat!r}: expected one of {', '.join(COMPAT_SCHEMES)}")
    if max_prompt_length is not None and (compat == "trl1" or max_prompt_length < 1):
        raise UsageError("--max-prompt-length must be a positive number of tokens, and applies to --compat trl0 and "
                         f"rewardbench only (TRL 1.x has no prompt limit); got {max_prompt_length} with {compat}")
    n = len(prompts)
    for name, column in (("tools", tools), ("documents", documents), ("chat_template_kwargs", template_kwargs)):
        if column is not None and len(column) != n:
            raise UsageError(f"the {name} column has {len(column)} rows but there are {n} pairs")
    conversational = [is_conversation(p) or is_conversation(c) for p, c in zip(prompts, chosen)]
    if any(conversational) and not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "the data is conversational but the tokenizer has no chat template",
            hint="pass --chat-template FILE, or --tokenizer with a chat template, or use standard-format data",
        )
    if tools is None and template_kwargs is None:
        kwargs: list[dict[str, Any]] = [{} for _ in range(n)]
    else:
        kwargs = [row_template_kwargs(i, tools, template_kwargs) if conversational[i] else {} for i in range(n)]
    if compat == "trl1":
        parts = _tokenize_trl1(tokenizer, prompts, chosen, rejected, conversational, kwargs, max_length, progress)
    else:
        from prefdiag import tokenization_compat as tc

        if compat == "trl0":
            parts = tc.tokenize_trl0(tokenizer, prompts, chosen, rejected, kwargs, max_length=max_length,
                                     max_prompt_length=max_prompt_length)
        else:
            parts = tc.tokenize_rewardbench(tokenizer, prompts, chosen, rejected, max_length=max_length,
                                            max_prompt_length=max_prompt_length)
        if progress is not None:
            progress(n)
    over = None
    if max_length is None and compat != "rewardbench":
        over = int(sum(len(p) + max(c, r) > TRL_DEFAULT_MAX_LENGTH
                       for p, c, r in zip(parts["prompt"], parts["chosen_full"], parts["rejected_full"])))
    settings = {
        "scheme": COMPAT_SCHEMES[compat],
        "compat": compat,
        "max_length": max_length,
        "max_prompt_length": _effective_max_prompt_length(compat, max_prompt_length),
        "truncation_mode": "keep_start" if compat == "trl1" else "keep_end",
        "eos_token": tokenizer.eos_token,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "chat_template_sha256": _sha256(getattr(tokenizer, "chat_template", None)),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "rows_with_tools": count_present(tools),
        "rows_with_chat_template_kwargs": count_present(template_kwargs),
        "documents_not_rendered": count_present(documents),
        "n_over_trl_default_max_length": over,
    }

    def column(name: str, dtype) -> np.ndarray:
        return np.asarray(parts[name], dtype=dtype).reshape(n)

    return TokenizedPairs(
        parts["prompt"], parts["chosen"], parts["rejected"], column("chosen_full", np.int64),
        column("rejected_full", np.int64), column("mismatch", bool), column("truncated", bool),
        column("dropped", bool), settings,
    )


TEMPLATE_COLUMNS = {"tools": "tools", "documents": "documents", "template_kwargs": "chat_template_kwargs"}


def template_columns(table) -> dict[str, list | None]:
    """The ``tools`` / ``documents`` / ``chat_template_kwargs`` columns of a pairs table as tokenize_pairs (and
    tokenization_key) keyword arguments; None for a column the table does not have."""
    present = set(getattr(table, "columns", ()))
    return {arg: (list(table[column]) if column in present else None) for arg, column in TEMPLATE_COLUMNS.items()}


def settings_notes(settings: dict[str, Any], unit: str = "pair") -> list[str]:
    """One-line notes on how the tokenization may differ from the user's TRL run, for the summary and terminal
    (``unit``: what a row of the data is, "pair" or "row")."""
    notes = []
    over = settings.get("n_over_trl_default_max_length")
    if over:
        notes.append(f"{plural(over, unit)} exceed{'s' if over == 1 else ''} "
                     f"{TRL_DEFAULT_MAX_LENGTH} tokens, TRL's default max_length, and were scored whole: a TRL run "
                     f"with default settings truncated them; pass --max-length {TRL_DEFAULT_MAX_LENGTH} to match it")
    docs = settings.get("documents_not_rendered")
    if docs:
        notes.append(f"{plural(docs, 'row')} {'has' if docs == 1 else 'have'} a documents column, which "
                     f"TRL 1.x's DPOTrainer does not pass to the chat template (nor does prefdiag); put them in "
                     f"chat_template_kwargs to render them")
    return notes


def _effective_max_prompt_length(compat: str, max_prompt_length: int | None) -> int | None:
    if compat == "trl0":
        from prefdiag.tokenization_compat import TRL0_MAX_PROMPT_LENGTH

        return TRL0_MAX_PROMPT_LENGTH if max_prompt_length is None else max_prompt_length
    if compat == "rewardbench":
        from prefdiag.tokenization_compat import REWARDBENCH_MAX_PROMPT_LENGTH

        return REWARDBENCH_MAX_PROMPT_LENGTH if max_prompt_length is None else max_prompt_length
    return None  # TRL 1.x has no prompt limit


def _tokenize_trl1(tokenizer, prompts, chosen, rejected, conversational, kwargs, max_length, progress):
    """TRL 1.x's layout: prompt and prompt+completion tokenized, the completion starting at their common prefix,
    then keep_start truncation at max_length."""
    n = len(prompts)
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
        for row_kwargs, group in group_by_kwargs(rows, kwargs):  # rows with the same tools etc. render together
            chat_prompts = [list(prompts[i]) for i in group]
            enc_p = chat_ids(tokenizer, chat_prompts, True, group, row_kwargs)
            enc_c = chat_ids(tokenizer, [p + list(chosen[i]) for p, i in zip(chat_prompts, group)], False, group,
                             row_kwargs)
            enc_r = chat_ids(tokenizer, [p + list(rejected[i]) for p, i in zip(chat_prompts, group)], False, group,
                             row_kwargs)
            for k, i in enumerate(group):
                prompt_ids[i], full_chosen[i], full_rejected[i] = enc_p[k], enc_c[k], enc_r[k]
        if progress is not None:
            progress(len(rows))

    out: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "chosen_full", "rejected_full",
                                            "mismatch", "truncated", "dropped")}
    for i in range(n):
        p = prompt_ids[i]
        prompt_len = min(common_token_prefix(p, full_chosen[i]), common_token_prefix(p, full_rejected[i]))
        c, r = full_chosen[i][prompt_len:], full_rejected[i][prompt_len:]
        out["mismatch"].append(prompt_len < len(p))
        out["chosen_full"].append(len(c))
        out["rejected_full"].append(len(r))
        dropped = truncated = False
        if max_length is not None:
            room = max(0, max_length - prompt_len)
            dropped = prompt_len >= max_length
            truncated = not dropped and (len(c) > room or len(r) > room)
            c, r = c[:room], r[:room]
        out["dropped"].append(dropped)
        out["truncated"].append(truncated)
        out["prompt"].append(p[:prompt_len])
        out["chosen"].append(c)
        out["rejected"].append(r)
    return out


def tokenization_key(tokenizer, prompts: Sequence[Any], chosen: Sequence[Any], rejected: Sequence[Any], *,
                     max_length: int | None = None, tools: Sequence[Any] | None = None,
                     documents: Sequence[Any] | None = None, template_kwargs: Sequence[Any] | None = None,
                     compat: str = "trl1", max_prompt_length: int | None = None) -> str | None:
    """A hash of everything that decides the token ids: the tokenizer's full definition, chat template and special
    tokens, the settings (``compat``, lengths), the library versions and every pair's text with its ``tools``,
    ``documents`` and ``chat_template_kwargs`` values. Takes the same keyword arguments as tokenize_pairs. None for
    a tokenizer without a serialisable (fast) backend, whose ids are then never reused."""
    import hashlib
    import json

    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    header = {
        "scheme": COMPAT_SCHEMES.get(compat, compat),
        "settings_version": 2,  # 2: settings count tools rows and pairs over TRL's default max_length
        "max_length": max_length,
        **({"max_prompt_length": max_prompt_length} if max_prompt_length is not None else {}),
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
    for name, column in (("tools", tools), ("documents", documents), ("chat_template_kwargs", template_kwargs)):
        if column is not None:  # only when given: a run without these columns hashes as if they did not exist
            digest.update(name.encode())
            for value in column:  # key order kept: the template renders dicts in their written order
                digest.update(json.dumps(value, ensure_ascii=False, default=str).encode())
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
