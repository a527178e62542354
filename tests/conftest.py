"""Tiny real models and tokenizers built from configs (no downloads), shared across the test session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "the a an cat dog bird sky sea sun moon red blue green big small happy sad yes no paris london rome capital "
    "city is was of in on what where why how answer question because it they we you good bad very not and or "
    "one two three four five plus minus equals please thanks sorry help sure"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) + rng.choice([".", "?", "!"]) for _ in range(n)]


def make_pairs(n: int = 24, seed: int = 1) -> list[dict]:
    """Readable random standard-format pairs of varied lengths, some prompts ending in a space or newline."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = "Question: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        prompt += rng.choice(["\nAnswer:", " ", "?", "\n"])
        chosen = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))) + "."
        rejected = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))) + "."
        pairs.append({"id": f"q{i:03d}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def make_conversations(n: int = 12, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 15)))}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "be helpful"}] + prompt
        chosen = [{"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))}]
        rejected = [{"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))}]
        rows.append({"id": f"c{i:03d}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_tokenizer(style: str):
    """A byte-level BPE tokenizer trained on the corpus: 'llama' adds BOS, 'gpt2' adds nothing, 'qwen' has ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {
        "llama": ["<unk>", "<s>", "</s>"],
        "gpt2": ["<|endoftext|>"],
        "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    }[style]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if style == "llama" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    if style == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    if style == "gpt2":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model(style: str, vocab_size: int, seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if style == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    elif style == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
    else:
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
    # Random init has near-uniform logits; sharpen them so log-probs differ clearly between responses.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model.eval()


def save_model(root: Path, style: str, seed: int) -> Path:
    tokenizer = build_tokenizer(style)
    model = build_model(style, len(tokenizer), seed)
    path = root / f"{style}-{seed}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """{style}: a reference directory and {style}-policy: a second model with the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for style in ("llama", "gpt2", "qwen"):
        dirs[style] = save_model(root, style, seed=0)
        dirs[f"{style}-policy"] = save_model(root, style, seed=1)
    return dirs


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs()))
    return path


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_conversations()))
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Each test session gets its own log-prob cache directory (never the user's)."""
    import os

    os.environ["PREFDIAG_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI's setup_logging configures logging process-wide; leave it as found for the next test."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("prefdiag")
    saved = root.level, list(root.handlers), ours.level
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    ours.setLevel(saved[2])


def invalid_summaries(root: Path) -> list[str]:
    """'path: error' for every summary.json prefdiag wrote under root (one with junit.xml beside it: RunResult.write
    writes both, always) that does not satisfy the published JSON Schema. A summary.json a test wrote by hand, to
    plant a bad one, has no junit.xml beside it and is left alone."""
    import jsonschema

    from prefdiag.schemas import summary_schema

    validator = jsonschema.Draft202012Validator(summary_schema())
    problems = []
    for path in sorted(root.rglob("summary.json")):
        if not (path.parent / "junit.xml").is_file():
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        for error in validator.iter_errors(summary):
            where = "/".join(map(str, error.absolute_path)) or "(top)"
            problems.append(f"{path}: {where}: {error.message[:300]}")
    return problems


@pytest.fixture(autouse=True)
def _summaries_match_the_schema(request):
    """After each test, every summary.json prefdiag wrote under the test's tmp_path satisfies the summary schema."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp_path = request.getfixturevalue("tmp_path")  # asked for before the test: torn down after this check
    yield
    problems = invalid_summaries(tmp_path)
    if problems:
        pytest.fail("summary.json does not match prefdiag/schemas/summary.schema.json:\n" + "\n".join(problems[:20]),
                    pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _session_summaries_match_the_schema(tmp_path_factory):
    """At the end of the session, the same check over every directory the session's fixtures made (module- and
    session-scoped runs included)."""
    yield
    problems = invalid_summaries(tmp_path_factory.getbasetemp())
    if problems:
        pytest.fail("summary.json does not match prefdiag/schemas/summary.schema.json:\n" + "\n".join(problems[:20]),
                    pytrace=False)
