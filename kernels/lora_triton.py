"""Fused LoRA linear layer in Triton: the low-rank update rides inside the base GEMM, forward and backward.

The rank-r product S = (x ⊙ mask)·Aᵀ is tiny (M×r), so it is computed first; the base GEMM then adds
S·(scaling·B)ᵀ to its accumulator before writing Y once, so the LoRA branch costs no extra pass over Y
(LoRA: https://arxiv.org/abs/2106.09685; the split follows LoRAFusion: https://arxiv.org/abs/2510.00206).

    Y = x·Wᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ

Shapes (x flattened to 2-D): x (M, K), mask (M, K) or None, W (N, K), bias (N,), A (r, K), B (N, r), Y (M, N).

The blocked algorithm, in plain Python (R = r padded to a power of two >= 16 for the tensor cores):

    # forward, kernel 1 ("shrink"): one pass over x
    for m in range(0, M, BM):
        S[m:m+BM, :] = sum over k of (x[m:m+BM, k:k+BK] * mask[...]) @ A[:, k:k+BK].T        # (BM, R)
    # forward, kernel 2: the base GEMM with the low-rank term folded into its accumulator
    for m in range(0, M, BM):                      # each (m, n) tile is one program (or one turn of a
        for n in range(0, N, BN):                  # persistent program)
            acc = zeros(BM, BN)                                                              # fp32
            for k in range(0, K, BK):
                acc += x[m:m+BM, k:k+BK] @ W[n:n+BN, k:k+BK].T
            acc += scaling * S[m:m+BM, :] @ B[n:n+BN, :].T      # (BM, R) @ (R, BN): one more MMA step
            Y[m:m+BM, n:n+BN] = (acc + bias[n:n+BN]).to(x.dtype)

    # backward, with G = dY·B (so dS = scaling·G):
    # kernel 3 ("dS/dB"): ONE pass over dY produces G, dB and dbias together
    for n in range(0, N, BN):  for m in range(0, M, BM):
        G[m:m+BM, :]  += dY[m:m+BM, n:n+BN] @ B[n:n+BN, :]               # atomics: summed over n-blocks
        dB[n:n+BN, :] += scaling * dY[m:m+BM, n:n+BN].T @ S[m:m+BM, :]
        dbias[n:n+BN] += dY[m:m+BM, n:n+BN].sum(0)
    # kernel 2 again: dX = dY·W + mask ⊙ (scaling·G·A), one GEMM, the low-rank term in its accumulator
    # kernel 4 ("dA"): dA = scaling·Gᵀ·(x ⊙ mask), one pass over x
    # no dW: the base weight is frozen.

Two implementations of kernel 2: ``_fused_gemm_kernel`` (pointer loads, one tile per program, any strides;
the one the CPU interpreter runs) and ``_fused_gemm_tma_kernel`` (Hopper: TMA tensor-descriptor loads and a
persistent grid of one program per SM).

Besides the Triton kernels, two cuBLAS-only routes, because on a GPU a Triton launch costs far more host
time than a torch op (benchmarks/RESULTS.md) and the LoRA extras are tiny next to the base GEMM:

    # "cublas" (forward 3 GEMMs, backward 5; an autograd.Function, so no autograd graph of small ops):
    S = (x ⊙ mask)·Aᵀ;  Y = x·Wᵀ + bias;  Y += scaling·S·Bᵀ                 # in place (addmm_)
    dS = scaling·dY·B;  dX = dY·W + mask ⊙ (dS·A);  dA = dSᵀ·(x ⊙ mask);  dB = scaling·dYᵀ·S
    # "merged" (no gradient wanted and no mask: inference): one GEMM on a cached merged weight
    W' = W + scaling·B·A        # rebuilt only when W, A, B or scaling change (tensor identity + ._version)
    Y = x·W'ᵀ + bias

``lora_linear(..., path=...)`` reaches every route; with ``path=None`` ``choose_path`` picks per call from
the H100 measurements (inference: "merged"; training: the reference's ops below FUSED_MIN_ROWS rows, where
the host is the bottleneck, "fused_tma" above; see its docstring and benchmarks/RESULTS.md).

Precision: fp16/bf16 operands, fp32 accumulation, output in x's dtype. fp32 operands follow torch's own
setting for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, off by default), so the Triton backend
and the reference round alike: "ieee" dots by default (exact fp32, tested to the fp32 tolerance), "tf32"
when the caller allowed tf32. The dS/dB and dA kernels sum with fp32 atomics, so the last bits of G, dB,
dA and dbias may differ from run to run. "merged" rounds W + scaling·B·A to the dtype once (fp32 inside
cuBLAS), so its output differs from the unmerged routes by about one rounding of the weight.
Limits: every tensor below 2**31 elements (32-bit offsets); fp16, bf16 and fp32 only.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.utils.weak
import triton
import triton.language as tl

from .reference import lora_linear as _unfused_lora_linear
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["SUPPORTED_DTYPES", "PATHS", "lora_linear", "choose_path", "lora_linear_stacked", "fused_gemm",
           "clear_cache"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PATHS = ("fused", "fused_tma", "cublas", "merged", "unfused")

# Autotuning benchmarks every config on first use of a shape; MINIPEFT_KERNEL_AUTOTUNE=0 uses the first
# config only (the GPU tests do this: they check correctness, not speed). The interpreter cannot autotune.
AUTOTUNE = not INTERPRETING and os.environ.get("MINIPEFT_KERNEL_AUTOTUNE", "1") != "0"


def _pad_rank(r: int) -> int:
    """r padded to a power of two >= 16: tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(r))


def _m_bucket(M: int) -> int:
    """Autotune key for M: a power of two, so every sequence length does not trigger a new tuning run."""
    return min(triton.next_power_of_2(M), 16384)


# --------------------------------------------------------------------------------------------------------
# Kernel 2: Y = P·Q + scaling · mask ⊙ (L·R) + bias.
#   forward: P = x (M, K), Q = Wᵀ, L = S (M, r), R = Bᵀ, no mask, bias.
#   dX:      P = dY (M, N), Q = W,  L = G (M, r), R = A,  the dropout mask, no bias.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-blocks share each column-block of Q while it sits in L2."""
    tiles_per_group = GROUP_M * num_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_size
    pid_n = (tile % tiles_per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _lowrank_epilogue(
    acc, offs_m, offs_n, M, N, R,
    l_ptr, r_ptr, mask_ptr, bias_ptr,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, stride_mn,
    scaling,
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    """acc (BM, BN) += scaling · mask ⊙ (L[offs_m, :] · R[:, offs_n]) + bias[offs_n]; all in fp32."""
    in_m = offs_m < M
    in_n = offs_n < N
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        in_r = offs_r < R                                       # the padded rank columns load as zeros
        low = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                      mask=in_m[:, None] & in_r[None, :], other=0.0)             # (BM, R_PAD)
        up = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                     mask=in_r[:, None] & in_n[None, :], other=0.0)              # (R_PAD, BN)
        delta = tl.dot(low.to(up.dtype), up, input_precision=PRECISION) * scaling  # (BM, BN) fp32
        if HAS_MASK:
            drop = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                           mask=in_m[:, None] & in_n[None, :], other=0.0)
            delta = delta * drop.to(tl.float32)
        acc += delta
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    return acc


def _gemm_configs():
    if not AUTOTUNE:  # the interpreter (and MINIPEFT_KERNEL_AUTOTUNE=0): one fixed config
        small = INTERPRETING
        return [triton.Config({"BM": 32 if small else 128, "BN": 32 if small else 128,
                               "BK": 32 if small else 64, "GROUP_M": 4}, num_warps=4, num_stages=3)]
    shapes = [  # (BM, BN, BK, warps, stages)
        (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (64, 256, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 256, 2, 4),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


_GEMM_KEY = ["M_BUCKET", "N", "K", "R_PAD", "HAS_LORA", "HAS_MASK", "HAS_BIAS", "PRECISION"]


@triton.autotune(configs=_gemm_configs(), key=_GEMM_KEY)
@triton.jit
def _fused_gemm_kernel(
    # pointers
    p_ptr, q_ptr, l_ptr, r_ptr, mask_ptr, bias_ptr, out_ptr,
    # sizes (M_BUCKET only keys the autotuner)
    M, N, K, R, M_BUCKET,
    # strides
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_mm, stride_mn, stride_om, stride_on,
    scaling,
    # meta-parameters
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (BM, BN) tile of out = P·Q + scaling·mask⊙(L·R) + bias, with pointer loads (any strides)."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    # Rows/columns past the edge wrap around (% M, % N): they load valid memory and are never stored.
    p_ptrs = p_ptr + (offs_m % M)[:, None] * stride_pm + offs_k[None, :] * stride_pk    # (BM, BK)
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + (offs_n % N)[None, :] * stride_qn    # (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        k_left = K - k * BK
        a = tl.load(p_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(q_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        p_ptrs += BK * stride_pk
        q_ptrs += BK * stride_qk
    acc = _lowrank_epilogue(acc, offs_m, offs_n, M, N, R, l_ptr, r_ptr, mask_ptr, bias_ptr,
                            stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, stride_mn, scaling,
                            HAS_LORA, HAS_MASK, HAS_BIAS, R_PAD, PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _tma_configs():
    if not AUTOTUNE:
        return [triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4)]
    shapes = [  # (BM, BN, BK, warps, stages); smem per stage = (BM + BN)·BK·2 bytes
        (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 5),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@triton.autotune(configs=_tma_configs(), key=_GEMM_KEY + ["Q_NK"])
@triton.jit
def _fused_gemm_tma_kernel(
    # pointers (P and Q must have unit stride in their last dimension: TMA copies rows of 16-byte multiples)
    p_ptr, q_ptr, l_ptr, r_ptr, mask_ptr, bias_ptr, out_ptr,
    # sizes
    M, N, K, R, M_BUCKET,
    # strides
    stride_pm, stride_qrow, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_mm, stride_mn, stride_om, stride_on,
    scaling,
    # meta-parameters
    Q_NK: tl.constexpr,            # True: Q is stored transposed, as (N, K) (the forward's W); False: (K, N)
    HAS_LORA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    R_PAD: tl.constexpr, PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Persistent version of _fused_gemm_kernel: NUM_SMS programs walk the tiles; P and Q arrive by TMA."""
    p_desc = tl.make_tensor_descriptor(p_ptr, shape=[M, K], strides=[stride_pm, 1], block_shape=[BM, BK])
    if Q_NK:
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[N, K], strides=[stride_qrow, 1], block_shape=[BN, BK])
    else:
        q_desc = tl.make_tensor_descriptor(q_ptr, shape=[K, N], strides=[stride_qrow, 1], block_shape=[BK, BN])
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):              # TMA zero-fills what lies past the edges
            a = p_desc.load([pid_m * BM, k * BK])                                   # (BM, BK)
            if Q_NK:
                b = q_desc.load([pid_n * BN, k * BK]).T                             # (BK, BN)
            else:
                b = q_desc.load([k * BK, pid_n * BN])                               # (BK, BN)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        acc = _lowrank_epilogue(acc, offs_m, offs_n, M, N, R, l_ptr, r_ptr, mask_ptr, bias_ptr,
                                stride_lm, stride_lr, stride_rr, stride_rn, stride_mm, stride_mn, scaling,
                                HAS_LORA, HAS_MASK, HAS_BIAS, R_PAD, PRECISION)
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# --------------------------------------------------------------------------------------------------------
# Kernel 1: S = (x ⊙ mask)·Aᵀ, stored (M, R_PAD) in x's dtype with zeros in the padded columns.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _shrink_kernel(
    x_ptr, mask_ptr, a_ptr, s_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_mm, stride_mk, stride_ar, stride_ak, stride_sm,
    HAS_MASK: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    offs_r = tl.arange(0, R_PAD)
    in_m = offs_m < M
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        in_k = (k0 + offs_k) < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)                     # (BM, BK)
        if HAS_MASK:
            x = x * tl.load(mask_ptr + offs_m[:, None] * stride_mm + (k0 + offs_k)[None, :] * stride_mk,
                            mask=in_m[:, None] & in_k[None, :], other=0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                      mask=(offs_r < R)[None, :] & in_k[:, None], other=0.0)           # (BK, R_PAD) = Aᵀ
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :], acc.to(s_ptr.dtype.element_ty),
             mask=in_m[:, None])


# --------------------------------------------------------------------------------------------------------
# Kernel 3: one pass over dY → G = dY·B (M, R_PAD) fp32, dB = scaling·dYᵀ·S (N, R_PAD) fp32, dbias (N,).
# Grid (N-blocks, M-splits); sums across programs go through fp32 atomics into zeroed buffers.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _dsdb_kernel(
    dy_ptr, b_ptr, s_ptr, g_ptr, db_ptr, dbias_ptr,
    M, N, R, ROWS_PER_SPLIT,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm,
    scaling,
    HAS_BIAS_GRAD: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, R_PAD)
    in_n = offs_n < N
    in_r = offs_r < R
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=in_n[:, None] & in_r[None, :], other=0.0)                           # (BN, R_PAD)
    db_acc = tl.zeros((BN, R_PAD), dtype=tl.float32)
    dbias_acc = tl.zeros((BN,), dtype=tl.float32)
    m_begin = tl.program_id(1) * ROWS_PER_SPLIT
    m_end = min(m_begin + ROWS_PER_SPLIT, M)
    for m0 in range(m_begin, m_end, BM):
        offs_m = m0 + tl.arange(0, BM)
        in_m = offs_m < m_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=in_m[:, None] & in_n[None, :], other=0.0)                      # (BM, BN)
        g = tl.dot(dy, b, input_precision=PRECISION)                                     # (BM, R_PAD)
        tl.atomic_add(g_ptr + offs_m[:, None] * R_PAD + offs_r[None, :], g,
                      mask=in_m[:, None] & in_r[None, :], sem="relaxed")
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :],
                    mask=in_m[:, None], other=0.0)                                       # (BM, R_PAD)
        db_acc = tl.dot(tl.trans(dy), s, db_acc, input_precision=PRECISION)              # (BN, R_PAD)
        if HAS_BIAS_GRAD:
            dbias_acc += tl.sum(dy.to(tl.float32), axis=0)
    tl.atomic_add(db_ptr + offs_n[:, None] * R_PAD + offs_r[None, :], db_acc * scaling,
                  mask=in_n[:, None] & in_r[None, :], sem="relaxed")
    if HAS_BIAS_GRAD:
        tl.atomic_add(dbias_ptr + offs_n, dbias_acc, mask=in_n, sem="relaxed")


# --------------------------------------------------------------------------------------------------------
# Kernel 4: dA = scaling·Gᵀ·(x ⊙ mask), (R_PAD, K) fp32. Grid (K-blocks, M-splits), fp32 atomics.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _da_kernel(
    g_ptr, x_ptr, mask_ptr, da_ptr,
    M, K, R, ROWS_PER_SPLIT,
    stride_xm, stride_xk, stride_mm, stride_mk,
    scaling,
    HAS_MASK: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    offs_k = tl.program_id(0) * BK + tl.arange(0, BK)
    offs_r = tl.arange(0, R_PAD)
    in_k = offs_k < K
    acc = tl.zeros((R_PAD, BK), dtype=tl.float32)
    m_begin = tl.program_id(1) * ROWS_PER_SPLIT
    m_end = min(m_begin + ROWS_PER_SPLIT, M)
    for m0 in range(m_begin, m_end, BM):
        offs_m = m0 + tl.arange(0, BM)
        in_m = offs_m < m_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)                       # (BM, BK)
        if HAS_MASK:
            x = x * tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_k[None, :] * stride_mk,
                            mask=in_m[:, None] & in_k[None, :], other=0.0)
        g_t = tl.load(g_ptr + offs_r[:, None] + offs_m[None, :] * R_PAD,
                      mask=in_m[None, :], other=0.0)                                     # (R_PAD, BM) = Gᵀ
        acc = tl.dot(g_t.to(x.dtype), x, acc, input_precision=PRECISION)
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], acc * scaling,
                  mask=(offs_r < R)[:, None] & in_k[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------------------
# Wrappers: check, allocate, launch. Every launch sits in `with interpreter_lock():`, a no-op on a GPU; the
# CPU interpreter keeps its state in globals, so two threads launching at once would corrupt each other's
# runs (triton_interpreter.py says how).
# --------------------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: "ieee" for fp32 unless torch itself allows tf32 matmuls (see module doc)."""
    if dtype == torch.float32 and not INTERPRETING and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.cache
def _device_info(index: int) -> tuple[int, int]:
    """(multiprocessor count, major compute capability) of CUDA device ``index``; read once per device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())[0]


def _splits(rows: int, row_block: int, other_blocks: int, device: torch.device) -> tuple[int, int]:
    """Split the rows so that the grid has about 4 programs per SM: (number of splits, rows per split)."""
    row_blocks = triton.cdiv(rows, row_block)
    want = max(1, triton.cdiv(4 * _num_sms(device), max(other_blocks, 1)))
    n_split = min(row_blocks, want)
    per_split = triton.cdiv(row_blocks, n_split) * row_block
    return triton.cdiv(rows, per_split), per_split


def shrink(x2d: torch.Tensor, mask2d: torch.Tensor | None, lora_A: torch.Tensor) -> torch.Tensor:
    """S = (x ⊙ mask)·Aᵀ as an (M, R_PAD) tensor in x's dtype; columns r.. are zero."""
    M, K = x2d.shape
    r = lora_A.shape[0]
    r_pad = _pad_rank(r)
    s = torch.empty((M, r_pad), device=x2d.device, dtype=x2d.dtype)
    if INTERPRETING:
        bm, bk, warps = 16, 32, 4
    else:  # the loop over K is serial: keep about two programs per SM busy
        bm = min(64, max(16, triton.next_power_of_2(triton.cdiv(M, 2 * _num_sms(x2d.device)))))
        bk, warps = 128, 4
    mask_arg = mask2d if mask2d is not None else x2d
    with interpreter_lock():
        _shrink_kernel[(triton.cdiv(M, bm),)](
            x2d, mask_arg, lora_A, s,
            M, K, r,
            x2d.stride(0), x2d.stride(1), mask_arg.stride(0), mask_arg.stride(1),
            lora_A.stride(0), lora_A.stride(1), s.stride(0),
            HAS_MASK=mask2d is not None, R_PAD=r_pad, PRECISION=_precision(x2d.dtype),
            BM=bm, BK=bk, num_warps=warps,
        )
    return s


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs Hopper or newer, a unit last stride, 16-byte aligned rows and base addresses."""
    for t in tensors:
        if not t.is_cuda or _device_info(t.get_device())[1] < 9:
            return False
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def _tma_allocator(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Scratch memory Triton asks for to build tensor descriptors on the device."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def fused_gemm(
    p: torch.Tensor, q: torch.Tensor, q_is_nk: bool,
    low: torch.Tensor | None, up: torch.Tensor | None, rank: int, scaling: float,
    mask: torch.Tensor | None, bias: torch.Tensor | None, tma: bool,
) -> torch.Tensor:
    """out (M, N) = P·Q + scaling·mask⊙(low·up) + bias, in P's dtype.

    p (M, K); q is (N, K) when ``q_is_nk`` (use its transpose) else (K, N); low (M, ≥rank); up (rank, N) given
    as any strided view; mask (M, N) or None; bias (N,) or None. ``tma`` picks the persistent TMA kernel.
    """
    M, K = p.shape
    N = q.shape[0] if q_is_nk else q.shape[1]
    out = torch.empty((M, N), device=p.device, dtype=p.dtype)
    has_lora = low is not None
    low_arg = low if has_lora else p
    up_arg = up if has_lora else p
    mask_arg = mask if mask is not None else p
    bias_arg = bias if bias is not None else p
    common = dict(HAS_LORA=has_lora, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                  R_PAD=_pad_rank(rank), PRECISION=_precision(p.dtype))
    if tma:
        # Every call: Triton keeps the allocator in a context variable, and backward runs on autograd's thread.
        triton.set_allocator(_tma_allocator)
        num_sms = _num_sms(p.device)
        grid = lambda META: (min(num_sms, triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"])),)
        with interpreter_lock():
            _fused_gemm_tma_kernel[grid](
                p, q, low_arg, up_arg, mask_arg, bias_arg, out,
                M, N, K, rank, _m_bucket(M),
                p.stride(0), q.stride(0), low_arg.stride(0), low_arg.stride(1), up_arg.stride(0), up_arg.stride(1),
                mask_arg.stride(0), mask_arg.stride(1), out.stride(0), out.stride(1),
                scaling, Q_NK=q_is_nk, NUM_SMS=num_sms, **common,
            )
        return out
    stride_qk, stride_qn = (q.stride(1), q.stride(0)) if q_is_nk else (q.stride(0), q.stride(1))
    grid = lambda META: (triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"]),)
    with interpreter_lock():
        _fused_gemm_kernel[grid](
            p, q, low_arg, up_arg, mask_arg, bias_arg, out,
            M, N, K, rank, _m_bucket(M),
            p.stride(0), p.stride(1), stride_qk, stride_qn, low_arg.stride(0), low_arg.stride(1),
            up_arg.stride(0), up_arg.stride(1), mask_arg.stride(0), mask_arg.stride(1), out.stride(0), out.stride(1),
            scaling, **common,
        )
    return out


def _dsdb(dy2d: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float, need_dbias: bool):
    """One pass over dY: G = dY·B (M, R_PAD) fp32, dB = scaling·dYᵀ·S (N, R_PAD) fp32, dbias (N,) fp32."""
    M, N = dy2d.shape
    r = lora_B.shape[1]
    r_pad = s.shape[1]
    g = torch.zeros((M, r_pad), device=dy2d.device, dtype=torch.float32)
    db = torch.zeros((N, r_pad), device=dy2d.device, dtype=torch.float32)
    dbias = torch.zeros((N,), device=dy2d.device, dtype=torch.float32) if need_dbias else g
    bm, bn, warps = (16, 32, 4) if INTERPRETING else (64, 128, 8)
    n_split, per_split = _splits(M, bm, triton.cdiv(N, bn), dy2d.device)
    with interpreter_lock():
        _dsdb_kernel[(triton.cdiv(N, bn), n_split)](
            dy2d, lora_B, s, g, db, dbias,
            M, N, r, per_split,
            dy2d.stride(0), dy2d.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0),
            scaling,
            HAS_BIAS_GRAD=need_dbias, R_PAD=r_pad, PRECISION=_precision(dy2d.dtype), BM=bm, BN=bn, num_warps=warps,
        )
    return g, db, (dbias if need_dbias else None)


def _da(g: torch.Tensor, x2d: torch.Tensor, mask2d: torch.Tensor | None, rank: int, scaling: float):
    """dA = scaling·Gᵀ·(x ⊙ mask) as an (R_PAD, K) fp32 tensor (rows rank.. stay zero)."""
    M, K = x2d.shape
    r_pad = g.shape[1]
    da = torch.zeros((r_pad, K), device=x2d.device, dtype=torch.float32)
    bm, bk, warps = (16, 32, 4) if INTERPRETING else (64, 128, 4)
    n_split, per_split = _splits(M, bm, triton.cdiv(K, bk), x2d.device)
    mask_arg = mask2d if mask2d is not None else x2d
    with interpreter_lock():
        _da_kernel[(triton.cdiv(K, bk), n_split)](
            g, x2d, mask_arg, da,
            M, K, rank, per_split,
            x2d.stride(0), x2d.stride(1), mask_arg.stride(0), mask_arg.stride(1),
            scaling,
            HAS_MASK=mask2d is not None, R_PAD=r_pad, PRECISION=_precision(x2d.dtype), BM=bm, BK=bk, num_warps=warps,
        )
    return da


# --------------------------------------------------------------------------------------------------------
# The per-shape choice, from the H100 run in benchmarks/RESULTS.md. That machine's host costs ~15-35 µs per
# torch op called from Python and 150-300 µs per fused Triton forward, so below FUSED_MIN_ROWS rows a training
# step is host-bound and the reference's ops (whose backward runs in C++ autograd, no Python) win; from
# FUSED_MIN_ROWS rows on it runs the persistent TMA kernels (1.17x the frozen floor vs 1.42x at M = 16384).
# --------------------------------------------------------------------------------------------------------
FUSED_MIN_ROWS = 8192

# The merged-weight cache (inference): one (N, K) copy of W per cached layer, at most this many bytes in all
# (MINIPEFT_MERGED_CACHE_MB, default 2048; 0 turns the "merged" route off for path=None).
MERGED_CACHE_BYTES = int(float(os.environ.get("MINIPEFT_MERGED_CACHE_MB", "2048")) * 2**20)


def choose_path(M: int, N: int, K: int, x: torch.Tensor, weight: torch.Tensor,
                needs_grad: bool = True, has_mask: bool = False) -> str:
    """The path the "triton" backend takes for a call on x (..., K) with M rows (H100: benchmarks/RESULTS.md).

    The interpreter always runs the pointer kernel ("fused"), so CI exercises it. On a GPU:
      - no gradient wanted (inference): "merged", one GEMM on W + scaling·B·A, once the merged weight is
        cached (``lora_linear`` takes "cublas" on the first sighting of an adapter state, or past the cache's
        byte budget); with a dropout mask "cublas";
      - gradients wanted, fewer than FUSED_MIN_ROWS rows: "unfused" (host-bound: fewest Python-level ops);
      - gradients wanted, FUSED_MIN_ROWS rows or more: "fused_tma" for fp16/bf16 tensors that suit TMA
        (Hopper, unit last stride, 16-byte rows), else "cublas".
    """
    if INTERPRETING:
        return "fused"
    if not needs_grad:
        return "cublas" if has_mask else "merged"
    if M < FUSED_MIN_ROWS:
        return "unfused"
    if x.dtype == torch.float32:
        return "cublas"
    return "fused_tma" if _tma_ok(x.reshape(-1, K), weight) else "cublas"


# --------------------------------------------------------------------------------------------------------
# "merged": W' = W + scaling·B·A, cached per weight tensor while W, A, B and scaling stay the same.
# --------------------------------------------------------------------------------------------------------
class _Merged:
    """One cache entry: the adapter state W' was built from (weak references + versions) and W' itself."""

    __slots__ = ("a_ref", "b_ref", "state", "merged")

    def __init__(self):
        self.a_ref = self.b_ref = None
        self.state = None          # (W._version, A._version, B._version, scaling, A.shape, B.shape)
        self.merged = None         # (N, K) tensor, or None until the state is seen a second time


_MERGED: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()


def clear_cache() -> None:
    """Drop every cached merged weight (they are also dropped with their base weight tensor)."""
    _MERGED.clear()


def _merged_weight(weight, lora_A, lora_B, scaling: float, force: bool) -> torch.Tensor | None:
    """W + scaling·B·A (N, K) from the cache, or built now; None where the cache declines (see choose_path).

    A state is (the identities of A and B, the versions of W, A and B, scaling). Without ``force`` W' is built
    only on the second call in a row with one state, so a training step (A and B change every step) or an
    autocast that hands new A/B copies each call never pays an (N, K) rebuild per call.
    """
    entry = _MERGED.get(weight)
    state = (weight._version, lora_A._version, lora_B._version, scaling, lora_A.shape, lora_B.shape)
    if entry is not None and entry.state == state and entry.a_ref() is lora_A and entry.b_ref() is lora_B:
        if entry.merged is not None:
            return entry.merged
        # second sighting of this state: build below
    else:  # first sighting: remember the state, drop a W' built from an older one
        if entry is None:
            entry = _Merged()
            _MERGED[weight] = entry
        entry.merged = None
        entry.a_ref = torch.utils.weak.WeakIdRef(lora_A)
        entry.b_ref = torch.utils.weak.WeakIdRef(lora_B)
        entry.state = state
        if not force:
            return None
    if not force:  # the live entries (those of dead weights are gone): counted here, on a rebuild only
        held = sum(e.merged.numel() * e.merged.element_size() for e in _MERGED.values() if e.merged is not None)
        if held + weight.numel() * weight.element_size() > MERGED_CACHE_BYTES:
            return None
    with torch.no_grad():
        # fp32 accumulation of B·A and W in one cuBLAS call, one rounding to W's dtype: (N, r)·(r, K) + (N, K)
        entry.merged = torch.addmm(weight, lora_B, lora_A, alpha=scaling).detach()
    return entry.merged


# --------------------------------------------------------------------------------------------------------
# "cublas": three GEMMs forward, five backward, inside one autograd.Function.
# --------------------------------------------------------------------------------------------------------
def _cublas_forward(x2d, mask2d, weight, bias, lora_A, lora_B, scaling):
    """(y (M, N), s (M, r), xa (M, K)) with xa = x ⊙ mask, s = xa·Aᵀ, y = x·Wᵀ + bias + scaling·s·Bᵀ."""
    xa = x2d if mask2d is None else x2d * mask2d                                     # (M, K)
    s = torch.mm(xa, lora_A.t())                                                     # (M, r)
    y = torch.mm(x2d, weight.t()) if bias is None else torch.addmm(bias, x2d, weight.t())   # (M, N)
    y.addmm_(s, lora_B.t(), alpha=scaling)                                           # Y += scaling·S·Bᵀ
    return y, s, xa


class _CublasLoRAFunction(torch.autograd.Function):
    """The "cublas" route with a hand-written backward: 5 cuBLAS calls instead of autograd's ~10 small ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_mask):
        K = x.shape[-1]
        N = weight.shape[0]
        x2d = x.reshape(-1, K)                                                       # (M, K)
        mask2d = None if dropout_mask is None else dropout_mask.reshape(-1, K)
        y, s, xa = _cublas_forward(x2d, mask2d, weight, bias, lora_A, lora_B, scaling)
        ctx.save_for_backward(xa, mask2d, weight, lora_A, lora_B, s)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        xa, mask2d, weight, lora_A, lora_B, s = ctx.saved_tensors
        scaling = ctx.scaling
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        dy2d = dy.reshape(-1, weight.shape[0])                                       # (M, N)
        dx = dA = dB = dbias = None
        if need_x or need_A:
            # dS = scaling·dY·B (M, r); beta=0 ignores the `input` operand (s only lends its shape)
            ds = torch.addmm(s, dy2d, lora_B, beta=0, alpha=scaling)
            if need_x:
                dx2d = torch.mm(dy2d, weight)                                        # (M, K)
                if mask2d is None:
                    dx2d.addmm_(ds, lora_A)                                          # += dS·A
                else:
                    dx2d.addcmul_(torch.mm(ds, lora_A), mask2d)                      # += mask ⊙ (dS·A)
                dx = dx2d.view(ctx.x_shape)
            if need_A:
                dA = torch.mm(ds.t(), xa)                                            # (r, K)
        if need_B:
            dB = torch.addmm(lora_B, dy2d.t(), s, beta=0, alpha=scaling)             # (N, r)
        if need_bias:
            dbias = dy2d.sum(0)
        return dx, None, dbias, dA, dB, None, None


# --------------------------------------------------------------------------------------------------------
# "fused" / "fused_tma": the Triton kernels.
# --------------------------------------------------------------------------------------------------------
def _forward_2d(x2d, mask2d, weight, bias, lora_A, lora_B, scaling, path):
    """(y2d (M, N), s (M, R_PAD)) for one Triton path."""
    r = lora_A.shape[0]
    s = shrink(x2d, mask2d, lora_A)                                    # (M, R_PAD)
    y = fused_gemm(x2d, weight, True, s, lora_B.t(), r, scaling, None, bias, tma=(path == "fused_tma"))
    return y, s


class _LoRALinearFunction(torch.autograd.Function):
    """Forward and backward of the fused LoRA linear layer; the weight is frozen (no dW)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_mask, path):
        K = x.shape[-1]
        N = weight.shape[0]
        x2d = x.reshape(-1, K)                                   # (M, K), a view when x's strides allow
        mask2d = None if dropout_mask is None else dropout_mask.reshape(-1, K)
        if path == "fused_tma" and x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        y2d, s = _forward_2d(x2d, mask2d, weight, bias, lora_A, lora_B, scaling, path)
        ctx.save_for_backward(x2d, mask2d, weight, lora_A, lora_B, s)
        ctx.scaling, ctx.path, ctx.x_shape = scaling, path, x.shape
        ctx.has_bias = bias is not None
        return y2d.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        x2d, mask2d, weight, lora_A, lora_B, s = ctx.saved_tensors
        scaling, path = ctx.scaling, ctx.path
        need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        r = lora_A.shape[0]
        dy2d = dy.reshape(-1, weight.shape[0])                    # (M, N)
        if path == "fused_tma" and dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        g, db, dbias = _dsdb(dy2d, lora_B, s, scaling, need_bias and ctx.has_bias)
        dx = dA = dB = None
        if need_x:
            dx2d = fused_gemm(dy2d, weight, False, g, lora_A, r, scaling, mask2d, None,
                              tma=(path == "fused_tma"))
            dx = dx2d.view(ctx.x_shape)
        if need_A:
            dA = _da(g, x2d, mask2d, r, scaling)[:r].to(lora_A.dtype)
        if need_B:
            dB = db[:, :r].to(lora_B.dtype)
        if dbias is not None:
            dbias = dbias.to(dy.dtype)
        return dx, None, dbias, dA, dB, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ (inputs checked by the caller, ``kernels.lora_linear``).

    ``path``: None picks per call (``choose_path``); "fused" (pointer kernel, any device Triton runs on),
    "fused_tma" (Hopper TMA kernel), "cublas" (3 cuBLAS GEMMs forward, 5 backward), "merged" (one GEMM on
    a cached W + scaling·B·A; only without a mask and when no gradient is wanted) or "unfused" (the
    reference's torch ops, autograd backward). "cublas" and "merged" also run on CPU tensors.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
        or (bias is not None and bias.requires_grad))
    if path is None:
        if x.numel() == 0:  # nothing to launch
            return _unfused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
        K = x.shape[-1]
        path = choose_path(x.numel() // K if K else 0, weight.shape[0], K, x, weight, needs_grad,
                           dropout_mask is not None)
        if path == "merged":
            merged = None if MERGED_CACHE_BYTES <= 0 else _merged_weight(weight, lora_A, lora_B, scaling, False)
            if merged is not None:
                return torch.nn.functional.linear(x, merged, bias)
            path = "cublas"
    elif path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    elif path == "merged":
        if needs_grad or dropout_mask is not None:
            raise ValueError("path 'merged' is for inference: no dropout mask and no gradient wanted")
        return torch.nn.functional.linear(x, _merged_weight(weight, lora_A, lora_B, scaling, True), bias)
    if path == "cublas":
        if not needs_grad:  # no graph to record: the same ops without the Function's overhead
            K = x.shape[-1]
            mask2d = None if dropout_mask is None else dropout_mask.reshape(-1, K)
            y, _, _ = _cublas_forward(x.reshape(-1, K), mask2d, weight, bias, lora_A, lora_B, scaling)
            return y.view(*x.shape[:-1], weight.shape[0])
        return _CublasLoRAFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    if path == "unfused" or x.numel() == 0:
        return _unfused_lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    if path == "fused_tma" and not _tma_ok(weight, lora_A):
        raise ValueError("path 'fused_tma' needs Hopper CUDA tensors with unit last stride and 16-byte rows")
    return _LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, path)


def lora_linear_stacked(
    x: torch.Tensor, weight_and_A: torch.Tensor, bias_and_zeros: torch.Tensor | None,
    lora_B: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """Forward only, for the benchmark: one cuBLAS GEMM x·[W; A]ᵀ gives Y and S, then Y += S·(s·B)ᵀ.

    weight_and_A (N + r, K) = torch.cat([W, A]); bias_and_zeros (N + r,) = cat([bias, zeros(r)]) or None.
    Returns a (..., N) view of the (..., N + r) product.
    """
    N, r = lora_B.shape
    x2d = x.reshape(-1, x.shape[-1])
    ys = torch.mm(x2d, weight_and_A.t()) if bias_and_zeros is None else \
        torch.addmm(bias_and_zeros, x2d, weight_and_A.t())                    # (M, N + r)
    y = ys[:, :N]
    y.addmm_(ys[:, N:], lora_B.t(), alpha=scaling)                            # in place, through the view
    return ys.view(*x.shape[:-1], N + r)[..., :N]
