"""The base model every chapter fine-tunes: a small GPT pretrained on the built-in corpus, cached on disk.

Pretraining is plain next-token prediction on random windows of the corpus stream,
L = −(1/N) Σₜ log p(xₜ₊₁ | x≤ₜ). The result is written once to a cache directory (MINIPEFT_CACHE, else
~/.cache/minipeft) in GPT-2's file layout and reused by every later command; no weights are committed.
Presets: "default" (≈1.3M parameters, about two and a half minutes on a 2-core CPU) and "tiny" (for tests).
Pretraining always runs with PRETRAIN_THREADS intra-op threads, whatever the caller set: a CPU reduction splits
its work by thread count, so the same seed gives the same model — in the tests, in the notebooks and in the CLI —
only if the thread count is fixed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from minipeft.checkpoint import save_json
from minipeft.data import build_world, corpus_tokens, pretraining_batch, pretraining_corpus
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, TrainResult, resolve_device, train

PRESETS: dict[str, tuple[GPTConfig, TrainConfig, int]] = {
    # (model, schedule, corpus paragraphs)
    "default": (GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=160),
                TrainConfig(steps=1000, lr=3e-3, batch_size=16, warmup_steps=30), 20000),
    "tiny": (GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64),
             TrainConfig(steps=150, lr=5e-3, batch_size=16, warmup_steps=10), 4000),
}
PRETRAIN_THREADS = 2
CACHE_VERSION = 2  # bump when the data or the architecture changes, so old caches are not reused


def cache_dir() -> Path:
    """Where base models are cached: $MINIPEFT_CACHE, else ~/.cache/minipeft."""
    return Path(os.environ.get("MINIPEFT_CACHE") or Path.home() / ".cache" / "minipeft")


def base_dir(preset: str = "default", seed: int = 0) -> Path:
    return cache_dir() / f"base-{preset}-seed{seed}-v{CACHE_VERSION}"


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown base preset {preset!r}; available: {', '.join(PRESETS)}")


def pretrain(preset: str = "default", seed: int = 0, device: str = "auto", steps: int | None = None,
             progress: bool = True) -> tuple[GPT, TrainResult]:
    """Train the preset's GPT from scratch on the built-in corpus (does not touch the cache)."""
    _check_preset(preset)
    model_cfg, train_cfg, n_paragraphs = PRESETS[preset]
    train_cfg = TrainConfig(**{**asdict(train_cfg), "seed": seed, **({"steps": steps} if steps else {})})
    tok = ByteTokenizer()
    stream = corpus_tokens(pretraining_corpus(build_world(seed), n_paragraphs, seed), tok)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(resolve_device(device))
    T = model_cfg.block_size

    def get_batch(generator: torch.Generator):
        idx, targets = pretraining_batch(stream, train_cfg.batch_size, T, generator)
        return idx, targets, None

    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        result = train(model, get_batch, train_cfg, progress=progress, desc=f"pretrain {preset}")
    finally:
        torch.set_num_threads(threads)
    return model, result


def load_base(preset: str = "default", seed: int = 0, device: str = "cpu", train_if_missing: bool = True,
              progress: bool = True) -> GPT:
    """The cached base model, pretraining (and caching) it first if there is none."""
    _check_preset(preset)
    directory = base_dir(preset, seed)
    # pretrain.json is the cache's last file (pretrain_and_cache writes it after the model): a save that was
    # killed before it leaves a cache that is made again, not one that fails to load
    if not (directory / "pretrain.json").is_file():
        if not train_if_missing:
            raise ValueError(f"no cached base model at {directory}; run `minipeft pretrain --preset {preset}`")
        pretrain_and_cache(preset, seed, device="auto", progress=progress)
    model = GPT.from_pretrained(directory)
    return model.to(resolve_device(device)).eval()


def pretrain_and_cache(preset: str = "default", seed: int = 0, device: str = "auto", steps: int | None = None,
                       progress: bool = True) -> dict:
    """Pretrain, write the model to the cache, and return a record of the run (also saved as JSON)."""
    model, result = pretrain(preset, seed, device, steps, progress)
    directory = base_dir(preset, seed)
    model.cpu().save_pretrained(directory)
    tail = result.losses[-20:]
    record = {"preset": preset, "seed": seed, "steps": len(result.losses), "final_loss": sum(tail) / len(tail),
              "first_loss": result.losses[0], "seconds": result.seconds,
              "tokens_per_second": result.tokens_per_second, "parameters": model.num_parameters(),
              "threads": PRETRAIN_THREADS, "torch": torch.__version__}
    save_json(record, directory / "pretrain.json")
    return record


def pretrain_record(preset: str = "default", seed: int = 0) -> dict | None:
    path = base_dir(preset, seed) / "pretrain.json"
    return json.loads(path.read_text()) if path.is_file() else None
