"""The fast path of model loading: a local directory holding one ``model.safetensors`` is read straight into a
model built without initialising its weights, with exactly what ``from_pretrained`` would load."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from prefdiag.errors import first_line

log = logging.getLogger(__name__)


def no_sdpa(exc: ValueError) -> bool:
    """True for transformers' refusal of SDPA attention (its message names sdpa or scaled_dot_product_attention)."""
    message = str(exc).lower()
    return "sdpa" in message or "scaled_dot_product_attention" in message


def from_local_safetensors(name: str, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module | None:
    """A local directory with one ``model.safetensors``, loaded as ``from_pretrained`` would load it but several
    times faster: the model is built without initialising its weights and the file's tensors are assigned to it.
    None (``from_pretrained`` does it) for anything else: sharded, quantized or remote-code checkpoints, weights
    that need renaming or converting, keys missing (other than a tied head) or unexpected, shapes that differ."""
    path = Path(name)
    weights = path / "model.safetensors"
    if not weights.is_file() or not (path / "config.json").is_file():
        return None
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or "quantization_config" in raw or "auto_map" in raw:
            return None
        return _assigned_model(name, weights, dtype, trust_remote_code)
    except Exception as exc:  # anything unusual: from_pretrained loads it, or names the problem
        log.debug("fast loading of %s gave way to from_pretrained: %s", name, first_line(exc, with_type=True))
        return None


def _assigned_model(name: str, weights: Path, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module | None:
    """The model built from its config under ``no_init_weights`` with the file's tensors assigned, or None."""
    import safetensors
    import safetensors.torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.initialization import no_init_weights

    with safetensors.safe_open(str(weights), framework="pt") as handle:
        if (handle.metadata() or {}).get("format", "pt") != "pt":
            return None
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    with no_init_weights():
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
        except ValueError as exc:  # an architecture without SDPA support, as in _from_pretrained
            if not no_sdpa(exc):
                raise
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    if model.is_custom_code():
        return None
    if dtype != torch.float32 and (getattr(model, "_keep_in_fp32_modules", None)
                                   or getattr(model, "_keep_in_fp32_modules_strict", None)):
        return None
    expected = model.state_dict()
    state = safetensors.torch.load_file(str(weights))
    if _needs_conversion(get_model_conversion_mapping(model, add_legacy=False), state.keys()):
        return None
    missing = expected.keys() - state.keys()
    if state.keys() - expected.keys() or missing - set(model.all_tied_weights_keys):
        return None
    if any(tensor.shape != expected[key].shape for key, tensor in state.items()):
        return None
    state = {key: tensor.to(expected[key].dtype) for key, tensor in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights(missing_keys=set(missing), recompute_mapping=False)
    return model


def _needs_conversion(transforms: list, keys) -> bool:
    """True when transformers would rename or convert some of these checkpoint keys on loading: any converter, or
    a renaming whose source pattern matches a key (a checkpoint saved by this transformers matches none)."""
    from transformers.core_model_loading import WeightRenaming

    for transform in transforms:
        if type(transform) is not WeightRenaming:
            return True
        if any(re.search(pattern, key) for pattern in transform.source_patterns for key in keys):
            return True
    return False
