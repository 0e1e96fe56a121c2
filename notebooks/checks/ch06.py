"""Checks for the exercises of chapter 6 (prompt tuning and P-tuning). Each prints one line: not done yet, what is
off, or correct.

The references are the library's own: GPT's forward with `prompt_embeds` for the prepending, the parameters of
real `PTuningEmbedding` modules for the counts, and `init_prompt_embeddings(..., "TEXT")` for the text init.
"""

from __future__ import annotations

import torch

from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.tuners.prompt import PTuningEmbedding, init_prompt_embeddings


def _tiny_gpt() -> GPT:
    torch.manual_seed(6)
    return GPT(GPTConfig(block_size=32, vocab_size=260, n_layer=2, n_head=2, n_embd=16)).eval()


def check_prepend_soft_prompt(fn) -> None:
    """Exercise 1: fn(P (n, C), tok_emb (B, T, C), attention_mask (B, T)) → (x (B, n+T, C), mask (B, n+T))."""
    g = torch.Generator().manual_seed(6)
    if fn(torch.randn(3, 16, generator=g), torch.randn(2, 5, 16, generator=g), torch.ones(2, 5)) is None:
        print("Exercise 1: not done yet — fill in prepend_soft_prompt.")
        return
    gpt = _tiny_gpt()
    cases = [(3, torch.ones(2, 5, dtype=torch.long)), (4, torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])),
             (1, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))]  # (n, attention_mask): padding on the right
    for n, mask in cases:
        B, T = mask.shape
        P = torch.randn(n, 16, generator=g)
        idx = torch.randint(0, 260, (B, T), generator=g)
        tok_emb = gpt.transformer.wte(idx).detach()  # (B, T, C)
        case = f"(n={n}, B={B}, T={T})"
        got = fn(P, tok_emb, mask)
        if not (isinstance(got, tuple) and len(got) == 2):
            print(f"Exercise 1: {case} return a pair (embeddings, mask); got {type(got).__name__}.")
            return
        x, m = got
        if tuple(x.shape) != (B, n + T, 16):
            print(f"Exercise 1: {case} the embeddings should be (B, n+T, C) = {(B, n + T, 16)}, got {tuple(x.shape)}: "
                  f"expand P to every row of the batch, then concatenate along the sequence (dim 1).")
            return
        if torch.equal(x, torch.cat([tok_emb, P.expand(B, -1, -1)], 1)):
            print(f"Exercise 1: {case} the soft prompt goes in FRONT of the tokens: [P ; wte(x)], positions 0 … n−1.")
            return
        if not torch.equal(x, torch.cat([P.expand(B, -1, -1), tok_emb], 1)):
            print(f"Exercise 1: {case} the embeddings are not [P ; tok_emb] row by row: the first n positions of "
                  f"every row are P, then the row's own token embeddings, unchanged.")
            return
        if tuple(m.shape) != (B, n + T):
            print(f"Exercise 1: {case} the mask should grow with the sequence to (B, n+T) = {(B, n + T)}, got "
                  f"{tuple(m.shape)}.")
            return
        if not m[:, :n].bool().all():
            print(f"Exercise 1: {case} the virtual tokens are always real: the first n mask columns are 1 (True).")
            return
        if not torch.equal(m[:, n:].bool(), mask.bool()):
            print(f"Exercise 1: {case} after the n prompt columns, the mask is the input's own attention_mask.")
            return
        with torch.no_grad():  # the end-to-end test: yours through the plain GPT against GPT's own prompt_embeds path
            yours = gpt(inputs_embeds=x, attention_mask=m.long())[0][:, n:]  # logits of the real tokens
            library = gpt(idx, attention_mask=mask, prompt_embeds=P)[0]
        diff = (yours - library).abs().max()
        if diff > 1e-5:
            print(f"Exercise 1: {case} your inputs give logits {diff:.1e} away from GPT's prompt_embeds path.")
            return
    print("Exercise 1: correct — through the frozen GPT your [P ; wte(x)] and mask give the same logits as its own "
          "prompt_embeds path, with and without padding.")


def _reference_ptuning(n: int, C: int, H: int) -> int:
    return sum(p.numel() for p in PTuningEmbedding(n, C, H, "MLP").parameters())


def check_ptuning_mlp_params(fn) -> None:
    """Exercise 2: fn(n, C, H) → trainable parameters of P-tuning with the MLP encoder."""
    if fn(16, 160, 128) is None:
        print("Exercise 2: not done yet — fill in ptuning_mlp_params.")
        return
    for n, C, H in [(16, 160, 128), (10, 64, 32), (20, 768, 768), (3, 48, 100)]:
        want, got = _reference_ptuning(n, C, H), fn(n, C, H)
        if got == want:
            continue
        if got == want - n * C:
            hint = "the n seed embeddings the encoder reads (n × C) are trained too"
        elif got == C * H + H * H + H * C + n * C:
            hint = "each of the three Linear layers has a bias (H, H and C numbers)"
        elif got == n * C + (C * H + H) + (H * C + C):
            hint = "peft's MLP encoder has three Linear layers: C → H, H → H, H → C"
        elif got == n * C:
            hint = "n·C is prompt tuning; P-tuning trains the encoder that produces the n vectors, and its seeds"
        else:
            hint = (f"the real module has {want:,d}: seeds n·C, then Linear(C, H), Linear(H, H), Linear(H, C), "
                    "each with a bias")
        print(f"Exercise 2: n={n}, C={C}, H={H}: you said {got:,d}; {hint}.")
        return
    n, C, H = 20, 768, 768
    print(f"Exercise 2: correct — at GPT-2 small's width (C = {C}, H = {H}, n = {n}) P-tuning trains {fn(n, C, H):,d} "
          f"numbers against prompt tuning's n·C = {n * C:,d}, {fn(n, C, H) / (n * C):.0f}× as many; after training "
          f"`fold()` keeps only the n·C.")


def check_text_init(fn) -> None:
    """Exercise 3: fn(wte (V, C), ids list[int], n) → (n, C): the ids' embeddings, repeated then cut to n."""
    g = torch.Generator().manual_seed(7)
    wte = torch.randn(260, 12, generator=g)
    tok = ByteTokenizer()
    if fn(wte, tok.encode("Answer"), 8) is None:
        print("Exercise 3: not done yet — fill in text_init.")
        return
    for text, n in [("Answer with one word. ", 16), ("Answer", 16), ("Answer with one word from the stories. ", 8),
                    ("abcd", 4)]:
        ids = tok.encode(text)
        want = init_prompt_embeddings(wte, n, "TEXT", text, tokenizer=tok)
        got = fn(wte, ids, n)
        case = f"text {text!r} ({len(ids)} tokens), n={n}"
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (n, 12):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            hint = ("repeat the ids until there are at least n, then cut to n" if len(ids) < n
                    else "keep only the first n ids")
            print(f"Exercise 3: {case}: expected shape (n, C) = {(n, 12)}, got {shape}; {hint}.")
            return
        if torch.equal(got, want):
            continue
        if len(ids) < n and torch.equal(got[: len(ids)], want[: len(ids)]):
            hint = "the first pass over the text is right; after it, start again from the text's first token"
        else:
            hint = "row i is wte[ids[i mod len(ids)]]: the embedding rows of the text's tokens, in order"
        print(f"Exercise 3: {case}: {hint}.")
        return
    print("Exercise 3: correct — the same soft prompt as init_prompt_embeddings(..., 'TEXT'), for texts shorter and "
          "longer than n.")
