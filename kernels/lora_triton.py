"""Fused LoRA linear layer in Triton: the low-rank update rides inside the base GEMM, forward and backward.

The rank-r product S = (x ⊙ mask)·Aᵀ is tiny (M×r), so it is computed first; the base GEMM then adds
(scaling·S)·Bᵀ to its accumulator before writing Y once, so the LoRA branch costs no extra pass over Y
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
            acc += (scaling * S[m:m+BM, :]).to(B.dtype) @ B[n:n+BN, :].T   # (BM, R) @ (R, BN): one more MMA step
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

The file reads in the order of Triton's tutorials: each kernel, then its wrapper, which checks its inputs,
allocates the output and launches. Then the autograd op that chains the kernels, registered with
``torch.library`` as two custom ops, ``minipeft::lora_linear_triton`` (forward) and
``minipeft::lora_linear_triton_backward``: torch.compile sees one opaque node per LoRA layer instead of
tracing into Triton's Python launcher. Last, ``lora_linear``: the reference's signature (kernels/reference.py)
on these kernels. The only choice made in this file is which GEMM kernel runs (TMA where ``_tma_ok`` allows);
whether Triton is worth running at all for a shape is the "auto" backend's question (kernels/lora_routes.py).

Precision: fp16/bf16 operands, fp32 accumulation, output in x's dtype. The low-rank term enters the accumulator
as (scaling·S)·Bᵀ, scaling·S computed in fp32 and rounded to B's dtype (16 bits for fp16/bf16) before the MMA, and
dX's as (scaling·G)·A likewise; with a dropout mask the epilogue scales the fp32 product S·Bᵀ (G·A) instead, then
masks it. fp32 operands follow torch's own setting for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32``,
off by default), so the Triton backend and the reference round alike: "ieee" dots by default (exact fp32, tested
to the fp32 tolerance), "tf32" when the caller allowed tf32. The dS/dB and dA kernels sum with fp32 atomics, so
the last bits of G, dB, dA and dbias may differ from run to run.
Limits: offsets are 32-bit, so every tensor must span, and every buffer hold, fewer than 2**31 elements: the switch
checks (kernels/limits.py; a dY that is a slice of a larger gradient is copied in backward); fp16, bf16 and fp32
only. Each op runs on its tensors' GPU (``torch.cuda.device_of``): Triton launches on the current device.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .limits import OFFSET_LIMIT, span
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["SUPPORTED_DTYPES", "TMA_DTYPES", "tma_ready", "shrink", "fused_gemm", "fused_gemm_tma", "Workspace",
           "workspace", "dsdb", "da", "lora_linear_op", "lora_linear_backward_op", "lora_linear"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_DTYPES = (torch.float16, torch.bfloat16)  # the TMA kernel's configs are sized for 2-byte operands

# Autotuning benchmarks every config on first use of a shape; MINIPEFT_KERNEL_AUTOTUNE=0 uses the first
# config only (the GPU tests do this: they check correctness, not speed). The interpreter cannot autotune.
AUTOTUNE = not INTERPRETING and os.environ.get("MINIPEFT_KERNEL_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------------------------------------
# Helpers every wrapper uses. Every launch sits in `with interpreter_lock():`, a no-op on a GPU; the CPU
# interpreter keeps its state in globals, so two threads launching at once would corrupt each other's runs
# (triton_interpreter.py says how).
# --------------------------------------------------------------------------------------------------------
def _pad_rank(r: int) -> int:
    """r padded to a power of two >= 16: tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(r))


def _m_bucket(M: int) -> int:
    """Autotune key for M: a power of two, so every sequence length does not trigger a new tuning run."""
    return min(triton.next_power_of_2(M), 16384)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: "ieee" for fp32 unless torch itself allows tf32 matmuls (see module doc)."""
    if dtype == torch.float32 and not INTERPRETING and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.cache
def _device_info(index: int) -> tuple[int, int, int]:
    """(multiprocessor count, major compute capability, shared memory bytes a program may use) of CUDA device
    ``index``; read once per device."""
    props = torch.cuda.get_device_properties(index)
    smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return props.multi_processor_count, props.major, smem


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())[0]


def _splits(rows: int, row_block: int, other_blocks: int, device: torch.device | int,
            per_sm: int = 4) -> tuple[int, int]:
    """Split the rows so that the grid has about ``per_sm`` programs per SM: (number of splits, rows per split).
    ``device``: the GPU, or its number of SMs."""
    sms = device if isinstance(device, int) else _num_sms(device)
    row_blocks = triton.cdiv(rows, row_block)
    want = max(1, triton.cdiv(per_sm * sms, max(other_blocks, 1)))
    n_split = min(row_blocks, want)
    per_split = triton.cdiv(row_blocks, n_split) * row_block
    return triton.cdiv(rows, per_split), per_split


# --------------------------------------------------------------------------------------------------------
# Kernel 1 ("shrink"): S = (x ⊙ mask)·Aᵀ, (M, r) in x's dtype. One program per BM rows; the rank is padded
# to R_PAD inside the program (zeros), and only the r real columns are stored.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _shrink_kernel(
    # pointers
    x_ptr, mask_ptr, a_ptr, s_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_mm, stride_mk, stride_ar, stride_ak, stride_sm, stride_sr,
    # meta-parameters
    HAS_MASK: tl.constexpr, R_PAD: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    offs_r = tl.arange(0, R_PAD)
    in_m = offs_m < M
    in_r = offs_r < R
    acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BK):
        in_k = (k0 + offs_k) < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)                     # (BM, BK)
        if HAS_MASK:
            x = x * tl.load(mask_ptr + offs_m[:, None] * stride_mm + (k0 + offs_k)[None, :] * stride_mk,
                            mask=in_m[:, None] & in_k[None, :], other=0.0)
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                      mask=in_r[None, :] & in_k[:, None], other=0.0)                   # (BK, R_PAD) = Aᵀ
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    tl.store(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_r[None, :])


def _shrink_tiles(x2d: torch.Tensor, has_mask: bool, r_pad: int) -> tuple[int, int, int, int]:
    """(BM, BK, warps, stages) of the shrink kernel for x2d (M, K): the first tiling whose shared memory fits.

    16-bit x first tries about one program of up to 64 rows per SM, its loop over K pipelined 3-4 deep, the
    best of 108 tilings on an H200 at M = 7936, r = 16 (2026-12-04): 4.3 → 3.4 µs at K = 768, 14.5 → 11.4 µs
    at K = 3072 against the next one, the tiling used before (half the rows, 128 columns, 3 stages). Each stage
    holds x's tile, the mask's and Aᵀ's in shared memory; a tiling is taken where 1.6× those bytes fit (the
    compiler's own buffers on top: 4 stages of fp32 64 × 128 tiles, 164 KB of operands, asked for 254 KB), so
    a large rank, a mask or a GPU with less shared memory steps down to smaller tiles.
    """
    if INTERPRETING:
        return 16, 32, 4, 1
    M, K = x2d.shape
    sms, _, smem = _device_info(x2d.get_device())
    rows = lambda per_sm: min(64, max(16, triton.next_power_of_2(triton.cdiv(M, per_sm * sms))))  # noqa: E731
    tilings = [(rows(1), 256, 3) if K >= 2048 else (rows(1), 128, 4)] if x2d.element_size() == 2 else []
    tilings += [(rows(2), 128, 3), (rows(2), 128, 2), (16, 64, 2), (16, 32, 1)]
    for bm, bk, stages in tilings:
        operand_bytes = stages * (bm * bk * (2 if has_mask else 1) + bk * r_pad) * x2d.element_size()
        if 1.6 * operand_bytes <= smem:
            return bm, bk, 4, stages
    return 16, 32, 4, 1


def shrink(x2d: torch.Tensor, mask2d: torch.Tensor | None, lora_A: torch.Tensor) -> torch.Tensor:
    """S = (x ⊙ mask)·Aᵀ: x2d (M, K), mask2d (M, K) or None, lora_A (r, K) → S (M, r) in x's dtype."""
    M, K = x2d.shape
    r = lora_A.shape[0]
    if lora_A.shape[1] != K or (mask2d is not None and mask2d.shape != x2d.shape):
        raise ValueError(f"shrink: x {tuple(x2d.shape)}, mask {None if mask2d is None else tuple(mask2d.shape)} "
                         f"and lora_A {tuple(lora_A.shape)} do not fit (M, K), (M, K), (r, K)")
    if M == 0 or K == 0:  # no rows, or an empty sum over K: nothing to launch
        return torch.zeros((M, r), device=x2d.device, dtype=x2d.dtype)
    s = torch.empty((M, r), device=x2d.device, dtype=x2d.dtype)
    bm, bk, warps, stages = _shrink_tiles(x2d, mask2d is not None, _pad_rank(r))
    mask_arg = mask2d if mask2d is not None else x2d  # any valid pointer: HAS_MASK=False never reads it
    with interpreter_lock():
        _shrink_kernel[(triton.cdiv(M, bm),)](
            x2d, mask_arg, lora_A, s,
            M, K, r,
            x2d.stride(0), x2d.stride(1), mask_arg.stride(0), mask_arg.stride(1),
            lora_A.stride(0), lora_A.stride(1), s.stride(0), s.stride(1),
            HAS_MASK=mask2d is not None, R_PAD=_pad_rank(r), PRECISION=_precision(x2d.dtype),
            BM=bm, BK=bk, num_warps=warps, num_stages=stages,
        )
    return s


# --------------------------------------------------------------------------------------------------------
# Kernel 2: out = P·Q + scaling · mask ⊙ (L·R) + bias.
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
        if HAS_MASK:
            delta = tl.dot(low.to(up.dtype), up, input_precision=PRECISION) * scaling  # (BM, BN) fp32
            drop = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                           mask=in_m[:, None] & in_n[None, :], other=0.0)
            acc += delta * drop.to(tl.float32)
        else:  # into the accumulator itself: no second (BM, BN) fp32 tile to hold in registers
            acc = tl.dot((low * scaling).to(up.dtype), up, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    return acc


def _autotune(configs, key, **kwargs):
    """triton.autotune, with the winners kept on disk where this Triton can (its cache, keyed by the key's
    values, the kernel's source and the GPU): a new process does not tune a shape again."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kwargs)


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


@_autotune(_gemm_configs(), _GEMM_KEY)
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


def _gemm_sizes(p, q, q_is_nk, low, up, mask, bias) -> tuple[int, int, int, int]:
    """The checks both GEMM wrappers share; returns (M, N, K, rank)."""
    M, K = p.shape
    N = q.shape[0] if q_is_nk else q.shape[1]
    if (q.shape[1] if q_is_nk else q.shape[0]) != K:
        raise ValueError(f"fused_gemm: p {tuple(p.shape)} and q {tuple(q.shape)} (q_is_nk={q_is_nk}) do not fit")
    rank = 0 if up is None else up.shape[0]
    if (low is None) != (up is None) or (low is not None and (low.shape[0] != M or low.shape[1] < rank
                                                              or up.shape[1] != N)):
        raise ValueError(f"fused_gemm: low (M, ≥r) and up (r, N) must come together and fit M={M}, N={N}")
    if mask is not None and mask.shape != (M, N) or bias is not None and bias.shape != (N,):
        raise ValueError(f"fused_gemm: mask must be ({M}, {N}) and bias ({N},)")
    return M, N, K, rank


def _operands(out: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    """The tensors, with ``out`` standing in for each absent or empty one.

    A kernel argument cannot be None, and an empty CUDA tensor may carry a null pointer, which a launch
    refuses. Any valid pointer does: the HAS_* flags keep the kernel from reading an absent operand, and with
    K = 0 the loop over K never reads P or Q.
    """
    return [out if t is None or t.numel() == 0 else t for t in tensors]


def _gemm_flags(p, low, mask, bias, rank) -> dict:
    return dict(HAS_LORA=low is not None, HAS_MASK=mask is not None, HAS_BIAS=bias is not None,
                R_PAD=_pad_rank(max(rank, 1)), PRECISION=_precision(p.dtype))


def fused_gemm(
    p: torch.Tensor, q: torch.Tensor, q_is_nk: bool,
    low: torch.Tensor | None, up: torch.Tensor | None, scaling: float,
    mask: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    """out (M, N) = P·Q + scaling·mask⊙(low·up) + bias, in P's dtype, with the pointer kernel (any strides).

    p (M, K); q is (N, K) when ``q_is_nk`` (use its transpose) else (K, N); low (M, ≥r) and up (r, N), any
    strided views, or both None (a plain GEMM); mask (M, N) or None; bias (N,) or None.
    """
    M, N, K, rank = _gemm_sizes(p, q, q_is_nk, low, up, mask, bias)
    out = torch.empty((M, N), device=p.device, dtype=p.dtype)
    if out.numel() == 0:  # no tiles, no programs
        return out
    p_arg, q_arg, low_arg, up_arg, mask_arg, bias_arg = _operands(out, p, q, low, up, mask, bias)
    stride_qk, stride_qn = (q.stride(1), q.stride(0)) if q_is_nk else (q.stride(0), q.stride(1))
    grid = lambda META: (triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"]),)  # noqa: E731
    with interpreter_lock():
        _fused_gemm_kernel[grid](
            p_arg, q_arg, low_arg, up_arg, mask_arg, bias_arg, out,
            M, N, K, rank, _m_bucket(M),
            p.stride(0), p.stride(1), stride_qk, stride_qn, low_arg.stride(0), low_arg.stride(1),
            up_arg.stride(0), up_arg.stride(1), mask_arg.stride(0), mask_arg.stride(1), out.stride(0), out.stride(1),
            scaling, **_gemm_flags(p, low, mask, bias, rank),
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Kernel 2, TMA variant (Hopper): the same tile maths; P and Q arrive by TMA (tensor descriptors) and a
# persistent grid of one program per SM walks the tiles.
# --------------------------------------------------------------------------------------------------------
def _tma_configs():
    if not AUTOTUNE:
        return [triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4)]
    shapes = [  # (BM, BN, BK, warps, stages); smem per stage = (BM + BN)·BK·2 bytes
        (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 5),
    ]
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@_autotune(_tma_configs(), _GEMM_KEY + ["Q_NK"])
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


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs Hopper or newer, a unit last stride, 16-byte aligned rows and base addresses."""
    for t in tensors:
        if not t.is_cuda or _device_info(t.get_device())[1] < 9:
            return False
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def tma_ready(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the TMA GEMM can run a layer's forward and its dX: x2d (M, K) and weight (N, K) fp16/bf16 that TMA
    can read (``_tma_ok``), and rows of N elements a multiple of 16 bytes, so that dY (M, N), or a contiguous copy
    of it (``_gemm`` makes one where TMA cannot read dY itself), can be read too."""
    return (x2d.dtype in TMA_DTYPES and weight.dtype == x2d.dtype
            and (weight.shape[0] * weight.element_size()) % 16 == 0 and _tma_ok(x2d, weight))


@functools.cache
def _tma_allocator(device: torch.device):
    """The allocator of scratch memory Triton asks for to build tensor descriptors, on ``device``."""
    def allocate(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, device=device, dtype=torch.int8)
    return allocate


def fused_gemm_tma(
    p: torch.Tensor, q: torch.Tensor, q_is_nk: bool,
    low: torch.Tensor | None, up: torch.Tensor | None, scaling: float,
    mask: torch.Tensor | None, bias: torch.Tensor | None,
) -> torch.Tensor:
    """``fused_gemm`` with the persistent TMA kernel; p and q must suit TMA (``_tma_ok``)."""
    M, N, K, rank = _gemm_sizes(p, q, q_is_nk, low, up, mask, bias)
    if not _tma_ok(p, q):
        raise ValueError("fused_gemm_tma needs Hopper (or newer) CUDA tensors with unit last stride, 16-byte "
                         "aligned rows and base addresses")
    out = torch.empty((M, N), device=p.device, dtype=p.dtype)
    if out.numel() == 0:
        return out
    low_arg, up_arg, mask_arg, bias_arg = _operands(out, low, up, mask, bias)
    # Every call: Triton keeps the allocator in a context variable, and backward runs on autograd's thread.
    triton.set_allocator(_tma_allocator(p.device))
    num_sms = _num_sms(p.device)
    grid = lambda META: (min(num_sms, triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"])),)  # noqa: E731
    with interpreter_lock():
        _fused_gemm_tma_kernel[grid](
            p, q, low_arg, up_arg, mask_arg, bias_arg, out,
            M, N, K, rank, _m_bucket(M),
            p.stride(0), q.stride(0), low_arg.stride(0), low_arg.stride(1), up_arg.stride(0), up_arg.stride(1),
            mask_arg.stride(0), mask_arg.stride(1), out.stride(0), out.stride(1),
            scaling, Q_NK=q_is_nk, NUM_SMS=num_sms, **_gemm_flags(p, low, mask, bias, rank),
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Kernel 3 ("dS/dB"): one pass over dY → G = dY·B (M, R_PAD) fp32, dB = scaling·dYᵀ·S (N, r), dbias (N,).
# Grid (N-blocks, M-splits). Sums across programs go through fp32 atomics into a zeroed workspace; the last
# program of a column block to finish (a counter, incremented once per program) rounds that block's dB and
# dbias to their dtypes. So a backward pays one zero fill and no cast kernel: in a CUDA-graph training step
# each of those is one more kernel per LoRA layer, ~1-2 µs of the GPU's time (RESULTS.md, H200 2026-12-04).
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _dsdb_kernel(
    # pointers (g, db_acc, dbias_acc and count: the zeroed workspace; db and dbias: the outputs)
    dy_ptr, b_ptr, s_ptr, g_ptr, db_acc_ptr, dbias_acc_ptr, count_ptr, db_ptr, dbias_ptr,
    # sizes
    M, N, R, ROWS_PER_SPLIT, N_SPLIT,
    # strides (G and the accumulators are contiguous: (M, R_PAD), (N, R_PAD), (N,))
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_dbn, stride_dbr,
    scaling,
    # meta-parameters
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
    # every split has rows (``_splits``): said, ptxas no longer waits for each MMA before the next (5% at GPT-2's
    # widths on an H100, 2026-12-06: 27.7 → 26.2 µs at N = 2304, 36.5 → 34.4 at 3072, 13.4 → 12.6 at 768)
    tl.assume(m_end > m_begin)
    for m0 in range(m_begin, m_end, BM):
        offs_m = m0 + tl.arange(0, BM)
        in_m = offs_m < m_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=in_m[:, None] & in_n[None, :], other=0.0)                      # (BM, BN)
        g = tl.dot(dy, b, input_precision=PRECISION)                                     # (BM, R_PAD)
        tl.atomic_add(g_ptr + offs_m[:, None] * R_PAD + offs_r[None, :], g,
                      mask=in_m[:, None] & in_r[None, :], sem="relaxed")
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr,
                    mask=in_m[:, None] & in_r[None, :], other=0.0)                       # (BM, R_PAD)
        db_acc = tl.dot(tl.trans(dy), s, db_acc, input_precision=PRECISION)              # (BN, R_PAD)
        if HAS_BIAS_GRAD:
            dbias_acc += tl.sum(dy.to(tl.float32), axis=0)
    db_offs = offs_n[:, None] * R_PAD + offs_r[None, :]
    tl.atomic_add(db_acc_ptr + db_offs, db_acc, mask=in_n[:, None] & in_r[None, :], sem="relaxed")
    if HAS_BIAS_GRAD:
        tl.atomic_add(dbias_acc_ptr + offs_n, dbias_acc, mask=in_n, sem="relaxed")
    tl.debug_barrier()                                # every thread's adds before the release below
    # acq_rel: the last split of this column block to arrive sees every other split's adds
    if tl.atomic_add(count_ptr + tl.program_id(0), 1) == N_SPLIT - 1:
        # ".cg": read L2, where the atomics landed, not this SM's L1
        db_sum = tl.load(db_acc_ptr + db_offs, mask=in_n[:, None] & in_r[None, :], other=0.0, cache_modifier=".cg")
        tl.store(db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr,
                 (db_sum * scaling).to(db_ptr.dtype.element_ty), mask=in_n[:, None] & in_r[None, :])
        if HAS_BIAS_GRAD:
            dbias_sum = tl.load(dbias_acc_ptr + offs_n, mask=in_n, other=0.0, cache_modifier=".cg")
            tl.store(dbias_ptr + offs_n, dbias_sum.to(dbias_ptr.dtype.element_ty), mask=in_n)


class Workspace(NamedTuple):
    """The zeroed fp32 buffers the backward's atomics add into, carved from one allocation (one fill).

    g (M, R_PAD) is G = dY·B; db (N, R_PAD), da (R_PAD, K) and dbias (N,) are the partial sums of dB, dA and
    dbias before their last program rounds them; count holds one int32 counter per column block of dY and of x
    (dsdb's, then da's). Single use: the counters and sums are not zero again after the kernels ran."""

    g: torch.Tensor
    db: torch.Tensor
    da: torch.Tensor
    dbias: torch.Tensor
    count: torch.Tensor


# Tiles of kernels 3 and 4 (the interpreter takes small ones, so that the tests' shapes span several blocks).
# dS/dB: 64 rows × 128 columns of dY, 4 warps, 3 stages, about 2 programs per SM: the best of 72 tilings on an
# H200 at M = 7936, r = 16 (2026-12-04): 12.9 / 18.5 / 8.1 µs at N = 2304 / 3072 / 768, against 16.2 / 22.9 /
# 8.2 for the 8-warp, 4-per-SM tiling before it (8 warps stay for ranks above 64: a (128, R_PAD) fp32 sum).
DSDB_BM, DSDB_BN, DSDB_WARPS, DSDB_STAGES, DSDB_PER_SM = (16, 32, 4, 1, 4) if INTERPRETING else (64, 128, 4, 3, 2)
DA_BM, DA_BK, DA_WARPS, DA_PER_SM = (16, 32, 4, 4) if INTERPRETING else (64, 128, 4, 4)
# The H100 80GB HBM3 (SXM) prefers other tiles (a sweep of 48 dS/dB and 42 dA tilings, 2026-12-06, same shapes,
# GPU time with the workspace's zero fill): dS/dB on 128-row blocks of 16-bit dY, 22.2 / 28.3 µs at N = 2304 / 3072
# against 26.1 / 34.4 with 64 rows (12.6 either way at 768); dA at 2 programs per SM, 6.9 / 21.1 µs at K = 768 /
# 3072 against 7.4 / 22.5 at 4. The column blocks (DSDB_BN, DA_BK) stay: the workspace counts them.
H100_NAME, H100_DSDB_BM, H100_DA_PER_SM = "NVIDIA H100 80GB HBM3", 128, 2


def _thin_tiles(device: torch.device, element_size: int, r_pad: int) -> tuple[int, int]:
    """(rows per dS/dB block, dA's programs per SM) for this GPU, dY's element size and the padded rank. The
    H100's 128 rows only where they were measured: 16-bit dY and R_PAD = 16 (fp32 dY at 3 stages would ask ~250 KB
    of shared memory, and a (128, R_PAD) fp32 G of a larger rank would crowd 4 warps' registers beside dB's sum)."""
    if device.type == "cuda" and not INTERPRETING:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _device_name(index) == H100_NAME:
            return (H100_DSDB_BM if element_size <= 2 and r_pad <= 16 else DSDB_BM), H100_DA_PER_SM
    return DSDB_BM, DA_PER_SM


def workspace(M: int, N: int, K: int, r: int, device: torch.device) -> Workspace:
    """Zeroed buffers for one backward of a LoRA layer with x (M, K), dY (M, N) and rank r (K = 0: no dA)."""
    r_pad = _pad_rank(r)
    # dbias after the blocks of 16-float rows, so that every block but the counters starts 64-byte aligned
    sizes = [M * r_pad, N * r_pad, r_pad * K, N, triton.cdiv(N, DSDB_BN) + triton.cdiv(K, DA_BK)]
    g, db, d_a, dbias, count = torch.zeros(sum(sizes), device=device, dtype=torch.float32).split(sizes)
    # zero bits are 0 in either dtype
    return Workspace(g.view(M, r_pad), db.view(N, r_pad), d_a.view(r_pad, K), dbias, count.view(torch.int32))


def _check_workspace(ws: Workspace, M: int | None, N: int | None, K: int | None, r_pad: int) -> None:
    """A workspace handed in must be the one ``workspace`` makes for this call's sizes (None: a part not used)."""
    counters = (0 if N is None else triton.cdiv(N, DSDB_BN)) + (0 if K is None else triton.cdiv(K, DA_BK))
    fits = ws.count.numel() >= counters
    if M is not None:
        fits = fits and ws.g.shape == (M, r_pad)
    if N is not None:
        fits = fits and ws.db.shape == (N, r_pad) and ws.dbias.shape == (N,)
    if K is not None:
        fits = fits and ws.da.shape == (r_pad, K)
    if not fits:
        raise ValueError(f"workspace: G {tuple(ws.g.shape)}, dB {tuple(ws.db.shape)}, dA {tuple(ws.da.shape)} do "
                         f"not fit M={M}, N={N}, K={K}, R_PAD={r_pad}: make it with workspace(M, N, K, r)")


def dsdb(dy2d: torch.Tensor, lora_B: torch.Tensor, s: torch.Tensor, scaling: float, need_dbias: bool,
         ws: Workspace | None = None):
    """One pass over dY (M, N): G = dY·B (M, R_PAD) fp32 with zero padding columns, dB = scaling·dYᵀ·S (N, r)
    in B's dtype, and dbias = dY.sum(0) (N,) in dY's dtype when ``need_dbias`` (else None).

    ``ws``: the backward's zeroed workspace (``workspace``), shared with ``da``; None allocates one."""
    M, N = dy2d.shape
    r = lora_B.shape[1]
    if lora_B.shape[0] != N or s.shape != (M, r):
        raise ValueError(f"dsdb: dY {tuple(dy2d.shape)}, B {tuple(lora_B.shape)} and S {tuple(s.shape)} "
                         "do not fit (M, N), (N, r), (M, r)")
    if ws is None:
        ws = workspace(M, N, 0, r, dy2d.device)
    _check_workspace(ws, M, N, None, _pad_rank(r))
    if M == 0 or N == 0:  # every sum is empty: zeros are the answer
        return ws.g, lora_B.new_zeros((N, r)), dy2d.new_zeros((N,)) if need_dbias else None
    db = torch.empty((N, r), device=dy2d.device, dtype=lora_B.dtype)
    dbias = torch.empty((N,), device=dy2d.device, dtype=dy2d.dtype) if need_dbias else None
    bm = _thin_tiles(dy2d.device, dy2d.element_size(), ws.g.shape[1])[0]
    n_split, per_split = _splits(M, bm, triton.cdiv(N, DSDB_BN), dy2d.device, DSDB_PER_SM)
    with interpreter_lock():
        _dsdb_kernel[(triton.cdiv(N, DSDB_BN), n_split)](
            dy2d, lora_B, s, ws.g, ws.db, ws.dbias, ws.count, db, dbias if need_dbias else db,
            M, N, r, per_split, n_split,
            dy2d.stride(0), dy2d.stride(1), lora_B.stride(0), lora_B.stride(1), s.stride(0), s.stride(1),
            db.stride(0), db.stride(1), scaling,
            HAS_BIAS_GRAD=need_dbias, R_PAD=ws.g.shape[1], PRECISION=_precision(dy2d.dtype),
            BM=bm, BN=DSDB_BN, num_warps=DSDB_WARPS if ws.g.shape[1] <= 64 else 8, num_stages=DSDB_STAGES,
        )
    return ws.g, db, dbias


# --------------------------------------------------------------------------------------------------------
# Kernel 4 ("dA"): dA = scaling·Gᵀ·(x ⊙ mask), (r, K). Grid (K-blocks, M-splits); fp32 atomics into the
# workspace, and the last split of a column block rounds it to dA's dtype, as in kernel 3.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _da_kernel(
    # pointers (g, da_acc and count: the workspace; da: the output)
    g_ptr, x_ptr, mask_ptr, da_acc_ptr, count_ptr, da_ptr,
    # sizes
    M, K, R, ROWS_PER_SPLIT, N_SPLIT,
    # strides (G and the accumulator are contiguous: (M, R_PAD) and (R_PAD, K))
    stride_xm, stride_xk, stride_mm, stride_mk, stride_dar, stride_dak,
    scaling,
    # meta-parameters
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
    acc_offs = offs_r[:, None] * K + offs_k[None, :]
    in_rk = (offs_r < R)[:, None] & in_k[None, :]                                       # the r real rows
    tl.atomic_add(da_acc_ptr + acc_offs, acc, mask=in_rk, sem="relaxed")
    tl.debug_barrier()                                # every thread's adds before the release below
    if tl.atomic_add(count_ptr + tl.program_id(0), 1) == N_SPLIT - 1:                    # the last split
        total = tl.load(da_acc_ptr + acc_offs, mask=in_rk, other=0.0, cache_modifier=".cg")
        tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak,
                 (total * scaling).to(da_ptr.dtype.element_ty), mask=in_rk)


def da(g: torch.Tensor, x2d: torch.Tensor, mask2d: torch.Tensor | None, rank: int, scaling: float,
       dtype: torch.dtype, ws: Workspace | None = None) -> torch.Tensor:
    """dA = scaling·Gᵀ·(x ⊙ mask) as an (r, K) tensor of ``dtype``; g (M, R_PAD) is ``dsdb``'s padded buffer.

    ``ws``: the workspace ``dsdb`` used (its dA part and counters are still zero); None allocates one."""
    M, K = x2d.shape
    r_pad = g.shape[1]
    if g.shape[0] != M or rank > r_pad or (mask2d is not None and mask2d.shape != x2d.shape):
        raise ValueError(f"da: G {tuple(g.shape)} and x {tuple(x2d.shape)} do not fit (M, R_PAD), (M, K)")
    if ws is None:
        ws = workspace(0, 0, K, r_pad, x2d.device)
    _check_workspace(ws, None, None, K, r_pad)
    if M == 0 or K == 0:
        return torch.zeros((rank, K), device=x2d.device, dtype=dtype)
    d_a = torch.empty((rank, K), device=x2d.device, dtype=dtype)
    k_blocks = triton.cdiv(K, DA_BK)
    n_split, per_split = _splits(M, DA_BM, k_blocks, x2d.device, _thin_tiles(x2d.device, x2d.element_size(), r_pad)[1])
    mask_arg = mask2d if mask2d is not None else x2d
    with interpreter_lock():
        _da_kernel[(k_blocks, n_split)](
            g, x2d, mask_arg, ws.da, ws.count[ws.count.numel() - k_blocks:], d_a,
            M, K, rank, per_split, n_split,
            x2d.stride(0), x2d.stride(1), mask_arg.stride(0), mask_arg.stride(1), d_a.stride(0), d_a.stride(1),
            scaling,
            HAS_MASK=mask2d is not None, R_PAD=r_pad, PRECISION=_precision(x2d.dtype), BM=DA_BM, BK=DA_BK,
            num_warps=DA_WARPS,
        )
    return d_a


# --------------------------------------------------------------------------------------------------------
# The autograd op: forward and backward through the kernels above, as two registered custom ops.
#
# Why custom ops and not a torch.autograd.Function: Dynamo (torch.compile) cannot trace into Triton's Python
# launcher, nor into `_tma_ok` (it reads data_ptr()), so a Function would break the graph at every LoRA layer.
# A custom op is one opaque node: Dynamo records it and asks its "fake" implementation for the output shapes
# and dtypes (no kernel runs while tracing). Custom ops take tensors and plain scalars only, so scaling is a
# float, the optional tensors are `Tensor?`, and a gradient that is not wanted comes back as an empty tensor
# (an op cannot return None). `tma` is None (the TMA kernel wherever `_tma_ok` allows), True or False; the
# "auto" backend's routes force it, ``lora_linear`` below leaves it None.
# --------------------------------------------------------------------------------------------------------
def _use_tma(tma: bool | None, p2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Which GEMM kernel: TMA for 16-bit tensors that suit it (tma=None), else as asked."""
    if tma is None:
        return not INTERPRETING and p2d.numel() > 0 and p2d.dtype in TMA_DTYPES and _tma_ok(p2d, weight)
    return tma


def _gemm(tma: bool, p2d: torch.Tensor, *args) -> torch.Tensor:
    """fused_gemm or fused_gemm_tma; a TMA operand P that TMA cannot read (a strided last dimension, a base or row
    stride off 16 bytes: a dY sliced from a larger gradient) is copied first, to a fresh, aligned buffer."""
    if tma:
        return fused_gemm_tma(p2d if _tma_ok(p2d) else p2d.clone(memory_format=torch.contiguous_format), *args)
    return fused_gemm(p2d, *args)


def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_mask: torch.Tensor | None, tma: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (Y (..., N), S (M, r)); S = (x ⊙ mask)·Aᵀ is returned for the backward (dB = scaling·dYᵀ·S)."""
    N, K = weight.shape
    M = math.prod(x.shape[:-1])
    x2d = x.reshape(M, K)                                   # (M, K), a view when x's strides allow
    mask2d = None if dropout_mask is None else dropout_mask.reshape(M, K)
    with torch.cuda.device_of(x):                           # launch on x's GPU (a no-op off CUDA)
        s = shrink(x2d, mask2d, lora_A)                                              # kernel 1: (M, r)
        y2d = _gemm(_use_tma(tma, x2d, weight), x2d, weight, True, s, lora_B.t(), scaling, None, bias)  # kernel 2
    return y2d.view(*x.shape[:-1], N), s                                             # (..., N), (M, r)


@torch.library.custom_op("minipeft::lora_linear_triton", mutates_args=())
def lora_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, dropout_mask: torch.Tensor | None, tma: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_forward`` as a registered op: what torch.compile records."""
    return _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma)


@lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma):
    M = math.prod(x.shape[:-1])
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((M, lora_A.shape[0]))


def _backward_kernels(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None, tma: bool | None,
    need_x: bool, need_A: bool, need_B: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dx (..., K), dA (r, K), dB (N, r), dbias (N,)); each one not asked for comes back empty."""
    N, K = weight.shape
    M = math.prod(x.shape[:-1])
    x2d = x.reshape(M, K)
    mask2d = None if dropout_mask is None else dropout_mask.reshape(M, K)
    dy2d = dy.reshape(M, N)                                                          # (M, N)
    if span(dy2d) >= OFFSET_LIMIT:  # a slice of a larger gradient (torch.cat's backward): the switch checked M·N
        dy2d = dy2d.contiguous()
    with torch.cuda.device_of(dy):                                                   # launch on dY's GPU
        ws = workspace(M, N, K if need_A else 0, lora_A.shape[0], dy.device)         # one zero fill
        g, d_b, d_bias = dsdb(dy2d, lora_B, s, scaling, need_bias, ws)              # kernel 3: G, dB, dbias
        d_x = dA = None
        if need_x:  # kernel 2 again: dX = dY·W + mask ⊙ (scaling·G·A)
            d_x = _gemm(_use_tma(tma, dy2d, weight), dy2d, weight, False, g, lora_A, scaling, mask2d, None)
            d_x = d_x.view(x.shape)
        if need_A:
            dA = da(g, x2d, mask2d, lora_A.shape[0], scaling, lora_A.dtype, ws)      # kernel 4
    empty = lambda: dy.new_empty(0)  # noqa: E731  (a fresh tensor each: outputs may not alias each other)
    return (d_x if need_x else empty(), dA if need_A else empty(), d_b if need_B else empty(),
            d_bias if need_bias else empty())


@torch.library.custom_op("minipeft::lora_linear_triton_backward", mutates_args=())
def lora_linear_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None, tma: bool | None,
    need_x: bool, need_A: bool, need_B: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_backward_kernels`` as a registered op: the backward graph AOTAutograd traces holds this node."""
    return _backward_kernels(dy, x, weight, lora_A, lora_B, s, scaling, dropout_mask, tma,
                             need_x, need_A, need_B, need_bias)


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, s, scaling, dropout_mask, tma, need_x, need_A, need_B, need_bias):
    empty = lambda: dy.new_empty(0)  # noqa: E731  (a fresh tensor each: outputs may not alias each other)
    return (dy.new_empty(x.shape) if need_x else empty(), lora_A.new_empty(lora_A.shape) if need_A else empty(),
            lora_B.new_empty(lora_B.shape) if need_B else empty(),
            dy.new_empty((weight.shape[0],)) if need_bias else empty())


def _save(ctx, x, weight, lora_A, lora_B, s, scaling, dropout_mask, tma) -> None:
    ctx.save_for_backward(x, weight, lora_A, lora_B, s, dropout_mask)
    ctx.scaling, ctx.tma = scaling, tma


def _grads(ctx, dy, backward) -> tuple:
    """Gradients to x, bias, lora_A and lora_B, each only when asked for; never to the (frozen) weight."""
    x, weight, lora_A, lora_B, s, dropout_mask = ctx.saved_tensors
    need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    d_x, dA, d_b, d_bias = backward(dy, x, weight, lora_A, lora_B, s, ctx.scaling, dropout_mask, ctx.tma,
                                    need_x, need_A, need_B, need_bias)
    keep = lambda t, wanted: t if wanted else None  # noqa: E731
    return (keep(d_x, need_x), None, keep(d_bias, need_bias), keep(dA, need_A), keep(d_b, need_B), None, None, None)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma = inputs
    _save(ctx, x, weight, lora_A, lora_B, output[1], scaling, dropout_mask, tma)
    ctx.mark_non_differentiable(output[1])  # the op returns S for its backward, never for the caller's graph


lora_linear_op.register_autograd(lambda ctx, dy, _ds: _grads(ctx, dy, torch.ops.minipeft.lora_linear_triton_backward),
                                 setup_context=_setup_context)


class _EagerLoraTriton(torch.autograd.Function):
    """The same forward and backward for eager mode, without the custom op's Python dispatch.

    A call through a registered custom op costs ~100 µs of host time before any kernel runs (measured on a
    2-core CPU; an autograd.Function costs ~15 µs), and in an eager training step at GPT-2 widths the host
    time is the step time. torch.compile never sees this class: while it traces, ``apply`` below takes the op.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma):
        y, s = _forward(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma)
        _save(ctx, x, weight, lora_A, lora_B, s, scaling, dropout_mask, tma)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _backward_kernels)


def apply(x, weight, bias, lora_A, lora_B, scaling: float, dropout_mask, tma: bool | None) -> torch.Tensor:
    """Run the kernels: through the registered op while torch.compile traces, through a Function in eager."""
    if torch.compiler.is_compiling():
        return torch.ops.minipeft.lora_linear_triton(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma)[0]
    return _EagerLoraTriton.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_mask, tma)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ on the Triton kernels, forward and backward.

    The reference's arguments (kernels/reference.py); inputs are checked by the caller, ``kernels.lora_linear``.
    Every call launches the kernels above, whatever the shape: the TMA GEMM where ``_tma_ok`` allows (Hopper,
    fp16/bf16, unit last stride, 16-byte rows), the pointer GEMM otherwise.
    """
    return apply(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask, None)
