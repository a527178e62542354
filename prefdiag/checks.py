"""Model-free checks of preference pairs, run before any model is loaded.

Each check is a small named function that returns a boolean per-pair column named after it, plus a float
``<check>_score`` where ranking the pairs helps (cleanlab Datalab's shape). Text is compared after whitespace
normalisation (runs of whitespace become one space, ends stripped). A conversation is compared on its rendered text,
one ``role: content`` line per message, for equality (identical, duplicate, conflict); edit distance, emptiness and
length count its messages' contents only, so a conversation scores as the same text in plain strings would. A
message's other keys (``tool_calls``...) count as part of its content, written as JSON.

Each check's label and one-line meaning are its flag's in the registry (prefdiag.flags); what that line leaves out:

=================  =========================================================================================
near_identical     not identical; ``near_identical_score`` is the normalised Levenshtein similarity, 1 - distance /
                   longer length, from 0.8 up (0 below: clearly different responses, whose exact distance would
                   cost ten times more); flagged from 0.9 (Pal et al.)
duplicate          every copy is flagged
conflict           includes the two responses in both orders; a pair whose responses are identical states no
                   preference, so it neither has nor causes a conflict
reversed_pair      strict: B over A beside A over B. Consistent chains from binarised rankings (A > B, B > C: B is
                   chosen once, rejected once) are a conflict but no reversed pair: gate on this one when such
                   chains are expected
empty_response     a conversation is empty when its messages' contents are
length_ratio       in tokens when a model was run, else in characters; ``length_ratio_score`` is longer / shorter
                   (NaN when a response is empty)
=================  =========================================================================================

Pure numpy/pandas/pyarrow and rapidfuzz, no torch. Everything is linear in the number of pairs: text is processed
in chunks on all cores, equality is by 64-bit hashes of the normalised text (grouping, not pairwise comparison), and
the edit distance is computed once per pair.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from prefdiag import flags

CHECKS = flags.names("data")  # the registry (prefdiag.flags) names every check
SCORES = tuple(flag.score for flag in flags.FLAGS if flag.kind == "data" and flag.score)
NEAR_IDENTICAL_SIMILARITY = 0.9
# Similarities under this floor are reported as 0: those responses are clearly different, and the banded edit
# distance that stops at the floor costs a tenth of the exact one on long responses.
SIMILARITY_FLOOR = 0.8
LENGTH_RATIO_LIMIT = 4.0
CHUNK_ROWS = 1 << 14

# Python's str.isspace() characters other than " ": a value holding one (or two spaces in a row, or a space at an
# end) needs normalising; all other values are already normal and skip the (costlier) split-and-join.
_WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_NEEDS_NORMALISING = rf"[{_WHITESPACE}]|  |^ | $"
# Mixing constants for combining 64-bit hashes into a key (odd, so multiplication is a bijection mod 2**64).
_K1, _K2, _K3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


@dataclass
class TextFeatures:
    """Per-pair facts about the text that every check is computed from (one pass over the data)."""

    prompt_key: np.ndarray  # uint64 hash of the normalised (rendered) prompt
    chosen_key: np.ndarray
    rejected_key: np.ndarray
    prompt_chars: np.ndarray  # characters of normalised content (a conversation: its messages' contents)
    chosen_chars: np.ndarray
    rejected_chars: np.ndarray
    identical: np.ndarray  # normalised chosen == normalised rejected (compared as text, not by hash)
    similarity: np.ndarray  # normalised Levenshtein similarity of normalised chosen and rejected, in [0, 1]

    def __len__(self) -> int:
        return len(self.identical)


def normalise_whitespace(texts: pa.Array) -> pa.Array:
    """Runs of whitespace become one space and both ends are stripped (Python's ``" ".join(s.split())``)."""
    needs = pc.match_substring_regex(texts, _NEEDS_NORMALISING)
    if not pc.any(needs).as_py():
        return texts
    subset = texts.take(pc.indices_nonzero(needs))
    joined = pc.binary_join(pc.utf8_split_whitespace(subset), pa.scalar(" ", subset.type))
    return pc.replace_with_mask(texts, needs, pc.utf8_trim_whitespace(joined))


def render(texts: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(text compared by the checks, content whose length counts): a string is both; a conversation renders as one
    ``role: content`` line per message, and its content is the messages' contents joined by spaces."""
    if not (pa.types.is_list(texts.type) or pa.types.is_large_list(texts.type)):
        return texts, texts
    messages = texts.flatten()
    lengths = pc.list_value_length(texts).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    roles = pc.struct_field(messages, "role").cast(pa.large_string())
    content = pc.fill_null(pc.struct_field(messages, "content").cast(pa.large_string()), "")
    lines = pc.binary_join_element_wise(roles, content, pa.scalar(": ", pa.large_string()))
    rendered = pc.binary_join(pa.ListArray.from_arrays(offsets, lines), pa.scalar("\n", pa.large_string()))
    contents = pc.binary_join(pa.ListArray.from_arrays(offsets, content), pa.scalar(" ", pa.large_string()))
    return rendered, contents


def _keys(texts: list[str]) -> np.ndarray:
    """64-bit hashes of the values (Python's string hash: per process, which is all grouping within a run needs)."""
    return np.fromiter((hash(t) for t in texts), dtype=np.int64, count=len(texts)).view(np.uint64)


def _chunk_features(prompt: pa.Array, chosen: pa.Array, rejected: pa.Array) -> tuple[np.ndarray, ...]:
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cpdist

    keys, chars, texts, contents = [], [], [], []
    for column in (prompt, chosen, rejected):
        rendered, content = render(column)
        plain = content is rendered  # a string is its own content
        rendered = normalise_whitespace(rendered)
        content = rendered if plain else normalise_whitespace(content)
        chars.append(pc.utf8_length(content).to_numpy(zero_copy_only=False).astype(np.int64))
        texts.append(rendered.to_pylist())
        keys.append(_keys(texts[-1]))
        if column is not prompt:
            contents.append(texts[-1] if plain else content.to_pylist())
    identical = keys[1] == keys[2]
    identical[identical] = [texts[1][i] == texts[2][i] for i in np.flatnonzero(identical)]  # equal text, not hash
    # Edit distance on the contents, so a conversation scores like the same text as plain strings.
    similarity = cpdist(
        contents[0], contents[1], scorer=Levenshtein.normalized_similarity, score_cutoff=SIMILARITY_FLOOR,
        dtype=np.float32, workers=1,
    )  # fmt: skip
    return (*keys, *chars, identical, similarity)


def text_features(table: pd.DataFrame, workers: int | None = None) -> TextFeatures:
    """Normalise, render, hash and compare every pair's text, a chunk of rows per task on all cores."""
    columns = [_arrow(table[name]) for name in ("prompt", "chosen", "rejected")]
    n = len(table)
    starts = range(0, n, CHUNK_ROWS)
    workers = workers or min(os.cpu_count() or 1, 8)

    def work(start: int):
        return _chunk_features(*(column.slice(start, CHUNK_ROWS).combine_chunks() for column in columns))

    if n == 0:
        parts = [_chunk_features(*(pa.array([], pa.large_string()) for _ in range(3)))]
    elif workers == 1 or len(starts) == 1:
        parts = [work(start) for start in starts]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(work, starts))
    merged = [np.concatenate([part[i] for part in parts]) for i in range(8)]
    return TextFeatures(*merged)


def _arrow(series: pd.Series) -> pa.ChunkedArray:
    if isinstance(series.dtype, pd.ArrowDtype) or getattr(series.dtype, "storage", None) == "pyarrow":
        return series.array.__arrow_array__()  # Arrow-backed (pandas str, ArrowDtype): no copy
    values = series.tolist()
    if any(isinstance(v, list) for v in values):  # Python message lists (keys that differ from row to row)
        rows = [[_comparable_message(m) for m in v] for v in values]
        return pa.chunked_array([pa.array(rows, _MESSAGES)])
    return pa.chunked_array([pa.array(values)])


_MESSAGES = pa.list_(pa.struct([("role", pa.large_string()), ("content", pa.large_string())]))


def _comparable_message(message: dict) -> dict[str, str]:
    """A message as {role, content} for the checks: its other keys (tool_calls...) join the content as JSON, so
    two tool calls that differ are different responses and a tool call is not an empty one."""
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    others = {k: v for k, v in message.items() if k not in ("role", "content")}
    if others:
        encoded = json.dumps(others, sort_keys=True, ensure_ascii=False, default=str)
        content = f"{content} {encoded}" if content else encoded
    return {"role": str(message.get("role")), "content": content}


def _combine(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = a * _K1 + b * _K2
        return key if c is None else key + c * _K3


# -- the checks -----------------------------------------------------------------------------------------------------


def identical(f: TextFeatures) -> dict[str, np.ndarray]:
    """chosen and rejected are the same text once whitespace is normalised: the pair carries no preference."""
    return {"identical": f.identical.copy()}


def near_identical(f: TextFeatures) -> dict[str, np.ndarray]:
    """Responses a few edits apart (DPOP's failure mode): DPO can lower both likelihoods while it widens the gap."""
    score = f.similarity.astype(np.float64)
    return {"near_identical": (score >= NEAR_IDENTICAL_SIMILARITY) & ~f.identical, "near_identical_score": score}


def duplicate(f: TextFeatures) -> dict[str, np.ndarray]:
    """The same (prompt, chosen, rejected) more than once; every copy is flagged."""
    key = pd.Series(_combine(f.prompt_key, f.chosen_key, f.rejected_key))
    return {"duplicate": key.duplicated(keep=False).to_numpy()}


def later_copies(f: TextFeatures) -> np.ndarray:
    """Every copy of a duplicated (prompt, chosen, rejected) but the first: what removing duplicates drops."""
    return pd.Series(_combine(f.prompt_key, f.chosen_key, f.rejected_key)).duplicated(keep="first").to_numpy()


def conflict(f: TextFeatures) -> dict[str, np.ndarray]:
    """For one prompt, a response is chosen in one pair and rejected in another (A over B and B over A included)."""
    states = ~f.identical  # an identical pair states no preference: it neither has nor causes a conflict
    chosen = _combine(f.prompt_key, f.chosen_key)[states]
    rejected = _combine(f.prompt_key, f.rejected_key)[states]
    flagged = np.zeros(len(f), dtype=bool)
    flagged[states] = pd.Series(chosen).isin(rejected).to_numpy() | pd.Series(rejected).isin(chosen).to_numpy()
    return {"conflict": flagged}


def reversed_pair(f: TextFeatures) -> dict[str, np.ndarray]:
    """Another pair holds the same prompt with the two responses swapped: the two state opposite preferences."""
    states = ~f.identical
    key = _combine(f.prompt_key, f.chosen_key, f.rejected_key)[states]
    swapped = _combine(f.prompt_key, f.rejected_key, f.chosen_key)[states]
    flagged = np.zeros(len(f), dtype=bool)
    flagged[states] = pd.Series(swapped).isin(key).to_numpy()
    return {"reversed_pair": flagged}


def empty_response(f: TextFeatures) -> dict[str, np.ndarray]:
    """chosen or rejected is empty (or only whitespace)."""
    return {"empty_response": (f.chosen_chars == 0) | (f.rejected_chars == 0)}


def empty_prompt(f: TextFeatures) -> dict[str, np.ndarray]:
    """The prompt is empty: an implicit prompt found nothing shared, or the prompt column is blank."""
    return {"empty_prompt": f.prompt_chars == 0}


def length_ratio(
    f: TextFeatures, chosen_tokens: np.ndarray | None = None, rejected_tokens: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """One response over 4x longer than the other: the preference may be about length (SimPO, R-DPO)."""
    if chosen_tokens is not None and rejected_tokens is not None:
        a, b = np.asarray(chosen_tokens, dtype=np.float64), np.asarray(rejected_tokens, dtype=np.float64)
    else:
        a, b = f.chosen_chars.astype(np.float64), f.rejected_chars.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where((a > 0) & (b > 0), np.maximum(a, b) / np.minimum(a, b), np.nan)
    return {"length_ratio": ratio > LENGTH_RATIO_LIMIT, "length_ratio_score": ratio}


def run_checks(
    table: pd.DataFrame, features: TextFeatures | None = None, tokens: tuple[np.ndarray, np.ndarray] | None = None
) -> pd.DataFrame:
    """Every check on a pairs table (prompt, chosen, rejected); ``tokens`` (chosen, rejected token counts) makes
    length_ratio count tokens. Returns the check columns, aligned with the table."""
    f = features if features is not None else text_features(table)
    columns: dict[str, np.ndarray] = {}
    for check in (identical, near_identical, duplicate, conflict, reversed_pair, empty_response, empty_prompt):
        columns.update(check(f))
    columns.update(length_ratio(f, *(tokens or (None, None))))
    return pd.DataFrame(columns, index=table.index)
