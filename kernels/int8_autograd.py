"""The linear layer on an int8 weight (LLM.int8()) as one autograd op that keeps the 8-bit codes, not Ŵ.

    forward:   y = LLM.int8(x, W₈) + bias       (..., out); kernels/int8_reference.py has the math
    backward:  Ŵ = code · a_w / 127             (out, in) in x's dtype, dequantized again
               dx = dy·Ŵ                          (..., in)
               dbias = Σ dy over the leading dims (out,), only if the bias requires a gradient
               no dW: the base weight is frozen

as bitsandbytes' ``MatMul8bitLt`` does (LLM.int8(), https://arxiv.org/abs/2208.07339): nothing saves a dense
weight, or x (there is no dW). ``route`` says
which implementation runs, already resolved by the switch (``kernels.int8_linear``): "reference"
(kernels/int8_reference.py) or "triton" (kernels/int8_triton.py). It is resolved *before* the op, not inside
it: the backward runs on autograd's thread, where the forward's ``use_backend`` block is not on the stack.

The op is registered with ``torch.library`` (``minipeft::int8_linear``), so torch.compile sees one node per
layer even though the outlier columns are found from the data; its backward is plain torch ops plus the
Triton dequantization op, which AOTAutograd traces. This module imports only torch and the reference.
"""

from __future__ import annotations

import torch

from .int8_reference import int8_dequantize_reference, int8_linear_reference

__all__ = ["dequantize", "int8_linear_op"]


def dequantize(route: str, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ (out, in) in ``dtype`` on a resolved route."""
    if route == "triton":
        return torch.ops.minipeft.int8_dequantize_triton(codes, absmax, dtype)
    return int8_dequantize_reference(codes, absmax, dtype)


@torch.library.custom_op("minipeft::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                   threshold: float, route: str) -> torch.Tensor:  # fmt: skip
    """y = LLM.int8(x, W₈) + bias in x's dtype: x (..., in) → y (..., out)."""
    x2d = x.reshape(-1, codes.shape[1])  # (M, in)
    if route == "triton":
        y = torch.ops.minipeft.int8_linear_triton(x2d, codes, absmax, bias, threshold)
    else:
        y = int8_linear_reference(x2d, codes, absmax, bias, threshold)
    return y.view(*x.shape[:-1], codes.shape[0])


@int8_linear_op.register_fake
def _(x, codes, absmax, bias, threshold, route):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, absmax, bias, threshold, route = inputs
    ctx.save_for_backward(codes, absmax)  # the 8-bit state, never Ŵ (and not x: there is no dW)
    ctx.dtype = x.dtype
    ctx.route = route


def _backward(ctx, dy):
    """dx = dy·Ŵ, Ŵ dequantized again from the codes; dbias = Σ dy. Nothing for the frozen 8-bit state."""
    codes, absmax = ctx.saved_tensors
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx = dbias = None
    if need_x:
        dx = torch.matmul(dy.to(ctx.dtype), dequantize(ctx.route, codes, absmax, ctx.dtype))  # (..., out)·(out, in)
    if need_bias:
        dbias = dy.reshape(-1, codes.shape[0]).sum(0)  # (out,)
    return dx, None, None, dbias, None, None


int8_linear_op.register_autograd(_backward, setup_context=_setup_context)
