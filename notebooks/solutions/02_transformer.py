"""Worked solutions to the exercises of chapter 2 (notebooks/02_transformer.ipynb): the transformer.

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from notebooks/:

    python solutions/02_transformer.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch02 import (  # noqa: E402
    check_block_parameters,
    check_causal_attention,
    check_kv_cache_bytes,
    check_kv_cache_shape,
)

from minipeft import GPTConfig  # noqa: E402


# Exercise 1 — causal attention from scratch.
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scores q·kᵀ/√hs, −∞ where a key lies in the query's future, softmax over the keys, then a weighted sum of
    the values. The mask is the lower triangle: query i sees keys 0 … i."""
    T, hs = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, nh, T, T) @ (B, nh, T, hs) → (B, nh, T, hs)


# Exercise 2 — the parameters of one block.
def block_parameters(n_embd: int, bias: bool = True) -> int:
    """Weights: c_attn d·3d + attn.c_proj d·d + c_fc d·4d + mlp.c_proj 4d·d = 12d². Biases: 3d + d + 4d + d = 9d.
    Two LayerNorms: a weight of d each, and a bias of d each when bias=True. So 12d² + 13d, or 12d² + 2d."""
    d = n_embd
    if bias:
        return 12 * d * d + 9 * d + 2 * (2 * d)
    return 12 * d * d + 2 * d


# Exercise 3 — the shape of the KV cache.
def kv_cache_shape(config: GPTConfig, batch_size: int, n_tokens: int) -> tuple[int, int, int, int]:
    """The attention keeps k as (B, nh, T, hs) after splitting heads, and the cache stores exactly that."""
    return (batch_size, config.n_head, n_tokens, config.n_embd // config.n_head)


# Exercise 4 — how big the KV cache gets.
def kv_cache_bytes(config: GPTConfig, batch_size: int, n_tokens: int, bytes_per_element: int = 4) -> int:
    """Keys and values (× 2), in every layer, each B·nh·T·hs = B·T·n_embd elements."""
    return 2 * config.n_layer * batch_size * n_tokens * config.n_embd * bytes_per_element


def main() -> None:
    check_causal_attention(causal_attention)
    check_block_parameters(block_parameters)
    check_kv_cache_shape(kv_cache_shape)
    check_kv_cache_bytes(kv_cache_bytes)


if __name__ == "__main__":
    main()
