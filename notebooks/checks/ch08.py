"""Checks for the exercises of chapter 8 (the Triton kernel). Each prints one line: not done yet, what is off, or
correct, and returns True when the answer is right.

The references: the chapter's byte table written out as a formula, torch's own FLOP counter on the reference's
ops, `kernels.reference.lora_linear` itself, and time per step recomputed from tokens per second — each on more
than one input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minipeft.kernels import reference


def fused_minus_base_bytes(M: int, N: int, K: int, r: int, e: int) -> int:
    """The chapter's byte table (section 2): the fused route moves e·(MK + rK + 2Mr + Nr) bytes more than the base
    linear — x read a second time, A, S written and read back, and B."""
    return e * (M * K + r * K + 2 * M * r + N * r)


def check_shrink_bytes(fn) -> bool:
    """Exercise 1: fn(M, K, r, e) → (bytes read, bytes written) by S = x·Aᵀ."""
    if fn(16, 32, 4, 2) is None:
        print("Exercise 1: not done yet — fill in shrink_bytes.")
        return False
    for M, K, N, r, e in [(1, 4096, 4096, 16, 2), (4096, 768, 2304, 8, 2), (16384, 4096, 4096, 64, 2),
                          (37, 100, 60, 4, 4)]:
        answer = fn(M, K, r, e)
        if not (isinstance(answer, tuple) and len(answer) == 2):
            print(f"Exercise 1: return a pair (bytes read, bytes written); got {answer!r}.")
            return False
        read, written = answer
        epilogue_reads = e * (M * r + N * r)  # the fused GEMM then reads S and B once more
        if written != e * M * r:
            print(f"Exercise 1: at M={M}, r={r}, e={e} the shrink writes S, which is (M, r): {e * M * r} bytes, "
                  f"not {written}.")
            return False
        if read + written + epilogue_reads != fused_minus_base_bytes(M, N, K, r, e):
            hint = " (the element size e multiplies every count)" if read == M * K + r * K else ""
            print(f"Exercise 1: at M={M}, K={K}, r={r}, e={e}, reads {read} do not fit section 2's table: the shrink "
                  f"reads x (M × K) and A (r × K), e bytes each{hint}.")
            return False
    print("Exercise 1: correct — the shrink pass reads x once more, which is why it costs memory time at large M.")
    return True


def _counted_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def check_lowrank_flops(fn) -> bool:
    """Exercise 2: fn(M, K, N, r) → FLOPs of (x·Aᵀ)·Bᵀ, counted by torch's FlopCounterMode on the reference."""
    if fn(8, 16, 12, 4) is None:
        print("Exercise 2: not done yet — fill in lowrank_flops.")
        return False
    for M, K, N, r in [(8, 16, 12, 4), (33, 64, 48, 8), (5, 40, 24, 16)]:
        x, W, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(r, K), torch.randn(N, r)
        lowrank = _counted_flops(reference.lora_linear, x, W, None, A, B, 2.0) - _counted_flops(F.linear, x, W)
        if fn(M, K, N, r) != lowrank:
            print(f"Exercise 2: at M={M}, K={K}, N={N}, r={r} the counter finds {lowrank} FLOPs, you said "
                  f"{fn(M, K, N, r)}. Each matmul (a, b)·(b, c) costs 2·a·b·c.")
            return False
    K = N = 4096
    print(f"Exercise 2: correct — at K = N = {K}, r = 16 that is {fn(1, K, N, 16) / (2 * K * N):.2%} of the base "
          f"GEMM's FLOPs, fused or not.")
    return True


def check_lora_forward(fn) -> bool:
    """Exercise 3: fn(x, W, bias, A, B, scaling, dropout_mask=None) against kernels.reference.lora_linear."""
    g = torch.Generator().manual_seed(8)
    x, W, b = torch.randn(2, 5, 12, generator=g), torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    A, B = torch.randn(3, 12, generator=g), torch.randn(10, 3, generator=g)
    m = (torch.rand(2, 5, 12, generator=g) > 0.3).float() / 0.7
    if fn(x, W, b, A, B, 2.0) is None:
        print("Exercise 3: not done yet — fill in lora_forward.")
        return False

    def close(u, v):
        return u.shape == v.shape and torch.allclose(u, v, atol=1e-5)

    for bias, mask in [(b, None), (None, m), (b, m)]:
        got = fn(x, W, bias, A, B, 2.0, mask)
        want = reference.lora_linear(x, W, bias, A, B, 2.0, mask)
        if close(got, want):
            continue
        case = f"(bias {'given' if bias is not None else 'None'}, mask {'given' if mask is not None else 'None'})"
        if got.shape != want.shape:
            hint = (f"the output should have shape {tuple(want.shape)} (x's leading dims, then N), "
                    f"not {tuple(got.shape)}")
        elif close(got, reference.lora_linear(x, W, bias, A, B, 1.0, mask)):
            hint = "the LoRA term is missing its scaling s"
        elif mask is not None and close(got, reference.lora_linear(x, W, bias, A, B, 2.0)):
            hint = "the dropout mask is ignored: apply it to x on the LoRA branch"
        elif mask is not None and close(got, reference.lora_linear(x * m, W, bias, A, B, 2.0)):
            hint = "the mask reaches the base layer too: only the LoRA branch sees x ⊙ m"
        elif bias is not None and close(got, reference.lora_linear(x, W, None, A, B, 2.0, mask)):
            hint = "the bias is missing"
        else:
            hint = f"max |yours − reference| = {(got - want).abs().max():.2e}; check the order A then B"
        print(f"Exercise 3: not right yet {case}: {hint}.")
        return False
    print("Exercise 3: correct — the same numbers as kernels.reference.lora_linear, the oracle the kernels are "
          "tested against.")
    return True


def check_host_ms_removed(fn) -> bool:
    """Exercise 4: fn(tokens_per_step, eager_tokens_per_s, graphs_tokens_per_s) → ms per step removed."""
    if fn(1000, 1000.0, 2000.0) is None:
        print("Exercise 4: not done yet — fill in host_ms_removed.")
        return False
    for tokens, eager, graphs in [(1000, 1000.0, 2000.0), (7936, 131_506.0, 199_873.0), (512, 40_000.0, 38_000.0)]:
        want = 1e3 * tokens / eager - 1e3 * tokens / graphs
        got = fn(tokens, eager, graphs)
        if got is None or abs(got - want) > 1e-6 * max(1.0, abs(want)):
            hint = ("the sign is reversed: eager time minus graphs time" if got is not None and abs(got + want) < 1e-6
                    else "time per step = tokens per step ÷ tokens/s, in seconds; × 1000 for ms")
            print(f"Exercise 4: {tokens} tokens at {eager:,.0f} tokens/s eager and {graphs:,.0f} with graphs: "
                  f"{want:.3f} ms are removed, you said {got}; {hint}.")
            return False
    print("Exercise 4: correct — the difference of the two step times, each tokens ÷ throughput (it is negative "
          "when the graphs step is the slower one).")
    return True
