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
"""

from __future__ import annotations

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
