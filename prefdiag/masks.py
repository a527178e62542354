"""Dense attention masks for the prefix and separate layouts, per layer type (full or sliding-window attention),
and which models those masks can describe at all."""

from __future__ import annotations

import inspect

import torch

from prefdiag import flex
from prefdiag.rows import _CHOSEN, _REJECTED

_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def attention_windows(model: torch.nn.Module) -> dict[str, int | None] | None:
    """How far back each kind of layer attends: {layer type: window or None for no window}, the single key ``""``
    when the model takes one mask for all layers. None when our masks cannot describe the model: a layer that is not
    attention, ALiBi (its bias follows token indices, not positions), or no ``position_ids`` input."""
    config = model.config
    if getattr(config, "alibi", False) or "position_ids" not in inspect.signature(model.forward).parameters:
        return None
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types is not None:
        kinds = set(layer_types)
        if not kinds <= _ATTENTION_LAYER_TYPES:
            return None
        if kinds == {"full_attention"}:
            return {"": None}
        return {kind: (window if kind == "sliding_attention" else None) for kind in kinds}
    if any(hasattr(config, name) for name in ("state_size", "ssm_state_size", "conv_kernel", "layers_block_type")):
        return None  # state-space or hybrid models without layer_types
    return {"": window or None}


def dense_masks(
    docs: torch.Tensor, segments: torch.Tensor, position_ids: torch.Tensor, windows: dict[str, int | None],
    attn_implementation: str, dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Dense [B,1,L,L] masks under ``flex.visible``, plus the diagonal, so that a padding query sees itself and
    no softmax row is empty. One mask per layer type where the model has several."""
    length = segments.shape[1]
    idx = torch.arange(length, device=segments.device)
    eye = torch.eye(length, dtype=torch.bool, device=segments.device)[None]
    windowed = any(w is not None for w in windows.values())
    farthest = int(position_ids.max()) if windowed else 0  # distances are position differences
    masks, built = {}, {}
    for kind, window in windows.items():
        window = window if window is not None and farthest >= window else None  # a window nothing reaches
        if window not in built:
            allowed = flex.visible(
                docs[:, :, None], docs[:, None, :], segments[:, :, None], segments[:, None, :], idx[:, None],
                idx[None, :], position_ids[:, :, None], position_ids[:, None, :], window, _CHOSEN, _REJECTED,
            )  # fmt: skip
            built[window] = mask_values(allowed | eye, attn_implementation, dtype)
        masks[kind] = built[window]
    return masks[""] if "" in masks else masks


def mask_values(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean [B,L,L] mask in the form the attention kernel takes, with the head axis added."""
    allowed = allowed[:, None]
    if attn_implementation == "sdpa":
        return allowed
    # eager (and other additive-mask kernels): 0 where allowed, the dtype's minimum elsewhere
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)
