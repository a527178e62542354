"""Does CHES before training predict which pairs DPO displaces? Train the shipped reference with TRL's DPOTrainer,
and rank-correlate each pair's CHES percentile (from prefdiag's engine, before training) with the measured change
of its chosen log-prob, beside simpler predictors (edit distance, reference margin, length difference).

    python experiments/ches_correlation/run.py                 # the recorded run (a few minutes on 2 CPU cores)
    python experiments/ches_correlation/run.py --tiny          # CI size: 32 pairs, 1 epoch (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from prefdiag.ches import add_ches_columns  # noqa: E402
from prefdiag.tokenization import tokenize_pairs  # noqa: E402

# Razin et al. report that higher CHES goes with a larger fall of the chosen log-prob: a negative correlation.
TOP_SHARE = 0.05
PREDICTORS = {
    "ches_percentile": "CHES percentile",
    "ches_norm_percentile": "length-normalised CHES percentile",
    "edit_distance": "edit distance between the responses (tokens)",
    "neg_ref_margin": "minus the reference margin (summed log-probs)",
    "length_difference": "chosen minus rejected length (tokens)",
}


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two token sequences (one numpy row per token of ``a``)."""
    b_arr = np.asarray(b)
    row = np.arange(len(b) + 1)
    for i, token in enumerate(a, start=1):
        substitution = row[:-1] + (b_arr != token)
        new = np.empty_like(row)
        new[0] = i
        new[1:] = np.minimum(row[1:] + 1, substitution)
        new = np.minimum.accumulate(new - np.arange(len(new))) + np.arange(len(new))  # insertions, left to right
        row = new
    return int(row[-1])


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho over the finite pairs and a two-sided p-value from the normal approximation."""
    keep = np.isfinite(x) & np.isfinite(y)
    rho = float(pd.Series(x[keep]).rank().corr(pd.Series(y[keep]).rank()))
    n = int(keep.sum())
    p = math.erfc(abs(rho) * math.sqrt(max(n - 1, 1)) / math.sqrt(2)) if math.isfinite(rho) else float("nan")
    return rho, p


def score(model, tokenized, ches: bool):
    from prefdiag.scoring import LogProbScorer, ScoreSettings

    scorer = LogProbScorer(model.eval(), ScoreSettings(ches=ches))
    chosen, rejected = scorer.score(tokenized)
    return chosen, rejected, scorer.extras


def train_dpo(reference, tokenizer, rows: list[dict], args, workdir: Path):
    """The reference trained with TRL's DPOTrainer (sigmoid loss, summed log-probs, as the sample policy was)."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(args.seed)
    policy = copy.deepcopy(reference).train()
    config = DPOConfig(
        output_dir=str(workdir / "trl"), report_to=[], beta=args.beta, learning_rate=args.lr,
        num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size, max_length=None,
        use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, save_strategy="no",
        logging_strategy="no", seed=args.seed, lr_scheduler_type="constant", warmup_steps=0,
        gradient_checkpointing=False,
    )  # fmt: skip
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=config, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.train()
    return trainer.model.eval()


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    rows = rows[: args.max_pairs] if args.max_pairs else rows
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32).eval()
    tokenized = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                               [r["rejected"] for r in rows])
    ref_c, ref_r, extras = score(reference, tokenized, ches=True)
    with tempfile.TemporaryDirectory() as workdir:
        policy = train_dpo(reference, tokenizer, rows, args, Path(workdir))
    pol_c, pol_r, _ = score(policy, tokenized, ches=False)
    table = pd.DataFrame({"id": [r.get("id", str(k)) for k, r in enumerate(rows)],
                          "category": [r.get("category") for r in rows], **extras})
    table = add_ches_columns(table)
    table["edit_distance"] = [edit_distance(c, r) for c, r in zip(tokenized.chosen_ids, tokenized.rejected_ids)]
    table["neg_ref_margin"] = -(ref_c - ref_r)
    table["length_difference"] = tokenized.chosen_tokens - tokenized.rejected_tokens
    table["chosen_logp_change"] = pol_c - ref_c
    table["rejected_logp_change"] = pol_r - ref_r
    settings = {"pairs": len(rows), "epochs": args.epochs, "lr": args.lr, "beta": args.beta,
                "batch_size": args.batch_size}
    return {**settings, **correlations(table)}


def correlations(table: pd.DataFrame) -> dict:
    """Each predictor's Spearman rho with the change of the chosen log-prob, and the mean change over the top 5% of
    pairs by that predictor (what a flag on it would remove), overall and per category."""
    change = table["chosen_logp_change"].to_numpy(float)
    results = {}
    for column, label in PREDICTORS.items():
        values = table[column].to_numpy(float)
        rho, p = spearman(values, change)
        top = values >= np.nanquantile(values, 1 - TOP_SHARE)
        by_category = {
            str(name): spearman(group[column].to_numpy(float), group["chosen_logp_change"].to_numpy(float))[0]
            for name, group in table.groupby("category")
        } if table["category"].notna().any() else {}
        results[column] = {"label": label, "spearman": rho, "p_approx": p,
                           "top_mean_change": float(np.nanmean(change[top])), "spearman_by_category": by_category}
    return {
        "mean_chosen_logp_change": float(np.nanmean(change)),
        "chosen_fell_rate": float(np.mean(change < 0)),
        "correlation_with_chosen_logp_change": results,
        "table": table,
    }


def markdown(result: dict) -> str:
    results = result["correlation_with_chosen_logp_change"]
    categories = sorted({c for v in results.values() for c in v["spearman_by_category"]})
    lines = ["| predictor (before training) | Spearman rho with the change of the chosen log-prob | p (approx.) | "
             "mean change, top 5% by it (nats) |" + "".join(f" rho in {c} |" for c in categories),
             "| --- | --- | --- | --- |" + " --- |" * len(categories)]
    for values in results.values():
        lines.append(f"| {values['label']} | {values['spearman']:+.3f} | {values['p_approx']:.1e} | "
                     f"{values['top_mean_change']:+.2f} |"
                     + "".join(f" {values['spearman_by_category'][c]:+.2f} |" for c in categories))
    lines.append(f"| (all pairs) | | | {result['mean_chosen_logp_change']:+.2f} |" + " |" * len(categories))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=str(ROOT / "sample_data" / "models" / "reference"))
    parser.add_argument("--data", default=str(ROOT / "sample_data" / "pairs.jsonl"))
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-pairs", type=int, default=0, help="use the first N pairs (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="CI size: 32 pairs, one epoch")
    parser.add_argument("--output", help="write the results (JSON) and the per-pair table (CSV) beside it")
    parser.add_argument("--table", help="no training: recompute the correlations from a per-pair CSV it wrote")
    args = parser.parse_args(argv)
    if args.tiny:
        args.max_pairs, args.epochs = 32, 1
    if args.table:
        result = correlations(pd.read_csv(args.table))
        print(markdown(result))
        if args.output:
            _write_json(Path(args.output), {"recomputed_from": Path(args.table).name, **result})
        return 0
    result = run(args)
    print(markdown(result))
    print(f"\n{result['pairs']} pairs, {result['epochs']:g} epochs, lr {result['lr']:g}, beta {result['beta']:g}: "
          f"mean change of the chosen log-prob {result['mean_chosen_logp_change']:+.3f} nats, "
          f"chosen fell on {100 * result['chosen_fell_rate']:.0f}% of pairs")
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        result["table"].to_csv(output.with_suffix(".csv"), index=False)
        _write_json(output, result)
    return 0


def _write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
