"""Preference data not yet in prompt/chosen/rejected shape, turned into pairs before validation:

- ``rated``: a prompt (``instruction`` or ``prompt``) with a list of ``completions``, each rated (UltraFeedback raw):
  binarised as HuggingFaceH4's ultrafeedback_binarized recipe does: the best-rated completion is chosen and one of
  the others, drawn at random (seeded), rejected. A completion's rating is its ``overall_score``, else the mean of
  its ``annotations`` ratings (UltraFeedback's four aspects; "N/A" skipped). ``rated-best-worst``: the worst-rated one
  is rejected instead. The rejected answer is drawn among the completions rated strictly below the chosen one, so
  rows whose completions all tie (or with fewer than two rated completions) are dropped and counted.
- ``shp``: two responses with a preference label or scores (SHP: ``history``, ``human_ref_A``, ``human_ref_B``,
  ``labels`` = 1 when A is preferred; without ``labels``, the higher of ``score_A`` / ``score_B``, ties dropped).
- ``arena``: two conversations and a verdict, as Chatbot Arena releases them (``conversation_a``,
  ``conversation_b``, ``winner`` = ``model_a`` / ``model_b``; ties, ``tie`` and ``tie (bothbad)``, dropped and
  counted): the winner's conversation is chosen, and the prompt is their shared start (TRL's extract_prompt).
- ``kto``: unpaired rows (``prompt``, ``completion``, ``label`` true = desirable, false = undesirable), as TRL's
  KTOTrainer reads them. Each row becomes a record whose chosen and rejected are both its completion, so the rest
  of loading (ids, conversations, validation) is shared; prefdiag.unpaired turns the scores into per-response
  metrics (a tie is scored once: prefdiag.rows). Paired data read with ``--data-format kto`` is unpaired as TRL
  does (prefdiag.data.unpair).

Every other column passes through; the pair id is the input row's ``id`` when present, else its row number, so a
pair still joins back to the row it came from."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from prefdiag.data.normalise import PairData
from prefdiag.data.readers import json_rows
from prefdiag.errors import DataError

RATED_PROMPTS = ("instruction", "prompt")
SHP_COLUMNS = ("human_ref_A", "human_ref_B")
ARENA_COLUMNS = ("conversation_a", "conversation_b", "winner")


def detect_shape(names: list[str]) -> str | None:
    """The shape the column names say, or None for prompt/chosen/rejected data."""
    if "chosen" in names or "rejected" in names:
        return None
    if "completions" in names and any(p in names for p in RATED_PROMPTS):
        return "rated"
    if all(c in names for c in SHP_COLUMNS):
        return "shp"
    if all(c in names for c in ARENA_COLUMNS):
        return "arena"
    if "completion" in names and "label" in names:
        return "kto"
    return None


def to_pairs(
    frame: pa.Table | pd.DataFrame, shape: str, source: str, json_path: Path | None, seed: int = 0,
    id_column: str | None = None, prompt_column: str = "prompt",
) -> tuple[pd.DataFrame, dict[str, Any], list[int]]:
    """The rows as prompt/chosen/rejected records (Python objects), the provenance details of the conversion, and
    the input row (0-based) each pair came from. ``id_column``: the --id-column named, if any; ``prompt_column``:
    KTO rows' prompt column (--prompt-column)."""
    rows = list(json_rows(json_path)) if json_path is not None else _rows(frame)
    if shape == "kto":
        records, details = _kto(rows, source, id_column, prompt_column)
    elif shape == "arena":
        records, details = _arena(rows, source, id_column)
    elif shape.startswith("rated"):
        records, details = _rated(rows, source, id_column, shape, seed)
    else:
        records, details = _shp(rows, source, id_column)
    if not records:
        raise DataError(f"{source}: no pairs: {details['n_ties_dropped']} of {len(rows)} rows are ties")
    numbers = [record.pop(_ROW) for record in records]
    return pd.DataFrame.from_records(records), {"shape": shape, "n_input_rows": len(rows), **details}, numbers


def _rows(frame: pa.Table | pd.DataFrame) -> list[dict]:
    if isinstance(frame, pa.Table):
        return frame.to_pylist()
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and v != v)} for row in
            frame.to_dict("records")]  # fmt: skip


_ROW = "\0row"  # where a record remembers its input row until the table is built


def _with_id(row: dict, number: int, id_column: str | None = None) -> dict:
    """Where the record came from, and its id: the row's ``id`` (else its number), or, when an --id-column is named
    (it passes through and is read as the id), the row's own ``id`` kept as a plain column."""
    if id_column is not None:
        return {_ROW: number, **({"id": row["id"]} if "id" in row else {})}
    return {_ROW: number, "id": row["id"] if "id" in row else number}


def _rated(
    rows: list[dict], source: str, id_column: str | None, shape: str, seed: int
) -> tuple[list[dict], dict[str, Any]]:
    rng = random.Random(seed)
    prompt_column = next(p for p in RATED_PROMPTS if any(p in row for row in rows))
    records, ties = [], 0
    for number, row in enumerate(rows):
        completions = row.get("completions")
        if isinstance(completions, str):  # a CSV cell: JSON text
            try:
                completions = json.loads(completions)
            except json.JSONDecodeError:
                pass
        if not isinstance(completions, list):
            raise DataError(f"{source}: row {number + 1}, column 'completions': expected a list of completions")
        rated = [(rating(c, source, number), _response(c, source, number)) for c in completions]
        rated = [(score, text) for score, text in rated if score is not None]
        if len(rated) < 2 or len({score for score, _ in rated}) == 1:
            ties += 1
            continue
        best = max(range(len(rated)), key=lambda i: rated[i][0])  # the first of the best-rated
        lower = [i for i, (score, _) in enumerate(rated) if score < rated[best][0]]
        worst = min(lower, key=lambda i: rated[i][0])
        rejected = worst if shape == "rated-best-worst" else rng.choice(lower)
        extra = {k: v for k, v in row.items() if k not in ("completions", prompt_column, "id")}
        records.append({**_with_id(row, number, id_column), "prompt": row.get(prompt_column), "chosen": rated[best][1],
                        "rejected": rated[rejected][1], "score_chosen": rated[best][0],
                        "score_rejected": rated[rejected][0], **extra})  # fmt: skip
    return records, {"n_ties_dropped": ties, "binarize_seed": seed, "prompt_column": prompt_column}


def rating(completion: Any, source: str, row: int) -> float | None:
    """A completion's rating: ``overall_score``, else the mean of its annotations' numeric ratings; None if none."""
    if not isinstance(completion, dict):
        raise DataError(f"{source}: row {row + 1}, column 'completions': expected objects with a response and ratings")
    if isinstance(completion.get("overall_score"), (int, float)):
        return float(completion["overall_score"])
    annotations = completion.get("annotations")
    values = []
    for annotation in (annotations.values() if isinstance(annotations, dict) else []):
        for item in annotation if isinstance(annotation, list) else [annotation]:
            value = item.get("Rating") if isinstance(item, dict) else item
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                continue  # "N/A"
    return sum(values) / len(values) if values else None


def _response(completion: dict, source: str, row: int) -> Any:
    for key in ("response", "text", "completion", "output"):
        if key in completion:
            return completion[key]
    raise DataError(f"{source}: row {row + 1}, column 'completions': a completion without a 'response'")


ARENA_WINNERS = {"model_a": "a", "model_b": "b", "tie": None, "tie (bothbad)": None}


def _arena(rows: list[dict], source: str, id_column: str | None) -> tuple[list[dict], dict[str, Any]]:
    records, ties = [], 0
    for number, row in enumerate(rows):
        winner = row.get("winner")
        if winner not in ARENA_WINNERS:
            raise DataError(f"{source}: row {number + 1}, column 'winner': expected one of "
                            f"{', '.join(ARENA_WINNERS)}, got {winner!r}")  # fmt: skip
        side = ARENA_WINNERS[winner]
        if side is None:
            ties += 1
            continue
        a, b = _conversation(row, "conversation_a", source, number), _conversation(row, "conversation_b", source,
                                                                                   number)  # fmt: skip
        extra = {k: v for k, v in row.items() if k not in ("conversation_a", "conversation_b", "id")}
        records.append({**_with_id(row, number, id_column), "chosen": a if side == "a" else b,
                        "rejected": b if side == "a" else a, **extra})  # fmt: skip
    return records, {"n_ties_dropped": ties}


def _conversation(row: dict, column: str, source: str, number: int) -> list:
    value = row.get(column)
    if isinstance(value, str):  # a CSV cell: JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or not value:
        raise DataError(f"{source}: row {number + 1}, column {column!r}: expected a list of messages")
    return value


KTO_LABELS = {True: True, False: False, 1: True, 0: False, "true": True, "false": False, "1": True, "0": False}


def kto_label(value: Any, source: str, row: int) -> bool:
    """A KTO label as a bool (true / false, 1 / 0, "true" / "false" in any case): True for a desirable response."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, str) and key in ("1.0", "0.0"):  # a float column written as text (pandas' CSV)
        key = key[0]
    if isinstance(key, float) and key in (0.0, 1.0):
        key = int(key)
    try:
        return KTO_LABELS[key]
    except (KeyError, TypeError):
        raise DataError(f"{source}: row {row + 1}, column 'label': expected true (desirable) or false (undesirable), "
                        f"got {value!r}") from None  # fmt: skip


def _kto(
    rows: list[dict], source: str, id_column: str | None, prompt_column: str
) -> tuple[list[dict], dict[str, Any]]:
    if not any(prompt_column in row for row in rows):
        raise DataError(f"{source}: unpaired KTO rows need a {prompt_column!r} column beside 'completion' and "
                        "'label'", hint="name another with --prompt-column")  # fmt: skip
    records = []
    for number, row in enumerate(rows):
        if row.get("completion") is None:
            raise DataError(f"{source}: row {number + 1}, column 'completion': missing value")
        extra = {k: v for k, v in row.items() if k not in (prompt_column, "prompt", "completion", "label", "id")}
        if prompt_column != "prompt" and "prompt" in row:
            extra["original_prompt"] = row["prompt"]  # a prompt column beside the one named: kept, renamed
        records.append({**_with_id(row, number, id_column), "prompt": row.get(prompt_column),
                        "chosen": row["completion"], "rejected": row["completion"],
                        "label": kto_label(row.get("label"), source, number),
                        **extra})  # fmt: skip
    return records, {}


def unpair(pairs: PairData) -> PairData:
    """Paired data read as KTO rows, as TRL's KTOTrainer unpairs it (unpair_preference_dataset): each pair gives
    its chosen response (label true) then its rejected one (label false), with ids ``<pair id>/chosen`` and
    ``<pair id>/rejected``; the prompt (explicit or extracted) and every other column are repeated."""
    table = pairs.table
    order = np.repeat(np.arange(len(table)), 2)
    desirable = np.tile([True, False], len(table))
    out = table.iloc[order].reset_index(drop=True)
    ids = out["pair_id"].astype(str)
    out["pair_id"] = pd.Series(np.where(desirable, ids + "/chosen", ids + "/rejected"), dtype="str")
    completion = out["chosen"].where(pd.Series(desirable), out["rejected"])
    out["chosen"], out["rejected"], out["label"] = completion, completion, desirable
    details = {**pairs.details, "shape": "kto", "unpaired_from_pairs": len(table)}
    rows = pairs.input_rows()[order]
    return dataclasses.replace(pairs, table=out, details=details, rows=rows)


def _shp(rows: list[dict], source: str, id_column: str | None) -> tuple[list[dict], dict[str, Any]]:
    records, ties = [], 0
    for number, row in enumerate(rows):
        a, b = row.get("human_ref_A"), row.get("human_ref_B")
        label = row.get("labels", row.get("label"))
        if label is None and "score_A" in row and "score_B" in row:
            if row["score_A"] == row["score_B"]:
                ties += 1
                continue
            label = int(row["score_A"] > row["score_B"])
        if label not in (0, 1, True, False, "0", "1"):
            raise DataError(f"{source}: row {number + 1}, column 'labels': expected 1 (A preferred) or 0 (B), got "
                            f"{label!r}")  # fmt: skip
        a_wins = str(int(label)) == "1" if not isinstance(label, str) else label == "1"
        extra = {k: v for k, v in row.items() if k not in ("history", "prompt", "human_ref_A", "human_ref_B", "id")}
        records.append({**_with_id(row, number, id_column), "prompt": row.get("history", row.get("prompt")),
                        "chosen": a if a_wins else b, "rejected": b if a_wins else a, **extra})  # fmt: skip
    return records, {"n_ties_dropped": ties}
