"""Int8Linear: a frozen Linear whose weight is stored in 8 bits, multiplied with LLM.int8()'s mixed-precision
decomposition.

Quantizing activations to 8 bits fails on the few feature dimensions where large models put outliers
(|x| ≥ 6 in LLM.int8()'s measurements): one such value sets its whole row's absmax and flattens every other
value of the row to a handful of codes. LLM.int8() splits the input columns in two (Dettmers et al. 2022,
https://arxiv.org/abs/2208.07339):

    O = { j : |x_ij| ≥ threshold for some row i }                     the outlier columns (bitsandbytes' ≥)
    y = x[:, O] · Ŵ[:, O]ᵀ                                             16 bits: x's dtype, Ŵ dequantized
      + (X₈ · W₈ᵀ) ⊙ (a_x · a_wᵀ) / 127²                                8 bits: the other columns
      + bias

where X₈, a_x are the row-wise int8 codes and absmax of x (``int8.rowwise_int8``, the weight's own
quantizer) with its outlier *values* zeroed first and then its O columns' codes set to 0; W₈, a_w are the
weight's (``quantize_int8``); X₈·W₈ᵀ is summed exactly in int32. threshold = 0 turns the decomposition off
(every column in 8 bits). Shapes: x (..., in) → y (..., out), W₈ (out, in), a_w (out,), a_x (M,) for the
M = prod(x.shape[:-1]) rows.

Which values set a_x is bitsandbytes' choice, followed here so that the two agree bit for bit: it zeroes the
values with |x| ≥ threshold, not their whole columns, so a small value that shares a column with an outlier
can still set its row's scale. The paper's split would take a_x over the 8-bit columns only; the difference
is one rounding step of 8 bits, and only in such rows.

Worked example: x (2, 4) = [[0.5, 7.0, -1, 2], [1, -0.25, 3, 0]] with threshold 6: column 1 holds 7.0, so O = {1};
column 1 goes through the 16-bit matmul, columns 0, 2, 3 through int8 with row absmax a_x = (2, 3).

Inside a CUDA graph capture (`torch.compile(mode="reduce-overhead")`) the outlier columns cannot be gathered by
`nonzero`, whose output size needs the host: there O is gathered into a fixed number of slots
(`MAX_OUTLIER_COLUMNS`, or every column of a narrower layer) by `torch.nonzero_static`, the empty slots
multiplied by zero, and a device-side assert stops the run if a batch ever has more outlier columns than slots
(never a silently dropped column). The sum is the same; only the order of the 16-bit additions can differ.

Backward (the weight is frozen): dx = dy · Ŵ, with Ŵ dequantized from the codes again, as bitsandbytes'
``MatMul8bitLt`` does; nothing saves a dense weight. One registered op (``minipeft::int8_linear``), so
torch.compile sees one node even though the outlier columns are found from the data.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .int8 import Int8Weight, _dequantize_int8, quantize_int8, rowwise_int8
from .nf4 import _FLOAT_DTYPES, _check_out_dtype
from .quantized_linear import QuantizedLinear

__all__ = ["Int8Linear", "int8_matmul", "int8_linear"]

DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, and bitsandbytes' default for Linear8bitLt
# Slots for outlier columns under CUDA graph capture. LLM.int8() counts a few to a few dozen outlier dimensions
# per layer up to 13B parameters (|x| >= 6); 128 leaves room, and costs a (M, 128) x (128, out) 16-bit GEMM.
MAX_OUTLIER_COLUMNS = 128


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 · b (N, K)ᵀ int8 → (M, N) int32, exactly.

    On CUDA, ``torch._int_mm`` (cuBLASLt int8 GEMM) where its shape rules hold (M > 16, K and N multiples of 8).
    Elsewhere a float GEMM that cannot round: every partial sum is an integer of size at most K·127², exact in
    fp32 while that is ≤ 2²⁴ (K ≤ 1040) and in fp64 beyond (≤ 2⁵³). On a CPU without AVX-512, torch's int8
    GEMM is a scalar loop (1.4 s against 0.1 s for fp64 at 1024³, 2-core AVX2 machine, torch 2.13).
    """
    M, K = a.shape
    N = b.shape[0]
    if a.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0:
        return torch._int_mm(a, b.t())
    exact = torch.float32 if K * 127 * 127 <= 2**24 else torch.float64
    return (a.to(exact) @ b.to(exact).t()).to(torch.int32)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                threshold: float) -> torch.Tensor:  # fmt: skip
    """y = LLM.int8(x, W) + bias (the module docstring's equation), in x's dtype; unchecked (Int8Linear checks).

    The arithmetic follows bitsandbytes' ``int8_vectorwise_quant`` and ``int8_mixed_scaled_mm`` step for step,
    so that the two agree bit for bit on fp16 and bf16 inputs: the int32 product is rescaled in fp32
    (``acc · (a_x · a_w) · (1/127²)``), the bias added, the sum rounded to x's dtype, then the 16-bit
    product of the outlier columns added in x's dtype. (bitsandbytes quantizes fp32 activations through
    fp16; here every dtype is quantized as it is.)
    """
    out_features, in_features = codes.shape
    x2d = x.reshape(-1, in_features)  # (M, in)
    outliers = None
    if threshold > 0:
        is_outlier = x2d.abs() >= threshold  # (M, in) bool
        columns = is_outlier.any(dim=0)  # (in,) bool
        x_codes, x_absmax = rowwise_int8(x2d.masked_fill(is_outlier, 0))  # (M, in) int8, (M,) fp32
        x_codes = x_codes.masked_fill(columns, 0)  # those columns go through the 16-bit matmul instead
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            y = _scaled_int8_product(x_codes, x_absmax, codes, absmax, bias, x.dtype)
            return _add_outlier_columns_static(y, x2d, columns, codes, absmax).view(*x.shape[:-1], out_features)
        outliers = columns.nonzero().squeeze(1)  # (n_outliers,) column indices (a host sync on GPU)
    else:
        x_codes, x_absmax = rowwise_int8(x2d)
    y = _scaled_int8_product(x_codes, x_absmax, codes, absmax, bias, x.dtype)
    if outliers is not None and outliers.numel():
        w_outliers = _dequantize_int8(codes[:, outliers], absmax, x.dtype)  # (out, n_outliers)
        y = y.addmm(x2d[:, outliers], w_outliers.t())  # += (M, n_outliers)·(n_outliers, out) in 16 bits
    return y.view(*x.shape[:-1], out_features)


def _scaled_int8_product(x_codes, x_absmax, codes, absmax, bias, dtype) -> torch.Tensor:
    """(X₈·W₈ᵀ) ⊙ (a_x·a_wᵀ) / 127² + bias, rounded to ``dtype``: (M, out)."""
    acc = int8_matmul(x_codes, codes)  # (M, out) int32, exact
    y = acc * (x_absmax[:, None] * absmax[None, :]) * 6.200124e-05  # (M, out) fp32; 1/127² in fp32
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def _add_outlier_columns_static(y, x2d, columns, codes, absmax, slots: int | None = None) -> torch.Tensor:
    """y + x[:, O]·Ŵ[:, O]ᵀ with O = columns.nonzero() gathered into a fixed number of slots, so that nothing
    needs the host (CUDA graph capture): empty slots point at column 0 and are multiplied by 0."""
    in_features = x2d.shape[1]
    slots = min(in_features, MAX_OUTLIER_COLUMNS if slots is None else slots)
    torch._assert_async(columns.sum() <= slots, "Int8Linear: more outlier columns than MAX_OUTLIER_COLUMNS "
                                                "slots in a CUDA graph; raise it (minipeft.quant.int8_linear)")
    index = torch.nonzero_static(columns, size=slots, fill_value=-1).squeeze(1)  # (slots,), -1 where empty
    used = (index >= 0).to(x2d.dtype)  # (slots,)
    index = index.clamp_min(0)
    w_outliers = _dequantize_int8(codes[:, index], absmax, x2d.dtype)  # (out, slots)
    return y.addmm(x2d[:, index] * used, w_outliers.t())  # += (M, slots)·(slots, out) in 16 bits


@torch.library.custom_op("minipeft::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                   threshold: float) -> torch.Tensor:  # fmt: skip
    """``int8_linear`` as a registered op (one node for torch.compile, whatever the outlier columns are)."""
    return int8_linear(x, codes, absmax, bias, threshold)


@int8_linear_op.register_fake
def _(x, codes, absmax, bias, threshold):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, absmax, bias, threshold = inputs
    ctx.save_for_backward(codes, absmax)  # the 8-bit state, never Ŵ (and not x: there is no dW)
    ctx.dtype = x.dtype


def _backward(ctx, dy):
    """dx = dy·Ŵ, Ŵ dequantized again from the codes; dbias = Σ dy. Nothing for the frozen 8-bit state."""
    codes, absmax = ctx.saved_tensors
    need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx = dbias = None
    if need_x:
        dx = torch.matmul(dy.to(ctx.dtype), _dequantize_int8(codes, absmax, ctx.dtype))  # (..., out)·(out, in)
    if need_bias:
        dbias = dy.reshape(-1, codes.shape[0]).sum(0)  # (out,)
    return dx, None, None, dbias, None


int8_linear_op.register_autograd(_backward, setup_context=_setup_context)


class Int8Linear(QuantizedLinear):
    """A linear layer with a frozen row-wise int8 weight and LLM.int8()'s outlier decomposition.

    Buffers ``codes`` ``(out, in)`` int8 and ``absmax`` ``(out,)`` fp32 (``Int8Weight``'s fields); an optional
    frozen bias. Device moves, dtype casts and strict loading as every ``QuantizedLinear``; no ``.weight``
    (``dequantize_weight()`` gives a dense copy).

    Args:
        threshold: input columns holding any |x| ≥ threshold go through a 16-bit matmul (0: none do).
            6.0, LLM.int8()'s value and bitsandbytes' default.

    Example: 4096 → 4096 holds 16 MiB of codes and 16 KiB of absmax instead of 32 MiB of bf16.
    """

    _ALL_STATE_NAMES = ("codes", "absmax")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        _check_threshold(threshold)
        if weight_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"weight_dtype must be float32, bfloat16 or float16 (the dtype the weight had), "
                             f"got {weight_dtype!r}")  # fmt: skip
        self.threshold = float(threshold)
        self.weight_dtype = weight_dtype
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("absmax", torch.zeros(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD) -> Int8Linear:
        """Quantize ``linear.weight`` (on its device) and keep a frozen copy of its bias.

        Raises ValueError where ``quantize_int8`` does (NaN/inf in the weight), naming ``linear.weight``.
        """
        w = linear.weight.detach()
        q = quantize_int8(w, name="linear.weight")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, threshold=threshold,
                    weight_dtype=w.dtype, device=w.device)  # fmt: skip
        layer.codes.copy_(q.codes)
        layer.absmax.copy_(q.absmax)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _state_names(self) -> tuple[str, ...]:
        return self._ALL_STATE_NAMES

    def _state_kind(self) -> str:
        return "int8"

    def int8_weight(self) -> Int8Weight:
        """The buffers as an ``Int8Weight`` (no copy)."""
        return Int8Weight(codes=self.codes, absmax=self.absmax, dtype=self.weight_dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype`` (default: the original dtype)."""
        if dtype is None:
            dtype = self.weight_dtype
        _check_out_dtype(dtype)
        return _dequantize_int8(self.codes, self.absmax, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) → (..., out) in x's dtype (autocast's, when it is on)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x has dtype {x.dtype}; expected a floating dtype (float16, bfloat16, float32, float64)")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected (..., {self.in_features})")
        if x.device != self.codes.device:
            raise ValueError(f"x is on {x.device} but the int8 codes are on {self.codes.device}; move them together")
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(x.device.type))  # F.linear's autocast rule (the op computes in x's)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return int8_linear_op(x, self.codes, self.absmax, bias, self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")  # fmt: skip


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold) \
            or threshold < 0:  # fmt: skip
        raise ValueError(f"threshold must be a finite number ≥ 0 (6.0 in LLM.int8(); 0 turns the outlier "
                         f"decomposition off), got {threshold!r}")  # fmt: skip
