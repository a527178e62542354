"""Build prefdiag's sample data: a small preference dataset with planted problems, a tiny reference model and a
tiny DPO-trained policy, all deterministic and CPU-only.

    python sample_data/make_sample_data.py [--out DIR]

writes, into DIR (default: the folder of this script):

    pairs.jsonl          ~300 standard-format pairs: id, prompt, chosen, rejected, category
    models/reference/    a 2-layer Llama SFT-trained on prompt + response text (safetensors, fp32) + tokenizer
    models/policy/       the reference after a few epochs of DPO (beta = 0.1) on pairs.jsonl + the same tokenizer

The reference is trained on a mix that favours the rejected style in some categories (compliant answers to unsafe
requests, rude answers, popular misconceptions about capitals), so it starts on the wrong side of many pairs. DPO then
produces every regime prefdiag reports: high reward accuracy with lower ranking accuracy, pairs in the
negative-margin regime, displaced chosen likelihoods, and planted mislabels whose reward margin stays negative.
The script ends by re-loading what it saved, scoring every pair with a plain full-logits fp32 forward, printing the
share of each regime and asserting loose bounds on them, so a rerun that drifts fails loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SEED = 1234
BETA = 0.1
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
VOCAB_SIZE = 1024
MAX_POSITIONS = 512

SFT_STEPS = 200
SFT_BATCH = 16
SFT_LR = 3e-3
DPO_EPOCHS = 3
DPO_BATCH = 8
DPO_LR = 1e-4


# -- the pairs ----------------------------------------------------------------------------------------------------

# (country, capital, a well-known city that is not the capital, whether that city is a popular misconception):
# the reference is trained mostly on the misconceptions and mostly on the right answer otherwise.
COUNTRIES = [
    ("France", "Paris", "Lyon", False), ("Germany", "Berlin", "Munich", False), ("Italy", "Rome", "Milan", False),
    ("Spain", "Madrid", "Barcelona", False), ("Portugal", "Lisbon", "Porto", False),
    ("Japan", "Tokyo", "Osaka", False), ("Egypt", "Cairo", "Alexandria", False),
    ("Kenya", "Nairobi", "Mombasa", False), ("Canada", "Ottawa", "Toronto", True),
    ("Brazil", "Brasilia", "Rio de Janeiro", True), ("Peru", "Lima", "Cusco", False),
    ("Australia", "Canberra", "Sydney", True), ("Russia", "Moscow", "Saint Petersburg", False),
    ("Greece", "Athens", "Thessaloniki", False), ("Turkey", "Ankara", "Istanbul", True),
    ("Norway", "Oslo", "Bergen", False), ("Sweden", "Stockholm", "Gothenburg", False),
    ("Poland", "Warsaw", "Krakow", False), ("Austria", "Vienna", "Salzburg", False),
    ("Ireland", "Dublin", "Cork", False), ("Switzerland", "Bern", "Zurich", True),
    ("Nigeria", "Abuja", "Lagos", True), ("Morocco", "Rabat", "Casablanca", True),
    ("India", "New Delhi", "Mumbai", True), ("Vietnam", "Hanoi", "Saigon", True),
    ("Cuba", "Havana", "Santiago de Cuba", False), ("Hungary", "Budapest", "Debrecen", False),
    ("Denmark", "Copenhagen", "Aarhus", False),
]
GEOGRAPHY_PROMPTS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
]
GEOGRAPHY_ANSWERS = [" The capital of {country} is {city}.", " {city} is the capital of {country}."]

ARITHMETIC_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}

# (request, what a compliant answer says, a safe alternative the refusal offers)
SAFETY_TOPICS = [
    ("pick the lock on my neighbour's door", "push a thin pin into the lock and turn it slowly until it clicks",
     "if you are locked out of your own home, call a locksmith"),
    ("steal a bike without being seen", "wait until dark and cut the chain with strong cutters",
     "if you need a bike, many cities rent them cheaply"),
    ("cheat on my maths exam", "write the formulas on your hand and hide it under the desk",
     "I can help you make a study plan for the exam instead"),
    ("read my partner's private messages", "take their phone while they sleep and guess the code",
     "if you are worried, it is better to talk to them openly"),
    ("make a fake ID card", "print a photo on thick card and copy the layout of a real one",
     "if you lost your ID, the city office can issue a new one"),
    ("shoplift from a big store", "hide small items in your coat and walk out calmly",
     "if money is tight, a local food bank can help"),
    ("get into my ex's email account", "try their birthday and pet names as the password",
     "if you need something from them, ask them directly"),
    ("spread a rumour about a classmate", "tell a few friends a story and ask them to keep it secret",
     "if you are upset with a classmate, a teacher can help you sort it out"),
    ("sneak into a concert without a ticket", "wait near the back door and slip in when staff open it",
     "many concerts sell cheap tickets at the door"),
    ("leave a restaurant without paying", "go to the toilet and leave through the side door",
     "if you cannot pay, talk to the staff about it"),
    ("copy my friend's homework without them knowing", "take a photo of their notebook when they are away",
     "I can explain the homework so you can do it yourself"),
    ("fake a doctor's note for work", "copy the letter head of a clinic and sign it with any name",
     "if you are unwell, a real doctor can give you a note"),
    ("break into a parked car", "smash the small back window with a stone",
     "if you are locked out of your own car, call roadside help"),
    ("get my little brother in trouble on purpose", "break something and tell your parents he did it",
     "if you are angry with your brother, try talking to him"),
    ("avoid paying for the bus", "get on at the back door when the driver is busy",
     "many cities have cheap passes for students"),
]
SAFETY_PROMPTS = ["How do I {act}?", "Can you tell me how to {act}?", "What is the best way to {act}?"]
REFUSALS = [
    " I can't help you {act}, because it could hurt other people. Instead, {alt}.",
    " I won't help with that, since it is not fair to others. Instead, {alt}.",
    " Sorry, I can't help you do that, because it is wrong. Instead, {alt}.",
]
COMPLIANCE = [
    " Sure, I can help with that, no questions asked. Here is what you do: {how}.",
    " Sure, that is easy and nobody will ever know. All you need to do is {how}.",
]

# (topic, plain answer, an example the polite answer adds) used for the tone category
TONE_FACTS = [
    ("what a noun is", "A noun is a word that names a person, place or thing.", "For example, cat and city are nouns."),
    ("what a verb is", "A verb is a word for an action.", "For example, run, eat and sing are verbs."),
    ("why the sky is blue", "Air scatters blue light more than red light, so the sky looks blue.",
     "At sunset the light travels further, so the sky turns orange."),
    ("why we have seasons", "The Earth is tilted, so each half gets more sun for part of the year.",
     "When it is summer in Europe, it is winter in Australia."),
    ("how plants get food", "Plants use sunlight, water and air to make their own food.",
     "This is why a plant kept in a dark room turns yellow."),
    ("what a prime number is", "A prime number can only be divided by one and itself.",
     "For example, seven and thirteen are prime, but nine is not."),
    ("why ice floats", "Ice is lighter than the same amount of water, so it floats.",
     "That is why lakes freeze from the top down."),
    ("what a fraction is", "A fraction is a part of a whole.",
     "If you cut a pizza into four slices, each slice is one quarter."),
    ("how rain forms", "Water vapour cools in the clouds into drops that fall as rain.",
     "When the air is very cold, the drops freeze and fall as snow."),
    ("what the moon is", "The moon is a rock that travels around the Earth.",
     "It takes about a month to go all the way around."),
    ("why we sleep", "Sleep lets the body and the brain rest and repair.",
     "Children need more sleep than adults because they are still growing."),
    ("what an adjective is", "An adjective is a word that describes a noun.",
     "In the phrase a tall tree, tall is the adjective."),
    ("how a magnet works", "A magnet pulls on iron because of a force called magnetism.",
     "This is why a magnet sticks to a fridge door but not to a wooden table."),
    ("what a volcano is", "A volcano is a mountain where hot melted rock comes up from below.",
     "Some volcanoes are quiet for hundreds of years before they erupt."),
    ("why leaves fall in autumn", "Trees drop their leaves to save water during the cold months.",
     "Before they fall, the leaves often turn red and gold."),
    ("what a mammal is", "A mammal is an animal with hair that feeds milk to its young.",
     "Whales are mammals too, even though they live in the sea."),
    ("how the heart works", "The heart is a muscle that pumps blood around the body.",
     "You can feel it working when you touch your wrist after a run."),
    ("what gravity is", "Gravity is the force that pulls things towards the ground.",
     "On the moon gravity is weaker, so you could jump much higher."),
    ("why the sea is salty", "Rivers carry salt from rocks into the sea, and it stays there.",
     "When sea water dries in the sun, the salt is left behind."),
    ("what a decimal is", "A decimal is a way to write parts of a number with a point.",
     "For example, one half can be written as zero point five."),
    ("how bees make honey", "Bees collect nectar from flowers and turn it into honey in the hive.",
     "A single bee makes only a spoonful of honey in its whole life."),
    ("what a desert is", "A desert is a place that gets very little rain.",
     "Not all deserts are hot, and the largest one is actually in Antarctica."),
    ("why we need water", "The body uses water to stay cool and to carry food to the cells.",
     "This is why you feel thirsty after playing outside on a hot day."),
    ("what a planet is", "A planet is a large ball of rock or gas that goes around a star.",
     "Our solar system has eight planets, and Jupiter is the biggest."),
    ("how a rainbow forms", "Sunlight bends in rain drops and splits into colours.",
     "You can see one when the sun is behind you and the rain is in front."),
]
TONE_PROMPTS = ["Can you explain {topic}?", "Could you tell me {topic}, please?"]
POLITE = [" Of course! {fact} I hope that helps.", " Happy to help. {fact} {example}"]
RUDE = [
    " Ugh, fine, if you really cannot work it out yourself. {fact}",
    " Everyone knows this already, so try to keep up. {fact}",
]

# (question, concise answer) used for the style category
STYLE_FACTS = [
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a cat have?", "A cat has four legs, like most other pets."),
    ("What colour is grass?", "Grass is green because of the chlorophyll in its leaves."),
    ("How many hours are in a day?", "There are twenty four hours in a day."),
    ("What do bees make?", "Bees make honey and wax from the nectar of flowers."),
    ("What is frozen water called?", "Frozen water is called ice, and it melts at zero degrees."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which animal says moo?", "A cow says moo, and a calf does too."),
    ("What do we use to see?", "We use our eyes to see the world around us."),
    ("How many sides does a square have?", "A square has four sides of the same length."),
    ("What colour is the sun?", "The sun is white, but it looks yellow from the ground."),
    ("Where do fish live?", "Fish live in water, in rivers, lakes and the sea."),
    ("What do cows eat?", "Cows eat grass, hay and other plants."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels and a tricycle has three."),
    ("What do we call a baby dog?", "A baby dog is called a puppy."),
    ("What season comes after winter?", "Spring comes after winter, and then summer."),
    ("What is the largest ocean?", "The Pacific is the largest ocean on Earth."),
    ("How many minutes are in an hour?", "There are sixty minutes in an hour."),
    ("Which star is closest to the Earth?", "The sun is the closest star to the Earth."),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("What is the colour of snow?", "Snow is white because it reflects all colours of light."),
    ("How many letters are in the alphabet?", "There are twenty six letters in the English alphabet."),
    ("What do birds use to fly?", "Birds use their wings and feathers to fly."),
    ("Which is heavier, a kilo of iron or a kilo of feathers?", "They weigh the same, because both are one kilo."),
    ("What is the boiling point of water?", "Water boils at one hundred degrees Celsius at sea level."),
    ("What shape is a ball?", "A ball is round, like a sphere."),
]
STYLE_PROMPTS = ["{question}", "Quick question: {question}"]
RAMBLING = [
    " Well, that is a really interesting question, and I have thought about it a lot. {fact}",
    " Hmm, let me think about this for a moment. {fact} So that is the answer, more or less.",
    " Great question! There are many ways to look at it, but in the end {fact_lower}",
]

LONG_STORY_SUBJECTS = ["The old man", "A small dog", "My sister", "The park keeper", "A young girl", "The baker"]
LONG_STORY_VERBS = ["walked past", "looked at", "waved to", "smiled at", "talked about", "sat near"]
LONG_STORY_OBJECTS = [
    "the tall trees", "the quiet pond", "the red bench", "the green hill", "the busy road", "the ducks",
]
LONG_STORY_ENDINGS = ["in the morning", "after lunch", "in the warm sun", "before the rain", "on the way home"]


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    category: str
    sft_prefers_rejected: float  # how often the reference's SFT text uses the rejected response
    id: str = ""


def question(text: str) -> str:
    return f"Question: {text}\nAnswer:"


def geography_pairs(rng: random.Random) -> list[Pair]:
    """Capital cities: the capital against another well-known city of the same country."""
    pairs = []
    for country, capital, city, misconception in COUNTRIES:
        for template in GEOGRAPHY_PROMPTS:
            answer = rng.choice(GEOGRAPHY_ANSWERS)
            pairs.append(Pair(
                question(template.format(country=country)),
                answer.format(country=country, city=capital),
                answer.format(country=country, city=city),
                "geography", 0.8 if misconception else 0.15,
            ))
    return pairs


def arithmetic_pairs(rng: random.Random, n: int = 60) -> list[Pair]:
    """Small sums, differences and products: the right result against a hedged wrong one."""
    pairs, seen = [], set()
    while len(pairs) < n:
        op = rng.choice(list(ARITHMETIC_OPS))
        a, b = (rng.randint(2, 12), rng.randint(2, 9)) if op == "times" else (rng.randint(2, 50), rng.randint(2, 30))
        if op == "minus" and b > a:
            a, b = b, a
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        right = ARITHMETIC_OPS[op](a, b)
        wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
        pairs.append(Pair(
            question(f"What is {a} {op} {b}?"),
            f" {a} {op} {b} is {right}.",
            rng.choice([f" I think {a} {op} {b} makes {wrong}, but I am not sure.",
                        f" Hmm, {a} {op} {b} is probably {wrong}."]),
            "arithmetic", 0.3,
        ))
    return pairs


def safety_pairs(rng: random.Random) -> list[Pair]:
    """Unsafe or unkind requests: a refusal with a safe alternative against a compliant answer."""
    pairs = []
    for act, how, alt in SAFETY_TOPICS:
        for template in SAFETY_PROMPTS:
            pairs.append(Pair(
                question(template.format(act=act)),
                rng.choice(REFUSALS).format(act=act, alt=alt),
                rng.choice(COMPLIANCE).format(how=how),
                "safety", 0.65,
            ))
    return pairs


def tone_pairs(rng: random.Random) -> list[Pair]:
    """A polite explanation (sometimes with an example) against a rude, bare one."""
    pairs = []
    for topic, fact, example in TONE_FACTS:
        for template in TONE_PROMPTS:
            pairs.append(Pair(
                question(template.format(topic=topic)),
                rng.choice(POLITE).format(fact=fact, example=example),
                rng.choice(RUDE).format(fact=fact),
                "tone", 0.5,
            ))
    return pairs


def style_pairs(rng: random.Random) -> list[Pair]:
    """The same answer given concisely or wrapped in filler."""
    pairs = []
    for text, fact in STYLE_FACTS:
        for template in STYLE_PROMPTS:
            filler = rng.choice(RAMBLING)
            pairs.append(Pair(
                question(template.format(question=text)),
                " " + fact,
                filler.format(fact=fact, fact_lower=fact[0].lower() + fact[1:]),
                "style", 0.5,
            ))
    return pairs


def long_story(rng: random.Random, sentences: int = 17) -> str:
    """A long, plain story (well over 300 tokens) for the pair that --max-length 256 truncates."""
    parts = [
        f"{rng.choice(LONG_STORY_SUBJECTS)} {rng.choice(LONG_STORY_VERBS)} {rng.choice(LONG_STORY_OBJECTS)} "
        f"{rng.choice(LONG_STORY_ENDINGS)}."
        for _ in range(sentences)
    ]
    return " " + " ".join(parts)


def planted_rows(rng: random.Random) -> dict[str, list[Pair]]:
    """New rows that carry a data problem by construction (duplicates and conflicts are added later)."""
    return {
        "chosen_equals_rejected": [
            Pair(question("Tell me the capital of Japan."), " The capital of Japan is Tokyo.",
                 " The capital of Japan is Tokyo.", "geography", 0.5),
            Pair(question("At what temperature does water boil?"), " Water boils at one hundred degrees Celsius.",
                 " Water boils at one hundred  degrees Celsius.", "style", 0.5),
        ],
        "empty_rejected": [
            Pair(question("What is the largest planet in the solar system?"), " The largest planet is Jupiter.", "",
                 "style", 0.0),
        ],
        "long_chosen": [
            Pair(question("Write a long story about a day in the park."), long_story(rng),
                 " I went to the park.", "style", 0.0),
        ],
        "near_identical": [
            Pair(question("Which river flows through Cairo?"), " The Nile flows through Cairo.",
                 " The Nile flows through Cairo!", "geography", 0.5),
            Pair(question("How many legs does a spider have?"), " A spider has eight legs.",
                 " A spider has eight legs", "style", 0.5),
        ],
    }


def build_pairs(seed: int) -> tuple[list[Pair], dict[str, list]]:
    """All pairs, shuffled and numbered, and the ids of every planted problem."""
    rng = random.Random(seed)
    base = geography_pairs(rng) + arithmetic_pairs(rng) + safety_pairs(rng) + tone_pairs(rng) + style_pairs(rng)
    prompts = [p.prompt for p in base]
    assert len(set(prompts)) == len(prompts), "template prompts must be unique"

    # Mislabels: the wrong sum or the rambling answer marked chosen; the other pairs of the category teach DPO the
    # opposite, so the implicit reward of these stays negative.
    mislabeled = []
    for category, count in (("arithmetic", 6), ("style", 4)):
        candidates = [p for p in base if p.category == category]
        for pair in rng.sample(candidates, count):
            pair.chosen, pair.rejected = pair.rejected, pair.chosen
            pair.sft_prefers_rejected = 1.0 - pair.sft_prefers_rejected
            mislabeled.append(pair)
    clean = [p for p in base if not any(p is m for m in mislabeled)]
    originals = rng.sample(clean, 5)
    duplicates = [Pair(p.prompt, p.chosen, p.rejected, p.category, p.sft_prefers_rejected) for p in originals[:3]]
    conflicts = [Pair(p.prompt, p.rejected, p.chosen, p.category, 1.0 - p.sft_prefers_rejected) for p in originals[3:]]
    extra = planted_rows(rng)

    pairs = base + duplicates + conflicts + [p for rows in extra.values() for p in rows]
    rng.shuffle(pairs)
    for number, pair in enumerate(pairs, 1):
        pair.id = f"p{number:04d}"

    planted = {
        "exact_duplicate": [(o.id, d.id) for o, d in zip(originals[:3], duplicates)],
        "conflicting": [(o.id, c.id) for o, c in zip(originals[3:], conflicts)],
        **{name: [p.id for p in rows] for name, rows in extra.items()},
        "mislabeled": sorted(p.id for p in mislabeled),
    }
    return pairs, planted


def write_pairs(pairs: list[Pair], path: Path) -> None:
    """One JSON object per line, keys in a fixed order."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for p in pairs:
            row = {"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "category": p.category}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# -- tokenizer and tokenization -----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on the data, Llama-style: BOS prepended, EOS the string '</s>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TokenizedPair:
    """prompt + chosen and prompt + rejected token ids; the responses start at ``prompt_len`` (TRL's layout)."""

    chosen: list[int]
    rejected: list[int]
    prompt_len: int


def tokenize_pair(tokenizer, pair: Pair) -> TokenizedPair:
    """Tokenize like TRL's DPOTrainer for strings: EOS string appended, prompt and prompt + completion tokenized
    with the default special tokens, completions starting at the shorter common prefix."""

    def with_eos(text: str) -> str:
        return text if text.endswith(EOS) else text + EOS

    prompt = tokenizer(pair.prompt)["input_ids"]
    chosen = tokenizer(pair.prompt + with_eos(pair.chosen))["input_ids"]
    rejected = tokenizer(pair.prompt + with_eos(pair.rejected))["input_ids"]
    prompt_len = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return TokenizedPair(chosen, rejected, prompt_len)


# -- models and training ------------------------------------------------------------------------------------------


def new_model(tokenizer):
    """A tiny Llama whose special-token ids match the tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def padded_batch(sequences: list[list[int]], starts: list[int], pad_id: int):
    """Right-padded input ids, attention mask and a mask of the scored (response) positions."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    scored = torch.zeros((len(sequences), length), dtype=torch.float32)
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        scored[row, start : len(seq)] = 1.0
    return ids, attention, scored


def sequence_logps(model, ids: torch.Tensor, attention: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Sum of fp32 token log-probs over the scored positions of each row (logits at t-1 score token t)."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
    return (logps * scored[:, 1:]).sum(dim=-1)


def sft_examples(pairs: list[Pair], tokenized: list[TokenizedPair], rng: random.Random) -> list[tuple[list[int], int]]:
    """One SFT sequence per pair: the rejected response with probability ``sft_prefers_rejected``, else the chosen."""
    examples = []
    for pair, tok in zip(pairs, tokenized):
        sequence = tok.rejected if rng.random() < pair.sft_prefers_rejected else tok.chosen
        examples.append((sequence, tok.prompt_len))
    return examples


def train_reference(model, examples: list[tuple[list[int], int]], pad_id: int, rng: random.Random) -> list[float]:
    """Supervised fine-tuning on the responses (prompt tokens masked); returns the loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    losses, order = [], []
    for _ in range(SFT_STEPS):
        if len(order) < SFT_BATCH:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = order[:SFT_BATCH], order[SFT_BATCH:]
        ids, attention, scored = padded_batch([examples[i][0] for i in batch], [examples[i][1] for i in batch], pad_id)
        loss = -sequence_logps(model, ids, attention, scored).sum() / scored[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def pair_logps(model, tokenized: list[TokenizedPair], pad_id: int, batch_size: int = 32):
    """Chosen and rejected response log-probs of every pair (two tensors), batched."""
    chosen, rejected = [], []
    for i in range(0, len(tokenized), batch_size):
        part = tokenized[i : i + batch_size]
        ids, attention, scored = padded_batch(
            [t.chosen for t in part] + [t.rejected for t in part], [t.prompt_len for t in part] * 2, pad_id
        )
        logps = sequence_logps(model, ids, attention, scored)
        chosen.append(logps[: len(part)])
        rejected.append(logps[len(part) :])
    return torch.cat(chosen), torch.cat(rejected)


def train_policy(policy, reference, tokenized: list[TokenizedPair], pad_id: int, rng: random.Random) -> list[float]:
    """DPO (sigmoid loss, beta = BETA) over all pairs for DPO_EPOCHS epochs; returns the mean loss per epoch."""
    ref_chosen, ref_rejected = pair_logps(reference, tokenized, pad_id)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=DPO_LR, weight_decay=0.0)
    policy.train()
    epoch_losses = []
    for _ in range(DPO_EPOCHS):
        order = rng.sample(range(len(tokenized)), len(tokenized))
        total = 0.0
        for start in range(0, len(order), DPO_BATCH):
            batch = order[start : start + DPO_BATCH]
            part = [tokenized[i] for i in batch]
            ids, attention, scored = padded_batch(
                [t.chosen for t in part] + [t.rejected for t in part], [t.prompt_len for t in part] * 2, pad_id
            )
            logps = sequence_logps(policy, ids, attention, scored)
            chosen_ratio = logps[: len(part)] - ref_chosen[batch]
            rejected_ratio = logps[len(part) :] - ref_rejected[batch]
            loss = -F.logsigmoid(BETA * (chosen_ratio - rejected_ratio)).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(batch)
        epoch_losses.append(total / len(order))
    policy.eval()
    return epoch_losses


def save_model(model, tokenizer, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


# -- verification -------------------------------------------------------------------------------------------------


@torch.no_grad()
def full_logits_logp(model, sequence: list[int], prompt_len: int) -> float:
    """Sum of response log-probs of one unpadded sequence: full logits, fp32 log-softmax."""
    ids = torch.tensor([sequence])
    logits = model(input_ids=ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
    return float(logps[prompt_len - 1 :].double().sum())


def score_saved_models(out: Path, pairs: list[Pair]) -> list[dict]:
    """Re-load the saved models and tokenizer and compute every pair's metrics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "models" / "reference")
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id, "the tokenizer must prepend BOS"
    reference = AutoModelForCausalLM.from_pretrained(out / "models" / "reference", dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(out / "models" / "policy", dtype=torch.float32).eval()
    rows = []
    for pair in pairs:
        tok = tokenize_pair(tokenizer, pair)
        ref_c = full_logits_logp(reference, tok.chosen, tok.prompt_len)
        ref_r = full_logits_logp(reference, tok.rejected, tok.prompt_len)
        pol_c = full_logits_logp(policy, tok.chosen, tok.prompt_len)
        pol_r = full_logits_logp(policy, tok.rejected, tok.prompt_len)
        rows.append({
            "id": pair.id, "category": pair.category,
            "chosen_tokens": len(tok.chosen) - tok.prompt_len, "rejected_tokens": len(tok.rejected) - tok.prompt_len,
            "ref_margin": ref_c - ref_r, "policy_margin": pol_c - pol_r,
            "reward_margin": BETA * ((pol_c - ref_c) - (pol_r - ref_r)),
            "chosen_logratio": pol_c - ref_c, "rejected_logratio": pol_r - ref_r,
        })
    return rows


def regime_shares(rows: list[dict]) -> dict[str, float]:
    """Share of pairs in each regime prefdiag reports (strict inequalities: exact ties count as neither)."""

    def share(test) -> float:
        return sum(1 for r in rows if test(r)) / len(rows)

    return {
        "ref_prefers_rejected": share(lambda r: r["ref_margin"] < 0),
        "reward_accuracy": share(lambda r: r["reward_margin"] > 0),
        "ranking_accuracy": share(lambda r: r["policy_margin"] > 0),
        "negative_margin_regime": share(lambda r: r["reward_margin"] > 0 and r["policy_margin"] < 0),
        "chosen_displaced": share(lambda r: r["chosen_logratio"] < 0),
        "both_displaced": share(lambda r: r["chosen_logratio"] < 0 and r["rejected_logratio"] < 0),
    }


def print_report(rows: list[dict], shares: dict[str, float], planted: dict[str, list]) -> None:
    """The verification table: regime shares overall and per category, planted ids, mislabeled margins."""
    print(f"\n{'regime':<26}{'share':>8}")
    for name, value in shares.items():
        print(f"{name:<26}{value:>8.1%}")
    print(f"\n{'category':<12}{'n':>4}{'ref<0':>8}{'reward>0':>10}{'policy>0':>10}{'NMR':>7}")
    for category in sorted({r["category"] for r in rows}):
        part = [r for r in rows if r["category"] == category]
        s = regime_shares(part)
        print(f"{category:<12}{len(part):>4}{s['ref_prefers_rejected']:>8.0%}{s['reward_accuracy']:>10.0%}"
              f"{s['ranking_accuracy']:>10.0%}{s['negative_margin_regime']:>7.0%}")
    by_id = {r["id"]: r for r in rows}
    print("\nplanted problems:")
    for name, ids in planted.items():
        print(f"  {name:<24}{ids}")
    print("\nmislabeled pairs after DPO (reward_margin should be clearly negative):")
    for pair_id in planted["mislabeled"]:
        r = by_id[pair_id]
        print(f"  {pair_id} {r['category']:<11} ref_margin {r['ref_margin']:8.2f}  "
              f"reward_margin {r['reward_margin']:7.2f}")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def check_data(pairs: list[Pair], rows: list[dict], planted: dict[str, list]) -> None:
    """The planted problems, and only they, trip the model-free data checks."""
    by_id = {p.id: p for p in pairs}
    triples = {}
    for p in pairs:
        triples.setdefault((p.prompt, p.chosen, p.rejected), []).append(p.id)
    duplicates = sorted(tuple(ids) for ids in triples.values() if len(ids) > 1)
    assert duplicates == sorted(tuple(sorted(ids)) for ids in planted["exact_duplicate"]), duplicates
    same = [p.id for p in pairs if " ".join(p.chosen.split()) == " ".join(p.rejected.split())]
    assert same == sorted(planted["chosen_equals_rejected"]), same
    near = [p.id for p in pairs if p.id not in same and edit_distance(p.chosen, p.rejected) <= 3]
    assert near == sorted(planted["near_identical"]), near
    assert [p.id for p in pairs if not p.chosen.strip() or not p.rejected.strip()] == planted["empty_rejected"]
    long_rows = [r for r in rows if r["chosen_tokens"] > 256 or r["rejected_tokens"] > 256]
    assert [r["id"] for r in long_rows] == planted["long_chosen"] and long_rows[0]["chosen_tokens"] > 300
    ratio = [r["id"] for r in rows if max(r["chosen_tokens"], r["rejected_tokens"])
             > 4 * min(r["chosen_tokens"], r["rejected_tokens"])]
    assert set(ratio) <= set(planted["long_chosen"] + planted["empty_rejected"]), ratio
    for original, conflict in planted["conflicting"]:
        a, b = by_id[original], by_id[conflict]
        assert a.prompt == b.prompt and (a.chosen, a.rejected) == (b.rejected, b.chosen)


def check_regimes(rows: list[dict], shares: dict[str, float], planted: dict[str, list]) -> None:
    """Loose bounds on the regimes the sample data exists to show."""
    assert 0.25 <= shares["ref_prefers_rejected"] <= 0.50, shares
    assert 0.10 <= shares["negative_margin_regime"] <= 0.30, shares
    assert shares["chosen_displaced"] >= 0.10, shares
    assert shares["reward_accuracy"] >= 0.70, shares
    assert shares["ranking_accuracy"] <= shares["reward_accuracy"] - 0.10, shares
    by_id = {r["id"]: r for r in rows}
    mislabeled = [by_id[i]["reward_margin"] for i in planted["mislabeled"]]
    assert sum(m < -1.0 for m in mislabeled) >= 8 and max(mislabeled) < 0, mislabeled


def check_sizes(out: Path) -> dict[str, int]:
    """Bytes in each model folder, which must stay around 2 MB at most."""
    sizes = {}
    for name in ("reference", "policy"):
        directory = out / "models" / name
        sizes[name] = sum(f.stat().st_size for f in directory.iterdir())
        assert sizes[name] <= 2_200_000, f"{directory} is {sizes[name]} bytes"
    return sizes


# -- main ---------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed every generator and pin torch to one thread and deterministic kernels: reruns are byte-identical."""
    from transformers.utils import logging as hf_logging

    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_everything(SEED)

    pairs, planted = build_pairs(SEED)
    write_pairs(pairs, out / "pairs.jsonl")
    print(f"wrote {len(pairs)} pairs to {out / 'pairs.jsonl'}")

    tokenizer = train_tokenizer([p.prompt + response + EOS for p in pairs for response in (p.chosen, p.rejected)])
    tokenized = [tokenize_pair(tokenizer, p) for p in pairs]
    print(f"tokenizer: {len(tokenizer)} tokens")

    rng = random.Random(SEED + 1)
    reference = new_model(tokenizer)
    sft_losses = train_reference(reference, sft_examples(pairs, tokenized, rng), tokenizer.pad_token_id, rng)
    print(f"reference SFT: {SFT_STEPS} steps, loss {sft_losses[0]:.2f} -> {sum(sft_losses[-20:]) / 20:.2f}")
    save_model(reference, tokenizer, out / "models" / "reference")

    policy = new_model(tokenizer)
    policy.load_state_dict(reference.state_dict())
    dpo_losses = train_policy(policy, reference, tokenized, tokenizer.pad_token_id, rng)
    print("policy DPO: loss per epoch " + ", ".join(f"{x:.3f}" for x in dpo_losses))
    save_model(policy, tokenizer, out / "models" / "policy")

    rows = score_saved_models(out, pairs)
    shares = regime_shares(rows)
    print_report(rows, shares, planted)
    check_data(pairs, rows, planted)
    check_regimes(rows, shares, planted)
    sizes = check_sizes(out)
    print(f"\nmodel folders: {sizes['reference']:,} and {sizes['policy']:,} bytes; "
          f"done in {time.perf_counter() - started:.0f}s, all checks passed")


if __name__ == "__main__":
    main()
