"""The merged weight W' = W + scaling·B·A in one pass: a read of W and a write of W'.

Training on the merged weight (the "merged_train" route of kernels/lora_routes.py; LoRA:
https://arxiv.org/abs/2106.09685) builds W' on every forward, since A and B change every step. Its reference,
``torch.addmm(W, B, A, alpha=scaling)``, is one cuBLAS call that first copies W into the output and then adds
the product into it: two reads and two writes of a weight-sized tensor, in two kernels. The rank-r product is a
few multiply-adds per weight, so the work is a copy's: here each program loads a tile of W and the matching
rows of B and columns of A, and writes the tile of W' once.

    for each tile (n, k):                                            # (BN, BK)
        W'[n:n+BN, k:k+BK] = (W[n:n+BN, k:k+BK] + scaling · B[n:n+BN, :] @ A[:, k:k+BK]).to(W.dtype)

Shapes: W (N, K), A (r, K), B (N, r); r is padded with zeros to a power of two ≥ 16 for the tensor cores, and
a rank above 64 is taken in chunks of 64 (so that any rank's tiles fit in shared memory).
Precision as the reference's: fp32 products and sums (exact products of fp16/bf16 operands; fp32 operands take
"ieee" dots, as torch's default for fp32 matmuls), one rounding to W's dtype; only the order of the r terms'
sum may differ from cuBLAS's. With B = 0 (a fresh adapter) W' is W bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_triton import _pad_rank
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["merge", "low_rank_tile"]

# 32 rows × 128 columns of W per program, 4 warps: a tile is 8 KB of bf16 read and written. Measured against addmm
# and three other tilings in benchmarks/RESULTS.md (section "On an H100, 2026-12-06 07:35-08:05": 2.2-3.5 µs against
# addmm's 4.4-7.8 at GPT-2 small's four widths).
BN, BK = (16, 32) if INTERPRETING else (32, 128)


@triton.jit
def low_rank_tile(a_ptr, b_ptr, offs_n, offs_k, in_n, in_k, R, stride_ar, stride_ak, stride_bn, stride_br,
                  R_PAD: tl.constexpr, RC: tl.constexpr):
    """B[offs_n, :] @ A[:, offs_k] in fp32, (len(offs_n), len(offs_k)): the rank in chunks of RC (one for r ≤ 64),
    padded with zeros to R_PAD. Also the NF4 merge's (kernels/nf4_merge_triton.py)."""
    low = tl.zeros((offs_n.shape[0], offs_k.shape[0]), dtype=tl.float32)
    for r0 in tl.static_range(0, R_PAD, RC):
        offs_r = r0 + tl.arange(0, RC)
        in_r = offs_r < R
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=in_n[:, None] & in_r[None, :], other=0.0)                       # (BN, RC)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=in_r[:, None] & in_k[None, :], other=0.0)                       # (RC, BK)
        low = tl.dot(b, a, low, input_precision="ieee")                                  # (BN, BK) fp32
    return low


@triton.jit
def _merge_kernel(
    w_ptr, a_ptr, b_ptr, out_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_on, stride_ok,
    scaling,
    R_PAD: tl.constexpr, RC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    in_n, in_k = offs_n < N, offs_k < K
    low = low_rank_tile(a_ptr, b_ptr, offs_n, offs_k, in_n, in_k, R, stride_ar, stride_ak, stride_bn, stride_br,
                        R_PAD, RC)                                                       # (BN, BK) fp32
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                mask=in_n[:, None] & in_k[None, :], other=0.0)                           # (BN, BK)
    merged = w.to(tl.float32) + scaling * low
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok,
             merged.to(out_ptr.dtype.element_ty), mask=in_n[:, None] & in_k[None, :])


def merge(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling·B·A, a new (N, K) tensor of W's dtype; W (N, K), A (r, K), B (N, r) share one dtype."""
    N, K = weight.shape
    r = lora_A.shape[0]
    if lora_A.shape != (r, K) or lora_B.shape != (N, r) or not (weight.dtype == lora_A.dtype == lora_B.dtype):
        raise ValueError(f"merge: W {tuple(weight.shape)} {weight.dtype}, A {tuple(lora_A.shape)} {lora_A.dtype} and "
                         f"B {tuple(lora_B.shape)} {lora_B.dtype} do not fit (N, K), (r, K), (N, r) of one dtype")
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    if r == 0:
        return out.copy_(weight)
    with interpreter_lock():
        _merge_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
            weight, lora_A, lora_B, out,
            N, K, r,
            weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
            scaling,
            R_PAD=_pad_rank(r), RC=min(_pad_rank(r), 64), BN=BN, BK=BK, num_warps=4,
        )
    return out
