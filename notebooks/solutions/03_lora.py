"""Worked solutions to the exercises of the LoRA chapter (notebooks/03_lora.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from the notebooks
directory (or anywhere):

    python notebooks/solutions/03_lora.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the notebooks directory, for `checks`

from checks.ch03 import check_lora_forward, check_lora_param_count, check_merge_weight  # noqa: E402


# Exercise 1 — LoRA's forward pass from scratch.
def lora_forward(x, W, b, A, B, scaling):
    """h = x·W₀ᵀ + b + scaling·(x·Aᵀ)·Bᵀ; x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r).

    The low-rank path goes through r numbers per token: x·Aᵀ is (..., r), then ·Bᵀ brings it to (..., out).
    Computing (x·Aᵀ)·Bᵀ instead of x·(B·A)ᵀ never builds the (out, in) matrix ΔW: that is what keeps LoRA cheap.
    """
    h = x @ W.T                           # (..., out)  the frozen layer
    if b is not None:
        h = h + b                         # (..., out)
    return h + scaling * (x @ A.T) @ B.T  # (..., r) then (..., out)


# Exercise 2 — the trainable-parameter count for a rank and a set of targets.
BLOCK_LINEARS = {  # a block's Linears by their name inside the block: parameters per unit of rank, r·(in + out)
    "attn.c_attn": lambda C: C + 3 * C,   # C → 3C (q, k, v fused)
    "attn.c_proj": lambda C: C + C,       # C → C
    "mlp.c_fc": lambda C: C + 4 * C,      # C → 4C
    "mlp.c_proj": lambda C: 4 * C + C,    # 4C → C
}


def lora_param_count(n_layer, n_embd, r, targets):
    """Σ over targeted Linears of r·(in + out), each block's Linears matched by their full names.

    Block i's Linears are "transformer.h.{i}.attn.c_attn" and so on. A target matches a Linear whose full name
    equals it or ends in "." + target, as in get_peft_model: "c_proj" selects both projections, "attn.c_attn"
    the fused q/k/v projection. "all-linear" is all four Linears of a block (the lm_head, tied to the
    embeddings, is left out).
    """
    total = 0
    for i in range(n_layer):
        for inner, per_rank in BLOCK_LINEARS.items():
            full = f"transformer.h.{i}.{inner}"
            if targets == "all-linear" or any(full == t or full.endswith("." + t) for t in targets):
                total += r * per_rank(n_embd)
    return total


# Exercise 3 — merging: W = W₀ + (α/r)·B·A.
def merge_weight(W, A, B, scaling):
    """W (out, in) + scaling · B (out, r) · A (r, in) → (out, in). After this, the layer is a plain Linear:
    x·Wᵀ = x·W₀ᵀ + scaling·x·Aᵀ·Bᵀ, the same output as the unmerged LoRA layer, at the base's cost."""
    return W + scaling * B @ A  # (out, in)


def main() -> None:
    check_lora_forward(lora_forward)
    check_lora_param_count(lora_param_count)
    check_merge_weight(merge_weight)


if __name__ == "__main__":
    main()
