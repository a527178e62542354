"""Run by tests/test_parallel.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): api.compare with in-memory models
inside a process group this script set up (as a training script would), then again with the policy's weights
poisoned on rank 1 only. Rank 0 writes the run to OUT/run; every rank writes what the second call raised."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path, reference_dir: str, policy_dir: str, pairs_file: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from prefdiag import api, distributed

    dist.init_process_group("gloo")
    reference = AutoModelForCausalLM.from_pretrained(reference_dir, dtype="float32")
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype="float32")
    options = api.RunOptions(dtype="float32", device="cpu", cache=False, batch_tokens=256)
    result = api.compare(pairs_file, reference, policy, options, tokenizer=reference_dir)
    if distributed.is_main():
        result.write(out / "run")
    if distributed.rank() == 1:
        with torch.no_grad():
            policy.lm_head.weight.fill_(float("nan"))
    try:
        api.compare(pairs_file, reference, policy, options, tokenizer=reference_dir)
        raised = None
    except Exception as exc:  # noqa: BLE001 - what each rank saw is the test's evidence
        raised = {"type": type(exc).__name__, "message": str(exc)}
    (out / f"fault-{distributed.rank()}.json").write_text(json.dumps(raised))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
