"""Checks for the exercises of chapter 5 (prefix tuning). Each prints one line: not done yet, what is off, or correct.

The references are the library's own: `PrefixEncoder.keys_values` for the reshape, the parameters of real
`PrefixEncoder` modules for the counts, and `GPT._attention_mask` with a prefix cache for the mask.
"""

from __future__ import annotations

import torch

from minipeft.model import GPT, KVCache
from minipeft.tuners.prefix import PrefixEncoder

# (B, n, L, nh, C): batch, virtual tokens, layers, heads, width; more than one shape so a hard-coded answer fails
RESHAPE_CASES = [(2, 10, 4, 4, 160), (3, 5, 2, 2, 64), (1, 7, 3, 6, 48)]


def _reference_past(P: torch.Tensor, L: int, nh: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each (B, nh, n, hs), row by row through the library's PrefixEncoder."""
    B, n, width = P.shape
    C = width // (2 * L)
    rows = [PrefixEncoder(n, L, nh, C, init=P[b]).keys_values() for b in range(B)]  # B × (L keys, L values)
    return [(torch.stack([r[0][layer] for r in rows]), torch.stack([r[1][layer] for r in rows])) for layer in range(L)]


def check_prefix_to_past(fn) -> None:
    """Exercise 1: fn(P (B, n, L·2·C), n_layer, n_head) → L pairs (keys, values), each (B, n_head, n, head_dim)."""
    g = torch.Generator().manual_seed(5)
    if fn(torch.randn(2, 10, 4 * 2 * 160, generator=g), 4, 4) is None:
        print("Exercise 1: not done yet — fill in prefix_to_past.")
        return
    for B, n, L, nh, C in RESHAPE_CASES:
        hs = C // nh
        P = torch.randn(B, n, L * 2 * C, generator=g)
        want = _reference_past(P, L, nh)
        got = fn(P, L, nh)
        case = f"(B={B}, n={n}, L={L}, n_head={nh}, C={C})"
        if not isinstance(got, (list, tuple)) or len(got) != L:
            print(f"Exercise 1: {case} expected a list of {L} (keys, values) pairs, one per layer; got "
                  f"{type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}.")
            return
        for layer, (pair, (k_ref, v_ref)) in enumerate(zip(got, want, strict=True)):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                print(f"Exercise 1: {case} layer {layer}: expected a pair (keys, values).")
                return
            k, v = pair
            if tuple(k.shape) != (B, nh, n, hs) or tuple(v.shape) != (B, nh, n, hs):
                print(f"Exercise 1: {case} layer {layer}: keys and values should be (B, n_head, n, head_dim) = "
                      f"{(B, nh, n, hs)}, got {tuple(k.shape)} and {tuple(v.shape)}. The attention wants heads before "
                      f"positions: a permute after the view.")
                return
            if torch.equal(k, k_ref) and torch.equal(v, v_ref):
                continue
            keys_first = P.view(B, n, 2, L, nh, hs)[:, :, :, layer].permute(2, 0, 3, 1, 4)  # (2, B, nh, n, hs)
            head_minor = P.view(B, n, L, 2, hs, nh)[:, :, layer].permute(2, 0, 4, 1, 3)  # (2, B, nh, n, hs)
            if torch.equal(k, v_ref) and torch.equal(v, k_ref):
                hint = "keys and values are swapped: within a layer's 2·C columns the key comes first"
            elif torch.equal(k, keys_first[0]) and torch.equal(v, keys_first[1]):
                hint = ("you read all layers' keys first, then all values; the columns go layer 0 key, layer 0 "
                        "value, layer 1 key, …: view as (B, n, L, 2, n_head, head_dim) or (B, n, 2L, n_head, "
                        "head_dim)")
            elif torch.equal(k, head_minor[0]) and torch.equal(v, head_minor[1]):
                hint = ("heads and head_dim are in the wrong order: each C-wide block is n_head heads of head_dim "
                        "numbers (head-major, like c_attn's output), so view (…, n_head, head_dim)")
            else:
                hint = (f"max |yours − library| = {max((k - k_ref).abs().max(), (v - v_ref).abs().max()):.2e}; "
                        "view P as (B, n, 2L, n_head, head_dim), permute to (2L, B, n_head, n, head_dim), "
                        "then take rows 2l and 2l+1")
            print(f"Exercise 1: {case} layer {layer}: {hint}.")
            return
    print("Exercise 1: correct — the same per-layer keys and values as PrefixEncoder.keys_values(), batch row by "
          "batch row, on three shapes.")


# (n, L, C, projection, H): H None means the MLP is C wide, as in the library's default
COUNT_CASES = [(10, 4, 160, False, None), (10, 4, 160, True, None), (5, 2, 64, True, 32), (3, 6, 48, True, 100),
               (20, 12, 768, False, None)]


def _reference_count(n: int, L: int, C: int, projection: bool, H: int | None) -> int:
    enc = PrefixEncoder(n, L, 1, C, prefix_projection=projection, encoder_hidden_size=H)
    return sum(p.numel() for p in enc.parameters())


def check_prefix_param_count(fn) -> None:
    """Exercise 2: fn(n, n_layer, n_embd, projection, hidden) → trainable parameters of the prefix encoder."""
    if fn(10, 4, 160, False, None) is None:
        print("Exercise 2: not done yet — fill in prefix_param_count.")
        return
    for n, L, C, proj, H in COUNT_CASES:
        want, got = _reference_count(n, L, C, proj, H), fn(n, L, C, proj, H)
        if got == want:
            continue
        h = C if H is None else H
        case = f"n={n}, L={L}, C={C}, " + (f"with the MLP (H={h})" if proj else "plain")
        if not proj and got == L * n * C:
            hint = "every layer stores a key AND a value per virtual token: a factor 2"
        elif proj and got == C * h + h + h * L * 2 * C + L * 2 * C:
            hint = "the MLP's input, the n embeddings E (n × C), is trained too"
        elif proj and got == n * C + C * h + h * L * 2 * C:
            hint = "both Linear layers have a bias (H and L·2·C numbers)"
        elif proj and got == L * 2 * n * C:
            hint = "that is the folded prefix P; while training, the encoder's own parameters are what is trained"
        else:
            hint = (f"the real module has {want:,d}; plain: L·2·n·C; with the MLP: the embeddings, then "
                    "Linear(C, H) and Linear(H, L·2·C), each with a bias")
        print(f"Exercise 2: {case}: you said {got:,d}; {hint}.")
        return
    print(f"Exercise 2: correct — for GPT-2 small's shape (L = 12, C = 768) a 20-token prefix is "
          f"{fn(20, 12, 768, False, None):,d} numbers; its training MLP (H = C) has "
          f"{fn(20, 12, 768, True, None):,d}, "
          f"{fn(20, 12, 768, True, None) / fn(20, 12, 768, False, None):.0f}× as many, dropped after training.")


def _reference_mask(attention_mask: torch.Tensor, n: int) -> torch.Tensor:
    B, T = attention_mask.shape
    nh, hs, L = 1, 1, 1
    prefix = KVCache.from_prefix([torch.zeros(B, nh, n, hs)] * L, [torch.zeros(B, nh, n, hs)] * L)
    return GPT._attention_mask(attention_mask.bool(), prefix, B, T, attention_mask.device)  # (B, 1, T, n+T)


def check_prefix_attention_mask(fn) -> None:
    """Exercise 3: fn(attention_mask (B, T) of 1/0, n) → bool (B, 1, T, n+T), True where a query may attend."""
    ones = torch.ones(1, 4, dtype=torch.long)
    if fn(ones, 2) is None:
        print("Exercise 3: not done yet — fill in prefix_attention_mask.")
        return
    cases = [(ones, 2),
             (torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 3),   # left padding, as in batched generation
             (torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]), 1)]  # right padding, as in training batches
    for mask, n in cases:
        B, T = mask.shape
        want = _reference_mask(mask, n)
        got = fn(mask, n)
        case = f"mask {mask.tolist()}, n={n}"
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (B, 1, T, n + T):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            print(f"Exercise 3: {case}: expected a (B, 1, T, n+T) = {(B, 1, T, n + T)} tensor (the 1 broadcasts over "
                  f"heads), got {shape}.")
            return
        got = got.bool()
        if torch.equal(got, want):
            continue
        if not got[..., :n].all():
            hint = "every query sees all n prefix entries: the first n columns are all True"
        elif (got[..., n:] & ~torch.ones(T, T, dtype=torch.bool).tril()).any():
            hint = "a query sees a later real token: among the real tokens the mask is causal (lower-triangular)"
        elif (got[..., n:] & ~want[..., n:]).any():
            hint = "a padded key is visible: hide the key columns where attention_mask is 0"
        elif not torch.diagonal(got[..., n:], dim1=-2, dim2=-1).all():
            hint = ("a padded query must see itself too: GPT's mask keeps the diagonal True (without a prefix that "
                    "keeps a left-padded query's softmax row from being all −∞, a NaN; with one it only changes what "
                    "the padded query computes)")
        else:
            hint = "a query misses an earlier real token it may attend to: keep causal entries whose key is real"
        print(f"Exercise 3: {case}: {hint}.")
        return
    print("Exercise 3: correct — the same mask GPT builds when the KV cache starts with a prefix (GPT._attention_mask),"
          " with left and right padding.")
