"""FlexAttention for packed rows: several pairs per row, each laid out ``[prompt, chosen, rejected]``, with a
block-sparse mask so that the kernel skips every block no query may see (other pairs, the other response, padding).

The kernel is compiled once per row shape on CUDA (rows are padded to a fixed pack length, so one shape serves the
whole run); elsewhere it runs eagerly, which is exact but slow, and is what the CPU tests use.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

ATTENTION_NAME = "prefdiag_flex"
BLOCK_SIZE = 128
_compiled: dict[str, object] = {}


def available() -> bool:
    """True when this torch has FlexAttention (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def compiles_on(device_type: str) -> bool:
    """Whether the kernel is compiled on this device (so every batch there should have the same shape)."""
    return device_type == "cuda"


def _kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiles_on(device_type):
        return flex_attention
    if device_type not in _compiled:
        _compiled[device_type] = torch.compile(flex_attention, dynamic=False)
    return _compiled[device_type]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None, **_):
    """A transformers attention function: ``attention_mask`` is the BlockMask of the packed batch."""
    from torch.nn.attention.flex_attention import BlockMask

    if s_aux is not None:
        raise NotImplementedError("attention sinks are not supported by the packed layout")
    if not isinstance(attention_mask, BlockMask):
        raise NotImplementedError("the packed layout needs a block mask")
    score_mod = None
    if softcap:

        def score_mod(score, b, h, q, kv):
            return softcap * torch.tanh(score / softcap)

    gqa = query.shape[1] != key.shape[1]
    if gqa and not _is_power_of_two(query.shape[1]):  # the kernel's GQA path wants a power-of-two head count
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
        gqa = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _kernel(query.device.type)(
            query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention)


@contextlib.contextmanager
def attention_switched_on(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with the packed-row attention inside the block, and restore its own attention after."""
    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def visible(doc_q, doc_k, seg_q, seg_k, q, k, pos_q, pos_k, window: int | None, chosen: int, rejected: int):
    """The one visibility rule of every layout: a query sees keys of its own pair (``doc`` < 0 is padding),
    causally, never the other response, and only the last ``window`` positions where its layer has a window.
    Elementwise on tensors that broadcast, so it builds dense masks and FlexAttention ``mask_mod``s alike."""
    allowed = (doc_q == doc_k) & (doc_q >= 0) & (k <= q) & ((seg_q != rejected) | (seg_k != chosen))
    if window is not None:
        allowed = allowed & (pos_q - pos_k < window)
    return allowed


def block_masks(
    docs: torch.Tensor, segments: torch.Tensor, positions: torch.Tensor, windows: dict[str, int | None],
    chosen: int, rejected: int,
):
    """BlockMask(s) for packed rows under the rule of ``visible``. ``docs`` numbers the pairs in a row, -1 on
    padding; ``segments`` marks the chosen and rejected tokens. One mask per layer type, or one under the key ``""``."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = docs.shape

    def mask_for(window: int | None):
        def mask_mod(b, h, q, kv):
            return visible(docs[b, q], docs[b, kv], segments[b, q], segments[b, kv], q, kv, positions[b, q],
                           positions[b, kv], window, chosen, rejected)  # fmt: skip

        # Compiled where the kernel is: evaluated eagerly, the mask holds several [B, L, L] int64 temporaries.
        mask = create_block_mask(
            mask_mod, batch, None, length, length, device=docs.device, BLOCK_SIZE=BLOCK_SIZE,
            _compile=compiles_on(docs.device.type),
        )  # fmt: skip
        mask.ndim = 4  # some models (GPT-2) look at attention_mask.ndim before handing the mask on
        return mask

    masks, built = {}, {}
    for kind, window in windows.items():
        if window not in built:
            built[window] = mask_for(window)
        masks[kind] = built[window]
    return masks[""] if "" in masks else masks
