"""The LoRA linear layer in plain PyTorch: the math, nothing clever.

A frozen linear layer plus a trainable low-rank update: the input goes through W as usual and, in parallel,
through the rank-r bottleneck A then B, scaled by ``scaling`` (LoRA, https://arxiv.org/abs/2106.09685).

    y = x·Wᵀ + bias + scaling·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ

Shapes follow torch.nn.Linear and peft: x (..., in), weight (out, in), bias (out,) or None,
lora_A (r, in), lora_B (out, r), dropout_mask None or shaped like x (already scaled by 1/(1-p)).

Autograd runs through the plain torch ops below. The base weight is frozen: it enters as ``weight.detach()``,
so no gradient ever reaches it even if the caller forgot ``requires_grad_(False)``. The bias gets a gradient
exactly when it requires one. This is also the oracle the fused Triton kernel is tested against; it is
itself tested against the dense form x·(W + scaling·B·A)ᵀ in float64.

The signature below is repeated on purpose in ``lora_triton.lora_linear`` (the Triton kernels),
``lora_routes.lora_linear`` (the "auto" backend's routes) and the switch ``kernels.lora_linear``: every kernel
sits beside its reference with the same arguments (plus the one that picks a backend or route), so that
swapping one for the other is a one-word change and the tests can call them all the same way.

``multi_lora_linear``, last, is a batch whose rows each use their own adapter (adapter_index per row, -1 for
none) as a plain loop over the adapters; ``multi_lora_triton.multi_lora_linear`` and the switch's
``kernels.multi_lora_linear`` repeat its signature. ``multi_lora_linear_packed`` takes the same adapters packed
once (``PackedAdapters``: every A stacked, every B side by side), which is what a server holding many adapters
keeps, and what the batched kernels read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ, unfused, through torch ops.

    ``backend`` is accepted (and ignored) so this function has the same signature as ``kernels.lora_linear``;
    inputs are not validated here: ``kernels.lora_linear`` does that at the public boundary.
    """
    y = F.linear(x, weight.detach(), bias)                    # (..., out)  the frozen base layer
    x_lora = x if dropout_mask is None else x * dropout_mask  # (..., in)   dropout on the LoRA branch only
    s = F.linear(x_lora, lora_A)                              # (..., r)    the rank-r bottleneck S = x·Aᵀ
    return y + scaling * F.linear(s, lora_B)                  # (..., out)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_index: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """A batch in which each row has its own adapter: the base layer for every row, then a loop over adapters.

        y[m] = x[m]·Wᵀ + bias + s_i·(x[m]·A_iᵀ)·B_iᵀ    with i = adapter_index[m]; no LoRA term where i = -1

    Shapes: x (..., in), weight (out, in), bias (out,) or None, lora_As[i] (r_i, in), lora_Bs[i] (out, r_i) (the
    ranks r_i may differ), scalings[i] a float, adapter_index (...) = x.shape[:-1] of int64 in [-1, n).
    Each adapter gathers its rows, runs the LoRA branch on them alone and adds the result back in place of
    those rows (``index_add``, an out-of-place op that autograd follows), so the gradients of adapter i are
    those of a batch of its rows alone. Like ``lora_linear`` it takes ``backend`` and ignores it, and leaves
    validation to the switch (``kernels.multi_lora_linear``). ``nonzero`` syncs with the host once per adapter:
    this is the oracle, not the fast path (kernels/multi_lora_triton.py is).
    """
    out_features, in_features = weight.shape
    y = F.linear(x, weight.detach(), bias)                     # (..., out)  the base layer, every row
    index = adapter_index.reshape(-1)                          # (M,)
    x2d = x.reshape(index.numel(), in_features)                # (M, in)   (not -1: in or out may be 0)
    y2d = y.reshape(index.numel(), out_features)               # (M, out)
    for i, (lora_A, lora_B, scaling) in enumerate(zip(lora_As, lora_Bs, scalings, strict=True)):
        rows = (index == i).nonzero().squeeze(1)               # (M_i,)  the rows of adapter i
        s = F.linear(x2d[rows], lora_A)                        # (M_i, r_i)
        y2d = y2d.index_add(0, rows, scaling * F.linear(s, lora_B))   # (M, out), rows M_i changed
    return y2d.view(y.shape)                                   # (..., out)


class PackedAdapters(NamedTuple):
    """n LoRA adapters of one layer packed by concatenation (``pack_adapters``): what the batched kernels read.

    Adapter i owns rows rank_start[i]:rank_start[i+1] of a_cat and the same columns of b_cat, where rank_start
    is the running sum of ``ranks`` (the ranks may differ).
    """

    a_cat: torch.Tensor          # (Σr, in)   A_0 over A_1 over …
    b_cat: torch.Tensor          # (out, Σr)  B_0 beside B_1 beside …
    ranks: tuple[int, ...]       # (r_0, r_1, …)
    scalings: tuple[float, ...]  # (s_0, s_1, …)


def pack_adapters(lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                  scalings: Sequence[float]) -> PackedAdapters:
    """Concatenate the adapters (two copies, no checks: ``kernels.pack_adapters`` checks). torch.cat is
    differentiable, so the gradients of a_cat and b_cat flow back to each A_i and B_i."""
    return PackedAdapters(torch.cat(list(lora_As)), torch.cat(list(lora_Bs), dim=1),
                          tuple(a.shape[0] for a in lora_As), tuple(float(s) for s in scalings))


def multi_lora_linear_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: PackedAdapters,
    adapter_index: torch.Tensor,
    groups: Any = None,
) -> torch.Tensor:
    """``multi_lora_linear`` on packed adapters: each adapter is a slice (a view) of a_cat and b_cat again.

    ``groups`` (the rows grouped by adapter, ``kernels.group_rows``) is for the Triton kernels; the loop finds
    each adapter's rows itself and ignores it.
    """
    lora_As = adapters.a_cat.split(adapters.ranks)         # n views (r_i, in)
    lora_Bs = adapters.b_cat.split(adapters.ranks, dim=1)  # n views (out, r_i)
    return multi_lora_linear(x, weight, bias, lora_As, lora_Bs, adapters.scalings, adapter_index)
