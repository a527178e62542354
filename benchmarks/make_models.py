"""Build benchmark inputs without the network: a random-init reference, a policy that is the reference with a small
seeded perturbation of every weight, a tokenizer, and a preference dataset of controlled token lengths.

The tokenizer is a byte-level BPE like the ones Llama-3 and Qwen2 ship (Qwen2's pre-tokenizer, 256 byte symbols,
special tokens last), its vocabulary exactly the model's, built so that every word (" a", " b", ..., " zz", ...) is
one token: a prompt of n words is n tokens (+ BOS where the shape has one), a response of m words is m tokens (+ the
EOS that TRL appends), so the dataset's token lengths are exact. Words are drawn uniformly from the vocabulary. After
saving, the tokenizer is read back with ``AutoTokenizer`` (which rebuilds Qwen2 tokenizers from vocab and merges) and
must tokenize identically.

Random init gives near-uniform next-token distributions (logits of std ~0.02*sqrt(hidden)), which would make every
log-prob ~ -log(vocab) and understate bf16 rounding errors. The final norm is therefore scaled so the logits have a
standard deviation of about ``logit_std`` (4 by default), closer to a trained LM's.

Layout written under ``--out`` (a directory per shape)::

    reference/      config.json, model.safetensors, tokenizer files   (AutoModelForCausalLM.from_pretrained works)
    policy/         the same, perturbed weights
    pairs.jsonl     {"id", "prompt", "chosen", "rejected"} per line    (pairs-<n>.jsonl for other sizes)
    manifest.json   the shape, seed and builder version; a directory whose manifest matches is reused

Usage::

    python benchmarks/make_models.py --shape cpu --out /tmp/prefdiag-bench/cpu
    python benchmarks/make_models.py --shape llama8b --out /tmp/prefdiag-bench/llama8b --device cuda
    python benchmarks/make_models.py --shape tiny --out DIR --pairs 10000      # models + pairs-10000.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILDER_VERSION = 2


@dataclass(frozen=True)
class Shape:
    """A model architecture plus the dataset scored with it."""

    name: str
    arch: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    dtype: str  # weights as saved: "float32" or "bfloat16"
    pairs: int
    prompt_words: tuple[int, int]  # inclusive range, uniform
    response_words: tuple[int, int]
    bos: bool  # the tokenizer prepends a BOS token (Llama style); Qwen style adds none
    policy_noise: float = 0.01  # policy = reference + noise * mean|w| * N(0, 1), per weight tensor
    logit_std: float = 4.0
    chat: bool = False  # conversational pairs, a ChatML template on the tokenizer (no BOS, EOS <|im_end|>)

    def config(self):
        """The transformers config of this shape."""
        common = dict(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings, dtype=self.dtype,
        )  # fmt: skip
        specials = special_tokens(self)
        first = self.vocab - len(specials["all"])  # special tokens close the vocabulary
        ids = {tok: first + i for i, tok in enumerate(specials["all"])}
        if self.arch == "llama":
            from transformers import LlamaConfig

            config = LlamaConfig(
                **common, bos_token_id=ids.get(specials["bos"]), eos_token_id=ids[specials["eos"]],
                pad_token_id=ids[specials["pad"]],
            )  # fmt: skip
        elif self.arch == "qwen2":
            from transformers import Qwen2Config

            config = Qwen2Config(**common, eos_token_id=ids[specials["eos"]], pad_token_id=ids[specials["pad"]])
        else:
            raise ValueError(f"unknown architecture {self.arch!r}")
        # transformers 5 keeps rope settings in rope_parameters; older versions in rope_theta
        if getattr(config, "rope_parameters", None) is not None:
            config.rope_parameters = {**config.rope_parameters, "rope_theta": self.rope_theta}
        else:
            config.rope_theta = self.rope_theta
        return config


_LONG = dict(prompt_words=(300, 900), response_words=(50, 300))

# Model sizes the benchmark matrix can run every shape with (``get_shape(name, **MODELS[m])``).
MODELS: dict[str, dict[str, int]] = {
    # The `cpu` shape's model: Llama, 4 layers, hidden 256 (the model issue 15 was measured with).
    "cpu": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688),
    # The same at half width: about 2.7x the tokens per second on a 2-core CPU; the full matrix fits ~25 minutes.
    "half": dict(hidden=128, layers=4, heads=4, kv_heads=4, intermediate=344),
}
_CPU_MODEL = dict(
    arch="llama", vocab=8000, max_positions=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False,
    dtype="float32", **MODELS["cpu"],
)  # fmt: skip

SHAPES: dict[str, Shape] = {
    # Small enough to score on a 2-core CPU in under a minute; prompts ~4x the responses, lengths +-30%.
    "cpu": Shape(
        name="cpu", arch="llama", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=8000,
        max_positions=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False, dtype="float32",
        pairs=160, prompt_words=(280, 520), response_words=(70, 130), bos=True,
    ),
    # The benchmark matrix (issue 15), all on the `cpu` shape's model unless --model says otherwise:
    # short answers after medium prompts (~160 prompt tokens, ~10 per response, EOS included)
    "short": Shape(name="short", pairs=160, prompt_words=(130, 190), response_words=(5, 13), bos=True, **_CPU_MODEL),
    # long answers after short prompts (~40 prompt tokens, ~400 per response)
    "long": Shape(name="long", pairs=160, prompt_words=(20, 60), response_words=(300, 500), bos=True, **_CPU_MODEL),
    # conversations: a system message and three turns as the prompt (40-120 words plus ~105 tokens of ChatML
    # markup), one assistant message per response (15-60 words + ~6); rendered by the ChatML template in both tools
    "chat": Shape(name="chat", pairs=160, prompt_words=(40, 120), response_words=(15, 60), bos=False, chat=True,
                  **_CPU_MODEL),
    # Model-light, for the scaling runs (thousands of pairs: Python-side costs dominate).
    "tiny": Shape(
        name="tiny", arch="llama", hidden=64, layers=1, heads=2, kv_heads=2, intermediate=172, vocab=2048,
        max_positions=512, rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False, dtype="float32",
        pairs=1000, prompt_words=(22, 42), response_words=(6, 10), bos=True,
    ),
    # Qwen2-0.5B: hidden 896, 24 layers, 14 heads / 2 KV heads, tied embeddings, vocab 151936.
    "qwen0.5b": Shape(
        name="qwen0.5b", arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
        vocab=151936, max_positions=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True,
        dtype="bfloat16", pairs=1024, bos=False, **_LONG,
    ),
    # Llama-3-8B: hidden 4096, 32 layers, 32 heads / 8 KV heads, vocab 128256. Build it on the GPU.
    "llama8b": Shape(
        name="llama8b", arch="llama", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
        vocab=128256, max_positions=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=False,
        dtype="bfloat16", pairs=256, bos=True, **_LONG,
    ),
}


def get_shape(name: str, model: str | None = None, **overrides: Any) -> Shape:
    """A named shape, on one of MODELS' sizes if ``model`` is given, with fields replaced (e.g. layers=1 for a smoke
    test)."""
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; expected one of {', '.join(SHAPES)}")
    if model is not None and model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    overrides = {**(MODELS[model] if model else {}), **{k: v for k, v in overrides.items() if v is not None}}
    return dataclasses.replace(SHAPES[name], **overrides)


# -- tokenizer ------------------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer pattern (Llama-3's differs only on digits, which never occur here).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def special_tokens(shape: Shape) -> dict[str, Any]:
    """Special tokens (last in the vocabulary, as in the real models): Llama-3 style with BOS, Qwen2 style, or
    Qwen2-Instruct style (ChatML, EOS ``<|im_end|>``) for the chat shape."""
    if shape.chat:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        return {"all": specials, "bos": None, "eos": specials[2], "pad": specials[0],
                "tokenizer_class": "Qwen2Tokenizer"}  # fmt: skip
    if shape.bos:
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
        return {"all": specials, "bos": specials[0], "eos": specials[1], "pad": specials[2],
                "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {"all": specials, "bos": None, "eos": specials[0], "pad": specials[0], "tokenizer_class": "Qwen2Tokenizer"}


def word_count(shape: Shape) -> int:
    """Words in the vocabulary: everything but the 256 byte symbols and the special tokens."""
    return shape.vocab - 256 - len(special_tokens(shape)["all"])


def words(n: int) -> list[str]:
    """The first n lower-case strings in (length, alphabetical) order: a, ..., z, aa, ab, ... Every prefix of a
    word is an earlier word, so one BPE merge per word (prefix + last letter) builds each as a single token."""
    import itertools
    import string

    out: list[str] = []
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            if len(out) == n:
                return out
            out.append("".join(letters))
    return out


def build_tokenizer(shape: Shape):
    """A byte-level BPE tokenizer (the kind Llama-3 and Qwen2 ship) of exactly ``shape.vocab`` entries, where
    " <word>" is always one token: text made of space-led words has as many tokens as words."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens(shape)
    space = "\u0120"  # the byte-level symbol of " "
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in words(word_count(shape)):
        token = space + word
        merges.append((space + word[:-1] if len(word) > 1 else space, word[-1]))
        vocab[token] = len(vocab)
    for token in specials["all"]:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    if specials["bos"]:
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=specials["bos"], eos_token=specials["eos"], pad_token=specials["pad"]
    )
    fast.model_max_length = shape.max_positions
    if shape.chat:
        fast.chat_template = CHATML
    assert len(fast) == shape.vocab, (len(fast), shape.vocab)
    return fast


def save_tokenizer(tokenizer, shape: Shape, path: Path) -> None:
    """Save, declare the class the real model family declares, and check AutoTokenizer reads it back identically
    (transformers rebuilds some families' tokenizers from vocab and merges with its own pre-tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = special_tokens(shape)["tokenizer_class"]
    config_file.write_text(json.dumps(config, indent=2))
    sample = make_pairs(dataclasses.replace(shape, chat=False), 1, seed=12345)[0]
    text = sample["prompt"] + sample["chosen"] + tokenizer.eos_token
    expected = tokenizer(text)["input_ids"]
    loaded = AutoTokenizer.from_pretrained(path)
    got = loaded(text)["input_ids"]
    words_in_text = len((sample["prompt"] + sample["chosen"]).split())
    if shape.chat:
        messages = [{"role": "user", "content": sample["prompt"]}]
        rendered = [t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for t in
                    (tokenizer, loaded)]  # fmt: skip
        if loaded.chat_template != CHATML or rendered[0] != rendered[1]:
            raise RuntimeError(f"the chat template does not survive loading {path}")
    if got != expected or len(got) != words_in_text + 1 + int(shape.bos):
        raise RuntimeError(
            f"{type(loaded).__name__} loaded from {path} tokenizes differently ({len(got)} vs {len(expected)} "
            f"tokens for {words_in_text} words + EOS)"
        )


# -- dataset --------------------------------------------------------------------------------------------------------


def make_pairs(shape: Shape, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n pairs of random space-led words (one token each), lengths uniform in the shape's ranges: standard format,
    or for a chat shape conversational (the prompt's words spread over a system message and user / assistant / user
    turns, each response one assistant message)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocabulary = np.array([" " + w for w in words(word_count(shape))])
    (plo, phi), (rlo, rhi) = shape.prompt_words, shape.response_words
    prompt_len = rng.integers(plo, phi + 1, size=n)
    chosen_len = rng.integers(rlo, rhi + 1, size=n)
    rejected_len = rng.integers(rlo, rhi + 1, size=n)
    text = vocabulary[rng.integers(0, len(vocabulary), size=int((prompt_len + chosen_len + rejected_len).sum()))]
    pairs, at = [], 0

    def take(k: int) -> str:
        nonlocal at
        out = "".join(text[at : at + k])
        at += k
        return out

    for i in range(n):
        if shape.chat:
            k = int(prompt_len[i])
            split = [max(1, k // 10), k * 4 // 10, k * 2 // 10]
            turns = [*split, k - sum(split)]  # system, user, assistant, user
            prompt = [{"role": role, "content": take(m)}
                      for role, m in zip(("system", "user", "assistant", "user"), turns)]  # fmt: skip
            chosen = [{"role": "assistant", "content": take(int(chosen_len[i]))}]
            rejected = [{"role": "assistant", "content": take(int(rejected_len[i]))}]
        else:
            prompt = take(int(prompt_len[i]))
            chosen = take(int(chosen_len[i]))
            rejected = take(int(rejected_len[i]))
        pairs.append({"id": f"p{i:06d}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    markup = 200 if shape.chat else 0  # ChatML: <|im_start|>, the role's bytes, newlines, <|im_end|>: ~26 a message
    longest = int((prompt_len + np.maximum(chosen_len, rejected_len)).max()) + 2 + markup  # + BOS and EOS
    if longest > shape.max_positions:
        raise ValueError(f"pairs up to {longest} tokens exceed max_position_embeddings {shape.max_positions}")
    return pairs


def write_pairs(shape: Shape, path: Path, n: int, seed: int = 0) -> Path:
    """Write n pairs as JSONL (atomically); reused when already there with the same line count."""
    path = Path(path)
    if path.exists() and _line_count(path) == n:
        return path
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for pair in make_pairs(shape, n, seed):
            handle.write(json.dumps(pair) + "\n")
    tmp.replace(path)
    return path


def _line_count(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


# -- models ---------------------------------------------------------------------------------------------------------


def _logit_gain(shape: Shape) -> float:
    """Scale for the final norm so logits have std ~logit_std (head weights ~N(0, 0.02^2), unit-RMS hidden)."""
    return shape.logit_std / (0.02 * shape.hidden**0.5)


def build_models(shape: Shape, out: Path, device: str = "cpu", seed: int = 0) -> dict[str, Path]:
    """Create, on ``device``, the reference (seed) and the policy (reference + seeded noise); save both."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, shape.dtype)
    config = shape.config()
    tokenizer = build_tokenizer(shape)
    torch.manual_seed(seed)
    with torch.device(device), torch.no_grad():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.eval()
        model.get_decoder().norm.weight.mul_(_logit_gain(shape))
        paths = {}
        paths["reference"] = _save(model, tokenizer, shape, out / "reference")
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        for param in model.parameters():
            scale = shape.policy_noise * param.detach().abs().float().mean()
            noise = torch.randn(param.shape, generator=generator, device=param.device, dtype=torch.float32)
            param.add_((noise * scale).to(param.dtype))
            del noise
        paths["policy"] = _save(model, tokenizer, shape, out / "policy")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return paths


def _save(model, tokenizer, shape: Shape, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # safetensors
    save_tokenizer(tokenizer, shape, path)
    return path


def count_parameters(shape: Shape) -> dict[str, int]:
    """Parameter counts from a meta-device instance (no memory): total, embedding, LM head, transformer body."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    body = sum(p.numel() for p in model.parameters() if p is not embed and p is not head)
    return {"total": total, "embedding": embed.numel(), "lm_head": head.numel(), "body": body}


# -- entry point ----------------------------------------------------------------------------------------------------


def manifest_of(shape: Shape, seed: int) -> dict[str, Any]:
    """What the models were built from, as it reads back from JSON."""
    manifest = {"builder_version": BUILDER_VERSION, "seed": seed, "shape": dataclasses.asdict(shape)}
    return json.loads(json.dumps(manifest))


def ensure(shape: Shape, out: Path, *, device: str = "cpu", seed: int = 0, pairs: int | None = None,
           force: bool = False, log=print) -> dict[str, Any]:  # fmt: skip
    """Build what is missing under ``out`` and return the paths: reference, policy, data (and whether reused)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    wanted = manifest_of(dataclasses.replace(shape, pairs=SHAPES.get(shape.name, shape).pairs), seed)
    have = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    models_ok = (
        not force
        and have == wanted
        and all((out / m / f).exists() for m in ("reference", "policy") for f in ("config.json", "tokenizer.json"))
    )
    started = time.perf_counter()
    if not models_ok:
        log(f"[make_models] building {shape.name} models on {device} into {out}")
        manifest_path.unlink(missing_ok=True)
        for stale in out.glob("pairs*.jsonl"):  # data follows the tokenizer: rebuild it too
            stale.unlink()
        build_models(shape, out, device=device, seed=seed)
        manifest_path.write_text(json.dumps(wanted, indent=2))
    models_seconds = time.perf_counter() - started
    n = shape.pairs if pairs is None else pairs
    data = out / ("pairs.jsonl" if n == SHAPES.get(shape.name, shape).pairs else f"pairs-{n}.jsonl")
    started = time.perf_counter()
    write_pairs(shape, data, n, seed)
    return {
        "shape": shape.name,
        "reference": str(out / "reference"),
        "policy": str(out / "policy"),
        "data": str(data),
        "pairs": n,
        "models_reused": models_ok,
        "models_seconds": round(models_seconds, 2),
        "data_seconds": round(time.perf_counter() - started, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--out", required=True, type=Path, help="directory for reference/, policy/, pairs*.jsonl")
    parser.add_argument("--device", default="cpu", help="where to initialise the models (cuda for the big shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, help="dataset size (default: the shape's)")
    parser.add_argument("--model", choices=sorted(MODELS), help="the model size (default: the shape's own)")
    parser.add_argument("--layers", type=int, help="override the layer count (smoke tests)")
    parser.add_argument("--force", action="store_true", help="rebuild the models even if the manifest matches")
    args = parser.parse_args(argv)
    shape = get_shape(args.shape, model=args.model, layers=args.layers)
    result = ensure(shape, args.out, device=args.device, seed=args.seed, pairs=args.pairs, force=args.force,
                    log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
