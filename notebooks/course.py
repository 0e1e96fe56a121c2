"""What every chapter shares: a deterministic start, and verdicts that are checked where they are stated.

A chapter states a verdict only from the numbers its cell just measured. When the verdict is a claim the chapter
builds on ("LoRA trains 0.3% of the weights", "merged LoRA adds no latency within the noise"), it goes through
`claim`: the sentence is printed when it holds and the chapter stops with the sentence when it does not — so a
re-run on another machine, or with a freshly pretrained base, cannot print a conclusion its numbers contradict.
The last cell calls `claims_report`, whose line tests/test_notebooks.py reads back from the executed notebook.

Claims that depend on training noise are measured over several seeds and phrased with their interval
(`minipeft.stats`); a claim about one run states only what that run shows.
"""

from __future__ import annotations

import random

import torch

CLAIMS: list[str] = []


def setup(seed: int = 0, threads: int = 1) -> None:
    """Seed Python's and torch's generators and fix the thread count (results depend on it), then say so.

    One thread: the models are small, and on a 2-core machine a second OpenMP thread mostly spin-waits.
    """
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    CLAIMS.clear()
    print(f"torch {torch.__version__} | {threads} thread(s) | seed {seed}")


def claim(held: bool, statement: str) -> None:
    """Print `statement` if `held`; otherwise stop the chapter, naming the claim that failed."""
    if not held:
        raise AssertionError(f"this chapter's claim did not hold on this run: {statement}")
    CLAIMS.append(statement)
    print(f"✓ {statement}")


def claims_report() -> None:
    """The chapter's last line: how many claims were checked (tests/test_notebooks.py reads it)."""
    print(f"{len(CLAIMS)} claims checked in this chapter, all held.")
