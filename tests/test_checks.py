"""Model-free checks: every planted problem is found, no clean look-alike is flagged, in standard and conversational
form; the summary counts them, --group-by splits them, and no model (nor torch) is needed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from prefdiag import api, checks
from prefdiag.cli import app

# (id, prompt, chosen, rejected, the checks that must flag it). Clean rows look like a problem and are not one.
ROWS = [
    ("identical", "Say hi", "Hi there!", "  Hi\n there! ", {"identical"}),
    ("clean-case", "Say hi", "Hi there, friend!", "Hello, dear colleague.", set()),
    ("near", "Compute 17*3", "17 times 3 is 51, so the answer is 51.", "17 times 3 is 51, so the answer is 52.",
     {"near_identical"}),
    ("clean-short", "What is 6*7?", "42", "43", set()),  # one edit, but half the text: not near-identical
    ("clean-near", "Capital of France?", "The capital of France is Paris.", "The capital of France is Marseille.",
     set()),  # similarity between 0.8 and 0.9: close, not near-identical
    ("dup-a", "Name a colour", "Blue is a colour.", "Bananas are yellow fruit.", {"duplicate"}),
    ("dup-b", "Name a colour", "Blue is a colour.", "Bananas are yellow fruit.", {"duplicate"}),
    ("dup-c", "Name  a colour", "Blue is a colour. ", "Bananas are\nyellow fruit.", {"duplicate"}),  # whitespace
    ("clean-dup", "Name a colour", "Blue is a colour.", "Grass is a plant.", set()),  # same prompt and chosen only
    ("swap-a", "Best pet?", "Dogs are loyal companions.", "Cats are independent.", {"conflict"}),
    ("swap-b", "Best pet?", "Cats are independent.", "Dogs are loyal companions.", {"conflict"}),
    ("chain-a", "Pick a number", "Seven is lucky.", "Three is fine.", {"conflict"}),
    ("chain-b", "Pick a number", "Nine is bigger.", "Seven is lucky.", {"conflict"}),
    ("clean-swap", "Best pet, really?", "Cats are independent.", "Dogs are loyal companions.", set()),  # other prompt
    ("same-greet", "Greet me", "Hello friend.", "Hello friend.", {"identical"}),  # states no preference
    ("clean-greet", "Greet me", "Good day to you.", "Hello friend.", set()),  # so this is no conflict
    ("empty-chosen", "Tell a joke", "", "Why did the chicken cross the road?", {"empty_response"}),
    ("empty-rejected", "Tell a story", "Once upon a time there was a fox.", "   \n", {"empty_response"}),
    ("empty-prompt", "", "Some answer here.", "Another answer there.", {"empty_prompt"}),
    ("blank-prompt", "  \n ", "A reply to nothing.", "A second reply.", {"empty_prompt"}),
    ("long", "Explain gravity", "Gravity is the force by which a planet or other body draws objects toward its "
     "center.", "Mass.", {"length_ratio"}),
    ("clean-long", "Explain mass", "Mass measures how much matter a body holds.", "Weight, sort of.", set()),
]
IDS = [r[0] for r in ROWS]
FLAGS = ("identical", "near_identical", "duplicate", "conflict", "empty_response", "empty_prompt", "length_ratio")


def standard_table() -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "prompt": p, "chosen": c, "rejected": r, "source": i.split("-")[0]}
                         for i, p, c, r, _ in ROWS])


def conversational_records() -> list[dict]:
    return [{"id": i, "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for i, p, c, r, _ in ROWS]


def expected(flag: str) -> list[str]:
    return [r[0] for r in ROWS if flag in r[4]]


def flagged(pairs: pd.DataFrame, flag: str) -> list[str]:
    return pairs.loc[pairs[flag].to_numpy(bool), "pair_id"].tolist()


@pytest.fixture(scope="module")
def standard_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("checks") / "pairs.jsonl"
    standard_table().to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("shape", ["standard", "conversational"])
@pytest.mark.parametrize("flag", FLAGS)
def test_each_check_finds_every_planted_pair_and_no_clean_one(standard_file, tmp_path, shape, flag):
    if shape == "standard":
        data = standard_file
    else:
        data = tmp_path / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in conversational_records()))
    pairs = api.audit(str(data)).pairs
    assert pairs["pair_id"].tolist() == IDS
    assert flagged(pairs, flag) == expected(flag)


def test_scores_rank_the_flagged_pairs(standard_file):
    from rapidfuzz.distance import Levenshtein

    pairs = api.audit(str(standard_file)).pairs.set_index("pair_id")
    near = pairs.loc["near", "near_identical_score"]
    assert near == pytest.approx(Levenshtein.normalized_similarity(ROWS[2][2], ROWS[2][3]))
    assert 0.8 <= pairs.loc["clean-near", "near_identical_score"] < 0.9  # a real look-alike, just under the bar
    assert pairs.loc["identical", "near_identical_score"] == 1.0
    assert pairs.loc["swap-a", "near_identical_score"] == 0.0  # clearly different: under the 0.8 floor
    long = ROWS[IDS.index("long")]
    assert pairs.loc["long", "length_ratio_score"] == pytest.approx(len(long[2]) / len(long[3]))
    assert np.isnan(pairs.loc["empty-chosen", "length_ratio_score"])  # empty is its own check


def test_summary_counts_and_rates_every_check(standard_file):
    summary = api.audit(str(standard_file)).summary
    n = len(ROWS)
    assert summary["n_pairs"] == n
    for flag in FLAGS:
        assert summary[f"n_{flag}"] == len(expected(flag)), flag
        assert summary[f"{flag}_rate"] == pytest.approx(len(expected(flag)) / n)
    assert summary["verdict"]["level"] == "warn"
    assert "4 conflicting" in summary["verdict"]["text"]
    assert summary["provenance"]["dataset"]["prompt_split"] == "column"


@pytest.mark.parametrize("shape", ["standard", "conversational"])
def test_reversed_pair_flags_swapped_responses_and_not_consistent_chains(standard_file, tmp_path, shape):
    data = standard_file
    if shape == "conversational":
        data = tmp_path / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in conversational_records()))
    pairs = api.audit(str(data)).pairs
    assert flagged(pairs, "reversed_pair") == ["swap-a", "swap-b"]  # chain-a/chain-b: a conflict, not reversed
    assert set(flagged(pairs, "conflict")) >= {"swap-a", "swap-b", "chain-a", "chain-b"}


def test_reversed_pair_ignores_identical_pairs_and_other_prompts():
    table = pd.DataFrame({"prompt": ["p", "p", "q", "r", "r"], "chosen": ["A", "B", "B", "X", "X"],
                          "rejected": ["B", "A", "A", "X", "X"]})  # fmt: skip
    assert checks.run_checks(table)["reversed_pair"].tolist() == [True, True, False, False, False]


def test_length_ratio_counts_tokens_when_a_model_gave_them():
    table = pd.DataFrame({"prompt": ["p", "q"], "chosen": ["a" * 50, "b" * 50], "rejected": ["c" * 10, "d" * 10]})
    features = checks.text_features(table)
    by_chars = checks.run_checks(table, features)
    assert by_chars["length_ratio"].tolist() == [True, True]
    by_tokens = checks.run_checks(table, features, tokens=(np.array([12, 3]), np.array([4, 13])))
    assert by_tokens["length_ratio"].tolist() == [False, True]
    assert by_tokens["length_ratio_score"].tolist() == pytest.approx([3.0, 13 / 3])


def test_chunks_and_threads_give_the_same_flags(monkeypatch):
    rng = np.random.default_rng(0)
    words = np.array("alpha beta gamma delta epsilon zeta eta theta".split())
    n = 3000
    texts = [" ".join(rng.choice(words, 6)) for _ in range(3 * n)]
    table = pd.DataFrame({"prompt": texts[:n], "chosen": texts[n:2 * n], "rejected": texts[2 * n:]})
    table.loc[2500, ["prompt", "chosen", "rejected"]] = table.loc[10, ["prompt", "rejected", "chosen"]].to_numpy()
    whole = checks.run_checks(table, checks.text_features(table, workers=1))
    monkeypatch.setattr(checks, "CHUNK_ROWS", 256)
    chunked = checks.run_checks(table, checks.text_features(table, workers=3))
    pd.testing.assert_frame_equal(whole, chunked)
    assert whole.loc[[10, 2500], "conflict"].all()


def test_whitespace_normalisation_matches_python_split_join():
    import pyarrow as pa

    values = ["  a  b\n\nc  ", "", "   ", "x", "a\u00a0b", "x\u2028y", "\tq\x85r", "plain text", "é  ü\u3000ß"]
    got = checks.normalise_whitespace(pa.array(values, pa.large_string())).to_pylist()
    assert got == [" ".join(v.split()) for v in values]


def test_group_by_gives_every_flat_metric_per_group(standard_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["audit", str(standard_file), "--group-by", "source", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    groups = summary["groups"]
    assert groups["column"] == "source"
    sources = sorted({i.split("-")[0] for i in IDS})
    assert list(groups["values"]) == sources
    flat = {k for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat -= {"schema_version"}
    for name, metrics in groups["values"].items():
        assert set(metrics) == flat
        rows = [r for r in ROWS if r[0].split("-")[0] == name]
        assert metrics["n_pairs"] == len(rows)
        for flag in FLAGS:
            assert metrics[f"n_{flag}"] == sum(flag in r[4] for r in rows)
    assert sum(m["n_conflict"] for m in groups["values"].values()) == summary["n_conflict"]


def test_group_by_an_unknown_column_is_a_usage_error_listing_the_columns(standard_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["audit", str(standard_file), "--group-by", "category", "-o", str(out)])
    assert result.exit_code == 2
    assert "--group-by: no column 'category'; the columns are: pair_id, prompt, chosen, rejected, source" in (
        result.stderr)
    assert "Traceback" not in result.output and not out.exists()


def test_model_free_audit_imports_no_torch(standard_file, tmp_path):
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from prefdiag.cli import app\n"
        f"r = CliRunner().invoke(app, ['audit', {str(standard_file)!r}, '-q', '-o', {str(tmp_path / 'o')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pairs = pd.read_parquet(tmp_path / "o" / "pairs.parquet")
    assert set(FLAGS) <= set(pairs.columns) and "ref_chosen_logp" not in pairs.columns


def test_with_a_reference_the_checks_count_tokens_and_sit_beside_the_model_columns(model_dirs, standard_file):
    options = api.RunOptions(device="cpu", cache=False)
    pairs = api.audit(str(standard_file), str(model_dirs["llama"]), options).pairs
    assert {"ref_chosen_logp", "flip_loss", *FLAGS} <= set(pairs.columns)
    longer = np.maximum(pairs["chosen_tokens"], pairs["rejected_tokens"])
    shorter = np.minimum(pairs["chosen_tokens"], pairs["rejected_tokens"])
    np.testing.assert_allclose(pairs["length_ratio_score"], longer / shorter)
    assert flagged(pairs, "duplicate") == expected("duplicate")  # text checks do not change with a model


def test_mislabel_score_is_the_implicit_reward_probability_of_a_flipped_label(model_dirs, standard_file):
    options = api.RunOptions(device="cpu", cache=False, beta=0.5, group_by="source")
    result = api.compare(str(standard_file), str(model_dirs["llama"]), str(model_dirs["llama-policy"]), options)
    pairs = result.pairs
    by_source = result.summary["groups"]["values"]
    assert by_source["dup"]["ranking_accuracy"] == pytest.approx((pairs.loc[pairs["source"] == "dup",
                                                                             "policy_margin"] > 0).mean())
    np.testing.assert_allclose(pairs["mislabel_score"], 1 / (1 + np.exp(pairs["reward_margin"])))
    assert (pairs.loc[pairs["reward_margin"] < -1, "likely_mislabeled"]).all()
    assert not pairs.loc[pairs["reward_margin"] >= 0, "likely_mislabeled"].any()
    np.testing.assert_allclose(pairs["flip_loss"], np.logaddexp(0, 0.5 * pairs["ref_margin"]))
