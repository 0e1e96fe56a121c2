"""Worked solutions to the exercises of the your-model chapter (notebooks/10_your_model.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from notebooks/:

    python solutions/10_your_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from minipeft.tokenizer import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch10 import (  # noqa: E402
    check_lora_trainable_parameters,
    check_merged_conv1d_weight,
    check_supervised_tokens,
)


# Exercise 1 — how many parameters LoRA trains on GPT-2.
def lora_trainable_parameters(n_layer: int, n_embd: int, r: int) -> int:
    """LoRA on every Linear of GPT-2's blocks: a pair A (r, in), B (out, r) per Linear, r·(in + out) parameters.

    Per block, with C = n_embd: c_attn C → 3C (4rC), attn.c_proj C → C (2rC), mlp.c_fc C → 4C (5rC) and
    mlp.c_proj 4C → C (5rC): 16·r·C. The output head is not adapted, and LoRA adds no bias.
    """
    C = n_embd
    linears = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]  # (in, out) of each adapted Linear of one block
    return n_layer * sum(r * (fan_in + fan_out) for fan_in, fan_out in linears)


# Exercise 2 — which tokens a completion row supervises.
def supervised_tokens(tokenizer, prompt: str, completion: str) -> list[int]:
    """The completion's tokens, then end-of-text: the targets a {"prompt", "completion"} row trains on.

    The prompt is encoded separately (after BOS) and only conditions the prediction; the completion is encoded on
    its own, which is why it starts with a space (GPT-2's BPE attaches the space to the word after it).
    """
    return tokenizer.encode(completion) + [tokenizer.eos_token_id]


# Exercise 3 — the merged weight, in transformers' layout.
def merged_conv1d_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W (out, in) + scaling·B (out, r)·A (r, in), transposed to GPT-2's Conv1D layout (in, out)."""
    return (W + scaling * (B @ A)).T  # (out, in) → (in, out)


def main() -> None:
    results = [check_lora_trainable_parameters(lora_trainable_parameters),
               check_supervised_tokens(supervised_tokens, ByteTokenizer()),
               check_merged_conv1d_weight(merged_conv1d_weight)]
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
