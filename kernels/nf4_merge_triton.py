"""A QLoRA layer's merged weight W' = Ŵ + scaling·B·A in one pass, from the 4-bit codes: for a batch of many rows.

QLoRA (https://arxiv.org/abs/2305.14314) keeps the base weight as NF4 codes and a LoRA adapter beside it:

    y = x·Ŵᵀ + scaling·(x·Aᵀ)·Bᵀ + bias = x·W'ᵀ + bias,    W' = Ŵ + scaling·B·A,
    Ŵ[n, k] = nf4_values[code(n, k)] · absmax[block(n, k)]

For a forward without gradients over many rows of x (a prefill), dequantize-then-GEMM writes Ŵ in 16 bits, runs
the GEMM and then the low-rank term as three more passes over (rows, out) tensors. Folding the adapter into the
weight as it is dequantized leaves one GEMM and nothing after it: each program reads a tile of codes, its
absmax, the matching rows of B and columns of A, and writes the tile of W' once.

    for each tile (n, k):                                            # (BN, BK), k a multiple of BK
        Ŵ_tile = nf4_values[codes] · absmax                           # fp32, nf4_lora_triton._nf4_rows
        W'[n:n+BN, k:k+BK] = (Ŵ_tile + scaling · B[n:n+BN, :] @ A[:, k:k+BK]).to(A.dtype)

Shapes: codes for an (N, K) weight, K a multiple of the blocksize (every row starts on a byte and a block);
A (r, K), B (N, r), W' (N, K) in A's dtype. The rank is padded to a power of two ≥ 16 for the tensor cores and
taken in chunks of 64. Precision: Ŵ and the low-rank product in fp32, one rounding; ``nf4_reference.
nf4_merge_reference`` is the same formula in torch ops. The merged weight lives for one call: nothing is cached,
so the layer's memory stays 4-bit between calls (a cached W' would be a 16-bit copy of the base).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .limits import NF4_BLOCKSIZES, OFFSET_LIMIT
from .lora_merge_triton import low_rank_tile
from .lora_triton import _pad_rank
from .nf4_lora_triton import _nf4_rows
from .nf4_merge_gluon import launch_merge, merge_fits
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["nf4_merge_triton", "nf4_merge_op"]

# 32 rows × 128 columns a program, 4 warps: the LoRA merge kernel's tile (kernels/lora_merge_triton.py), within 4% of
# the best of 9 tilings on an H100 at 4096², 2304 × 768 and 768 × 3072 (benchmarks/RESULTS.md). The interpreter's
# 64 columns still span two blocks of 32 and leave a partial last tile for the tests' small shapes.
BN, BK = (16, 64) if INTERPRETING else (32, 128)
NUM_WARPS = 4


@triton.jit
def _nf4_merge_kernel(
    codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, a_ptr, b_ptr, out_ptr,
    N, K, R,
    stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    R_PAD: tl.constexpr, RC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    in_n, in_k = offs_n < N, offs_k < K
    low = low_rank_tile(a_ptr, b_ptr, offs_n, offs_k, in_n, in_k, R, stride_ar, stride_ak, stride_bn, stride_br,
                        R_PAD, RC)                                                       # (BN, BK) fp32 B·A
    w = _nf4_rows(codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
                  offs_n, k0, N, K, BK, BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)           # (BN, BK) fp32 Ŵ
    merged = w + scaling * low
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], merged.to(out_ptr.dtype.element_ty),
             mask=in_n[:, None] & in_k[None, :])


def nf4_merge_triton(
    codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor, dq_values: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
    dq_blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """Ŵ + scaling·B·A as a new contiguous (out_features, in_features) tensor of A's dtype. The NF4 state as the
    kernels take it (flat, contiguous: ``minipeft.quant.nf4.kernel_arguments``); a blocksize of
    ``limits.NF4_BLOCKSIZES`` dividing in_features; fewer than 2**31 weights (32-bit offsets); A (r, in_features)
    and B (out_features, r) of one dtype. Where ``nf4_merge_gluon.merge_fits`` (bf16 or fp16 A and B of rank 1 to
    64, on an NVIDIA GPU) kernels/nf4_merge_gluon.py makes it, the same sum in the MMA's layout; elsewhere (fp32
    adapters, Triton's interpreter) this file's kernel."""
    N, K = out_features, in_features
    r = lora_A.shape[0]
    if (blocksize not in NF4_BLOCKSIZES or K % blocksize or N * K >= OFFSET_LIMIT or lora_A.shape != (r, K)
            or lora_B.shape != (N, r) or lora_A.dtype != lora_B.dtype):
        raise ValueError(f"nf4_merge_triton: an ({N}, {K}) NF4 weight of blocksize {blocksize}, A "
                         f"{tuple(lora_A.shape)} {lora_A.dtype} and B {tuple(lora_B.shape)} {lora_B.dtype}: needs "
                         f"a blocksize of {NF4_BLOCKSIZES} dividing in_features, fewer than 2**31 weights, and "
                         "A (r, in), B (out, r) of one dtype")
    out = torch.empty((N, K), device=codes.device, dtype=lora_A.dtype)
    if out.numel() == 0:
        return out
    if merge_fits(codes, lora_A, N):  # 16-bit A and B on a GPU: the MMA's layout throughout (nf4_merge_gluon.py)
        launch_merge((codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values), N, K, blocksize,
                     dq_blocksize, lora_A, lora_B, scaling, out)
        return out
    double_quant = absmax_scale is not None
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    r_pad = _pad_rank(max(r, 1))
    with interpreter_lock(), torch.cuda.device_of(codes):  # on the codes' GPU (Triton launches on the current one)
        _nf4_merge_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
            codes, absmax, scale_arg, offset_arg, nf4_values, dq_arg, lora_A, lora_B, out,
            N, K, r,
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            scaling,
            BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant,
            R_PAD=r_pad, RC=min(r_pad, 64), BN=BN, BK=BK, num_warps=NUM_WARPS,
        )
    return out


# The kernel as a registered custom op, for the reason kernels/nf4_triton.py gives: torch.compile sees one opaque
# node whose output it reads from the fake implementation.
@torch.library.custom_op("minipeft::nf4_merge_triton", mutates_args=())
def nf4_merge_op(
    codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor, dq_values: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
    dq_blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """``nf4_merge_triton`` as the op ``minipeft::nf4_merge_triton``."""
    return nf4_merge_triton(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, out_features,
                            in_features, blocksize, dq_blocksize, lora_A, lora_B, scaling)


@nf4_merge_op.register_fake
def _(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, out_features, in_features, blocksize,
      dq_blocksize, lora_A, lora_B, scaling):
    return lora_A.new_empty((out_features, in_features))
