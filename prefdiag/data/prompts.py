"""Implicit prompts: split the shared prompt off chosen and rejected exactly as TRL's extract_prompt does, and
Anthropic HH transcripts after their last shared Assistant turn."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from prefdiag.errors import DataError

log = logging.getLogger(__name__)

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_CHUNK_ROWS = 100_000  # rows per Python pass (prompt extraction), to bound the Python objects alive at once


def _chunks(*arrays: pa.ChunkedArray):
    """Aligned slices of at most _CHUNK_ROWS rows, as Python lists."""
    n = len(arrays[0])
    for start in range(0, n, _CHUNK_ROWS):
        yield start, [a.slice(start, _CHUNK_ROWS).to_pylist() for a in arrays]



def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit prompt off a pair exactly as TRL's extract_prompt does: the longest common prefix of
    messages for conversations; of characters, stepped back before a space, for strings. Like TRL, when one side is
    a prefix of the other the split falls one element before the end of the shorter one."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if isinstance(chosen, str) and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings, by binary search on C-level comparisons."""
    hi = min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid
    return lo


def extract_prompt_index(chosen: str, rejected: str) -> int:
    """Where TRL's extract_prompt splits two strings (may be -1, as TRL's own index may be), without its
    character-by-character loop."""
    shortest = min(len(chosen), len(rejected))
    k = common_prefix_length(chosen, rejected)
    if k == shortest:  # no differing character: TRL's loop ends on its last index
        return max(shortest - 1, 0)
    return k - 1 if chosen[k - 1] == " " else k


def _split_strings(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray):
    parts: tuple[list, list, list] = ([], [], [])
    for _, (cs, rs) in _chunks(chosen, rejected):
        _cut(cs, rs, [extract_prompt_index(c, r) for c, r in zip(cs, rs)], parts)
    return _string_columns(parts)


def _cut(cs: list[str], rs: list[str], idx: list[int], parts: tuple[list, list, list]) -> None:
    """Append one chunk's (prompt, chosen, rejected), each pair cut at its index, to ``parts``."""
    parts[0].append(pa.array([c[:i] for c, i in zip(cs, idx)], pa.large_string()))
    parts[1].append(pa.array([c[i:] for c, i in zip(cs, idx)], pa.large_string()))
    parts[2].append(pa.array([r[i:] for r, i in zip(rs, idx)], pa.large_string()))


def _string_columns(parts: tuple[list, list, list]) -> tuple[pa.ChunkedArray, ...]:
    return tuple(pa.chunked_array(chunks, pa.large_string()) for chunks in parts)


def _split_conversations(chosen: pa.ChunkedArray | list, rejected: pa.ChunkedArray | list):
    if isinstance(chosen, list) or isinstance(rejected, list):  # Python message lists, kept as written
        chosen, rejected = _as_list(chosen), _as_list(rejected)
        split = [extract_prompt(c, r) for c, r in zip(chosen, rejected)]
        return [s[0] for s in split], [s[1] for s in split], [s[2] for s in split]
    prompts, chosen_out, rejected_out = [], [], []
    for _, (cs, rs) in _chunks(chosen, rejected):
        split = [extract_prompt(c, r) for c, r in zip(cs, rs)]
        prompts.append(pa.array([s[0] for s in split], chosen.type))
        chosen_out.append(pa.array([s[1] for s in split], chosen.type))
        rejected_out.append(pa.array([s[2] for s in split], rejected.type))
    return pa.chunked_array(prompts, chosen.type), pa.chunked_array(chosen_out, chosen.type), pa.chunked_array(
        rejected_out, rejected.type
    )


def _looks_like_hh(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray) -> bool:
    """Every transcript starts with "\\n\\nHuman:" and has an "\\n\\nAssistant:" turn."""
    return all(
        pc.all(pc.starts_with(column, HH_HUMAN)).as_py() and pc.all(pc.match_substring(column, HH_ASSISTANT)).as_py()
        for column in (chosen, rejected)
    )


def hh_split_index(chosen: str, rejected: str) -> int:
    """End of the last "\\n\\nAssistant:" that lies inside the prefix both transcripts share; -1 if there is none."""
    shared = common_prefix_length(chosen, rejected)
    at = chosen.rfind(HH_ASSISTANT, 0, shared)
    return at + len(HH_ASSISTANT) if at >= 0 else -1


def _split_hh(chosen: pa.ChunkedArray, rejected: pa.ChunkedArray, source: str, *, strict: bool):
    """HH transcripts split after their last shared Assistant turn; None (not strict) if some pair has none."""
    parts: tuple[list, list, list] = ([], [], [])
    for start, (cs, rs) in _chunks(chosen, rejected):
        idx = [hh_split_index(c, r) for c, r in zip(cs, rs)]
        if min(idx) < 0:
            if not strict:
                log.info("%s: not every pair shares an HH Assistant turn; using TRL's extract_prompt", source)
                return None
            row = start + idx.index(-1)
            raise DataError(
                f"{source}: row {row + 1}: chosen and rejected share no {HH_ASSISTANT!r} turn to split the HH "
                "transcript at"
            )
        _cut(cs, rs, idx, parts)
    return _string_columns(parts)


def _as_list(column: pa.ChunkedArray | list) -> list:
    return column if isinstance(column, list) else column.to_pylist()
