"""Reference implementations the fast code is checked against: TRL's own tokenization, and an unbatched fp32
computation with full logits."""

from __future__ import annotations

import pytest
import torch


def logp_close(expected: float):
    """Equality for summed fp32 log-probs: padding and batch shape change the kernels' summation order, which on
    some CPUs moves a 100-nat sum by ~4e-4. Far below the smallest masking bug seen (0.06 nats)."""
    return pytest.approx(expected, rel=1e-5, abs=1e-4)


def trl_tokenize(tokenizer, rows: list[dict], tmp_path) -> list[dict]:
    """prompt_ids / chosen_ids / rejected_ids exactly as TRL's DPOTrainer prepares them (its own code)."""
    from datasets import Dataset

    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = make_trainer(tokenizer, dataset, tmp_path)
    return [dict(ex) for ex in trainer.eval_dataset]


def make_trainer(tokenizer, dataset, tmp_path, model=None, ref_model=None, beta: float = 0.1):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    if model is None:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
    if ref_model is None:
        import copy

        ref_model = copy.deepcopy(model)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], per_device_eval_batch_size=4, max_length=None, beta=beta,
        use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # bf16=False: TRL's default autocasts the reference to bf16 and its numbers drift by ~1e-3 nats
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, eval_dataset=dataset,
                      processing_class=tokenizer)


@torch.no_grad()
def full_logits_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> tuple[float, int]:
    """Sum of log p(completion | prompt), one unpadded sequence, full logits, fp32 log-softmax."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model.float()(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
    p = len(prompt_ids)
    scored = logps[max(p - 1, 0):]
    return float(scored.double().sum()), len(scored)


@torch.no_grad()
def full_ches(model, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> tuple[float, float]:
    """(ches, ches_norm) from two unpadded fp32 forwards: the inputs of the LM head at the positions that predict
    each response token, summed in fp64 (Razin et al. 2024; SCIENCE.md)."""
    sums, counts = [], []
    model = model.float()
    for completion in (chosen_ids, rejected_ids):
        ids = torch.tensor([list(prompt_ids) + list(completion)])
        captured = {}
        handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        hidden = captured["x"][0].double()
        first = max(len(prompt_ids) - 1, 0)
        sums.append(hidden[first : ids.shape[1] - 1].sum(0))
        counts.append(ids.shape[1] - 1 - first)
    s_w, s_l = sums
    n_w, n_l = counts
    ches = float(s_w @ s_l - s_w @ s_w)
    ches_norm = float(s_w @ s_l / (n_w * n_l) - s_w @ s_w / n_w**2)
    return ches, ches_norm
