"""Where a scored model comes from: a directory or hub id (loaded when first needed), a LoRA adapter directory on
the reference's weights, or a model already in memory (scored in place, its train/eval mode restored afterwards).

Each source knows its cache identity before any weights load (``identity()``: None means "do not cache"), gives
the causal LM to score inside ``ready()``, and describes itself for the report (``provenance()``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from prefdiag import models
from prefdiag.options import FINGERPRINT_MAX_BYTES
from prefdiag.phases import phase


@dataclass(frozen=True)
class AdapterDisabled:
    """The reference of a PEFT policy trained without a separate reference model: the same ``PeftModel`` with its
    adapter disabled (``with model.disable_adapter():``), as TRL's DPOTrainer computes it. Pass it as ``reference``
    (``api.compare(data, AdapterDisabled(policy), policy)``); ``reference=None`` with a PEFT policy means the same."""

    model: Any


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (it can disable its adapter and hands out its base model)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def is_in_memory(model: Any) -> bool:
    """True for a model object (a torch module or an AdapterDisabled wrapper), False for a path or hub id."""
    return isinstance(model, (torch.nn.Module, AdapterDisabled))


class LoadedModels:
    """The one model loaded from a directory or hub id that is kept in memory, so that a LoRA policy on the
    reference reuses the reference's weights instead of loading them again."""

    def __init__(self, options: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.options, self.device, self.dtype = options, device, dtype
        self.current: models.LoadedModel | None = None

    def get(self, name: str, revision: str | None, what: str, *, reuse: bool = False) -> models.LoadedModel:
        """The model ``name``: the one in memory when ``reuse`` and it is the same, else freshly loaded."""
        if reuse and self.current is not None and self.current.name == name:
            return self.current
        self.release()
        with phase("load_model"):
            self.current = models.load_model(
                name, dtype=self.dtype, device=self.device, revision=revision,
                trust_remote_code=self.options.trust_remote_code, what=what, shard=self.options.shard,
                tp=getattr(self.options, "tp", 1),
            )  # fmt: skip
        return self.current

    def release(self) -> None:
        """Free the model in memory (and the GPU cache) before the next one is loaded."""
        if self.current is None:
            return
        device, self.current = self.current.device, None
        if device.type == "cuda":
            torch.cuda.empty_cache()


class PathModel:
    """A model directory or hub id; with ``adapter``, that LoRA adapter directory applied to it (the model's weights
    already in memory are reused)."""

    def __init__(self, label: str, name: str, revision: str | None, loaded: LoadedModels, adapter: str | None = None):
        self.label, self.name, self.revision, self.loaded, self.adapter = label, name, revision, loaded, adapter
        self.device = loaded.device
        self._model: models.LoadedModel | None = None

    def identity(self) -> dict[str, Any]:
        with phase("model_identity"):
            return models.model_identity(
                self.name, dtype=self.loaded.dtype, device=self.loaded.device, revision=self.revision,
                trust_remote_code=self.loaded.options.trust_remote_code, adapter=self.adapter,
            )  # fmt: skip

    @contextlib.contextmanager
    def ready(self) -> Iterator[torch.nn.Module]:
        base = self.loaded.get(self.name, self.revision, self.label, reuse=self.adapter is not None)
        if self.adapter is not None:
            with phase("load_model"):
                base = models.attach_adapter(base, self.adapter)
        self._model = base
        yield base.model

    def provenance(self) -> dict[str, Any]:
        return self._model.provenance() if self._model is not None else {}


class InMemoryModel:
    """A model object the caller already holds (a ``PreTrainedModel`` or a ``PeftModel``), scored where it is: no
    copy, no reload, its device and dtype as they are. ``adapter_disabled`` scores a PeftModel with its adapter off.
    Its cache identity is a hash of its weights when they are at most ``FINGERPRINT_MAX_BYTES`` (``hash_weights``
    True: always, False: never); without one, its pairs are not cached."""

    def __init__(self, label: str, model: Any, *, adapter_disabled: bool = False, hash_weights: bool | None = None):
        if adapter_disabled and not is_peft_model(model):
            raise models.ModelError(f"{label}: only a PEFT model can be scored with its adapter disabled")
        self.label, self.model, self.adapter_disabled = label, model, adapter_disabled
        self.causal_lm = model.get_base_model() if is_peft_model(model) else model  # LoRA layers stay injected
        first = next(self.causal_lm.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.hash_weights = hash_weights
        self._fingerprint: str | None = None

    def identity(self) -> dict[str, Any] | None:
        nbytes = sum(p.numel() * p.element_size() for p in self.causal_lm.parameters())
        if self.hash_weights is False or (self.hash_weights is None and nbytes > FINGERPRINT_MAX_BYTES):
            return None
        with phase("model_identity"):
            self._fingerprint = self._fingerprint or _weights_hash(self.causal_lm)
        return {
            "name": self._name(),
            "fingerprint": self._fingerprint,
            "adapter_disabled": self.adapter_disabled,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device_type": self.device.type,
        }

    @contextlib.contextmanager
    def ready(self) -> Iterator[torch.nn.Module]:
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()  # dropout off, as TRL scores
        try:
            with self.model.disable_adapter() if self.adapter_disabled else contextlib.nullcontext():
                yield self.causal_lm
        finally:
            for module, training in modes:
                module.training = training

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self._name(),
            "in_memory": True,
            **({"adapter_disabled": True} if self.adapter_disabled else {}),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "fingerprint": self._fingerprint,
            "architecture": type(self.causal_lm).__name__,
        }

    def _name(self) -> str:
        return getattr(self.causal_lm, "name_or_path", "") or f"<in-memory {type(self.causal_lm).__name__}>"


def _weights_hash(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes, bytes): the same weights, the same hash."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}|".encode())
        digest.update(data.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
