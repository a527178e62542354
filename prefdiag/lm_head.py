"""The LM head on selected hidden states: logits in fp32 with the model's own logit transforms (Cohere's scale,
Granite's divisor, Gemma's soft cap), and per-token log-probs in chunks so no large fp32 logits block exists."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class LMHead:
    """A causal LM's output layer as the scorer uses it; ``chunk_bytes`` bounds one fp32 logits chunk."""

    def __init__(self, model: torch.nn.Module, chunk_bytes: int) -> None:
        self.module = model.get_output_embeddings()
        config = model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere multiplies logits by it
        self.logits_scaling = getattr(config, "logits_scaling", None)  # Granite divides logits by it
        self.chunk_bytes = chunk_bytes
        weight = getattr(self.module, "weight", None)
        self.fp32_out_mm = weight is not None and weight.device.type == "cuda"

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states, in fp32, with the model's own logit transforms."""
        head, weight = self.module, self.module.weight
        if self.fp32_out_mm and type(head) is torch.nn.Linear and weight.dtype in (torch.bfloat16, torch.float16):
            try:  # fp32 output from a bf16 matmul: logits are not rounded to bf16 before the log-softmax
                logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
                if head.bias is not None:
                    logits = logits + head.bias.float()
            except (RuntimeError, TypeError, NotImplementedError):
                log.info("torch.mm(out_dtype=float32) is not available here; logits are rounded to %s", weight.dtype)
                self.fp32_out_mm = False
                logits = head(hidden).float()
        else:
            logits = head(hidden).float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logps(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs of ``targets``, chunked so one fp32 logits block stays under ``chunk_bytes``."""
        chunk = max(1, self.chunk_bytes // (4 * self.module.weight.shape[0]))
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            out[start:stop] = logps_from_logits(self.logits(hidden[start:stop]), targets[start:stop])
        return out


def logps_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, in fp32."""
    logits = logits.float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
