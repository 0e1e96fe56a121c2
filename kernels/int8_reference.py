"""LLM.int8()'s matmul in PyTorch ops: the reference the Triton kernels (kernels/int8_triton.py) are checked against.

Quantizing activations to 8 bits fails on the few feature dimensions where large models put outliers
(|x| ≥ 6 in LLM.int8()'s measurements): one such value sets its whole row's absmax and flattens every other
value of the row to a handful of codes. LLM.int8() splits the input columns in two (Dettmers et al. 2022,
https://arxiv.org/abs/2208.07339):

    O = { j : |x_ij| ≥ threshold for some row i }                     the outlier columns (bitsandbytes' ≥)
    y = x[:, O] · Ŵ[:, O]ᵀ                                             16 bits: x's dtype, Ŵ dequantized
      + (X₈ · W₈ᵀ) ⊙ (a_x · a_wᵀ) / 127²                                8 bits: the other columns
      + bias

where X₈, a_x are the row-wise int8 codes and absmax of x (``rowwise_int8``, the weight's own quantizer) with
its outlier *values* zeroed first and then its O columns' codes set to 0; W₈, a_w are the weight's; X₈·W₈ᵀ is
summed exactly in int32. threshold = 0 turns the decomposition off (every column in 8 bits). Shapes:
x2d (M, in) → y (M, out), W₈ (out, in) int8, a_w (out,) fp32, a_x (M,) fp32.

Which values set a_x is bitsandbytes' choice, followed here so that the two agree bit for bit: it zeroes the
values with |x| ≥ threshold, not their whole columns, so a small value that shares a column with an outlier
can still set its row's scale. The paper's split would take a_x over the 8-bit columns only; the difference
is one rounding step of 8 bits, and only in such rows.

Worked example: x (2, 4) = [[0.5, 7.0, -1, 2], [1, -0.25, 3, 0]] with threshold 6: column 1 holds 7.0, so O = {1};
column 1 goes through the 16-bit matmul, columns 0, 2, 3 through int8 with row absmax a_x = (2, 3).

Inside a CUDA graph capture the outlier columns cannot be gathered by ``nonzero``, whose output size needs the
host: there O is gathered into a fixed number of slots (``MAX_OUTLIER_COLUMNS``, or every column of a narrower
layer) by ``torch.nonzero_static``, the empty slots multiplied by zero, and a device-side assert stops the run
if a batch ever has more outlier columns than slots (never a silently dropped column). The sum is the same;
only the order of the 16-bit additions can differ. (The Triton kernels need no such bound: they read the
number of outlier columns on the GPU.)

This module imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_OUTLIER_COLUMNS", "rowwise_int8", "int8_matmul", "int8_dequantize_reference",
           "int8_linear_reference"]

# Slots for outlier columns under CUDA graph capture. LLM.int8() counts a few to a few dozen outlier dimensions
# per layer up to 13B parameters (|x| >= 6); 128 leaves room, and costs a (M, 128) x (128, out) 16-bit GEMM.
MAX_OUTLIER_COLUMNS = 128
INV_127 = 7.874015718698502e-3  # 1/127 rounded to fp32, as bitsandbytes writes it
# bitsandbytes' default-backend (CPU) constant for 1/127², which is 6.2000124e-05 (its CUDA kernel uses
# 6.200012e-05); kept for bit-identity with that path
INV_127_SQUARED = 6.200124e-05


def rowwise_int8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantizer, unchecked: a 2-D ``(rows, cols)`` float tensor → codes ``(rows, cols)`` int8, absmax
    ``(rows,)`` fp32. The arithmetic of bitsandbytes' CPU path, step for step, so the bits agree:
    the absmax is taken in ``a``'s dtype (exact: a maximum rounds nothing) and widened to fp32, and the product
    ``a · (127 / absmax)`` is formed in fp32 (a 16-bit tensor times an fp32 one promotes to fp32).
    A row with NaN or ±inf gets a NaN or inf absmax, so anything computed from it is not finite either.
    """
    absmax = a.abs().amax(dim=1).float()  # (rows,)
    scaled = a * (127.0 / absmax[:, None])  # (rows, cols) fp32; 0·(127/0) = NaN for an all-zero row
    codes = torch.round(scaled).nan_to_num_(0.0).to(torch.int8)  # that row's codes: 0, explicitly
    return codes, absmax


def int8_dequantize_reference(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ŵ = code · absmax / 127: codes (out, in) int8, absmax (out,) fp32 → (out, in) in ``dtype``; unchecked.
    Computed in fp32 as bitsandbytes' ``int8_vectorwise_dequant`` does (``code · absmax · (1/127)``, the
    reciprocal rounded to fp32), then rounded once to ``dtype``."""
    return (codes * absmax[:, None] * INV_127).to(dtype)


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


def int8_linear_reference(x2d: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                          threshold: float) -> torch.Tensor:  # fmt: skip
    """y = LLM.int8(x, W) + bias (the module docstring's equation): x2d (M, in) → (M, out) in x's dtype; unchecked.

    The arithmetic follows bitsandbytes' ``int8_vectorwise_quant`` and ``int8_mixed_scaled_mm`` step for step,
    so that the two agree bit for bit on fp16 and bf16 inputs: the int32 product is rescaled in fp32
    (``acc · (a_x · a_w) · (1/127²)``), the bias added, the sum rounded to x's dtype, then the 16-bit
    product of the outlier columns added in x's dtype. (bitsandbytes quantizes fp32 activations through
    fp16; here every dtype is quantized as it is.)
    """
    if threshold > 0:
        is_outlier = x2d.abs() >= threshold  # (M, in) bool
        columns = is_outlier.any(dim=0)  # (in,) bool
        x_codes, x_absmax = rowwise_int8(x2d.masked_fill(is_outlier, 0))  # (M, in) int8, (M,) fp32
        x_codes = x_codes.masked_fill(columns, 0)  # those columns go through the 16-bit matmul instead
        y = _scaled_int8_product(x_codes, x_absmax, codes, absmax, bias, x2d.dtype)
        if x2d.is_cuda and torch.cuda.is_current_stream_capturing():
            return _add_outlier_columns_static(y, x2d, columns, codes, absmax)
        outliers = columns.nonzero().squeeze(1)  # (n_outliers,) column indices (a host sync on GPU)
        if outliers.numel():
            w_outliers = int8_dequantize_reference(codes[:, outliers], absmax, x2d.dtype)  # (out, n_outliers)
            y = y.addmm(x2d[:, outliers], w_outliers.t())  # += (M, n_outliers)·(n_outliers, out) in 16 bits
        return y
    x_codes, x_absmax = rowwise_int8(x2d)
    return _scaled_int8_product(x_codes, x_absmax, codes, absmax, bias, x2d.dtype)


def _scaled_int8_product(x_codes, x_absmax, codes, absmax, bias, dtype) -> torch.Tensor:
    """(X₈·W₈ᵀ) ⊙ (a_x·a_wᵀ) / 127² + bias, rounded to ``dtype``: (M, out)."""
    acc = int8_matmul(x_codes, codes)  # (M, out) int32, exact
    y = acc * (x_absmax[:, None] * absmax[None, :]) * INV_127_SQUARED  # (M, out) fp32
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def _add_outlier_columns_static(y, x2d, columns, codes, absmax, slots: int | None = None) -> torch.Tensor:
    """y + x[:, O]·Ŵ[:, O]ᵀ with O = columns.nonzero() gathered into a fixed number of slots, so that nothing
    needs the host (CUDA graph capture): empty slots point at column 0 and are multiplied by 0."""
    in_features = x2d.shape[1]
    slots = min(in_features, MAX_OUTLIER_COLUMNS if slots is None else slots)
    torch._assert_async(columns.sum() <= slots, "Int8Linear: more outlier columns than MAX_OUTLIER_COLUMNS "
                                                "slots in a CUDA graph; raise it (kernels.int8_reference)")
    index = torch.nonzero_static(columns, size=slots, fill_value=-1).squeeze(1)  # (slots,), -1 where empty
    used = (index >= 0).to(x2d.dtype)  # (slots,)
    index = index.clamp_min(0)
    w_outliers = int8_dequantize_reference(codes[:, index], absmax, x2d.dtype)  # (out, slots)
    return y.addmm(x2d[:, index] * used, w_outliers.t())  # += (M, slots)·(slots, out) in 16 bits
