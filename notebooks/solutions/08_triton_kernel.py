"""Worked solutions to the exercises of the Triton-kernel chapter (notebooks/08_triton_kernel.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes (notebooks/checks/ch08.py).
Run from notebooks/:

    python solutions/08_triton_kernel.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch08 import (  # noqa: E402
    check_host_ms_removed,
    check_lora_forward,
    check_lowrank_flops,
    check_shrink_bytes,
)


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


def main() -> None:
    results = [check_shrink_bytes(shrink_bytes), check_lowrank_flops(lowrank_flops), check_lora_forward(lora_forward),
               check_host_ms_removed(host_ms_removed)]
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
