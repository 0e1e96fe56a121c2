"""QLoRA's layer in Triton: the 4-bit weight is dequantized in registers on its way into the LoRA GEMM.

A LoRA adapter on an NF4 base (QLoRA, https://arxiv.org/abs/2305.14314):

    Ŵ[o, c] = nf4_values[code(i)] · absmax[i // blocksize],   i = o · in_features + c    (never written out)
    absmax[b] = dq_values[absmax_codes[b]] · absmax_scale[b // dq_blocksize] + absmax_offset   (double quant)
    y = x·Ŵᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ

Shapes (x flattened to 2-D): x (M, in), mask (M, in) or None, Ŵ (out, in), bias (out,), A (r, in), B (out, r).

Dequantize-then-GEMM writes Ŵ in 16 bits and reads it back (2 + 2 bytes per weight, plus the half byte of
codes); here the GEMM reads the half byte of codes and its block statistics (4.13 bits per weight with double
quantization) and makes each weight where it is used. Everything else is the LoRA kernels' plan
(kernels/lora_triton.py), with its kernels reused: the "shrink" pass for S = (x ⊙ mask)·Aᵀ, one pass over
dY for G = dY·B, dB and dbias, the low-rank epilogue, and the dA pass. The GEMMs are new; the first, for
every shape and for dX:

    # kernel 2 here: out = P·Q + scaling · mask ⊙ (L·R) + bias, with Q made from the NF4 state
    #   forward: P = x (M, in),   Q = Ŵᵀ: Q[k, n] = Ŵ[n, k],  flat index i = n·in + k,  L = S, R = Bᵀ, bias
    #   dX:      P = dY (M, out), Q = Ŵ:  Q[k, n] = Ŵ[k, n],  flat index i = k·in + n,  L = G, R = A, the mask
    for each (BM, BN) tile of out:
        acc = zeros(BM, BN)
        for k in range(0, K, BK):
            i = k_block[:, None] * stride_qk + n_block[None, :] * stride_qn       # (BK, BN) indices into Ŵ
            code = codes[i // 2] >> 4 if i is even else codes[i // 2] & 15          # element 2j: high nibble
            q = (nf4_values[code] * absmax[i // blocksize]).to(P.dtype)           # rounded as Ŵ would be
            acc += P[m_block, k_block] @ q
        out = acc + the low-rank epilogue

Two ways to make a tile of Ŵ, chosen per launch:
- packed (``_nf4_rows``), when in_features is a multiple of the blocksize (so every row of Ŵ starts on a
  byte and on a block): a tile of whole rows loads its bytes once, splits each into its two nibbles and
  interleaves them back into order (``tl.join``), and loads one absmax per row and block — a (rows, cols)
  tile reads rows·cols/2 bytes and rows·max(1, cols/blocksize) statistics;
- per weight (``_nf4_tile``), for every other shape (in_features not a multiple of the blocksize: a row then
  starts inside a block, and for an odd in_features a byte straddles two rows): each weight loads its own byte
  and its block's statistics, which L1 serves to its neighbours. Correct for every shape; about 10× slower than
  the packed path on an H200.

The forward has a kernel of its own, ``_nf4_forward_kernel``, wherever whole rows of Ŵ start on a 32-bit word
(in_features a multiple of the blocksize, the codes 4-byte aligned): the GEMM above with Ŵ's rows on the MMA's M
side, the codes read as words and looked up by one gather per chunk, K split across programs for a batch of a few
rows (with S made by the same launch): on an H200, 1.78× the time of a bf16 linear layer at 16 rows (before
kernels/nf4_rows_gluon.py took those rows) and 2.44× at 4096 (K = N = 4096, with a rank-16 adapter). The section
above the kernel says what each change removed, and benchmarks/RESULTS.md what still keeps it behind a bf16 GEMM.
From 1 to 16 rows of bf16 or fp16 x on an NVIDIA GPU (no dropout, no adapter or one of rank ≤ 16, a blocksize of
64 or more) the forward runs kernels/nf4_rows_gluon.py instead, in one launch: the weight built straight into the
registers of Ampere's mma.sync, its codebook lookup one shared-memory load a byte (a Gluon kernel, GPU only).
A forward of one or two rows without dropout that it cannot take (fp32 x, a blocksize of 32, a rank above 16, the
CPU's interpreter) skips the tensor cores too: kernels/nf4_decode_triton.py, matrix-vector products on CUDA cores,
2.6× faster for one row on an H200 than this GEMM was with its earlier lookup. From
``nf4_rs_gluon.MIN_ROWS`` rows on a Hopper GPU (bf16 or fp16 x, no adapter or one of rank ≤ 32, a blocksize of
64 or more) it runs kernels/nf4_rs_gluon.py: Hopper's wgmma with Ŵ as its first operand, made from the codes in
the registers the MMA reads, and x copied by TMA as its second.

Registered as ``minipeft::nf4_lora_linear_triton`` (forward) and ``minipeft::nf4_lora_linear_triton_backward``,
with an autograd.Function twin for eager mode, as kernels/lora_triton.py does and for the same reasons.
What the kernels take, the switch (``kernels.nf4_lora_linear``) checks or makes so: a state of flat, contiguous
tensors (they index codes[i // 2] and absmax[i // blocksize]); a blocksize that is a power of two from 32 to 4096
(whole blocks per tile: kernels/limits.py); 32-bit offsets, so fewer than 2**31 weights (i = o·in + c) and every
tensor spanning fewer than 2**31 elements.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import lora_triton
from .limits import OFFSET_LIMIT, span
from .lora_triton import (
    _GEMM_KEY,
    _autotune,
    _gemm_configs,
    _lowrank_epilogue,
    _m_bucket,
    _pad_rank,
    _precision,
    _tile_coords,
    da,
    dsdb,
    shrink,
    workspace,
)
from .nf4_decode_triton import MAX_ROWS as DECODE_MAX_ROWS
from .nf4_decode_triton import nf4_decode
from .nf4_rows_gluon import launch_rows, rows_fit, rows_split
from .nf4_rs_gluon import launch_rs, rs_fits
from .nf4_triton import absmax_at
from .triton_interpreter import interpreter_lock

__all__ = ["nf4_gemm", "nf4_forward", "forward_fits", "nf4_lora_linear"]


@triton.jit
def _nf4_tile(codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
              offs_k, offs_n, K, N, stride_qk, stride_qn,
              BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The (BK, BN) tile Q[offs_k, offs_n] of the dequantized weight, fp32; zeros outside (K, N)."""
    ok = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    i = offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn                     # (BK, BN) flat indices
    byte = tl.load(codes_ptr + i // 2, mask=ok, other=0).to(tl.int32)
    code = tl.where(i % 2 == 0, byte >> 4, byte & 0x0F)                              # element 2j: high nibble
    block = i // BLOCKSIZE
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // DQ_BLOCKSIZE, mask=ok, other=0.0)
        absmax = tl.load(dq_ptr + absmax_code) * scale + tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    return tl.where(ok, tl.load(nf4_ptr + code) * absmax, 0.0)


@triton.jit
def _nf4_rows(codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
              rows, col0, n_rows, in_features,
              COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Ŵ[rows, col0 : col0 + COLS] as an fp32 (len(rows), COLS) tile, for in_features % BLOCKSIZE == 0.

    Row r's columns c, c+1 (c even) share byte (r·in + c) / 2: high nibble first. Rows past n_rows read as 0;
    columns past in_features read another row's weights, which the caller multiplies by zeros of x.
    """
    ROWS: tl.constexpr = rows.shape[0]
    offs_b = tl.arange(0, COLS // 2)                                                # byte within the row
    in_rows = rows < n_rows
    first = rows * in_features + col0                                               # (ROWS,) flat index
    ok = in_rows[:, None] & (col0 + 2 * offs_b < in_features)[None, :]
    byte = tl.load(codes_ptr + first[:, None] // 2 + offs_b[None, :], mask=ok, other=0).to(tl.int32)
    w = tl.join(tl.load(nf4_ptr + (byte >> 4)), tl.load(nf4_ptr + (byte & 0x0F)))   # (ROWS, COLS/2, 2)
    w = tl.reshape(w, (ROWS, COLS))                                                  # back in column order
    if BLOCKSIZE >= COLS:  # the tile's part of a row lies in one block (col0 is a multiple of COLS)
        absmax = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, first // BLOCKSIZE,
                           in_rows, DQ_BLOCKSIZE, DOUBLE_QUANT)                      # (ROWS,)
        w = w * absmax[:, None]
    else:  # COLS / BLOCKSIZE blocks per row of the tile
        NB: tl.constexpr = COLS // BLOCKSIZE
        block = first[:, None] // BLOCKSIZE + tl.arange(0, NB)[None, :]             # (ROWS, NB)
        absmax = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, block,
                           in_rows[:, None] & (block < tl.cdiv(n_rows * in_features, BLOCKSIZE)),
                           DQ_BLOCKSIZE, DOUBLE_QUANT)
        w = tl.reshape(tl.reshape(w, (ROWS, NB, BLOCKSIZE)) * absmax[:, :, None], (ROWS, COLS))
    return w


SMEM_BYTES = 200 * 1024  # an H100/H200 block may use 227 KiB of shared memory; keep a margin


def _smem_estimate(bm: int, bn: int, bk: int, stages: int, size: int) -> int:
    """Shared memory a config needs, from above: (stages + 2) copies of the two operand tiles and an fp32
    (BM, BN) buffer for the epilogue's layout change (a 64×128×64 fp32 config with 3 stages measured 256 KiB
    on an H200, which this puts at 272 KiB)."""
    return (bm + bn) * bk * size * (stages + 2) + bm * bn * 4


def _nf4_gemm_configs():
    """The dense GEMM's configs; without autotuning one that also fits fp32 operands in shared memory."""
    if not lora_triton.AUTOTUNE:
        small = lora_triton.INTERPRETING
        # in the interpreter 64-wide tiles too, so that a blocksize of 32 puts two blocks in a tile row
        return [triton.Config({"BM": 16 if small else 64, "BN": 64, "BK": 64 if small else 32, "GROUP_M": 4},
                              num_warps=4, num_stages=3)]
    return _gemm_configs()


def _fit_shared_memory(configs, named_args, **_):
    """Autotuning prunes with this: fewer pipeline stages (or none of a config) where fp32 operands would need
    more shared memory than a block has."""
    size = named_args["p_ptr"].element_size()
    fitted = []
    for c in configs:
        bm, bn, bk, stages = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"], c.num_stages
        while stages > 1 and _smem_estimate(bm, bn, bk, stages, size) > SMEM_BYTES:
            stages -= 1
        if _smem_estimate(bm, bn, bk, stages, size) <= SMEM_BYTES:
            fitted.append(triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=stages))
    return fitted or configs[-1:]


@_autotune(_nf4_gemm_configs(), _GEMM_KEY + ["BLOCKSIZE", "DOUBLE_QUANT", "Q_IS_W", "PACKED"],
           prune_configs_by={"early_config_prune": _fit_shared_memory})
@triton.jit
def _nf4_gemm_kernel(
    # pointers
    p_ptr, codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
    l_ptr, r_ptr, mask_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, R, M_BUCKET,
    # strides (stride_qk, stride_qn: of the flat index into Ŵ)
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_mm, stride_mn, stride_om, stride_on,
    scaling,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, Q_IS_W: tl.constexpr,
    PACKED: tl.constexpr,          # in_features % BLOCKSIZE == 0: tiles of whole rows (_nf4_rows)
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BM, BN) tile of out = P·Q + scaling·mask⊙(L·R) + bias, Q dequantized from NF4 as it is used."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    p_ptrs = p_ptr + (offs_m % M)[:, None] * stride_pm + offs_k[None, :] * stride_pk    # (BM, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        p = tl.load(p_ptrs, mask=offs_k[None, :] < K - k * BK, other=0.0)
        if PACKED and Q_IS_W:      # dX: Q = Ŵ[k-block, n-block], rows of Ŵ along k
            q = _nf4_rows(codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
                          k * BK + offs_k, pid_n * BN, K, N, BN, BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)
        elif PACKED:               # forward: Q = Ŵ[n-block, k-block]ᵀ, rows of Ŵ along n
            q = tl.trans(_nf4_rows(codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
                                   offs_n, k * BK, N, K, BK, BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT))
        else:
            q = _nf4_tile(codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
                          k * BK + offs_k, offs_n, K, N, stride_qk, stride_qn, BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)
        acc = tl.dot(p, q.to(p.dtype), acc, input_precision=PRECISION)                 # Ŵ rounded to P's dtype
        p_ptrs += BK * stride_pk
    acc = _lowrank_epilogue(acc, offs_m, offs_n, M, N, R, l_ptr, r_ptr, mask_ptr, bias_ptr,
                            stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, stride_mn, scaling,
                            HAS_LORA, HAS_MASK, HAS_BIAS, R_PAD, PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def nf4_gemm(
    p: torch.Tensor, state: tuple, out_features: int, in_features: int, blocksize: int, dq_blocksize: int,
    q_is_w: bool, low: torch.Tensor | None, up: torch.Tensor | None, scaling: float,
    mask: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    """out = P·Q + scaling·mask⊙(low·up) + bias, in P's dtype, Q made from the NF4 weight Ŵ (out, in).

    ``state`` = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values), as
    ``minipeft.quant.nf4.kernel_arguments`` gives it. ``q_is_w`` False: Q = Ŵᵀ and p is (M, in) (the forward
    where ``nf4_forward`` cannot run); True: Q = Ŵ and p is (M, out) (dX). low (M, ≥r) and up (r, N), mask
    (M, N), bias (N,): each optional.
    """
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    K, N = (out_features, in_features) if q_is_w else (in_features, out_features)
    M = p.shape[0]
    if p.shape[1] != K:
        raise ValueError(f"nf4_gemm: p {tuple(p.shape)} does not fit a ({out_features}, {in_features}) weight "
                         f"(q_is_w={q_is_w})")
    rank = 0 if up is None else up.shape[0]
    out = torch.empty((M, N), device=p.device, dtype=p.dtype)
    if out.numel() == 0:
        return out
    double_quant = absmax_scale is not None
    p_arg, low_arg, up_arg, mask_arg, bias_arg = lora_triton._operands(out, p, low, up, mask, bias)
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    # flat index into Ŵ (out, in) of Q[k, n]: Ŵ[n, k] (forward) or Ŵ[k, n] (dX)
    stride_qk, stride_qn = (in_features, 1) if q_is_w else (1, in_features)
    grid = lambda META: (triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"]),)  # noqa: E731
    with interpreter_lock():
        _nf4_gemm_kernel[grid](
            p_arg, codes, absmax, scale_arg, offset_arg, nf4_values, dq_arg, low_arg, up_arg, mask_arg, bias_arg, out,
            M, N, K, rank, _m_bucket(M),
            p.stride(0), p.stride(1), stride_qk, stride_qn, low_arg.stride(0), low_arg.stride(1),
            up_arg.stride(0), up_arg.stride(1), mask_arg.stride(0), mask_arg.stride(1), out.stride(0), out.stride(1),
            scaling,
            BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant, Q_IS_W=q_is_w,
            PACKED=in_features % blocksize == 0,
            HAS_LORA=low is not None, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
            R_PAD=_pad_rank(max(rank, 1)), PRECISION=_precision(p.dtype),
        )
    return out


# --------------------------------------------------------------------------------------------------------
# The forward on whole rows of Ŵ (in_features a multiple of the blocksize, the codes contiguous and 4-byte
# aligned: ``forward_fits``). What the GEMM above does per weight, and what this kernel does instead (each
# measured on an H200: benchmarks/RESULTS.md):
#   - Ŵ's rows go on the MMA's M side ("swap AB"): a program makes outᵀ[n-block, m-block] = Ŵ[n-block, :] ·
#     xᵀ[:, m-block], so the dequantized tile is the MMA's first operand as it comes out of registers (no
#     transpose), and a batch of one row of x still fills the tile (16 rows of x, 15 of them masked);
#   - the codes are read as 32-bit words (8 weights each): vector loads the pipeliner can prefetch
#     (asynchronous copies need 4 bytes or more; a byte per load was neither vectorized nor prefetched);
#   - the 16-entry codebook is loaded once, a (16,) tensor, and a chunk's codes are looked up by one
#     ``tl.gather`` along it, which the compiler serves from shared memory (the 16 values in 16 banks: no
#     conflicts). As a load from global memory in the loop, the pipeliner turned every lookup into an
#     asynchronous copy, 3× slower; as eight gathers on a (rows, 16) codebook in registers, one per nibble of the
#     words, each weight took two shuffles and the selects around them (1.5× slower at 16 rows, 1.7× at 4096);
#   - K is split across programs when the (n, m) tiles are too few to fill the GPU (a batch of a few rows):
#     each of the SPLIT_K programs of a tile writes its fp32 partial sum, one more program per split makes
#     that split's part of S = x·Aᵀ (the shrink kernel would loop over all of K in one program), and a second
#     kernel adds the partials in a fixed order (the same result on every run; no atomics).
#
#     for each (BN, BM) tile of outᵀ and each split [k_lo, k_hi) of K:
#         acc = zeros(BN, BM)
#         for k in range(k_lo, k_hi, BK):
#             word = codes32[(n·K + k) / 8 + w]                  (BN, BK/8): weights 8w .. 8w+7, two per byte
#             Ŵ[n, k:k+BK] = codebook[nibbles of word] · absmax  (low byte first, high nibble first in a byte)
#             acc += Ŵ[n, k:k+BK] @ x[m, k:k+BK]ᵀ
#         one split: acc += scaling·B[n]·S[m]ᵀ + bias[n], store;  more: store acc as a partial sum, and
#         _finish_splits_kernel adds the partials, scaling·S·Bᵀ and the bias
# --------------------------------------------------------------------------------------------------------
def _forward_configs():
    """(BN, BM, BK) tiles: BM = 16 for a few rows (a decode step), larger for prefill and training."""
    if not lora_triton.AUTOTUNE:
        if lora_triton.INTERPRETING:  # BK = 64 puts two blocks of 32 in a chunk
            return [triton.Config({"BN": 32, "BM": 16, "BK": 64, "GROUP_N": 4}, num_warps=4, num_stages=1)]
        return [triton.Config({"BN": 128, "BM": 64, "BK": 64, "GROUP_N": 8}, num_warps=8, num_stages=3)]
    shapes = [  # (BN, BM, BK, warps, stages)
        (128, 16, 64, 4, 3), (64, 16, 64, 4, 3), (128, 16, 128, 4, 3), (256, 16, 64, 8, 3),
        (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
    ]
    return [triton.Config({"BN": bn, "BM": bm, "BK": bk, "GROUP_N": 8}, num_warps=w, num_stages=st)
            for bn, bm, bk, w, st in shapes]


FORWARD_BK_MAX = max(c.kwargs["BK"] for c in _forward_configs())  # a split of K is a multiple of every BK


def _prune_forward(configs, named_args, **_):
    """No row tile wider than the rows (a 256-row tile for one row of x is 255 rows of zeros)."""
    rows = max(16, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BM"] <= rows] or configs[:1]


@triton.jit
def _s_part(x_ptr, a_ptr, s_part_ptr, m_block, pid_k, k_lo, k_hi, M, R, stride_xm, stride_xk, stride_ar, stride_ak,
            R_PAD: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """s_part[pid_k, m-block] = x[m-block, k_lo:k_hi] · A[:, k_lo:k_hi]ᵀ, (BM, R_PAD) in fp32."""
    offs_m = m_block * BM + tl.arange(0, BM)
    offs_r = tl.arange(0, R_PAD)
    offs_k = tl.arange(0, BK)
    s_acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        in_k = (k0 + offs_k) < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & in_k[None, :], other=0.0)                 # (BM, BK)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak,
                    mask=(offs_r < R)[:, None] & in_k[None, :], other=0.0)                 # (R_PAD, BK)
        s_acc = tl.dot(x, tl.trans(a), s_acc, input_precision=PRECISION)
    tl.store(s_part_ptr + (pid_k * M + offs_m[:, None]) * R_PAD + offs_r[None, :], s_acc, mask=(offs_m < M)[:, None])


@triton.jit
def _forward_tile(
    pid, pid_k, k_lo, k_hi,
    x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
    s_ptr, b_ptr, bias_ptr, out_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_bn, stride_br, stride_os, stride_om, stride_on,
    scaling,
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Tile ``pid`` of yᵀ = Ŵ·xᵀ over the columns [k_lo, k_hi); with SPLIT_K = 1 plus scaling·B·Sᵀ + bias."""
    offs_k = tl.arange(0, BK)
    pid_n, pid_m = _tile_coords(pid, tl.cdiv(N, BN), tl.cdiv(M, BM), GROUP_N)
    offs_n = pid_n * BN + tl.arange(0, BN)                       # rows of Ŵ: columns of y
    offs_m = pid_m * BM + tl.arange(0, BM)                       # rows of x
    offs_w = tl.arange(0, BK // 8)                               # words of a chunk: weights 8w .. 8w+7
    in_n = offs_n < N
    in_m = offs_m < M
    row_word = offs_n * (K // 8)                                 # K % 8 == 0: every row starts on a word
    row_block = offs_n * (K // BLOCKSIZE)                        # and on a block: the row's first block
    book = tl.load(nf4_ptr + tl.arange(0, 16))                                       # the codebook (16,)
    # a chunk lies in one quantization block per row when BK <= BLOCKSIZE (k is a multiple of BK): its absmax
    # is loaded one chunk ahead, by hand (a byte load cannot be an asynchronous copy, so the pipeliner would not)
    am_next = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, row_block + k_lo // BLOCKSIZE,
                        in_n, DQ_BLOCKSIZE, DOUBLE_QUANT)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    # Every split has columns: k_lo < K, since nf4_forward makes split = cdiv(K, k_split) (the interpreter checks
    # it). Without this line the compiler keeps a path around the loop whose zeros meet the MMAs' results in the
    # accumulator, and ptxas serializes the MMAs (C7515): each waited for before the next chunk's dequantization
    # (benchmarks/compiled.py shows both).
    tl.assume(k_hi > k_lo)
    for k0 in range(k_lo, k_hi, BK):
        in_kw = (k0 + 8 * offs_w) < k_hi
        word = tl.load(words_ptr + row_word[:, None] + (k0 // 8 + offs_w)[None, :],
                       mask=in_n[:, None] & in_kw[None, :], other=0)                       # (BN, BK/8) int32
        if BLOCKSIZE >= BK:
            am = am_next[:, None]                                                          # (BN, 1)
            next_ok = in_n & (offs_n * 0 + k0 + BK < k_hi)  # a tensor: the interpreter takes no scalar mask
            am_next = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr,
                                row_block + (k0 + BK) // BLOCKSIZE, next_ok, DQ_BLOCKSIZE, DOUBLE_QUANT)
        else:                # BK / BLOCKSIZE blocks per row of the chunk: each word's own block
            am = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr,
                           (row_block + k0 // BLOCKSIZE)[:, None] + (8 * offs_w // BLOCKSIZE)[None, :],
                           in_n[:, None] & in_kw[None, :], DQ_BLOCKSIZE, DOUBLE_QUANT)     # (BN, BK/8)
        # The word's bytes are b0 (bits 0-7) .. b3; weight 2j is byte j's high nibble, 2j+1 its low one. The
        # nibbles are put in column order first (joined from the most significant index bit down, so that the
        # reshape puts weight f at 8w + f; joins stay in registers), then looked up by one gather.
        n4 = tl.join(tl.join(word >> 4, word >> 20), tl.join(word >> 12, word >> 28))     # weights 0, 4, 2, 6
        n5 = tl.join(tl.join(word, word >> 16), tl.join(word >> 8, word >> 24))           # weights 1, 5, 3, 7
        code = tl.reshape(tl.join(n4, n5), (BN * BK,)) & 0x0F                              # (BN·BK,)
        value = tl.reshape(tl.gather(book, code, 0), (BN, BK))                             # (BN, BK) fp32
        if BLOCKSIZE >= BK:
            w = value * am
        else:                # each word's absmax, repeated for its 8 weights
            w = value * tl.reshape(tl.broadcast_to(am[:, :, None], (BN, BK // 8, 8)), (BN, BK))
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=in_m[:, None] & ((k0 + offs_k) < k_hi)[None, :], other=0.0)      # (BM, BK)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=PRECISION)         # Ŵ rounded to x's dtype
    if SPLIT_K == 1:         # the low-rank term and the bias (with splits, _finish_splits_kernel adds them)
        if HAS_LORA:
            offs_r = tl.arange(0, R_PAD)
            in_r = offs_r < R
            up = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                         mask=in_n[:, None] & in_r[None, :], other=0.0)                    # (BN, R_PAD) = B
            low = tl.load(s_ptr + offs_m[None, :] * stride_sm + offs_r[:, None] * stride_sr,
                          mask=in_m[None, :] & in_r[:, None], other=0.0)                   # (R_PAD, BM) = Sᵀ
            acc = tl.dot(up, (low * scaling).to(up.dtype), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_n[:, None] & in_m[None, :])


@_autotune(_forward_configs(), ["M_BUCKET", "N", "K", "SPLIT_K", "BLOCKSIZE", "DOUBLE_QUANT", "HAS_LORA",
                                "HAS_BIAS", "R_PAD", "PRECISION"],
           prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _nf4_forward_kernel(
    # pointers (codes as int32 words; out: y (M, N), or the partial sums (SPLIT_K, M, N) in fp32;
    # s_part: the partial sums of S (SPLIT_K, M, R_PAD) in fp32 when SHRINK_HERE)
    x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
    s_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, s_part_ptr,
    # sizes (M_BUCKET only keys the autotuner; K_SPLIT: columns of K per split, a multiple of BK)
    M, N, K, R, M_BUCKET, K_SPLIT,
    # strides
    stride_xm, stride_xk, stride_sm, stride_sr, stride_ar, stride_ak, stride_bn, stride_br,
    stride_os, stride_om, stride_on,
    scaling,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_LORA: tl.constexpr, SHRINK_HERE: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr,
):
    """One (BN, BM) tile of yᵀ = Ŵ·xᵀ over one split of K; with SPLIT_K = 1 plus scaling·B·Sᵀ + bias.

    With SHRINK_HERE, one more program per block of rows and split computes that split's part of S = x·Aᵀ
    (the "shrink" kernel's work, spread over the splits instead of one serial pass over K)."""
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    if SHRINK_HERE and pid >= num_tiles:  # programs past the tiles: S of one block of rows over this split
        _s_part(x_ptr, a_ptr, s_part_ptr, pid - num_tiles, pid_k, k_lo, k_hi, M, R, stride_xm, stride_xk,
                stride_ar, stride_ak, R_PAD, PRECISION, BM, BK)
    else:
        _forward_tile(pid, pid_k, k_lo, k_hi, x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr,
                      nf4_ptr, dq_ptr, s_ptr, b_ptr, bias_ptr, out_ptr, M, N, K, R, stride_xm, stride_xk,
                      stride_sm, stride_sr, stride_bn, stride_br, stride_os, stride_om, stride_on, scaling,
                      BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT, SPLIT_K, HAS_LORA, HAS_BIAS, R_PAD, PRECISION,
                      BN, BM, BK, GROUP_N)


@triton.jit
def _finish_splits_kernel(
    part_ptr, s_part_ptr, s_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, R,
    stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    SPLIT_K: tl.constexpr, HAS_LORA: tl.constexpr, SHRINK_HERE: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    """y = Σ_s part[s] + scaling·S·Bᵀ + bias for one (BM, BN) tile; with SHRINK_HERE, S = Σ_s s_part[s] too,
    stored (in y's dtype) by the first column of tiles. The partial sums are loaded at once, as one
    (splits, BM, BN) block, and summed by ``tl.sum`` in a fixed order: the same result on every run."""
    SPLITS: tl.constexpr = triton.next_power_of_2(SPLIT_K)
    offs_s = tl.arange(0, SPLITS)[:, None, None]                                          # (SPLITS, 1, 1)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    in_m = offs_m < M
    ok = in_m[:, None] & (offs_n < N)[None, :]
    part = tl.load(part_ptr + (offs_s * M + offs_m[None, :, None]) * N + offs_n[None, None, :],
                   mask=(offs_s < SPLIT_K) & ok[None, :, :], other=0.0)                   # (SPLITS, BM, BN)
    acc = tl.sum(part, axis=0)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        in_r = offs_r < R
        if SHRINK_HERE:
            s_part = tl.load(s_part_ptr + (offs_s * M + offs_m[None, :, None]) * R_PAD + offs_r[None, None, :],
                             mask=(offs_s < SPLIT_K) & in_m[None, :, None], other=0.0)   # (SPLITS, BM, R_PAD)
            s = tl.sum(s_part, axis=0).to(s_ptr.dtype.element_ty)   # S in x's dtype, as the shrink kernel makes it
            if tl.program_id(1) == 0:
                tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, s,
                         mask=in_m[:, None] & in_r[None, :])
        else:
            s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                        mask=in_m[:, None] & in_r[None, :], other=0.0)
        up = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=(offs_n < N)[None, :] & in_r[:, None], other=0.0)               # (R_PAD, BN) = Bᵀ
        acc = tl.dot((s * scaling).to(up.dtype), up, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=ok)


def _split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """How many programs share a tile's sum over K: about two programs per SM counting 128 × 64 tiles, with
    at least 256 columns of K per program. On an H200 (132 SMs) at K = N = 4096: 8 for 1 and 16 rows of x (faster
    than 4 and 32, and as fast as 16, with the earlier lookup; 1.78× against 2.14× the bf16 linear for 16 with the
    one-gather lookup), 2 at 256 rows, 1 from 512 rows on."""
    tiles = triton.cdiv(M, 64) * triton.cdiv(N, 128)
    return max(1, min(2 * lora_triton._num_sms(device) // tiles, K // 256))


def forward_fits(in_features: int, blocksize: int, codes: torch.Tensor) -> bool:
    """Whether ``nf4_forward`` can read these codes as 32-bit words: whole rows of Ŵ start on a word and a
    block (in_features a multiple of the blocksize, 32 or more), and the codes are contiguous and 4-byte
    aligned."""
    return in_features % blocksize == 0 and codes.is_contiguous() and codes.data_ptr() % 4 == 0


def nf4_forward(
    x2d: torch.Tensor, state: tuple, out_features: int, in_features: int, blocksize: int, dq_blocksize: int,
    lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, mask2d: torch.Tensor | None,
    bias: torch.Tensor | None, split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, S): y = x·Ŵᵀ + scaling·S·Bᵀ + bias (M, out) and S = (x ⊙ mask)·Aᵀ (M, r), in x's dtype, where
    ``forward_fits``.

    x2d (M, in), lora_A (r, in) and lora_B (out, r) together or neither (then S is None), mask2d (M, in) or
    None, bias (out,) or None. ``split_k``: programs per tile along K (default: ``_split_k``'s choice). With K
    split and no mask, S is made by the forward's own programs; otherwise by the shrink kernel first.
    Without ``split_k``, ``nf4_rows_gluon.MIN_ROWS`` to ``MAX_ROWS`` rows where ``nf4_rows_gluon.rows_fit`` (16-bit
    x on an NVIDIA GPU, no adapter or one of rank ≤ 16) go to kernels/nf4_rows_gluon.py; the rest of at most
    ``nf4_decode_triton.MAX_ROWS`` rows without a mask to the decode kernel (kernels/nf4_decode_triton.py:
    matrix-vector products on CUDA cores, 2.6× faster for one row on an H200 than this GEMM was with its earlier
    lookup; fp32 x, a blocksize of 32, a rank above 16, the interpreter). From ``nf4_rs_gluon.MIN_ROWS`` rows
    where ``nf4_rs_gluon.rs_fits`` (16-bit x on a Hopper GPU, no adapter or one of rank ≤ 32, a blocksize of 64 or
    more), kernels/nf4_rs_gluon.py, with S by the shrink kernel first.
    """
    M, K = x2d.shape
    N = out_features
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    if K != in_features or not forward_fits(in_features, blocksize, codes):
        raise ValueError(f"nf4_forward: x {tuple(x2d.shape)}, in_features={in_features}, blocksize {blocksize}: "
                         f"needs x (M, in_features), in_features a multiple of the blocksize, 4-byte aligned codes")
    rank = 0 if lora_A is None else lora_A.shape[0]
    if N and K and split_k is None and rows_fit(x2d, blocksize, mask2d, lora_A):  # a few rows: mma.sync (Gluon)
        y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
        s = None if lora_A is None else torch.empty((M, rank), device=x2d.device, dtype=x2d.dtype)
        launch_rows(x2d, state, N, K, blocksize, dq_blocksize, lora_A, lora_B, scaling, bias, y, s,
                    rows_split(N, K, lora_triton._num_sms(x2d.device)))
        return y, s
    if M <= DECODE_MAX_ROWS and mask2d is None and split_k is None:  # a decode step: no tensor cores
        return nf4_decode(x2d, state, N, in_features, blocksize, dq_blocksize, lora_A, lora_B, scaling, bias)
    if N and K and split_k is None and rs_fits(x2d, blocksize, codes, lora_A):  # many rows on Hopper (Gluon)
        s = None if lora_A is None else shrink(x2d, mask2d, lora_A)                 # (M, r)
        y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
        return launch_rs(x2d, state, N, K, blocksize, dq_blocksize, s, lora_B, scaling, bias, y), s
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if y.numel() == 0:
        return y, None if lora_A is None else shrink(x2d, mask2d, lora_A)
    split = split_k or _split_k(M, N, K, x2d.device)
    k_split = triton.cdiv(triton.cdiv(K, split), FORWARD_BK_MAX) * FORWARD_BK_MAX
    split = triton.cdiv(K, k_split)                               # no split left without columns
    shrink_here = lora_A is not None and split > 1 and mask2d is None
    if lora_A is None:
        s = None
    elif shrink_here:
        s = torch.empty((M, rank), device=x2d.device, dtype=x2d.dtype)
    else:
        s = shrink(x2d, mask2d, lora_A)                                              # (M, r)
    r_pad = _pad_rank(max(rank, 1))
    part = y if split == 1 else torch.empty((split, M, N), device=x2d.device, dtype=torch.float32)
    s_part = torch.empty((split, M, r_pad), device=x2d.device, dtype=torch.float32) if shrink_here else y
    double_quant = absmax_scale is not None
    s_arg, a_arg, b_arg, bias_arg = lora_triton._operands(y, s, lora_A, lora_B, bias)
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    flags = dict(SPLIT_K=split, HAS_LORA=lora_A is not None, SHRINK_HERE=shrink_here, HAS_BIAS=bias is not None,
                 R_PAD=r_pad, PRECISION=_precision(x2d.dtype))

    def grid(META):  # the (n, m) tiles, plus with SHRINK_HERE one program per block of rows for S
        m_blocks = triton.cdiv(M, META["BM"])
        return (m_blocks * triton.cdiv(N, META["BN"]) + (m_blocks if shrink_here else 0), split)

    with interpreter_lock():
        _nf4_forward_kernel[grid](
            x2d, codes.view(torch.int32), absmax, scale_arg, offset_arg, nf4_values, dq_arg,
            s_arg, a_arg, b_arg, bias_arg, part, s_part,
            M, N, K, rank, _m_bucket(M), k_split,
            x2d.stride(0), x2d.stride(1), s_arg.stride(0), s_arg.stride(-1), a_arg.stride(0), a_arg.stride(-1),
            b_arg.stride(0), b_arg.stride(-1), part.stride(0) if split > 1 else 0, part.stride(-2),
            part.stride(-1), scaling,
            BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant, **flags,
        )
        if split > 1:
            bm, bn = 16, 32
            _finish_splits_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                part, s_part, s_arg, b_arg, bias_arg, y, M, N, rank,
                s_arg.stride(0), s_arg.stride(-1), b_arg.stride(0), b_arg.stride(-1), y.stride(0), y.stride(1),
                scaling, BM=bm, BN=bn, num_warps=4, **flags,
            )
    return y, s


# --------------------------------------------------------------------------------------------------------
# The autograd op: lora_triton's forward and backward with these GEMMs in place of the dense one.
# --------------------------------------------------------------------------------------------------------
def _forward(x, state, bias, lora_A, lora_B, scaling, dropout_mask, sizes):
    """(Y (..., out), S (M, r)); sizes = (out_features, in_features, blocksize, dq_blocksize)."""
    out_features, in_features = sizes[0], sizes[1]
    M = math.prod(x.shape[:-1])
    x2d = x.reshape(M, in_features)                                                  # (M, in)
    mask2d = None if dropout_mask is None else dropout_mask.reshape(M, in_features)
    with torch.cuda.device_of(x):                                                    # launch on x's GPU
        if forward_fits(in_features, sizes[2], state[0]):  # whole rows of Ŵ on words and blocks
            y2d, s = nf4_forward(x2d, state, *sizes, lora_A, lora_B, scaling, mask2d, bias)  # (M, out), (M, r)
        else:
            s = shrink(x2d, mask2d, lora_A)                                          # (M, r)
            y2d = nf4_gemm(x2d, state, *sizes, False, s, lora_B.t(), scaling, None, bias)
    return y2d.view(*x.shape[:-1], out_features), s


def _backward_kernels(dy, x, state, lora_A, lora_B, s, scaling, dropout_mask, sizes, need_x, need_A, need_B,
                      need_bias):
    """(dx (..., in), dA (r, in), dB (out, r), dbias (out,)); each one not asked for comes back empty."""
    out_features, in_features = sizes[0], sizes[1]
    M = math.prod(x.shape[:-1])
    x2d = x.reshape(M, in_features)
    mask2d = None if dropout_mask is None else dropout_mask.reshape(M, in_features)
    dy2d = dy.reshape(M, out_features)                                               # (M, out)
    if span(dy2d) >= OFFSET_LIMIT:  # a slice of a larger gradient: the switch checked M·out (kernels/limits.py)
        dy2d = dy2d.contiguous()
    empty = lambda: dy.new_empty(0)  # noqa: E731  (a fresh tensor each: outputs may not alias each other)
    with torch.cuda.device_of(dy):                                                   # launch on dY's GPU
        ws = workspace(M, out_features, in_features if need_A else 0, lora_A.shape[0], dy.device)  # one zero fill
        g, d_b, d_bias = dsdb(dy2d, lora_B, s, scaling, need_bias, ws)               # G, dB, dbias
        d_x = nf4_gemm(dy2d, state, *sizes, True, g, lora_A, scaling, mask2d, None).view(x.shape) if need_x \
            else empty()
        d_a = da(g, x2d, mask2d, lora_A.shape[0], scaling, lora_A.dtype, ws) if need_A else empty()
    return (d_x, d_a, d_b if need_B else empty(), d_bias if need_bias else empty())


@torch.library.custom_op("minipeft::nf4_lora_linear_triton", mutates_args=())
def nf4_lora_linear_op(
    x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None, nf4_values: torch.Tensor, dq_values: torch.Tensor | None,
    bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
    dropout_mask: torch.Tensor | None, out_features: int, in_features: int, blocksize: int, dq_blocksize: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_forward`` as a registered op: what torch.compile records."""
    state = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    return _forward(x, state, bias, lora_A, lora_B, scaling, dropout_mask,
                    (out_features, in_features, blocksize, dq_blocksize))


@nf4_lora_linear_op.register_fake
def _(x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, lora_A, lora_B, scaling,
      dropout_mask, out_features, in_features, blocksize, dq_blocksize):
    return x.new_empty((*x.shape[:-1], out_features)), x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0]))


@torch.library.custom_op("minipeft::nf4_lora_linear_triton_backward", mutates_args=())
def nf4_lora_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None, nf4_values: torch.Tensor, dq_values: torch.Tensor | None,
    lora_A: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None,
    out_features: int, in_features: int, blocksize: int, dq_blocksize: int,
    need_x: bool, need_A: bool, need_B: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_backward_kernels`` as a registered op: the backward graph AOTAutograd traces holds this node."""
    state = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    return _backward_kernels(dy, x, state, lora_A, lora_B, s, scaling, dropout_mask,
                             (out_features, in_features, blocksize, dq_blocksize), need_x, need_A, need_B, need_bias)


@nf4_lora_linear_backward_op.register_fake
def _(dy, x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, lora_A, lora_B, s, scaling,
      dropout_mask, out_features, in_features, blocksize, dq_blocksize, need_x, need_A, need_B, need_bias):
    empty = lambda: dy.new_empty(0)  # noqa: E731
    return (dy.new_empty(x.shape) if need_x else empty(), lora_A.new_empty(lora_A.shape) if need_A else empty(),
            lora_B.new_empty(lora_B.shape) if need_B else empty(),
            dy.new_empty((out_features,)) if need_bias else empty())


# inputs of the op, by position: x 0, the state 1-6, bias 7, lora_A 8, lora_B 9, scaling 10, mask 11, sizes 12-15
def _save(ctx, x, state, lora_A, lora_B, s, scaling, dropout_mask, sizes) -> None:
    ctx.save_for_backward(x, *state, lora_A, lora_B, s, dropout_mask)   # the 4-bit state, never Ŵ
    ctx.scaling, ctx.sizes = scaling, sizes


def _grads(ctx, dy, backward) -> tuple:
    """Gradients to x, bias, lora_A and lora_B, each only when asked for; none to the frozen 4-bit state."""
    x, *state, lora_A, lora_B, s, dropout_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_x, need_bias, need_A, need_B = need[0], need[7], need[8], need[9]
    d_x, d_a, d_b, d_bias = backward(dy, x, *state, lora_A, lora_B, s, ctx.scaling, dropout_mask, *ctx.sizes,
                                     need_x, need_A, need_B, need_bias)
    keep = lambda t, wanted: t if wanted else None  # noqa: E731
    return (keep(d_x, need_x), *([None] * 6), keep(d_bias, need_bias), keep(d_a, need_A), keep(d_b, need_B),
            *([None] * 6))


def _setup_context(ctx, inputs, output):
    x, *rest = inputs
    _save(ctx, x, tuple(rest[:6]), rest[7], rest[8], output[1], rest[9], rest[10], tuple(rest[11:15]))
    ctx.mark_non_differentiable(output[1])  # the op returns S for its backward, never for the caller's graph


def _backward_from_state(dy, x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, lora_A, lora_B,
                         s, scaling, dropout_mask, out_features, in_features, blocksize, dq_blocksize, need_x,
                         need_A, need_B, need_bias):
    """``_backward_kernels`` with the op's flat arguments (the eager Function's backward)."""
    state = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    return _backward_kernels(dy, x, state, lora_A, lora_B, s, scaling, dropout_mask,
                             (out_features, in_features, blocksize, dq_blocksize), need_x, need_A, need_B, need_bias)


nf4_lora_linear_op.register_autograd(
    lambda ctx, dy, _ds: _grads(ctx, dy, torch.ops.minipeft.nf4_lora_linear_triton_backward),
    setup_context=_setup_context)


class _EagerNF4LoraTriton(torch.autograd.Function):
    """The op's forward and backward without its Python dispatch, for eager mode (see kernels/lora_triton.py)."""

    @staticmethod
    def forward(ctx, x, codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, bias, lora_A, lora_B,
                scaling, dropout_mask, out_features, in_features, blocksize, dq_blocksize):
        state = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
        sizes = (out_features, in_features, blocksize, dq_blocksize)
        y, s = _forward(x, state, bias, lora_A, lora_B, scaling, dropout_mask, sizes)
        _save(ctx, x, state, lora_A, lora_B, s, scaling, dropout_mask, sizes)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _backward_from_state)


def nf4_lora_linear(x, state, bias, lora_A, lora_B, scaling: float, dropout_mask, out_features: int,
                    in_features: int, blocksize: int, dq_blocksize: int) -> torch.Tensor:
    """y = x·Ŵᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ on the kernels above (inputs checked by the caller,
    ``kernels.nf4_lora_linear``): the registered op while torch.compile traces, its Function in eager mode, and
    the forward alone where nothing needs a gradient (a decode step: no autograd node to make)."""
    if torch.compiler.is_compiling():
        return torch.ops.minipeft.nf4_lora_linear_triton(x, *state, bias, lora_A, lora_B, float(scaling),
                                                         dropout_mask, out_features, in_features, blocksize,
                                                         dq_blocksize)[0]
    if not torch.is_grad_enabled() or not (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        sizes = (out_features, in_features, blocksize, dq_blocksize)
        return _forward(x, state, bias, lora_A, lora_B, float(scaling), dropout_mask, sizes)[0]
    return _EagerNF4LoraTriton.apply(x, *state, bias, lora_A, lora_B, float(scaling), dropout_mask, out_features,
                                     in_features, blocksize, dq_blocksize)
