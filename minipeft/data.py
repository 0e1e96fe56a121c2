"""The built-in world: a synthetic language, a pretraining corpus about it, and three downstream tasks.

Everything is generated from a seed, so nothing is downloaded and every run sees the same data.

The world. 48 people with invented names (syllables glued together) each live in a city, work at
a job, keep a pet and have a favourite colour; some are friends. Cities lie near landmarks. The pretraining
corpus states these facts in many sentence templates ("Tobar lives in Velm.", "In Velm lives Tobar.",
"Tobar has a home in Velm."), mixes them into short paragraphs with small stories and descriptions of
places and food, and separates paragraphs with the end-of-text token. A 1-2M parameter GPT learns the
language and most of the facts in about two and a half CPU minutes.

The downstream tasks use formats the corpus never shows (`Review: … Sentiment:`, `Record: …`,
`Question: …`), so the base model has to be adapted before it can do them:

(a) ``sentiment`` (classification). A review of a dish or a place, two clauses built from polar words the
    corpus uses neutrally ("the soup was warm"), sometimes negated ("was not fresh"). The label is read off a
    verbalizer: the logit of ``g`` (good) against ``b`` (bad) at the answer position. Metric: accuracy;
    chance 0.5. Fair because the polarity of each word must be learned from the labelled examples.
(b) ``record`` (generation, exact match). Rewrite ``Record: name=Tobar; job=baker; city=Velm`` as
    ``Tobar is a baker from Velm.`` with fields in a random order. Names, jobs and cities are drawn
    independently (they are not the world's facts), so only the rule can be learned, not the answers.
    Metric: exact match of the greedy generation; chance 0.
(c) ``facts`` (knowledge). ``Question: Where does Tobar live? Answer: Tobar lives in`` → ``Velm`` (or the
    job, pet or colour). The people in the test split never appear in the training split, so fine-tuning
    can only teach how to answer: the facts themselves must come from what the base model learned in
    pretraining. Half of the people are test people: 96 test questions, so a score's 95% interval is about
    ±0.1. Metric: exact match; chance is one over the number of possible values (a model that answers in the
    right form but guesses the fact).

Your own data is a JSONL file instead (`load_jsonl`, minipeft/jsonl.py, re-exported here): `dataset_loss` is
its training loss, as `task_loss` is a built-in task's.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# load_jsonl is re-exported: `from minipeft.data import load_jsonl` is its public name
from minipeft.jsonl import JsonlDataset, load_jsonl, pad_right  # noqa: F401

SYLLABLES = ["ta", "bor", "vel", "mi", "ka", "ren", "lo", "su", "dan", "ri", "po", "mar", "ne", "gil",
             "ho", "zu", "fen", "li", "ra", "tom", "e", "an", "is", "ul", "or"]
JOBS = ["baker", "smith", "farmer", "sailor", "painter", "doctor", "teacher", "miner"]
PETS = ["cat", "dog", "owl", "goat", "horse", "fox", "crow", "frog"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
LANDMARKS = ["river", "forest", "mountain", "lake", "sea", "desert", "bridge", "castle"]
THINGS = ["bread", "soup", "tea", "fish", "cake", "wine", "room", "bed", "garden", "music"]
# Polar words for the sentiment task; the corpus also uses them, without any label.
POSITIVE = ["fresh", "warm", "kind", "clean", "sweet", "quiet", "bright", "tasty"]
NEGATIVE = ["stale", "cold", "rude", "dirty", "bitter", "noisy", "dark", "bland"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    color: str


@dataclass(frozen=True)
class World:
    people: tuple[Person, ...]
    cities: tuple[str, ...]
    landmarks: dict[str, str]  # city -> landmark it lies near
    friends: tuple[tuple[str, str], ...]


def make_name(rng: random.Random, n_syllables: int | None = None) -> str:
    n = n_syllables or rng.choice([2, 2, 3])
    return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


def build_world(seed: int = 0, n_people: int = 48, n_cities: int = 6) -> World:
    """The people, cities and friendships of the built-in world (deterministic in `seed`)."""
    rng = random.Random(f"world-{seed}")
    names: list[str] = []
    while len(names) < n_people + n_cities:
        name = make_name(rng)
        if name not in names and 3 <= len(name) <= 9:
            names.append(name)
    cities = tuple(names[n_people:])
    people = tuple(
        Person(name, rng.choice(cities), rng.choice(JOBS), rng.choice(PETS), rng.choice(COLORS))
        for name in names[:n_people]
    )
    landmarks = {c: rng.choice(LANDMARKS) for c in cities}
    pairs = {tuple(sorted(rng.sample(names[:n_people], 2))) for _ in range(n_people)}
    return World(people, cities, landmarks, tuple(sorted(pairs)))


# ---------------------------------------------------------------- the corpus
FACT_TEMPLATES = {
    "city": ["{n} lives in {v}.", "{n} is from {v}.", "In {v} lives {n}.", "{n} has a home in {v}.",
             "The home of {n} is in {v}.", "{n} was born in {v}."],
    "job": ["{n} is a {v}.", "{n} works as a {v}.", "By trade, {n} is a {v}.", "Everyone knows {n} the {v}.",
            "The {v} {n} works every day."],
    "pet": ["{n} has a {v}.", "{n} keeps a {v}.", "The {v} of {n} is old.", "{n} walks with a {v}."],
    "color": ["{n} likes the color {v}.", "The favorite color of {n} is {v}.", "{n} wears {v} clothes."],
}
STORY_TEMPLATES = [
    "{a} went to {c} and met {b}.", "{a} and {b} ate {t} together.", "{a} wrote a letter to {b}.",
    "One day {a} visited {c}.", "{a} sang a song about the {l}.", "{a} bought {t} in {c}.",
]
DESCRIPTION_TEMPLATES = [
    "The {t} in {c} was {w}.", "The {t} was {w} and the {t2} was {w2}.", "It was a {w} day near the {l}.",
    "The inn in {c} had {w} {t}.", "People say the {t} is {w} in {c}.",
]


def _biography(world: World, rng: random.Random) -> str:
    """Every fact about one person, each in a random template, in a random order."""
    p = rng.choice(world.people)
    attrs = list(FACT_TEMPLATES)
    rng.shuffle(attrs)
    return " ".join(rng.choice(FACT_TEMPLATES[a]).format(n=p.name, v=getattr(p, a)) for a in attrs)


def _paragraph(world: World, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return _biography(world, rng)
    sentences = []
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        p = rng.choice(world.people)
        if kind < 0.6:  # a fact about a person
            attr = rng.choice(list(FACT_TEMPLATES))
            sentences.append(rng.choice(FACT_TEMPLATES[attr]).format(n=p.name, v=getattr(p, attr)))
        elif kind < 0.7:  # a friendship
            a, b = rng.choice(world.friends)
            sentences.append(rng.choice(["{a} is a friend of {b}.", "{a} and {b} are friends."]).format(a=a, b=b))
        elif kind < 0.78:  # a place
            c = rng.choice(world.cities)
            sentences.append(rng.choice(["{c} is near the {l}.", "The {l} is close to {c}."])
                             .format(c=c, l=world.landmarks[c]))
        elif kind < 0.88:  # a small story
            b = rng.choice(world.people)
            sentences.append(rng.choice(STORY_TEMPLATES).format(
                a=p.name, b=b.name, c=rng.choice(world.cities), t=rng.choice(THINGS),
                l=rng.choice(LANDMARKS)))
        else:  # a description, with polar words but no verdict
            words = POSITIVE + NEGATIVE
            sentences.append(rng.choice(DESCRIPTION_TEMPLATES).format(
                t=rng.choice(THINGS), t2=rng.choice(THINGS), w=rng.choice(words), w2=rng.choice(words),
                c=rng.choice(world.cities), l=rng.choice(LANDMARKS)))
    return " ".join(sentences)


def pretraining_corpus(world: World, n_paragraphs: int = 20000, seed: int = 0) -> list[str]:
    """Paragraphs of the synthetic language; the caller joins them with end-of-text tokens."""
    rng = random.Random(f"corpus-{seed}")
    return [_paragraph(world, rng) for _ in range(n_paragraphs)]


def corpus_tokens(paragraphs: list[str], tokenizer) -> torch.Tensor:
    """One long 1-D stream of token ids: bos paragraph eos bos paragraph eos …"""
    ids: list[int] = []
    for text in paragraphs:
        ids.extend(tokenizer.encode(text, add_bos=True, add_eos=True))
    return torch.tensor(ids, dtype=torch.long)


def pretraining_batch(stream: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator):
    """Random windows of the stream: idx (B, T) and the next-token targets (B, T)."""
    starts = torch.randint(0, stream.numel() - block_size - 1, (batch_size,), generator=generator)
    idx = torch.stack([stream[s : s + block_size] for s in starts.tolist()])  # (B, T)
    targets = torch.stack([stream[s + 1 : s + 1 + block_size] for s in starts.tolist()])  # (B, T)
    return idx, targets


# ----------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class Example:
    prompt: str  # what the model is given
    answer: str  # what it must produce (or, for classification, the verbalizer word)


@dataclass
class Task:
    """A downstream task: splits of examples, how it is scored, and what chance would score."""

    name: str
    description: str
    metric: str  # "accuracy" (verbalizer classification) or "exact_match" (greedy generation)
    chance: float
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    choices: tuple[str, ...] = ()  # the verbalizer words, for classification
    discrete_prompt: str = ""  # a hand-written instruction: the "prompt engineering" baseline
    max_new_tokens: int = 16
    extra: dict = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}")
        return getattr(self, name)


def _sentiment_task(seed: int, sizes: tuple[int, int, int]) -> Task:
    rng = random.Random(f"sentiment-{seed}")

    def clause(good: bool) -> str:
        negate = rng.random() < 0.3
        word = rng.choice(NEGATIVE if good == negate else POSITIVE)  # "not stale" reads as good
        return f"the {rng.choice(THINGS)} was {'not ' if negate else ''}{word}"

    def example() -> Example:
        good = rng.random() < 0.5
        text = " and ".join(clause(good) for _ in range(rng.choice([1, 2])))
        return Example(f"Review: {text.capitalize()}. Sentiment: ", "good" if good else "bad")

    train, val, test = ([example() for _ in range(n)] for n in sizes)
    return Task("sentiment", "Is a review good or bad? Read off the verbalizer tokens 'g' and 'b'.",
                "accuracy", 0.5, train, val, test, choices=("good", "bad"),
                discrete_prompt="Good or bad? ", max_new_tokens=4)


def _record_task(seed: int, world: World, sizes: tuple[int, int, int]) -> Task:
    rng = random.Random(f"record-{seed}")
    names = [p.name for p in world.people]

    def example() -> Example:
        # Known words in random combinations: the answer cannot be recalled, only built by the rule.
        name, job, city = rng.choice(names), rng.choice(JOBS), rng.choice(world.cities)
        fields = [f"name={name}", f"job={job}", f"city={city}"]
        rng.shuffle(fields)
        return Example(f"Record: {'; '.join(fields)}. Sentence: ", f"{name} is a {job} from {city}.")

    train, val, test = ([example() for _ in range(n)] for n in sizes)
    return Task("record", "Rewrite a key=value record as one sentence.", "exact_match", 0.0, train, val, test,
                discrete_prompt="Rewrite as a sentence. ", max_new_tokens=40)


def _facts_task(seed: int, world: World, sizes: tuple[int, int, int]) -> Task:
    rng = random.Random(f"facts-{seed}")
    people = list(world.people)
    rng.shuffle(people)
    # Disjoint people per split: the answers for test people were only ever seen in pretraining. Half of the
    # people are test people, so the test split has 4 × 24 = 96 questions: an accuracy's 95% interval is ±0.1.
    n_test, n_val = len(people) // 2, len(people) // 8
    groups = {"test": people[:n_test], "validation": people[n_test : n_test + n_val],
              "train": people[n_test + n_val :]}
    # The answer starts by restating the question as a corpus sentence ("Tobar lives in"), given in the
    # prompt; the model completes it with the fact. Fine-tuning teaches the form; the fact must come from
    # pretraining, because test people never appear in the training split.
    questions = [("Where does {n} live?", "{n} lives in ", "city"), ("What is the job of {n}?", "{n} is a ", "job"),
                 ("Which pet does {n} keep?", "{n} keeps a ", "pet"),
                 ("What color does {n} like?", "{n} likes the color ", "color")]

    def examples(group: list[Person], n: int) -> list[Example]:
        out = []
        for i in range(n):
            p = group[i % len(group)]
            q, stem, attr = questions[(i // len(group)) % len(questions)]
            out.append(Example(f"Question: {q.format(n=p.name)} Answer: {stem.format(n=p.name)}", getattr(p, attr)))
        return out

    n_train, n_val_ex, n_test_ex = sizes
    per_person = len(questions)
    train = examples(groups["train"], min(n_train, per_person * len(groups["train"])))
    val = examples(groups["validation"], min(n_val_ex, per_person * len(groups["validation"])))
    test = examples(groups["test"], min(n_test_ex, per_person * len(groups["test"])))
    chance = (1 / len(world.cities) + 1 / len(JOBS) + 1 / len(PETS) + 1 / len(COLORS)) / per_person
    return Task("facts", "Answer a question about a person of the built-in world (test people are unseen "
                "in fine-tuning).", "exact_match", chance, train, val, test,
                discrete_prompt="Answer with one word from the stories. ", max_new_tokens=12,
                extra={"test_people": [p.name for p in groups["test"]]})


TASKS = ("sentiment", "record", "facts")


def load_task(name: str, seed: int = 0, sizes: tuple[int, int, int] = (1000, 100, 200)) -> Task:
    """One of TASKS with (train, validation, test) sizes; `facts` is capped by the number of people."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    if name == "sentiment":
        return _sentiment_task(seed, sizes)
    if name == "record":
        return _record_task(seed, build_world(seed), sizes)
    return _facts_task(seed, build_world(seed), sizes)


def encode_examples(examples: list[Example], tokenizer, block_size: int, prefix: str = "",
                    verbalizer_only: bool = False):
    """Tensors for supervised fine-tuning: only the answer (and eos) tokens are predicted.

    Returns idx (B, T), targets (B, T) with -100 on prompt and padding positions, and attention_mask
    (B, T) — right-padded with the pad token. Sequence: bos · prefix · prompt · answer · eos.
    With `verbalizer_only` (classification), only the answer's first token is a target: the loss is then
    the cross-entropy of exactly the logit that evaluation reads.
    """
    rows, tgts = [], []
    for ex in examples:
        p = tokenizer.encode(prefix + ex.prompt, add_bos=True)
        a = tokenizer.encode(ex.answer, add_eos=True)
        seq = p + a
        if len(seq) > block_size:
            raise ValueError(f"example is {len(seq)} tokens but block_size is {block_size}: {ex.prompt!r}")
        # targets are already shifted: position t predicts token t+1
        tgt = [-100] * (len(p) - 1) + ([a[0]] + [-100] * (len(a) - 1) if verbalizer_only else a) + [-100]
        rows.append(seq)
        tgts.append(tgt[: len(seq)])
    return pad_right(rows, tgts, tokenizer.pad_token_id)


def verbalizer_loss(choice_ids: list[int]) -> Callable[..., torch.Tensor]:
    """Cross-entropy over the verbalizer tokens only, at each row's answer position: a `loss_fn(net, idx,
    targets, attention_mask)` for minipeft.train.train.

    For classification read off a verbalizer (logit of "g" vs "b"), the natural training loss is the one the
    evaluation reads: softmax over the choices' first tokens, not over the whole vocabulary (PET, Schick &
    Schütze 2021, https://arxiv.org/abs/2001.07676). With a frozen base this learns several times faster,
    because no step is spent pushing the other 258 tokens' probability down. Expects batches whose targets
    mark exactly one position per row (`encode_examples(..., verbalizer_only=True)`).
    """
    ids = torch.tensor(choice_ids)

    def loss_fn(net, idx, targets, attention_mask):
        logits, _ = net(idx, attention_mask=attention_mask)  # (B, T, vocab)
        rows = torch.arange(idx.shape[0], device=idx.device)
        pos = (targets != -100).int().argmax(dim=1)  # (B,) the position that predicts the answer
        choice_ids_ = ids.to(idx.device)
        label = (targets[rows, pos, None] == choice_ids_).int().argmax(dim=1)  # (B,) index of the right choice
        return F.cross_entropy(logits[rows, pos][:, choice_ids_].float(), label)

    return loss_fn


def task_loss(task: Task, tokenizer) -> Callable[..., torch.Tensor] | None:
    """The training loss a task wants: the verbalizer cross-entropy for classification, else None (the
    model's own next-token loss on the answer)."""
    if task.metric != "accuracy":
        return None
    return verbalizer_loss([tokenizer.encode(c)[0] for c in task.choices])


def dataset_loss(dataset: JsonlDataset) -> Callable[..., torch.Tensor] | None:
    """The training loss a JSONL dataset wants: the verbalizer cross-entropy over its labels' first tokens for
    the classification format, else None (the model's own next-token loss on the supervised tokens)."""
    if not isinstance(dataset, JsonlDataset):
        raise TypeError(f"dataset_loss expects a JsonlDataset (from load_jsonl), got {type(dataset).__name__}")
    return verbalizer_loss(list(dataset.choice_ids)) if dataset.format == "classification" else None


def task_batch(task: Task, tokenizer, batch_size: int, block_size: int, generator: torch.Generator,
               prefix: str = ""):
    """A random training batch of the task (idx, targets, attention_mask)."""
    pick = torch.randint(0, len(task.train), (batch_size,), generator=generator).tolist()
    return encode_examples([task.train[i] for i in pick], tokenizer, block_size, prefix,
                           verbalizer_only=task.metric == "accuracy")
