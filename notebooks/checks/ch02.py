"""Checks for the exercises of chapter 2 (the transformer). Each prints one line: not done yet, what is off, or
correct.

The references are PyTorch's `F.scaled_dot_product_attention(is_causal=True)` for attention, the parameters of
real `minipeft.model.Block` modules for the count, and the tensors of a real `KVCache` after a forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minipeft import GPT, GPTConfig
from minipeft.model import Block, KVCache

# (B, nh, T, hs): more than one shape, so that a hard-coded answer fails
ATTENTION_SHAPES = [(2, 4, 7, 8), (1, 2, 16, 40), (3, 1, 1, 5)]
CACHE_CONFIGS = [GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=260, block_size=64),
                 GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=100, block_size=32),
                 GPTConfig(n_layer=1, n_head=8, n_embd=64, vocab_size=260, block_size=16)]
CACHE_CASES = [(0, 2, 10), (1, 1, 32), (2, 3, 5)]  # (config index, batch size, tokens)


def check_causal_attention(fn) -> None:
    """Exercise 1: fn(q, k, v) → causal attention output, all (B, nh, T, hs)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    if fn(q, k, v) is None:
        print("Exercise 1: not done yet — fill in causal_attention.")
        return
    close = lambda a, b: a.shape == b.shape and torch.allclose(a, b, atol=1e-5)  # noqa: E731
    for shape in ATTENTION_SHAPES:
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = fn(q, k, v)
        if close(got, want):
            continue
        case, T = f"(B, nh, T, hs) = {shape}", shape[2]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            hint = f"the output should have q's shape {shape}, got {getattr(got, 'shape', type(got).__name__)}"
        elif close(got, F.scaled_dot_product_attention(q, k, v)):
            hint = "the causal mask is missing: query i may only see keys j ≤ i (-inf above the diagonal)"
        elif close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)):
            hint = "the scores are not scaled: divide q·kᵀ by √head_dim"
        elif close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(T))):
            hint = "the scale uses T; it is √head_dim, the last dimension of q"
        elif close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(T, T).triu().bool())):
            hint = "the mask is flipped: keep the lower triangle (tril), so query i sees keys 0 … i"
        else:
            hint = f"max |yours − reference| = {(got - want).abs().max():.2e}; softmax over the last dim (the keys)"
        print(f"Exercise 1: not right yet at {case}: {hint}.")
        return
    print("Exercise 1: correct — the same numbers as F.scaled_dot_product_attention(is_causal=True), the fused call "
          "CausalSelfAttention makes.")


def check_block_parameters(fn) -> None:
    """Exercise 2: fn(n_embd, bias) → parameters of one Block."""
    if fn(64, True) is None:
        print("Exercise 2: not done yet — fill in block_parameters.")
        return
    for d, bias in [(64, True), (160, True), (48, False), (768, True)]:
        want = sum(p.numel() for p in Block(GPTConfig(n_embd=d, n_head=4, bias=bias)).parameters())
        got = fn(d, bias)
        if got == want:
            continue
        if bias and got == 12 * d * d:
            hint = "that is the weight matrices alone: add the biases (3d + d + 4d + d) and the LayerNorms (2 × 2d)"
        elif bias and got == 12 * d * d + 9 * d:
            hint = "the two LayerNorms are missing: each has a weight and a bias of d numbers"
        elif not bias and got == 12 * d * d + 13 * d:
            hint = "with bias=False the Linears have no biases and each LayerNorm only its weight (d)"
        else:
            hint = "c_attn d → 3d, attn.c_proj d → d, c_fc d → 4d, mlp.c_proj 4d → d, plus ln_1 and ln_2"
        print(f"Exercise 2: a block of width {d} (bias={bias}) has {want:,d} parameters, you said {got!r}. "
              f"Hint: {hint}.")
        return
    print("Exercise 2: correct — 12d² + 13d with biases (12d² + 2d without): GPT-2 small's blocks hold 7.1M each, "
          "85M of its 124M together.")


def _run_cache(config_index: int, batch_size: int, n_tokens: int) -> tuple[GPTConfig, KVCache]:
    config = CACHE_CONFIGS[config_index]
    torch.manual_seed(config_index)
    model = GPT(config).eval()
    cache = KVCache(config.n_layer, batch_size)
    idx = torch.randint(0, config.vocab_size, (batch_size, n_tokens))  # (B, T)
    with torch.no_grad():
        model(idx, kv_cache=cache)
    return config, cache


def check_kv_cache_shape(fn) -> None:
    """Exercise 3: fn(config, batch_size, n_tokens) → the shape of one layer's cached keys."""
    if fn(CACHE_CONFIGS[0], 2, 10) is None:
        print("Exercise 3: not done yet — fill in kv_cache_shape.")
        return
    for case in CACHE_CASES:
        config, cache = _run_cache(*case)
        want = tuple(cache.keys[0].shape)
        got = fn(config, case[1], case[2])
        got = tuple(got) if isinstance(got, (tuple, list, torch.Size)) else got
        if got == want:
            continue
        B, T, nh, hs = case[1], case[2], config.n_head, config.n_embd // config.n_head
        if got == (B, T, nh, hs):
            hint = "heads come before positions in the cache, as in the attention: (B, n_head, T, head_dim)"
        elif got == (B, T, config.n_embd):
            hint = "the cache keeps keys split into heads, (B, n_head, T, head_dim), ready for the next step"
        else:
            hint = "one tensor per layer, batch first, then heads, then positions, then head_dim = n_embd // n_head"
        print(f"Exercise 3: B={B}, T={T}, n_head={nh}, n_embd={config.n_embd}: the cache holds {want}, you said "
              f"{got!r}. Hint: {hint}.")
        return
    print("Exercise 3: correct — (B, n_head, T, head_dim) per layer, for keys and for values alike.")


def check_kv_cache_bytes(fn) -> None:
    """Exercise 4: fn(config, batch_size, n_tokens, bytes_per_element) → bytes of every cached key and value."""
    if fn(CACHE_CONFIGS[0], 2, 10, 4) is None:
        print("Exercise 4: not done yet — fill in kv_cache_bytes.")
        return
    for case in CACHE_CASES:
        config, cache = _run_cache(*case)
        want = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        got = fn(config, case[1], case[2], 4)
        if got == want:
            continue
        if got * 2 == want:
            hint = "keys and values are both cached: twice the keys' size"
        elif got * config.n_layer == want:
            hint = "every layer has its own keys and values: multiply by n_layer"
        else:
            hint = "2 (keys, values) × n_layer × B × T × n_embd elements, bytes_per_element each"
        print(f"Exercise 4: config {case[0] + 1}, B={case[1]}, T={case[2]}: the cache holds {want:,d} bytes, you said "
              f"{got!r}. Hint: {hint}.")
        return
    gpt2 = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
    mb = fn(gpt2, 1, 1024, 2) / 2**20
    print(f"Exercise 4: correct — GPT-2 small's fp16 cache for one 1024-token sequence takes {mb:.0f} MiB, growing "
          "linearly with batch and context.")
