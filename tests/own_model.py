"""Fixtures for the "your model, your data" tests, built inside the tests (nothing downloaded): a random GPT-2
with odd sizes saved by transformers, a small byte-level BPE trained with `tokenizers` on built-in text and
saved as tokenizer.json beside it, and JSONL files of each row format made from the built-in tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from minipeft.data import NEGATIVE, POSITIVE, THINGS, build_world, load_task, pretraining_corpus

# The BPE's vocabulary: big enough that the built-in world's words are single tokens (what a frozen random base
# needs to learn the reviews' labels in a CI-sized run); the model's is a little larger (a checkpoint may pad it).
VOCAB_SIZE = 701
MODEL_VOCAB = 707
EOT_ID = 0  # <|endoftext|>, the BPE's only special token, comes first


def corpus_text(n: int = 400) -> list[str]:
    return pretraining_corpus(build_world(0), n, seed=0)


def train_bpe(directory: Path) -> Path:
    """A byte-level BPE (GPT-2's kind) with <|endoftext|>, trained on built-in text; returns tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    reviews = [ex.prompt + ex.answer for ex in load_task("sentiment", sizes=(200, 0, 0)).train]
    tok.train_from_iterator(corpus_text() + reviews, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def save_gpt2(directory: Path, seed: int = 0):
    """A random transformers GPT-2 with odd sizes (3 heads of 12, 70 positions), saved as safetensors."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=3, n_embd=36, n_positions=70, vocab_size=MODEL_VOCAB,
                                     bos_token_id=EOT_ID, eos_token_id=EOT_ID)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def text_rows(n: int = 24) -> list[dict]:
    return [{"text": t[:120]} for t in corpus_text(n)]


def completion_rows(n: int = 24, seed: int = 0) -> list[dict]:
    task = load_task("record", seed=seed, sizes=(n, 1, 1))
    return [{"prompt": ex.prompt, "completion": ex.answer} for ex in task.train]


def review_rows(n: int, seed: int = 0, bpe: bool = True) -> list[dict]:
    """Reviews whose label the polar word decides ("The soup was fresh. Sentiment:" → " good"). For a BPE the
    label carries its leading space (one word token); for bytes the text does (labels start with g / b)."""
    rng = random.Random(f"reviews-{seed}")
    rows = []
    for _ in range(n):
        good = rng.random() < 0.5
        word = rng.choice(POSITIVE if good else NEGATIVE)
        label = "good" if good else "bad"
        text = f"Review: the {rng.choice(THINGS)} was {word}. Sentiment:"
        rows.append({"text": text, "label": " " + label} if bpe else {"text": text + " ", "label": label})
    return rows
