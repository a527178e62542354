"""The baseline: TRL's ``DPOTrainer.evaluate()`` on (data, reference, policy), as a user would run it to get the same
numbers prefdiag reports. Prints one JSON line on stdout (the last line) with the timings and eval metrics.

    python benchmarks/trl_evaluate.py --data pairs.jsonl --reference REF --policy POL --device cpu [--logps]

Settings: ``per_device_eval_batch_size`` (default 8), ``max_length=None`` (no truncation, as prefdiag's default),
``report_to=[]``. On CPU the models are fp32 and ``DPOConfig(bf16=False, use_cpu=True)`` (TRL's default bf16=True
would autocast the reference to bf16 even on CPU). On a GPU the models are loaded in bf16 with
``DPOConfig(bf16=True)``. The trainer needs a ``train_dataset``: it gets the first pair only, so it does not tokenize
the data twice.

Fields: ``process_seconds`` (from the script's first line), ``import_seconds``, ``load_seconds`` (both models),
``init_seconds`` (DPOTrainer construction: tokenization, device placement), ``evaluate_seconds`` (the evaluate()
call), ``pairs``, ``pairs_per_second`` (over evaluate()), ``metrics``, ``cuda_max_allocated_gib`` (peak over
evaluate(), weights included), ``peak_rss_mib``. With ``--logps``
also ``logps``: per-pair summed completion log-probs (input order) captured from the models' fused-head outputs
(``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected``), which is exactly what DPO's loss sums.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="JSONL of prompt/chosen/rejected (an id column is ignored)")
    parser.add_argument("--reference", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_eval_batch_size")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--logps", action="store_true", help="include the per-pair log-probs in the JSON line")
    return parser.parse_args(argv)


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]


class _LogpRecorder:
    """Forward hook on a model patched with TRL's fused LM head: each call's per-token log-probs (zero off the
    completion) summed per row; the batch is [chosen..., rejected...], as DPOTrainer lays it out."""

    def __init__(self) -> None:
        self.chosen: list = []
        self.rejected: list = []

    def __call__(self, module, args, kwargs, output) -> None:
        log_probs = getattr(output, "log_probs", None)
        if log_probs is None or not kwargs.get("fused_lm_head", False):
            return
        sums = log_probs.detach().double().sum(dim=1).cpu()
        chosen, rejected = sums.chunk(2, dim=0)
        self.chosen.extend(chosen.tolist())
        self.rejected.extend(rejected.tolist())


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import_seconds = time.perf_counter() - _STARTED

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=dtype)
    load_seconds = time.perf_counter() - started

    rows = _read_jsonl(args.data)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            output_dir=output_dir,
            report_to=[],
            per_device_eval_batch_size=args.batch_size,
            max_length=None,
            beta=args.beta,
            bf16=(dtype == torch.bfloat16),
            use_cpu=(device == "cpu"),
            dataloader_num_workers=0,
            disable_tqdm=True,
            save_strategy="no",
            logging_strategy="no",
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=config,
            train_dataset=Dataset.from_list(rows[:1]),
            eval_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        init_seconds = time.perf_counter() - started
        recorders = {}
        if args.logps:
            for name, model in (("policy", trainer.model), ("ref", trainer.ref_model)):
                recorders[name] = _LogpRecorder()
                model.register_forward_hook(recorders[name], with_kwargs=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = trainer.evaluate()
        if device == "cuda":
            torch.cuda.synchronize()
        evaluate_seconds = time.perf_counter() - started

    result = {
        "tool": "trl",
        "trl_version": sys.modules["trl"].__version__,
        "device": device,
        "dtype": dtype_name,
        "batch_size": args.batch_size,
        "pairs": len(rows),
        "import_seconds": round(import_seconds, 4),
        "load_seconds": round(load_seconds, 4),
        "init_seconds": round(init_seconds, 4),
        "evaluate_seconds": round(evaluate_seconds, 4),
        "pairs_per_second": round(len(rows) / evaluate_seconds, 3),
        "metrics": metrics,
        "cuda_max_allocated_gib": (
            round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None
        ),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.logps:
        logps = {}
        for name, recorder in recorders.items():
            if len(recorder.chosen) != len(rows):
                raise SystemExit(f"captured {len(recorder.chosen)} {name} rows for {len(rows)} pairs")
            logps[f"{name}_chosen"], logps[f"{name}_rejected"] = recorder.chosen, recorder.rejected
        result["logps"] = logps
    result["process_seconds"] = round(time.perf_counter() - _STARTED, 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
