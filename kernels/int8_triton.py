"""LLM.int8()'s matmul in Triton: five kernels with the arguments and results of kernels/int8_reference.py.

The math is the reference's (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339):

    O   = { j : |x_ij| ≥ threshold for some row i }                  outlier columns
    y   = x[:, O]·Ŵ[:, O]ᵀ  +  (X₈·W₈ᵀ) ⊙ (a_x·a_wᵀ) / 127²  +  bias

Written as PyTorch ops it is a dozen passes over (M, in) and (M, out) tensors: |x|, the comparison, the
column reduction, the masked copy, the row absmax, the scaled and rounded codes, then the int32 GEMM output
(4 bytes per element), its rescale by an (M, out) fp32 outer product, the bias, the cast. On GPT-2's c_fc
(M = 7936, out = 3072) the int32 product alone is 97 MB written and read again. Here:

    1. _scan_kernel       one pass over x: each row's absmax over the values below the threshold, and a 1
                          stored in flags[j] for each outlier's column j
    2. _compact_kernel    the flagged columns' numbers in order, and how many there are, on the GPU (no host
                          sync, so a CUDA graph can capture the call whatever the data)
    3. _quantize_kernel   a second pass: X₈ = round(x · 127/a_x), 0 for outliers and flagged columns
    4. _matmul_kernel     X₈·W₈ᵀ on the int8 tensor cores into an int32 accumulator, then in registers
                          · a_x · a_w / 127² + bias, rounded to x's dtype: y
    5. _outlier_kernel    y += x[:, O]·Ŵ[:, O]ᵀ in 16 bits, Ŵ's columns dequantized from the codes as they load;
                          it reads the number of outlier columns on the GPU and loops that many (no work when
                          there are none). Kept out of the GEMM: the same loop in the GEMM's epilogue made the
                          GEMM 2x slower on an H200, with a second accumulator tile or without one

The 8-bit part gives the reference's bits: the same operations in the same order (the int32 sum is exact, then
fp32 products, the bias, one rounding), with the compiler's fusing of a multiply and an add into one FMA turned
off where it would skip a rounding torch makes. Only the outlier columns' 16-bit sum can differ in its order.
``int8_dequantize_triton`` makes Ŵ for backward's dX = dy·Ŵ (then a cuBLAS GEMM, as the NF4 backward does).

Limits: every tensor (and x's span in memory) below 2**31 elements, for 32-bit offsets (the switch checks); fp16,
bf16 and fp32.
This module imports only torch, triton and the LoRA kernels' shared helpers (tile order, autotuning).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import int8_reference
from .lora_triton import AUTOTUNE, _autotune, _m_bucket, _tile_coords
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["SUPPORTED_DTYPES", "int8_linear_triton", "int8_dequantize_triton"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5·2²³: (v + it) − it rounds an fp32 |v| < 2²² half to even
INV_127 = tl.constexpr(int8_reference.INV_127)  # the reference's fp32 constants (a kernel reads constexprs only)
INV_127_SQUARED = tl.constexpr(int8_reference.INV_127_SQUARED)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _scan_kernel(
    x_ptr, absmax_ptr, flags_ptr,
    M, K, stride_xm, stride_xk, threshold,
    HAS_THRESHOLD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Rows [pid·BM, pid·BM + BM): a_x = max |x| over the values below the threshold (NaN if a row has a NaN,
    as torch's amax gives); flags[j] = 1 where column j holds a value ≥ the threshold (flags start at 0)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    in_m = rows < M
    amax = tl.zeros((BM,), tl.float32)
    nans = tl.zeros((BM,), tl.int32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        ok = in_m[:, None] & (cols < K)[None, :]
        a = tl.abs(tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
                           mask=ok, other=0.0).to(tl.float32))  # (BM, BK) |x|
        if HAS_THRESHOLD:
            big = (a >= threshold) & ok  # (BM, BK); never the padding (its 0 would pass a threshold of 0)
            # flags[j] = 1 for each outlier's column: a store only where there is one (every writer writes the
            # same 1, so no atomics, and no reduction across the tile's rows)
            tl.store(flags_ptr + (cols[None, :] + 0 * rows[:, None]), tl.full((BM, BK), 1, tl.int32), mask=big)
            a = tl.where(big, 0.0, a)
        nans += tl.sum((a != a).to(tl.int32), axis=1)  # the hardware's max drops NaN; torch's keeps it
        amax = tl.maximum(amax, tl.max(a, axis=1))
    tl.store(absmax_ptr + rows, tl.where(nans > 0, float("nan"), amax), mask=in_m)


@triton.jit
def _compact_kernel(flags_ptr, index_ptr, count_ptr, K, BLOCK: tl.constexpr):
    """One program: the flagged columns' numbers in order, index[0:count], and count (a stream compaction: each
    flagged column's slot is the number of flagged columns before it, an exclusive prefix sum)."""
    count = tl.full((), 0, tl.int32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        f = tl.load(flags_ptr + cols, mask=cols < K, other=0)  # (BLOCK,) 0 or 1
        slot = count + tl.cumsum(f, 0) - f
        tl.store(index_ptr + slot, cols, mask=f > 0)
        count += tl.sum(f, 0)
    tl.store(count_ptr, count)


@triton.jit
def _quantize_kernel(
    x_ptr, absmax_ptr, flags_ptr, codes_ptr,
    M, K, stride_xm, stride_xk, threshold,
    HAS_THRESHOLD: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """X₈ = round(x · (127 / a_x)) for one (BM, BK) tile, as ``rowwise_int8`` rounds it: the quotient and the
    product in fp32, round half to even; 0 for an outlier value, a flagged column, or a row whose a_x is 0 or NaN."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    in_m = rows < M
    in_k = cols < K
    ok = in_m[:, None] & in_k[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
    amax = tl.load(absmax_ptr + rows, mask=in_m, other=1.0)  # (BM,)
    nonzero = amax > 0  # False for 0 and NaN: the reference's 0·(127/0) = NaN and NaN·… give code 0 there
    # torch computes 127 / a_x as reciprocal(a_x) · 127, two roundings: the same here, for the same codes
    scale = tl.where(nonzero, tl.math.div_rn(1.0, tl.where(nonzero, amax, 1.0)) * 127.0, 0.0)
    v = x * scale[:, None]  # |v| ≤ 127 (NaN for an inf x when the threshold is 0, as in the reference)
    code = (v + ROUND_MAGIC) - ROUND_MAGIC
    if HAS_THRESHOLD:
        flagged = tl.load(flags_ptr + cols, mask=in_k, other=0) != 0
        code = tl.where((tl.abs(x) >= threshold) | flagged[None, :], 0.0, code)
    code = tl.where(code != code, 0.0, code)
    tl.store(codes_ptr + rows[:, None] * K + cols[None, :], code.to(tl.int8), mask=ok)


def _matmul_configs():
    if not AUTOTUNE:  # the interpreter (and MINIPEFT_KERNEL_AUTOTUNE=0): one fixed config
        small = INTERPRETING
        return [triton.Config({"BM": 32 if small else 128, "BN": 32 if small else 128, "BK": 32 if small else 128,
                               "GROUP_M": 8}, num_warps=4 if small else 8, num_stages=3)]  # fmt: skip
    shapes = [  # (BM, BN, BK, warps, stages): int8 operands, so BK = 128 is 128 bytes, as 64 is for bf16
        (128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (64, 256, 128, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (16, 64, 128, 4, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@_autotune(_matmul_configs(), ["M_BUCKET", "N", "K", "HAS_BIAS"])
@triton.jit
def _matmul_kernel(
    # pointers
    xq_ptr, wq_ptr, ax_ptr, aw_ptr, bias_ptr, y_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, M_BUCKET,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One (BM, BN) tile of y = (X₈·W₈ᵀ) ⊙ (a_x·a_wᵀ) / 127² + bias: the int8 GEMM over K, then the rescale."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    in_m = rows < M
    in_n = cols < N
    acc = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        in_k = ks < K
        a = tl.load(xq_ptr + rows[:, None] * K + ks[None, :], mask=in_m[:, None] & in_k[None, :], other=0)
        b = tl.load(wq_ptr + cols[:, None] * K + ks[None, :], mask=in_n[:, None] & in_k[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)  # exact: |Σ| ≤ K·127²
    ax = tl.load(ax_ptr + rows, mask=in_m, other=0.0)
    aw = tl.load(aw_ptr + cols, mask=in_n, other=0.0)
    y = acc.to(tl.float32) * (ax[:, None] * aw[None, :]) * INV_127_SQUARED
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=in_n, other=0.0).to(tl.float32)[None, :]
    y = y.to(y_ptr.dtype.element_ty)  # rounded to x's dtype, as the reference rounds it before the outlier part
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y, mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _outlier_kernel(
    x_ptr, wq_ptr, aw_ptr, index_ptr, count_ptr, y_ptr,
    M, N, K, stride_xm, stride_xk,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """y += x[:, O]·Ŵ[:, O]ᵀ for one (BM, BN) tile, in 16 bits (fp32 sums, one rounding to y's dtype), Ŵ's
    columns dequantized from the codes as they load; the loop runs as many steps as the GPU's count of
    outlier columns says, none when there are none."""
    n_outliers = tl.load(count_ptr)
    if n_outliers > 0:
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), 8)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        in_m = rows < M
        in_n = cols < N
        y_ptrs = y_ptr + rows[:, None] * N + cols[None, :]
        y = tl.load(y_ptrs, mask=in_m[:, None] & in_n[None, :], other=0.0).to(tl.float32)  # (BM, BN)
        aw = tl.load(aw_ptr + cols, mask=in_n, other=0.0)
        for j0 in range(0, n_outliers, BJ):
            js = j0 + tl.arange(0, BJ)
            in_j = js < n_outliers
            col = tl.load(index_ptr + js, mask=in_j, other=0)  # (BJ,) outlier column numbers
            xo = tl.load(x_ptr + rows[:, None] * stride_xm + col[None, :] * stride_xk,
                         mask=in_m[:, None] & in_j[None, :], other=0.0)  # (BM, BJ) in x's dtype
            wc = tl.load(wq_ptr + cols[:, None] * K + col[None, :], mask=in_n[:, None] & in_j[None, :], other=0)
            wo = (wc.to(tl.float32) * aw[:, None] * INV_127).to(xo.dtype)  # (BN, BJ) Ŵ[:, O], as dequantized
            y = tl.dot(xo, tl.trans(wo), y, input_precision=PRECISION)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _dequantize_kernel(codes_ptr, absmax_ptr, out_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """Ŵ = code · a_w · (1/127) in fp32, rounded once to the output's dtype: one (BN, BK) tile."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rows < N)[:, None] & (cols < K)[None, :]
    code = tl.load(codes_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.float32)
    a = tl.load(absmax_ptr + rows, mask=rows < N, other=0.0)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], (code * a[:, None] * INV_127).to(out_ptr.dtype.element_ty),
             mask=ok)


@functools.lru_cache(maxsize=64)
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (and back to a Python float), once per pair."""
    return torch.tensor(value, dtype=dtype).item()


def int8_linear_triton(x2d: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                       threshold: float) -> torch.Tensor:  # fmt: skip
    """``int8_linear_reference`` on the Triton kernels: x2d (M, in) → (M, out) in x's dtype.

    Unchecked (``kernels.int8_linear`` checks): x2d fp32/fp16/bf16 with any strides, codes (out, in) int8 and
    contiguous, absmax (out,) fp32, bias (out,) in x's dtype or None, threshold ≥ 0.
    """
    # 1. sizes and outputs
    M, K = x2d.shape
    N = codes.shape[0]
    dev = x2d.device
    y = torch.empty(M, N, dtype=x2d.dtype, device=dev)
    if M == 0:
        return y
    has_threshold = threshold > 0
    threshold = _in_dtype(threshold, x2d.dtype)  # torch compares |x| ≥ it in x's dtype: round it the same way
    x_absmax = torch.empty(M, dtype=torch.float32, device=dev)
    flags = torch.zeros(K if has_threshold else 1, dtype=torch.int32, device=dev)
    x_codes = torch.empty(M, K, dtype=torch.int8, device=dev)
    bm, bk = (16, 32) if INTERPRETING else (8, 256)  # 8 rows a program: ~1000 programs at a training step's M
    strides = (x2d.stride(0), x2d.stride(1))
    # 2. launches (one interpreted launch at a time: triton_interpreter.py)
    with interpreter_lock():
        _scan_kernel[(triton.cdiv(M, bm),)](x2d, x_absmax, flags, M, K, *strides, float(threshold),
                                             HAS_THRESHOLD=has_threshold, BM=bm, BK=bk)  # fmt: skip
        _quantize_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            x2d, x_absmax, flags, x_codes, M, K, *strides, float(threshold), HAS_THRESHOLD=has_threshold, BM=bm, BK=bk,
            enable_fp_fusion=False)  # x·scale rounded before the rounding to an integer, as torch rounds it
    if has_threshold:  # the outlier columns in order, and how many there are: on the GPU, no host sync
        index = torch.empty(K, dtype=torch.int32, device=dev)  # (K,), the first `count` entries written
        count = torch.empty((), dtype=torch.int32, device=dev)
        with interpreter_lock():
            _compact_kernel[(1,)](flags, index, count, K, BLOCK=1024)
    grid = lambda META: (triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"]),)
    with interpreter_lock():
        _matmul_kernel[grid](x_codes, codes, x_absmax, absmax, bias if bias is not None else absmax, y,
                             M, N, K, _m_bucket(M), HAS_BIAS=bias is not None,
                             enable_fp_fusion=False)  # the rescale's product rounded before the bias, as in torch
        if has_threshold:
            bm, bn, bj = (16, 32, 32) if INTERPRETING else (64, 128, 32)
            _outlier_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
                x2d, codes, absmax, index, count, y, M, N, K, *strides,
                PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",  # fp32 as exact as the reference's
                BM=bm, BN=bn, BJ=bj, num_warps=4)  # fmt: skip
    return y


def int8_dequantize_triton(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``int8_dequantize_reference`` on a Triton kernel: codes (out, in) int8 contiguous, absmax (out,) fp32 →
    (out, in) in ``dtype``; unchecked."""
    N, K = codes.shape
    out = torch.empty(N, K, dtype=dtype, device=codes.device)
    bn, bk = (16, 32) if INTERPRETING else (32, 256)
    with interpreter_lock():
        _dequantize_kernel[(triton.cdiv(N, bn), triton.cdiv(K, bk))](codes, absmax, out, N, K, BN=bn, BK=bk)
    return out


# --------------------------------------------------------------------------------------------------------
# The wrappers as registered custom ops (torch.ops.minipeft.int8_*_triton), which kernels/int8_autograd.py calls:
# that module imports no Triton, and AOTAutograd, tracing the backward under torch.compile, sees the
# dequantization as one opaque node (it cannot trace Triton's Python launcher).
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minipeft::int8_linear_triton", mutates_args=())
def int8_linear_triton_op(x2d: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None,
                          threshold: float) -> torch.Tensor:  # fmt: skip
    """``int8_linear_triton`` as the op ``minipeft::int8_linear_triton``, on x's GPU (Triton launches on the current
    one; ``device_of`` is a no-op off CUDA)."""
    with torch.cuda.device_of(x2d):
        return int8_linear_triton(x2d, codes, absmax, bias, threshold)


@int8_linear_triton_op.register_fake
def _(x2d, codes, absmax, bias, threshold):
    return x2d.new_empty((x2d.shape[0], codes.shape[0]))


@torch.library.custom_op("minipeft::int8_dequantize_triton", mutates_args=())
def int8_dequantize_triton_op(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``int8_dequantize_triton`` as the op ``minipeft::int8_dequantize_triton``, on the codes' GPU."""
    with torch.cuda.device_of(codes):
        return int8_dequantize_triton(codes, absmax, dtype)


@int8_dequantize_triton_op.register_fake
def _(codes, absmax, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)
