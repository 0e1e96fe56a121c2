"""QLoRA's forward for many rows on Hopper: warps that make Ŵ beside warps that run the tensor cores (Gluon).

The layer (QLoRA, https://arxiv.org/abs/2305.14314), for a batch of many rows (a prefill, a training step):

    y = x·Ŵᵀ + scaling·S·Bᵀ + bias,   Ŵ[n, k] = nf4_values[code(n, k)] · absmax[n, k // blocksize],   S = x·Aᵀ

A GEMM on Ŵ made from the codes does, per weight read, the work of a dense GEMM plus a lookup, a multiply and a
rounding per weight *per tile of x's rows*: at 4096 × 4096 × 4096 with 256-row tiles, 16 lookups per weight,
268 million in all, against 68.7 billion multiply-adds on the tensor cores. kernels/nf4_lora_triton.py makes
each tile of Ŵ with the same warps that then wait for its MMA, so the two take turns. Here they do not, as the
Hopper GEMMs of cuBLAS and CUTLASS keep their loads apart from their MMAs (warp specialization; "FlashAttention-3",
https://arxiv.org/abs/2407.08608, section 3.1, describes the pattern). Each program owns a (BM, BN) tile of y
and runs three kinds of warps at once, which pass a ring of STAGES shared-memory stages around with mbarriers:

    loader (1 warp), for each 64-column step k of K:            # Hopper's TMA: copies that no thread waits on
        wait empty[s];  copy x[rows, k:k+64], the codes' words[cols, k/8:k/8+8], absmax64[k/64, cols] into s
    dequantizer (DEQUANT_WARPS warps), for each step:           # registers → shared memory
        wait loaded[s];  Ŵ[cols, k:k+64] = lookup(words) · absmax  (in x's dtype);  store it into s;  arrive ready[s]
    two MMA warpgroups (BM/2 rows of x each), for each step:   # wgmma reads both operands from shared memory
        wait loaded[s] and ready[s];  acc += x[rows] · Ŵᵀ (asynchronous; the previous step's MMA retired,
        its stage goes back: arrive empty[s - 1])
        first: acc = (scaling·S)[rows] · B[cols]ᵀ, one MMA of depth R;  last: y = acc + bias

Two choices make the dequantizer fast enough to keep up:
1. **It issues no global load.** Making Ŵ's stage visible to the tensor cores takes ``fence.proxy.async``, which
   ptxas emits as ``MEMBAR.ALL.CTA``: a warp waits there for all its loads in flight, so a dequantizer that
   loaded its next codes itself would wait for memory once a step. The loader's TMA copies land in shared
   memory without any warp waiting on them.
2. **The absmax comes pre-expanded** (``expand_absmax``: one fp32 value per row of Ŵ and 64 columns, transposed
   to (K/64, N) so that a step's values are one contiguous row for TMA; 1/16 of a float per weight, 1 MB at
   4096²): the double quantization's two dependent lookups are done once per call, not once per tile of rows.

The dequantizer's lookup is kernels/nf4_merge_gluon.py's (a warp shuffle from the lane that holds the codebook
entry). The low-rank term enters as the accumulator's first MMA, of depth R = the rank padded to 16 or 32: S (from
kernels/lora_triton.py's shrink) times scaling, rounded to x's dtype (exact where scaling is a power of two; one
more rounding of the low-rank term otherwise), against B. Gluon (``triton.experimental.gluon``) is Triton's
lower-level language; Triton's interpreter does not run it, so this kernel is tested on a GPU only
(tests/test_nf4_ws.py); ``expand_absmax`` is plain Triton and runs on the CPU under the interpreter too.
``nf4_lora_triton.nf4_forward`` launches it where ``ws_fits``: at least ``MIN_ROWS`` rows of bf16 or fp16 x on a
Hopper GPU, no adapter or one of rank ≤ ``MAX_RANK``, a blocksize of 64 or more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .nf4_merge_gluon import _weight
from .nf4_triton import absmax_at
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["MIN_ROWS", "MAX_RANK", "BM", "BN", "BK", "STAGES", "expand_absmax", "ws_fits", "launch_ws"]

MIN_ROWS = 1024      # fewer rows: the fused Triton GEMM (kernels/nf4_lora_triton.py); see ws_fits
MAX_RANK = 32        # the low-rank MMA's depth, padded to 16 or 32 (shared memory: S's and B's tiles)
BM, BN, BK = 256, 128, 64   # a program's tile of y, and K's step (one absmax per row of Ŵ and step)
STAGES = 3           # the ring: 3 × (32 + 16 + 4 + 0.5) KB, with S's and B's tiles under the H100's 227 KB
DEQUANT_WARPS = 4    # the default partition; a warpgroup, so that setmaxnreg can lower its registers
MMA_REGS = 184       # registers a thread of an MMA warpgroup (a 128 × 128 fp32 accumulator is 128 of them)
LOAD_REGS = 40
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (its name from Triton 3.7 on)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # (renamed after Triton 3.6)


# --------------------------------------------------------------------------------------------------------
# The absmax, one fp32 value per row of Ŵ and 64 columns, transposed (plain Triton).
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _expand_absmax_kernel(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, out_ptr, N, K, stride_out,
                          BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                          BJ: tl.constexpr, BNN: tl.constexpr):
    j = tl.program_id(0) * BJ + tl.arange(0, BJ)            # steps of 64 columns
    n = tl.program_id(1) * BNN + tl.arange(0, BNN)          # rows of Ŵ
    ok = (j < K // 64)[:, None] & (n < N)[None, :]
    block = n[None, :] * (K // BLOCKSIZE) + (j[:, None] * 64) // BLOCKSIZE    # (BJ, BNN) quantization blocks
    absmax = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, block, ok, DQ_BLOCKSIZE,
                       DOUBLE_QUANT)
    tl.store(out_ptr + j[:, None] * stride_out + n[None, :], absmax, mask=ok)


def expand_absmax(state: tuple, N: int, K: int, blocksize: int, dq_blocksize: int) -> torch.Tensor:
    """(K/64, N) fp32: entry [j, n] is the absmax of the block that holds Ŵ[n, 64j .. 64j + 63] (blocksize ≥ 64,
    K a multiple of it). Rows are padded to a multiple of 4 floats (TMA wants 16-byte strides); the view
    returned has N columns."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    n_pad = triton.cdiv(N, 4) * 4
    out = torch.empty((K // 64, n_pad), device=absmax.device, dtype=torch.float32)
    double_quant = absmax_scale is not None
    scale, offset, dq = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    bj, bn = 8, 128
    with interpreter_lock():
        _expand_absmax_kernel[(triton.cdiv(K // 64, bj), triton.cdiv(N, bn))](
            absmax, scale, offset, dq, out, N, K, out.stride(0), BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize,
            DOUBLE_QUANT=double_quant, BJ=bj, BNN=bn, num_warps=4)
    return out[:, :N]


# --------------------------------------------------------------------------------------------------------
# The three partitions, then the kernel that forks them.
# --------------------------------------------------------------------------------------------------------
@gluon.jit
def _load_partition(x_desc, words_desc, absmax_desc, x_smem, words_smem, absmax_smem, loaded, empty, K, off_m,
                    off_n, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
    """One warp: for each step, wait until the MMAs released the stage, then start its three copies."""
    nbytes: gl.constexpr = BM * 64 * 2 + BN * 8 * 4 + BN * 4   # x (16-bit), the words, the absmax
    for i in range(K // 64):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)   # a fresh barrier passes parity 1 at once
        mbarrier.expect(loaded.index(s), nbytes)
        _tma_load(x_desc, [off_m, i * 64], loaded.index(s), x_smem.index(s))
        _tma_load(words_desc, [off_n, i * 8], loaded.index(s), words_smem.index(s))
        _tma_load(absmax_desc, [i, off_n], loaded.index(s), absmax_smem.index(s))


@gluon.jit
def _dequantize_partition(nf4_ptr, s_ptr, b_ptr, scaling, w_smem, words_smem, absmax_smem, s_smem, b_smem, loaded,
                          ready, lora_ready, M, N, K, R, off_m, off_n, BM: gl.constexpr, BN: gl.constexpr,
                          STAGES: gl.constexpr, R_PAD: gl.constexpr, HAS_LORA: gl.constexpr):
    """The default partition (DEQUANT_WARPS warps): the low-rank operands once, then Ŵ's tile of every step."""
    PW: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = w_smem.dtype
    if HAS_LORA:  # (scaling·S)[rows] and B[cols], zero past M, N and the rank
        LL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (R_PAD // 8), R_PAD // 8], [PW, 1], [1, 0])
        rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, LL))
        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, LL))
        r = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, LL))
        s_tile = gl.load(s_ptr + (rows * R)[:, None] + r[None, :], mask=(rows < M)[:, None] & (r < R)[None, :],
                         other=0.0)
        s_smem.store((s_tile.to(gl.float32) * scaling).to(dtype))
        b_tile = gl.load(b_ptr + (cols * R)[:, None] + r[None, :], mask=(cols < N)[:, None] & (r < R)[None, :],
                         other=0.0)
        b_smem.store(b_tile)
        fence_async_shared()
        _cta_barrier()
        mbarrier.arrive(lora_ready.index(0), count=1)
    # Ŵ's tile (BN, 64) as (BN, 8 words): a row's 8 words over TPR lanes, WPT words a lane
    TPR: gl.constexpr = 32 * PW // BN if 32 * PW > BN else 1
    WPT: gl.constexpr = 8 // TPR
    WL: gl.constexpr = gl.BlockedLayout([1, WPT], [32 // TPR, TPR], [PW, 1], [1, 0])
    AL: gl.constexpr = gl.BlockedLayout([1, 1], [32 // TPR, TPR], [PW, 1], [1, 0])
    n = gl.arange(0, BN, layout=gl.SliceLayout(1, WL))
    w = gl.arange(0, 8, layout=gl.SliceLayout(0, WL))
    # lane t holds codebook entry t % 16 for the shuffle lookup (_weight)
    book = gl.load(nf4_ptr + ((((n % (32 // TPR)) * TPR)[:, None] + (w // WPT)[None, :]) & 15))
    nk = K // 64
    gl.assume(nk > 0)
    for i in range(nk):
        s = i % STAGES
        mbarrier.wait(loaded.index(s), (i // STAGES) & 1)
        word = words_smem.index(s).load(WL)                                                      # (BN, 8)
        absmax = absmax_smem.index(s).permute((1, 0)).load(AL).reshape([BN])
        am = gl.convert_layout(absmax, gl.SliceLayout(1, WL))[:, None]                          # (BN, 1)
        wh = gl.join(gl.join(gl.join(_weight(word, am, book, 0), _weight(word, am, book, 1)),
                             gl.join(_weight(word, am, book, 2), _weight(word, am, book, 3))),
                     gl.join(gl.join(_weight(word, am, book, 4), _weight(word, am, book, 5)),
                             gl.join(_weight(word, am, book, 6), _weight(word, am, book, 7))))  # (BN, 8, 2, 2, 2)
        # weight u = 4·u2 + 2·u1 + u0 of word j is column 8j + u: the joins' last axes, most significant last
        wh = gl.reshape(gl.permute(wh, [0, 1, 4, 3, 2]), [BN, 64]).to(dtype)
        w_smem.index(s).store(wh)   # free: loaded[s] completed after the MMAs released the stage
        fence_async_shared()
        _cta_barrier()
        mbarrier.arrive(ready.index(s), count=1)


@gluon.jit
def _mma_partition(x_smem, w_smem, s_smem, b_smem, loaded, ready, empty, lora_ready, y_ptr, bias_ptr, M, N, K,
                   off_m, off_n, WG: gl.constexpr, CM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                   HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr):
    """One warpgroup: rows off_m + CM·WG .. + CM of y's tile."""
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    acc = gl.zeros([CM, BN], gl.float32, ACC)
    if HAS_LORA:
        mbarrier.wait(lora_ready.index(0), 0)
        acc = warpgroup_mma(s_smem.slice(CM * WG, CM), b_smem.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))   # (returns at once: one may stay in flight)
    nk = K // 64
    gl.assume(nk > 0)
    for i in range(nk):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(loaded.index(s), phase)
        mbarrier.wait(ready.index(s), phase)
        acc = warpgroup_mma(x_smem.index(s).slice(CM * WG, CM), w_smem.index(s).permute((1, 0)), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))   # step i - 1's MMA has retired ...
        if i > 0:
            mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)  # ... so its stage goes back to the loader
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    rows = off_m + CM * WG + gl.arange(0, CM, layout=gl.SliceLayout(1, ACC))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, ACC))
    if HAS_BIAS:
        acc = acc + gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
    gl.store(y_ptr + (rows * N)[:, None] + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@gluon.jit
def _nf4_ws_kernel(x_desc, words_desc, absmax_desc, nf4_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, scaling, M, N, K, R,
                   BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, R_PAD: gl.constexpr,
                   HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr):
    off_n = gl.program_id(0) * BN      # programs side by side share the codes' tile (L2) and differ in x's rows
    off_m = gl.program_id(1) * BM
    dtype: gl.constexpr = x_desc.dtype
    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, 64], x_desc.layout)
    words_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 8], words_desc.layout)
    absmax_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BN], absmax_desc.layout)
    w_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, 64], gl.NVMMASharedLayout.get_default_for([BN, 64], dtype))
    s_smem = gl.allocate_shared_memory(dtype, [BM, R_PAD], gl.NVMMASharedLayout.get_default_for([BM, R_PAD], dtype))
    b_smem = gl.allocate_shared_memory(dtype, [BN, R_PAD], gl.NVMMASharedLayout.get_default_for([BN, R_PAD], dtype))
    lora_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    loaded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(lora_ready.index(0), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(loaded.index(i), count=1)   # the loader's expect; then the copies' bytes
        mbarrier.init(ready.index(i), count=1)    # the dequantizer's arrive
        mbarrier.init(empty.index(i), count=2)    # one arrive from each MMA warpgroup
    fence_async_shared()
    CM: gl.constexpr = BM // 2
    gl.warp_specialize([
        (_dequantize_partition, (nf4_ptr, s_ptr, b_ptr, scaling, w_smem, words_smem, absmax_smem, s_smem, b_smem,
                                 loaded, ready, lora_ready, M, N, K, R, off_m, off_n, BM, BN, STAGES, R_PAD,
                                 HAS_LORA)),
        (_load_partition, (x_desc, words_desc, absmax_desc, x_smem, words_smem, absmax_smem, loaded, empty, K,
                           off_m, off_n, BM, BN, STAGES)),
        (_mma_partition, (x_smem, w_smem, s_smem, b_smem, loaded, ready, empty, lora_ready, y_ptr, bias_ptr, M, N,
                          K, off_m, off_n, 0, CM, BN, STAGES, HAS_LORA, HAS_BIAS)),
        (_mma_partition, (x_smem, w_smem, s_smem, b_smem, loaded, ready, empty, lora_ready, y_ptr, bias_ptr, M, N,
                          K, off_m, off_n, 1, CM, BN, STAGES, HAS_LORA, HAS_BIAS)),
    ], [1, 4, 4], [LOAD_REGS, MMA_REGS, MMA_REGS])


# --------------------------------------------------------------------------------------------------------
# Where it runs, and the launch.
# --------------------------------------------------------------------------------------------------------
def _hopper(device: torch.device) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device) == (9, 0)


def ws_fits(x2d: torch.Tensor, blocksize: int, codes: torch.Tensor, lora_A: torch.Tensor | None) -> bool:
    """Whether ``launch_ws`` takes this forward: at least ``MIN_ROWS`` rows of contiguous bf16 or fp16 x (16-byte
    aligned, as TMA reads it), no adapter or one of rank ≤ ``MAX_RANK`` in x's dtype, a blocksize of 64 or more,
    16-byte aligned codes, on a Hopper GPU (wgmma, TMA and setmaxnreg are sm_90's), not under the interpreter.
    Why 1024 rows: a program takes 256 rows of x, so fewer rows leave SMs idle (32 programs at 256 rows of a
    4096-wide layer); on an H200 at K = N = 4096 this kernel took 4.4× the bf16 linear's time at 256 rows, 1.6×
    at 1024 and 1.44× at 4096, where the Triton GEMM took 2.7-2.8×, 2.3× and 2.4-2.5× on an H100
    (benchmarks/RESULTS.md)."""
    return (not INTERPRETING and x2d.is_cuda and x2d.shape[0] >= MIN_ROWS and x2d.dtype in (torch.bfloat16,
            torch.float16) and x2d.is_contiguous() and x2d.data_ptr() % 16 == 0 and blocksize >= 64
            and codes.data_ptr() % 16 == 0
            and (lora_A is None or (lora_A.shape[0] <= MAX_RANK and lora_A.dtype == x2d.dtype))
            and triton.cdiv(x2d.shape[0], BM) < 2**16 and _hopper(x2d.device))   # (the grid's second axis)


def launch_ws(x2d: torch.Tensor, state: tuple, N: int, K: int, blocksize: int, dq_blocksize: int,
              s: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, bias: torch.Tensor | None,
              y: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x·Ŵᵀ + scaling·S·Bᵀ + bias, where ``ws_fits``; s = x·Aᵀ (M, r) from the shrink kernel, or None
    with lora_B None. K a multiple of the blocksize (whole blocks per row)."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    M = x2d.shape[0]
    gl_dtype = gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16
    absmax64 = expand_absmax(state, N, K, blocksize, dq_blocksize)                   # (K/64, N) fp32
    x_desc = TensorDescriptor.from_tensor(x2d, [BM, 64], gl.NVMMASharedLayout.get_default_for([BM, 64], gl_dtype))
    words = codes.view(torch.int32).view(N, K // 8)
    words_desc = TensorDescriptor.from_tensor(words, [BN, 8], gl.NVMMASharedLayout.get_default_for([BN, 8], gl.int32))
    absmax_desc = TensorDescriptor.from_tensor(absmax64, [1, BN],
                                               gl.NVMMASharedLayout.get_default_for([1, BN], gl.float32))
    rank = 0 if s is None else s.shape[1]
    s_arg = x2d if s is None else s.contiguous()
    b_arg = x2d if lora_B is None else lora_B.contiguous()
    _nf4_ws_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM))](
        x_desc, words_desc, absmax_desc, nf4_values, s_arg, b_arg, x2d if bias is None else bias, y, float(scaling),
        M, N, K, rank, BM=BM, BN=BN, STAGES=STAGES, R_PAD=16 if rank <= 16 else 32, HAS_LORA=s is not None,
        HAS_BIAS=bias is not None, MMA_REGS=MMA_REGS, LOAD_REGS=LOAD_REGS, num_warps=DEQUANT_WARPS)
    return y
