"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node N`` (gloo, CPU): the distributed helpers, then
a tiny DPOTrainer with PrefdiagCallback. Rank 0 writes what it saw to OUT/result.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out: Path, ref_dir: str, pairs_file: str) -> None:
    import numpy as np
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from prefdiag import distributed
    from prefdiag.integrations.trl import PrefdiagCallback

    result: dict = {}
    # Before any process group: a single process.
    result["before_group"] = [distributed.rank(), distributed.world_size()]
    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(
        output_dir=str(out / "run"), report_to=[], per_device_train_batch_size=2, per_device_eval_batch_size=2,
        max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, learning_rate=5e-3,
        max_length=None, beta=0.5, use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
        logging_steps=2, save_only_model=True, ddp_backend="gloo",
    )  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir, dtype="float32"), args=args,
        train_dataset=dataset, eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(ref_dir),
    )  # fmt: skip
    assert dist.is_initialized()
    result["rank_world"] = [distributed.rank(), distributed.world_size()]
    # Each rank sends its share of squares; every rank must get all of them, in pair order.
    lengths = np.arange(10) % 4 + 1
    share = distributed.my_share(lengths)
    gathered = distributed.gather_pairs(10, share, {"square": share.astype(float) ** 2})
    to_root = distributed.gather_pairs(10, share, {"square": share.astype(float) ** 2}, to_all=False)
    shares = [None] * distributed.world_size()
    dist.all_gather_object(shares, share.tolist())
    callback = PrefdiagCallback(trainer, at_start=True, output_dir=out / "pairs")
    trainer.add_callback(callback)
    trainer.train()
    if distributed.rank() == 0:
        result.update(
            gathered=gathered["square"].tolist(), to_root=to_root["square"].tolist(), shares=shares,
            history=callback.history,
        )  # fmt: skip
        (out / "result.json").write_text(json.dumps(result))
    else:
        assert to_root is None
        (out / "other-rank-history.json").write_text(json.dumps(callback.history))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
