"""The linear layer on an NF4 weight as one autograd op that keeps the 4-bit codes, not the dense weight.

Autograd through ``F.linear(x, dequantize(W_q))`` saves the dequantized weight Ŵ from forward to backward,
where dX needs it: (out, in) values in x's dtype per layer, 3.9x the bytes of the codes in bf16, held for the
whole step. This op saves the packed codes and their statistics instead (~4.13 bits per weight with double
quantization) and dequantizes a second time in backward, as bitsandbytes' ``MatMul4Bit`` does
(QLoRA: https://arxiv.org/abs/2305.14314):

    forward:   Ŵ = dequantize(codes, absmax…)     (out, in), in x's dtype, freed when forward returns
               y = x·Ŵᵀ + bias                     (..., out)
    backward:  Ŵ = dequantize(codes, absmax…)     again: one more pass over 4-bit codes
               dx = dy·Ŵ                           (..., in)
               dbias = Σ dy over the leading dims  (out,), only if the bias requires a gradient
               no dW: the base weight is frozen

Worked bytes: a 4096 x 4096 layer saves 8 MiB of codes + 260 KiB of statistics for backward instead of
32 MiB of bf16 Ŵ. The price is one more dequantization per layer and step (memory-bound: ~2.5 bytes moved
per weight in bf16).

``route`` says which dequantizer runs, already resolved by the switch (``kernels.nf4_linear``): "reference"
(kernels/nf4_reference.py) or "triton" (the op ``minipeft::nf4_dequantize_triton``, kernels/nf4_triton.py).
It is resolved *before* the op, not inside it: the backward runs on autograd's thread, where the forward's
``use_backend`` block is not on the stack, and a compiled graph runs after the block has closed.

The op is registered with ``torch.library`` (``minipeft::nf4_linear``) so torch.compile sees one node per
layer; its backward is plain torch ops (plus the Triton dequantization op), which AOTAutograd traces.
This module imports only torch and the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .nf4_reference import nf4_dequantize_reference

__all__ = ["dequantize", "nf4_linear_op"]


def dequantize(
    route: str,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    numel: int,
    blocksize: int,
    dq_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The flat ``(numel,)`` dequantized weight on a resolved route; the arguments of nf4_dequantize_reference."""
    args = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, numel, blocksize, dq_blocksize, dtype)
    if route == "triton":
        return torch.ops.minipeft.nf4_dequantize_triton(*args)
    return nf4_dequantize_reference(*args)


@torch.library.custom_op("minipeft::nf4_linear", mutates_args=())
def nf4_linear_op(
    x: torch.Tensor,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    dq_blocksize: int,
    route: str,
) -> torch.Tensor:
    """y = x·Ŵᵀ + bias with Ŵ dequantized to x's dtype: x (..., in) → y (..., out)."""
    w = dequantize(route, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values,
                   out_features * in_features, blocksize, dq_blocksize, x.dtype)  # fmt: skip
    return F.linear(x, w.view(out_features, in_features), bias)  # (..., out)


@nf4_linear_op.register_fake
def _(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, out_features, in_features,
      blocksize, dq_blocksize, route):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, *sizes = inputs
    # The 4-bit state, never Ŵ (and never x: dx does not need it, and there is no dW).
    ctx.save_for_backward(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    ctx.sizes = sizes  # out_features, in_features, blocksize, dq_blocksize, route
    ctx.dtype = x.dtype


def _backward(ctx, dy):
    """dx = dy·Ŵ with Ŵ dequantized again; dbias = Σ dy. Nothing for the 4-bit state: it is not trainable."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = ctx.saved_tensors
    out_features, in_features, blocksize, dq_blocksize, route = ctx.sizes
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[7]
    dx = dbias = None
    if need_x:
        w = dequantize(route, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values,
                       out_features * in_features, blocksize, dq_blocksize, ctx.dtype)  # fmt: skip
        dx = torch.matmul(dy.to(ctx.dtype), w.view(out_features, in_features))  # (..., out)·(out, in) → (..., in)
    if need_bias:
        dbias = dy.reshape(-1, out_features).sum(0)  # (out,)
    return dx, None, None, None, None, None, None, dbias, None, None, None, None, None


nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)
