"""Checks the scoring engine makes around its forward passes: a row too long for the device's memory is refused
naming its pair, weights holding NaN or inf name the model, and body + LM head must reproduce the model's logits."""

from __future__ import annotations

import inspect
import os

import torch

from prefdiag.errors import ModelError, UsageError
from prefdiag.rows import _Row


def model_name(model: torch.nn.Module) -> str:
    """The path or hub name the model was loaded from, else its class name."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def refuse_rows_beyond_memory(
    model: torch.nn.Module, rows: list[_Row], device: torch.device, *, dense_mask: bool, full_logits: bool
) -> None:
    """Raise a UsageError, before any forward pass, when the longest row's attention mask (``dense_mask``: the
    4D-mask layouts) or logits (``full_logits``: full forward passes) alone would not fit in the device's memory
    (a 10 MB pair would otherwise try to allocate terabytes), naming its pair (``row N``) and token count."""
    longest = max(rows, key=lambda row: len(row.input_ids))
    length = len(longest.input_ids)
    config = model.config
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    need = 4 * length * width * next(model.parameters()).element_size()  # a few activations
    if dense_mask:
        need += length * length  # the dense [L, L] boolean mask, the least the 4D-mask path builds
    if full_logits:
        need += 4 * length * (getattr(config, "vocab_size", 0) or 0)  # fp32 logits of every position
    have = device_memory_bytes(device)
    if have is not None and need > have:
        raise UsageError(
            f"row {longest.pair + 1}: the pair is {length} tokens long; scoring it needs more than "
            f"{need / 2**30:,.0f} GiB, and the {device.type} device has {have / 2**30:,.0f} GiB",
            hint="use --max-length to truncate long pairs (as TRL's max_length does)",
        )


def name_non_finite_weights(model: torch.nn.Module) -> None:
    """Raise a ModelError naming the model and its first weight holding NaN or inf, if there is one."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelError(
            f"model {model_name(model)}: its weights hold NaN or inf ({bad[0]}{more})",
            hint="the checkpoint is corrupt or diverged in training; load another one",
        )


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device (host RAM for the CPU), None where it cannot be known."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (RuntimeError, ValueError, OSError, AttributeError):
        return None
    return None


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """True when the model's forward takes ``logits_to_keep`` (its logits can be asked for at one position)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def last_hidden_and_logits(
    model: torch.nn.Module, body: torch.nn.Module, input_ids: torch.Tensor, mask, positions: dict
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward pass of the whole model: the body's last hidden states [B, L, D] as the model itself computed
    them (None where the body's output was not seen) and the model's fp32 logits at each row's last position."""
    captured: dict = {}

    def keep(module, args, output):
        captured.setdefault("hidden", output[0])

    handle = body.register_forward_hook(keep)
    try:
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1, **positions)
    finally:
        handle.remove()
    hidden = captured.get("hidden")
    if not isinstance(hidden, torch.Tensor) or hidden.shape[:2] != input_ids.shape:
        hidden = None
    return hidden, out.logits[:, -1].float()


def logits_close(full: torch.Tensor, ours: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """True when our logits match the model's within rounding (bf16/fp16 logits round at ~0.4%)."""
    scale = float(full.abs().max().clamp_min(1.0))
    tolerance = 1e-3 if weight_dtype == torch.float32 else 3e-2
    return full.shape == ours.shape and bool(torch.allclose(full, ours, atol=tolerance * scale, rtol=tolerance))
