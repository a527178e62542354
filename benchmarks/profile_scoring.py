"""Where the scoring engine's time goes on a CPU, by operator share (shares, not seconds: they hold on a loaded
machine), for the prefix and separate layouts on the short-response shape of issue 15 (prompts of about 160
tokens, responses of about 10, the 4-layer Llama of the ``cpu`` benchmark shape in fp32, random init).

    python benchmarks/profile_scoring.py [--pairs 64] [--threads 2] [--top 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tokenized_pairs(pairs: int, vocab: int, seed: int = 0):
    from prefdiag.tokenization import TokenizedPairs

    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(4, vocab, rng.integers(140, 181)).tolist() for _ in range(pairs)]
    chosen = [rng.integers(4, vocab, rng.integers(8, 13)).tolist() + [2] for _ in range(pairs)]
    rejected = [rng.integers(4, vocab, rng.integers(8, 13)).tolist() + [2] for _ in range(pairs)]
    zeros = np.zeros(pairs, dtype=bool)
    return TokenizedPairs(prompts, chosen, rejected, np.array([len(c) for c in chosen]),
                          np.array([len(r) for r in rejected]), zeros, zeros.copy(), zeros.copy())


def profile(model, tokenized, layout: str, top: int) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from prefdiag.scoring import LogProbScorer, ScoreSettings

    LogProbScorer(model, ScoreSettings(layout=layout)).score(tokenized)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        LogProbScorer(model, ScoreSettings(layout=layout)).score(tokenized)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / total) for e in ranked[:top]], total


def main() -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    tokenized = tokenized_pairs(args.pairs, config.vocab_size)
    totals = {}
    for layout in ("prefix", "separate"):
        shares, totals[layout] = profile(model, tokenized, layout, args.top)
        print(f"\n{layout}: self CPU time by operator (share of the profiled scoring call)")
        for name, share in shares:
            print(f"  {100 * share:5.1f}%  {name}")
    print(f"\nprefix / separate, profiled self CPU time: {totals['prefix'] / totals['separate']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
