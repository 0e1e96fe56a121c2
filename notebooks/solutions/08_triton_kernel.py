"""Worked solutions to the exercises of the Triton-kernel chapter (notebooks/08_triton_kernel.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from the repository root:

    python notebooks/solutions/08_triton_kernel.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minipeft.kernels import reference


# Exercise 1 — the bytes of the shrink pass.
def shrink_bytes(M: int, K: int, r: int, e: int = 2) -> tuple[int, int]:
    """(bytes read, bytes written) by the shrink pass S = x·Aᵀ, x (M, K), A (r, K), e bytes per element.

    It reads x (M·K elements) and A (r·K) once and writes S (M·r) once. With a dropout mask it would also read
    the mask, another M·K elements: the price of applying dropout inside the kernel.
    """
    return e * (M * K + r * K), e * M * r


# Exercise 2 — the FLOPs of the low-rank term.
def lowrank_flops(M: int, K: int, N: int, r: int) -> int:
    """FLOPs of (x·Aᵀ)·Bᵀ: (M, K)·(K, r) costs 2·M·K·r, then (M, r)·(r, N) costs 2·M·r·N."""
    return 2 * M * r * (K + N)


# Exercise 3 — the LoRA forward in plain torch.
def lora_forward(x, W, bias, A, B, scaling, dropout_mask=None):
    """y = x·Wᵀ + bias + scaling·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ; x (..., K), W (N, K), A (r, K), B (N, r)."""
    y = F.linear(x, W, bias)                                   # (..., N)  the frozen base layer
    x_lora = x if dropout_mask is None else x * dropout_mask   # (..., K)  dropout on the LoRA branch only
    return y + scaling * (x_lora @ A.T) @ B.T                  # (..., r) then (..., N)


# Exercise 4 — what CUDA graphs take away from a step.
def host_ms_removed(tokens_per_step: int, eager_tokens_per_s: float, graphs_tokens_per_s: float) -> float:
    """Milliseconds per step by which the graphs step is shorter: time per step = tokens per step ÷ tokens/s."""
    return 1e3 * tokens_per_step / eager_tokens_per_s - 1e3 * tokens_per_step / graphs_tokens_per_s


def fused_minus_base_bytes(M: int, N: int, K: int, r: int, e: int) -> int:
    """The chapter's byte table: the fused route moves e·(MK + rK + 2Mr + Nr) more bytes than the base linear."""
    return e * (M * K + r * K + 2 * M * r + N * r)


def counted_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def main() -> None:
    e = 2
    for M, K, N, r in [(1, 4096, 4096, 16), (4096, 768, 2304, 8), (16384, 4096, 4096, 64)]:
        read, written = shrink_bytes(M, K, r, e)
        assert written == e * M * r
        assert read + written + e * (M * r + N * r) == fused_minus_base_bytes(M, N, K, r, e)  # + the epilogue's S, B
    print("Exercise 1: correct")

    for M, K, N, r in [(8, 16, 12, 4), (33, 64, 48, 8), (5, 40, 24, 16)]:
        x, W, A, B = torch.randn(M, K), torch.randn(N, K), torch.randn(r, K), torch.randn(N, r)
        lowrank = counted_flops(reference.lora_linear, x, W, None, A, B, 2.0) - counted_flops(F.linear, x, W)
        assert lowrank_flops(M, K, N, r) == lowrank, (M, K, N, r, lowrank)
    print("Exercise 2: correct")

    g = torch.Generator().manual_seed(8)
    x, W, bias = torch.randn(2, 5, 12, generator=g), torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    A, B = torch.randn(3, 12, generator=g), torch.randn(10, 3, generator=g)
    mask = (torch.rand(2, 5, 12, generator=g) > 0.3).float() / 0.7
    for b, m in [(bias, None), (None, mask), (bias, mask)]:
        got, want = lora_forward(x, W, b, A, B, 2.0, m), reference.lora_linear(x, W, b, A, B, 2.0, m)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    print("Exercise 3: correct")

    assert abs(host_ms_removed(1000, 1000.0, 2000.0) - 500.0) < 1e-6
    print("Exercise 4: correct")


if __name__ == "__main__":
    main()
