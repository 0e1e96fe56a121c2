"""Worked solutions to the exercises of the many-adapters chapter (notebooks/11_many_adapters.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from notebooks/:

    python solutions/11_many_adapters.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch11 import (  # noqa: E402
    check_average_of_adapters,
    check_fusion_parameters,
    check_group_rows,
    check_mixed_batch_by_loop,
)


# Exercise 1 — Average by hand.
def average_of_adapters(o: torch.Tensor, deltas: torch.Tensor, weights) -> torch.Tensor:
    """o (B, T, C), deltas (N, B, T, C), N weights → o + Σᵢ wᵢ·δᵢ(o), (B, T, C).

    The sublayer's output is kept once and each adapter adds its update times its weight. When the weights sum to
    1 this equals Σᵢ wᵢ·(o + δᵢ), the average of the adapters' full outputs; with task-arithmetic weights such as
    [1, −1] only this form is right (the other would scale o by Σᵢ wᵢ = 0).
    """
    w = torch.as_tensor(weights, dtype=deltas.dtype).view(-1, 1, 1, 1)  # (N, 1, 1, 1), broadcast over B, T, C
    return o + (w * deltas).sum(dim=0)  # (B, T, C)


# Exercise 2 — group the rows as the kernel does.
def group_rows(adapter_index: torch.Tensor, n_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """adapter_index (M,) in [-1, n) → order (M,), seg_start (n + 1,).

    A stable sort puts the rows of adapter 0 before those of adapter 1, …, keeping their order inside a group, and
    the −1 rows (no LoRA term) first. Segment i starts where the sorted index first reaches i: one binary search
    per adapter, for i = 0 … n (the last start, n, is where the rows end). Both run on the device, with no sync.
    """
    index_sorted, order = torch.sort(adapter_index, stable=True)  # (M,), (M,)
    bounds = torch.arange(n_adapters + 1, dtype=index_sorted.dtype)  # (n + 1,) 0, 1, …, n
    return order, torch.searchsorted(index_sorted, bounds)  # (M,), (n + 1,)


# Exercise 3 — the size of a fusion.
def fusion_parameters(d: int, n_sites: int, fusion_type: str = "dynamic") -> int:
    """W_Q and W_K are (d, d) with a bias each: 2·(d² + d); a dynamic fusion adds W_V (d, d) without a bias.

    Nothing depends on the number of adapters fused: the keys and values are computed from each adapter's update
    with the same matrices.
    """
    per_site = 2 * (d * d + d) + (d * d if fusion_type == "dynamic" else 0)
    return n_sites * per_site


# Exercise 4 — a mixed batch, the slow way.
def mixed_batch_by_loop(pm, idx: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
    """idx (B, T) → logits (B, T, vocab), row b computed alone with adapter adapter_names[b] active."""
    rows = []
    with torch.no_grad():
        for b, name in enumerate(adapter_names):
            if name == "__base__":
                with pm.disable_adapter():
                    rows.append(pm(idx[b:b + 1])[0])  # (1, T, vocab)
            else:
                pm.set_adapter(name)
                rows.append(pm(idx[b:b + 1])[0])  # (1, T, vocab); a soft prompt's tokens are not in the logits
    return torch.cat(rows)  # (B, T, vocab)


def main() -> None:
    results = [check_average_of_adapters(average_of_adapters), check_group_rows(group_rows),
               check_fusion_parameters(fusion_parameters), check_mixed_batch_by_loop(mixed_batch_by_loop)]
    if not all(results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
