"""Worked solutions to the exercises of the prefix-tuning chapter (notebooks/05_prefix_tuning.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from notebooks/:

    python solutions/05_prefix_tuning.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch05 import check_prefix_attention_mask, check_prefix_param_count, check_prefix_to_past  # noqa: E402


# Exercise 1 — the prefix reshape.
def prefix_to_past(P: torch.Tensor, n_layer: int, n_head: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """P (B, n, L·2·C) → L pairs (keys, values), each (B, n_head, n, head_dim).

    The columns of one virtual token run layer 0 key, layer 0 value, layer 1 key, …, each C wide and head-major
    (n_head blocks of head_dim), so a view splits them into 2L blocks of heads; a permute then puts the heads
    before the positions, the layout the attention's q·kᵀ wants.
    """
    B, n, width = P.shape
    C = width // (2 * n_layer)
    hs = C // n_head
    kv = P.view(B, n, 2 * n_layer, n_head, hs).permute(2, 0, 3, 1, 4)  # (2L, B, nh, n, hs)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(n_layer)]


# Exercise 2 — the parameter count, with and without the reparameterisation MLP.
def prefix_param_count(n: int, n_layer: int, n_embd: int, projection: bool = False, hidden: int | None = None) -> int:
    """Trainable numbers of a prefix encoder.

    Plain: P itself, n rows of L·2·C.  With the MLP: the n embeddings E (n·C), Linear(C, H) (C·H weights + H
    biases) and Linear(H, L·2·C) (H·L·2·C + L·2·C) — P is computed from them and not stored while training.
    """
    flat = n_layer * 2 * n_embd  # L·2·C: one virtual token's keys and values in every layer
    if not projection:
        return n * flat
    H = n_embd if hidden is None else hidden
    return n * n_embd + (n_embd * H + H) + (H * flat + flat)


# Exercise 3 — the attention mask with a prefix.
def prefix_attention_mask(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) of 1/0 → bool (B, 1, T, n+T): True where query t may attend to key s.

    Keys 0 … n−1 are the prefix, visible to every query. Among the real tokens: causal (s ≤ t) and only real
    keys; each query also sees itself, as in GPT._attention_mask. That diagonal is what keeps a left-padded query's
    softmax row from being empty (a NaN) when there is no prefix (n = 0); with a prefix every row already has the n
    prefix keys, and the diagonal only changes what a padded query computes (an output the loss ignores).
    """
    B, T = attention_mask.shape
    valid = attention_mask.bool()  # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    real = (causal[None] & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)  # (B, T, T)
    prefix = torch.ones(B, T, n, dtype=torch.bool)  # (B, T, n)
    return torch.cat([prefix, real], dim=2)[:, None]  # (B, 1, T, n+T)


def main() -> None:
    check_prefix_to_past(prefix_to_past)
    check_prefix_param_count(prefix_param_count)
    check_prefix_attention_mask(prefix_attention_mask)


if __name__ == "__main__":
    main()
