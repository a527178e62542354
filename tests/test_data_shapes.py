"""Preference data in other shapes becomes the same pairs (and the same numbers) as the same pairs written as
prompt/chosen/rejected: rated completions (UltraFeedback raw) binarised as the ultrafeedback_binarized recipe does
or best against worst, and two responses with a label or scores (SHP). Unpaired KTO rows: tests/test_kto.py."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_data_formats import write
from typer.testing import CliRunner

from prefdiag import api
from prefdiag.cli import app
from prefdiag.data import DATA_FORMATS, load_pairs

runner = CliRunner()
FORMATS = ["jsonl", "json", "csv", "parquet", "saved"]


def completion(response: str, overall: float | None = None, aspects: dict | None = None) -> dict:
    item = {"model": "m", "response": response, "annotations": {
        name: {"Rating": str(value), "Rationale": "because"} for name, value in (aspects or {}).items()}}
    if overall is not None:
        item["overall_score"] = overall
    return item


def ultrafeedback() -> list[dict]:
    """Raw UltraFeedback rows: two-completion rows have exactly one possible pair; one row ties and is dropped."""
    return [
        {"source": "evol", "instruction": "Name a colour.",
         "completions": [completion(" Blue.", 8.0), completion(" Bananas.", 3.5)]},
        {"source": "flan", "instruction": "Add 2 and 2.",
         "completions": [completion(" Five.", 2.0), completion(" Four.", 9.0)]},
        {"source": "sharegpt", "instruction": "Say hi.",  # a tie: dropped and counted
         "completions": [completion(" Hi.", 7.0), completion(" Hello.", 7.0)]},
        {"source": "truthful", "instruction": "Is the sky green?",  # no overall_score: mean of the aspect ratings
         "completions": [completion(" Yes.", aspects={"honesty": 1, "helpfulness": 2, "truthfulness": "N/A"}),
                         completion(" No, it is blue.", aspects={"honesty": 5, "helpfulness": 4})]},
    ]


EXPECTED = [  # the same pairs written as prompt/chosen/rejected: the input row number is the id
    {"id": 0, "prompt": "Name a colour.", "chosen": " Blue.", "rejected": " Bananas.", "source": "evol"},
    {"id": 1, "prompt": "Add 2 and 2.", "chosen": " Four.", "rejected": " Five.", "source": "flan"},
    {"id": 3, "prompt": "Is the sky green?", "chosen": " No, it is blue.", "rejected": " Yes.", "source": "truthful"},
]


def pairs_of(table: pd.DataFrame) -> list[dict]:
    return [{k: row[k] for k in ("pair_id", "prompt", "chosen", "rejected")} for row in table.to_dict("records")]


def expected_pairs() -> list[dict]:
    return [{"pair_id": str(r["id"]), **{k: r[k] for k in ("prompt", "chosen", "rejected")}} for r in EXPECTED]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rated_completions_binarise_like_the_recipe_in_every_format(tmp_path, fmt):
    data = load_pairs(str(write(ultrafeedback(), tmp_path / "uf", fmt)))
    assert pairs_of(data.table) == expected_pairs(), fmt
    assert data.table["score_chosen"].tolist() == [8.0, 9.0, 4.5] and data.table["source"].tolist() == [
        "evol", "flan", "truthful"]
    provenance = data.provenance()
    assert provenance["shape"] == "rated" and provenance["n_ties_dropped"] == 1 and provenance["n_input_rows"] == 4


def test_rated_rejected_is_drawn_among_lower_rated_with_a_seed_or_is_the_worst(tmp_path):
    rows = [{"instruction": f"Question {i}?", "completions": [completion(f" best {i}", 9.0), completion(
        f" tied best {i}", 9.0)] + [completion(f" low{k} {i}", float(k)) for k in range(1, 4)]} for i in range(40)]
    path = write(rows, tmp_path / "uf", "jsonl")
    drawn = load_pairs(str(path), data_format="rated").table
    assert drawn["chosen"].str.startswith(" best").all()  # the first of the best-rated
    assert drawn["rejected"].str.startswith(" low").all()  # never a completion rated as high as the chosen one
    assert drawn["rejected"].nunique() > 40 / 2 and drawn["rejected"].str[:5].nunique() == 3  # all three drawn
    assert drawn.equals(load_pairs(str(path), data_format="rated").table)  # seeded: the same pairs every time
    assert not drawn["rejected"].equals(load_pairs(str(path), data_format="rated", binarize_seed=1).table["rejected"])
    worst = load_pairs(str(path), data_format="rated-best-worst").table
    assert worst["rejected"].str.startswith(" low1").all() and worst["score_rejected"].eq(1.0).all()


def test_rated_completions_give_the_numbers_of_the_same_pairs(model_dirs, tmp_path):
    options = api.RunOptions(device="cpu", cache=False)
    shaped = api.audit(str(write(ultrafeedback(), tmp_path / "uf", "jsonl")), str(model_dirs["llama"]), options)
    plain = api.audit(str(write(EXPECTED, tmp_path / "plain", "jsonl")), str(model_dirs["llama"]), options)
    columns = ["pair_id", "ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens", "identical"]
    pd.testing.assert_frame_equal(shaped.pairs[columns], plain.pairs[columns])
    assert shaped.summary["ref_ranking_accuracy"] == plain.summary["ref_ranking_accuracy"]


def shp() -> list[dict]:
    return [
        {"post_id": "p1", "history": "Why is the sea salty?", "human_ref_A": " Minerals from rocks.",
         "human_ref_B": " Because fish cry.", "labels": 1, "score_A": 52, "score_B": 3},
        {"post_id": "p2", "history": "Best way to learn?", "human_ref_A": " Never practise.",
         "human_ref_B": " Practise daily.", "labels": 0, "score_A": 1, "score_B": 40},
    ]


SHP_PAIRS = [{"id": 0, "prompt": "Why is the sea salty?", "chosen": " Minerals from rocks.",
              "rejected": " Because fish cry."},
             {"id": 1, "prompt": "Best way to learn?", "chosen": " Practise daily.", "rejected": " Never practise."}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_responses_with_a_label_become_pairs_in_every_format(tmp_path, fmt):
    data = load_pairs(str(write(shp(), tmp_path / "shp", fmt)))
    assert pairs_of(data.table) == [{"pair_id": str(r["id"]), **{k: r[k] for k in ("prompt", "chosen", "rejected")}}
                                    for r in SHP_PAIRS], fmt  # fmt: skip
    assert data.table["post_id"].tolist() == ["p1", "p2"] and data.provenance()["shape"] == "shp"


def test_two_responses_with_scores_only_prefer_the_higher_score_and_drop_ties(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in shp()]
    rows.append({**rows[0], "post_id": "p3", "score_B": 52})
    data = load_pairs(str(write(rows, tmp_path / "scores", "jsonl")), data_format="shp")
    assert data.table["chosen"].tolist() == [" Minerals from rocks.", " Practise daily."]
    assert data.provenance()["n_ties_dropped"] == 1


def test_shp_pairs_give_the_numbers_of_the_same_pairs(model_dirs, tmp_path):
    options = api.RunOptions(device="cpu", cache=False)
    shaped = api.audit(str(write(shp(), tmp_path / "shp", "parquet")), str(model_dirs["gpt2"]), options)
    plain = api.audit(str(write(SHP_PAIRS, tmp_path / "plain", "parquet")), str(model_dirs["gpt2"]), options)
    columns = ["pair_id", "ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens"]
    pd.testing.assert_frame_equal(shaped.pairs[columns], plain.pairs[columns])


def arena() -> list[dict]:
    """Chatbot Arena rows: two conversations and a verdict; ties are dropped and counted."""
    def chat(question: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    return [
        {"question_id": "q1", "model_a": "m1", "model_b": "m2", "winner": "model_b", "language": "English",
         "conversation_a": chat("Why is the sea salty?", "Because fish cry."),
         "conversation_b": chat("Why is the sea salty?", "Minerals from rocks.")},
        {"question_id": "q2", "model_a": "m2", "model_b": "m3", "winner": "tie (bothbad)", "language": "English",
         "conversation_a": chat("Hi", "Hello"), "conversation_b": chat("Hi", "Hey")},
        {"question_id": "q3", "model_a": "m3", "model_b": "m1", "winner": "model_a", "language": "English",
         "conversation_a": chat("Best way to learn?", "Practise daily."),
         "conversation_b": chat("Best way to learn?", "Never practise.")},
    ]  # fmt: skip


def test_arena_conversations_become_pairs_with_the_numbers_of_the_same_pairs(model_dirs, tmp_path):
    plain = [{"id": r["question_id"], "prompt": [{"role": "user", "content": p["prompt"]}],
              "chosen": [{"role": "assistant", "content": p["chosen"].strip()}],
              "rejected": [{"role": "assistant", "content": p["rejected"].strip()}]}
             for r, p in zip([arena()[0], arena()[2]], SHP_PAIRS)]  # fmt: skip
    for fmt in ("jsonl", "parquet", "csv"):
        data = load_pairs(str(write(arena(), tmp_path / f"arena-{fmt}", fmt)))
        assert data.provenance()["shape"] == "arena" and data.provenance()["n_ties_dropped"] == 1, fmt
        assert data.table["prompt"].tolist() == [p["prompt"] for p in plain], fmt  # the shared start: the question
        assert data.table["model_a"].tolist() == ["m1", "m3"], fmt  # every other column passes through
    options = api.RunOptions(device="cpu", cache=False)
    columns = ["ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens"]
    shaped = api.audit(str(write(arena(), tmp_path / "arena", "jsonl")), str(model_dirs["qwen"]), options)
    same = api.audit(str(write(plain, tmp_path / "plain", "jsonl")), str(model_dirs["qwen"]), options)
    pd.testing.assert_frame_equal(shaped.pairs[columns], same.pairs[columns])
    assert shaped.pairs["pair_id"].tolist() == ["0", "2"]  # the input rows: ids join back to the file


def test_an_arena_verdict_that_is_not_one_of_its_values_is_named(tmp_path):
    rows = arena()
    rows[2]["winner"] = "model_c"
    result = runner.invoke(app, ["audit", str(write(rows, tmp_path / "arena", "jsonl"))])
    assert result.exit_code == 2 and "row 3, column 'winner'" in result.stderr and "model_c" in result.stderr


def test_the_shapes_are_data_formats():
    assert {"rated", "rated-best-worst", "shp", "arena", "kto"} <= set(DATA_FORMATS)
