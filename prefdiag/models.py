"""Loading tokenizers and causal LMs (local directories or hub ids), choosing device and dtype, and checking that a
policy fits its reference. Remote code runs only when the caller asks for it; safetensors are preferred.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefdiag.errors import ModelError, first_line
from prefdiag.fast_loading import from_local_safetensors, no_sdpa

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class LoadedModel:
    """A model ready for scoring, with what identifies it in a report or a cache key."""

    model: torch.nn.Module
    name: str
    revision: str | None
    commit: str | None
    dtype: torch.dtype
    device: torch.device
    fingerprint: str
    base: str | None = None  # for an adapter: the base model it is applied to

    def provenance(self) -> dict[str, Any]:
        return {
            **({"adapter_base": self.base} if self.base else {}),
            "name": self.name,
            "revision": self.revision,
            "commit": self.commit,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "fingerprint": self.fingerprint,
            "architecture": type(self.model).__name__,
        }


def resolve_device(device: str = "auto") -> torch.device:
    """Map --device to a torch device, refusing one this machine does not have."""
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("--device mps was asked for but MPS is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Map --dtype to a torch dtype; auto is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        not name.startswith((".", "/", "~"))
        and len(parts) <= 2
        and all(parts)
        and not name.endswith((".json", ".jsonl", ".safetensors", ".bin"))
    )


def check_model_path(name: str, what: str) -> None:
    """Refuse a local path that does not exist (a hub id is left for the hub to resolve)."""
    if Path(name).exists():
        if not Path(name).is_dir():
            raise ModelError(f"{what} {name!r} is a file; expected a model directory or a hub id")
        return
    if not _looks_like_hub_id(name):
        raise ModelError(f"{what} path {name!r} does not exist")


def check_model_dir(name: str, what: str) -> None:
    """Refuse a local directory that holds no model (no config.json, and not a PEFT adapter)."""
    path = Path(name)
    if path.is_dir() and not (path / "config.json").is_file() and not is_adapter(name):
        raise ModelError(f"{what} {name!r} is not a model directory (no config.json)")


def hub_hint(name: str) -> str | None:
    """The hint for a model or tokenizer that could not be fetched: offline, or not downloaded yet."""
    if Path(name).exists():
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"HF_HUB_OFFLINE is set: download it first (hf download {name}) or pass a local directory"
    return f"check the hub id and the network, or download it first (hf download {name}) and pass the local directory"


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load the tokenizer of a model directory or hub id."""
    from transformers import AutoTokenizer

    check_model_path(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        raise ModelError(
            f"cannot load a tokenizer from {name!r}: {first_line(exc)}",
            hint=hub_hint(name) or "pass --tokenizer with a directory or hub id that has one",
        ) from exc
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ModelError(f"{name!r} has no usable tokenizer", hint="pass --tokenizer")
    return tokenizer


def load_model(
    name: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    revision: str | None = None,
    trust_remote_code: bool = False,
    what: str = "model",
    shard: bool = False,
    tp: int = 1,
) -> LoadedModel:
    """Load a causal LM in eval mode (dropout off) on the device, preferring safetensors and SDPA attention;
    ``shard`` spreads its layers over every visible GPU (transformers' ``device_map="auto"``)."""
    check_model_path(name, what)
    kwargs = dict(revision=revision, dtype=dtype, trust_remote_code=trust_remote_code)
    if tp > 1:  # tensor parallel over tp ranks of the process group (prefdiag.parallel)
        from prefdiag.parallel import tensor_parallel_kwargs

        kwargs.update(tensor_parallel_kwargs(name, tp, device, revision=revision, trust_remote_code=trust_remote_code))
    elif shard:
        kwargs["device_map"] = "auto"
    elif device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}  # weights go straight to the GPU, never staged on the CPU
    # the fast path: a plain local safetensors checkpoint, read straight into a model built without initialising
    fast = device.type == "cpu" and not shard and tp == 1
    model = from_local_safetensors(name, dtype, trust_remote_code) if fast else None
    if model is None:
        model = _from_pretrained(name, what, kwargs)
    if not shard and tp == 1:
        model.to(device)
    model.eval()
    commit = getattr(model.config, "_commit_hash", None)
    return LoadedModel(
        model=model,
        name=name,
        revision=revision,
        commit=commit,
        dtype=dtype,
        device=device,
        fingerprint=weights_fingerprint(name, commit),
    )


def _from_pretrained(name: str, what: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """transformers' own loading: hub ids, sharded, quantized and remote-code checkpoints, device maps."""
    from transformers import AutoModelForCausalLM

    try:
        try:
            return AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa", **kwargs)
        except ValueError as exc:  # an architecture without SDPA support
            if not no_sdpa(exc):
                raise
            return AutoModelForCausalLM.from_pretrained(name, attn_implementation="eager", **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load {what} {name!r}: {first_line(exc)}", hint=hub_hint(name)) from exc


def is_adapter(name: str) -> bool:
    """True for a PEFT adapter directory (adapter_config.json), e.g. a LoRA policy."""
    return (Path(name) / "adapter_config.json").is_file()


def adapter_base(name: str) -> str | None:
    """The base model an adapter was trained on, as its adapter_config.json records it."""
    config = json.loads((Path(name) / "adapter_config.json").read_text())
    return config.get("base_model_name_or_path")


def model_identity(
    name: str, *, dtype: torch.dtype, device: torch.device, revision: str | None = None,
    trust_remote_code: bool = False, adapter: str | None = None,
) -> dict[str, Any]:
    """What identifies a model's numbers, known before its weights are loaded (the cache key is built from it)."""
    commit = None
    if not Path(name).is_dir():  # a hub id: the resolved commit pins the weights
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
            commit = config._commit_hash
        except Exception as exc:
            raise ModelError(f"cannot read the config of {name!r}: {first_line(exc)}", hint=hub_hint(name)) from exc
    identity = {
        "name": str(Path(name).resolve()) if Path(name).is_dir() else name,
        "revision": revision,
        "commit": commit,
        "fingerprint": weights_fingerprint(name, commit),
        "dtype": str(dtype).removeprefix("torch."),
        "device_type": device.type,
    }
    if adapter is not None:
        identity["adapter"] = {"name": str(Path(adapter).resolve()), "fingerprint": weights_fingerprint(adapter)}
    return identity


def attach_adapter(loaded: LoadedModel, adapter: str) -> LoadedModel:
    """Wrap a loaded base model with a PEFT adapter (active); the base alone is the adapter disabled, as in TRL."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(loaded.model, adapter)
    except Exception as exc:
        raise ModelError(f"cannot load the adapter {adapter!r} onto {loaded.name!r}: {first_line(exc)}") from exc
    peft_model.eval()
    return LoadedModel(
        model=peft_model.get_base_model(),  # the causal LM with the adapter's layers injected and enabled
        name=adapter,
        revision=None,
        commit=None,
        dtype=loaded.dtype,
        device=loaded.device,
        fingerprint=weights_fingerprint(adapter),
        base=loaded.name,
    )


def weights_fingerprint(name: str, commit: str | None = None) -> str:
    """A cheap identity of the weights: sizes and mtimes of local weight files, or the hub commit."""
    path = Path(name)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(path.iterdir()):
            if file.suffix in (".safetensors", ".bin", ".json", ".model", ".jinja", ".txt"):
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(f"{name}@{commit}".encode())
    return digest.hexdigest()[:16]


def vocabulary_size(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def config_vocabulary_size(name: str, *, revision: str | None = None, trust_remote_code: bool = False) -> int | None:
    """The vocabulary size a model's config declares, read without loading weights (a local config.json that
    declares it is read as JSON: no AutoConfig)."""
    declared = _declared_vocabulary_size(name)
    if declared is not None:
        return declared
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(f"cannot read the config of {name!r}: {first_line(exc)}") from exc
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


def _declared_vocabulary_size(name: str) -> int | None:
    """vocab_size from a local config.json (its text_config's for a multimodal model), None where it is not
    written there or the file cannot be read (AutoConfig then supplies the class default or names the problem)."""
    path = Path(name) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    size = (text if isinstance(text, dict) else config).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_same_vocabulary(
    reference: str, policy: str, tokenizer, *, policy_revision: str | None = None, trust_remote_code: bool = False,
    reference_revision: str | None = None,
) -> None:
    """Refuse a policy whose vocabulary differs from the reference's (its log-probs would not be comparable);
    checked from configs and tokenizers before any model is loaded."""
    ref_size = config_vocabulary_size(reference, revision=reference_revision, trust_remote_code=trust_remote_code)
    pol_size = config_vocabulary_size(policy, revision=policy_revision, trust_remote_code=trust_remote_code)
    if ref_size is not None and pol_size is not None and ref_size != pol_size:
        raise ModelError(
            f"policy {policy!r} has a vocabulary of {pol_size} tokens but the reference {reference!r} "
            f"has {ref_size}: log-probs are not comparable"
        )
    if _same_tokenizer_files(reference, policy):
        return  # byte-identical tokenizer files: nothing to load (a 150k-token tokenizer takes seconds)
    policy_vocab = policy_vocabulary_from_files(policy)
    if policy_vocab is None:  # no tokenizer.json to read (a slow-only tokenizer, a hub id): load it to compare
        policy_tokenizer = maybe_load_tokenizer(policy, revision=policy_revision,
                                                trust_remote_code=trust_remote_code)
        policy_vocab = None if policy_tokenizer is None else policy_tokenizer.get_vocab()
    if policy_vocab is not None and policy_vocab != tokenizer.get_vocab():
        raise ModelError(
            f"the tokenizer of policy {policy!r} differs from the reference's: log-probs are not comparable"
        )


def _same_tokenizer_files(reference: str, policy: str) -> bool:
    """True when both are local directories whose tokenizer.json files are byte-identical."""
    a, b = Path(reference) / "tokenizer.json", Path(policy) / "tokenizer.json"
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def policy_vocabulary_from_files(name: str) -> dict[str, int] | None:
    """The token -> id map a local directory's tokenizer would have, read from its tokenizer.json (the model's
    vocabulary plus its added tokens) and the added tokens of tokenizer_config.json, without building a tokenizer.
    None when there is no readable tokenizer.json (the caller then loads the tokenizer)."""
    path = Path(name) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
        vocab = definition["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        tokens = {str(token): int(i) for token, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [piece, score] at the piece's id
        tokens = {str(entry[0]): i for i, entry in enumerate(vocab)}
    else:
        return None
    for added in definition.get("added_tokens") or []:
        tokens[added["content"]] = int(added["id"])
    config = Path(name) / "tokenizer_config.json"
    if config.is_file():
        try:
            decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
            for i, added in decoder.items():
                tokens[added["content"] if isinstance(added, dict) else str(added)] = int(i)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    return tokens


def maybe_load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer in a model directory if it has one, else None (used to cross-check a policy)."""
    if not Path(name).is_dir():
        return None
    if not any((Path(name) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return load_tokenizer(name, revision=revision, trust_remote_code=trust_remote_code)
    except ModelError:
        return None
