"""QLoRA's forward for many rows on Hopper, the weight made in the registers the tensor cores read (Gluon).

The layer (QLoRA, https://arxiv.org/abs/2305.14314), for a batch of many rows (a prefill, a training step):

    y = x·Ŵᵀ + scaling·S·Bᵀ + bias,   Ŵ[n, k] = nf4_values[code(n, k)] · absmax[n, k // blocksize],   S = x·Aᵀ

Hopper's MMA (wgmma) takes its first operand from shared memory or from registers, its second from shared memory
only. A GEMM that puts x first has to write each tile of Ŵ to shared memory and make it visible to the tensor
cores (a fence and a barrier) before the MMA may read it: the warp-specialized kernel that did so (4 warps making
Ŵ beside two warpgroups on wgmma) took 1.44× the bf16 linear at 4096 rows (benchmarks/RESULTS.md). This kernel
computes yᵀ = Ŵ·xᵀ instead: Ŵ is the first operand, made from the codes straight into the registers that the MMA
reads, x the second, copied by TMA. Each program owns a (BN rows of Ŵ, BM rows of x) tile of yᵀ at a time, two
warpgroups of 64 rows of Ŵ each, and walks its tiles (as many programs as SMs, each taking every
``num_programs``-th tile) with one ring of STAGES shared-memory stages, filled STAGES - 1 steps ahead — into the
next tile's first steps while this tile finishes:

    for each of the program's tiles:
        accᵀ = B[cols] · (scaling·S[rows])ᵀ                   # the low-rank term: one MMA of depth R (16 or 32)
        for each 64-column step k of K:
            wait until x[rows, k:k+64], the codes' words[cols, k/8:k/8+8] and absmax[cols, k/64] have landed
            a = round(nf4_values[codes] · absmax)           # (BN, 64) in registers, as the MMA's first operand
            accᵀ += a · x[rows, k:k+64]ᵀ                    # asynchronous: the next step's lookups run under it
            wait for step k - 1's MMA; refill its stage with step k + STAGES - 1 (of this tile or the next)
        yᵀ = accᵀ + bias                                     # to shared memory, then one TMA copy to y

**Which lane holds which weight** is fixed by the MMA: in each 16 × 16 block of the first operand, lane t holds rows
t/4 and t/4 + 8 and columns 2(t%4), 2(t%4) + 1 and the same 8 columns on — two neighbouring columns a register,
which is one byte of codes (two 4-bit codes, the first in the high nibble). Over a 64-column step, lane t needs
byte t % 4 of each of its rows' 8 words. A byte is looked up in a table of the 256 byte values' pairs of fp32
codebook values in shared memory (16 copies, one per lane of a half-warp: an 8-byte load is served a half-warp at a
time, so 16 lanes read 16 different pairs of banks whatever their bytes), multiplied by the row's absmax and
rounded to x's dtype once, as dequantize-then-GEMM's Ŵ is: six instructions for two weights (``LOOKUP_BF16_ASM``:
PRMT, IMAD, LDS, two FMULs, one F2FP; ``TABLE_ASM`` fills the table, and tests/test_nf4_rs.py runs both through a
small emulator of their instructions on the CPU). The absmax comes pre-expanded (``expand_absmax``: one fp32 value
per row of Ŵ and 64 columns, transposed so that a step's values are one contiguous row for TMA), so the double
quantization's two dependent lookups are done once per call, not once per tile of x's rows.

**Two sets of registers for the operand.** An MMA reads its register operand while it runs, and PTX leaves those
registers to the program until ``wgmma.wait_group`` has retired it. A loop that makes every step's operand in one
set of registers — which is what ptxas allocates for a loop body written once — overwrites the operand of the MMA
still running: on an H100, 7 of 8 checks with 256-row tiles came out wrong (NaN) and 1 of 8 with 128-row tiles,
whose MMAs finish sooner. The loop here is written out over two steps, so the steps alternate between two sets
(32 registers a thread), and the wait after step k's MMA retires step k - 1's, whose set step k + 1 then writes.
``benchmarks/compiled.py`` counts such writes in the compiled loop (its "A overwritten" column; tests/
test_compiled.py requires 0).

Gluon (``triton.experimental.gluon``) is Triton's lower-level language; Triton's interpreter does not run it, so
this kernel is tested on a GPU (tests/test_nf4_rs.py) and compiled for sm_90a on the CPU (tests/test_compiled.py);
``expand_absmax`` is plain Triton and runs on the CPU under the interpreter too. ``nf4_lora_triton.nf4_forward``
launches it where ``rs_fits``: at least ``MIN_ROWS`` rows of bf16 or fp16 x on a Hopper GPU, no adapter or one of
rank ≤ ``MAX_RANK``, a blocksize of 64 or more.
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

from .lora_triton import _num_sms
from .nf4_triton import absmax_at
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["MIN_ROWS", "MAX_RANK", "BM", "BN", "STAGES", "TABLE_ASM", "LOOKUP_BF16_ASM", "LOOKUP_F16_ASM",
           "expand_absmax", "rs_fits", "launch_rs"]

MIN_ROWS = 512       # fewer rows: the fused Triton GEMM (kernels/nf4_lora_triton.py); see rs_fits
MAX_RANK = 32        # the low-rank MMA's depth, padded to 16 or 32
BM, BN = 256, 128    # a program's tile of yᵀ: x's rows (the MMA's N, its largest), Ŵ's rows (two warpgroups of 64)
STAGES = 3           # 3 × (32 + 4 + 0.5) KB, y's tile (64 KB), S's (8 KB) and the 32 KB table: 213.5 of 227 KB
WARPS = 8
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (its name from Triton 3.7 on)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # (renamed after Triton 3.6)
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


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


def _table_asm() -> str:
    """PTX run once by each of 256 threads: declares the table (256 entries × 16 copies × 8 bytes), writes entry t
    (its 16 copies: nf4_values[t >> 4] then nf4_values[t & 15], fp32), waits for the program and returns the
    table's address. $1: t; $2, $3: the entry's two values."""
    lines = ["{ .shared .align 16 .b8 nf4_rs_pairs[32768]; .reg .b32 base, a;",
             "mov.u32 base, nf4_rs_pairs; shl.b32 a, $1, 7; add.u32 a, a, base;"]
    for i in range(8):
        lines.append(f"st.shared.v4.b32 [a+{16 * i}], {{$2, $3, $2, $3}};")
    return "\n".join(lines + ["bar.sync 0; mov.u32 $0, base; }"])


def _lookup_asm(cvt: str) -> str:
    """PTX for one register of the MMA's operand: byte $3 (a PRMT selector, 0x4440 + q) of word $2, looked up in
    the table at $5 (the table's address + 8·(lane % 16)), times the absmax $4, rounded to x's dtype ($0 the low
    half: the lower column)."""
    return ("{ .reg .b32 b, a, p; .reg .f32 lo, hi;"
            " prmt.b32 b, $2, 0, $3; mad.lo.u32 a, b, 128, $5; ld.shared.v2.f32 {lo, hi}, [a];"
            f" mul.rn.f32 lo, lo, $4; mul.rn.f32 hi, hi, $4; {cvt} p, hi, lo; mov.b32 {{$0, $1}}, p; }}")


TABLE_ASM = _table_asm()
LOOKUP_BF16_ASM = _lookup_asm("cvt.rn.bf16x2.f32")
LOOKUP_F16_ASM = _lookup_asm("cvt.rn.f16x2.f32")
_TABLE_ASM = gl.constexpr(TABLE_ASM)  # a kernel reads only constexpr globals
_LOOKUP_BF16 = gl.constexpr(LOOKUP_BF16_ASM)
_LOOKUP_F16 = gl.constexpr(LOOKUP_F16_ASM)


def _code_layout(bn: int) -> gl.DistributedLinearLayout:
    """(bn rows, 8 words, 4 bytes): lane t holds byte t % 4 of every word of rows t/4 and t/4 + 8 of its warp's 16
    (registers: the row + 8 first, then the word), the first operand's registers once each byte is a pair."""
    return gl.DistributedLinearLayout(
        reg_bases=[[8, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[16 << i, 0, 0] for i in range((bn // 16).bit_length() - 1)], block_bases=[],
        shape=[bn, 8, 4])


def _absmax_layout(bn: int) -> gl.DistributedLinearLayout:
    """A step's absmax (1, bn) as ``_code_layout``'s rows hold it."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 8]], lane_bases=[[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 16 << i] for i in range((bn // 16).bit_length() - 1)], block_bases=[], shape=[1, bn])


@gluon.jit
def _make_table(nf4_ptr):
    """Writes this program's table of pairs (``TABLE_ASM``, every thread once); returns its address (a scalar)."""
    t = gl.arange(0, 256, layout=gl.BlockedLayout([1], [32], [8], [0]))
    address = gl.inline_asm_elementwise(
        _TABLE_ASM, "=r,r,r,r", [t, gl.load(nf4_ptr + (t >> 4)).to(gl.int32, bitcast=True),
                                 gl.load(nf4_ptr + (t & 15)).to(gl.int32, bitcast=True)],
        dtype=gl.int32, is_pure=False, pack=1)
    return gl.max(address, axis=0)


@gluon.jit
def _weights(words_smem, absmax_smem, table, sel, ACC: gl.constexpr, BN: gl.constexpr, DTYPE: gl.constexpr,
             CL: gl.constexpr, AL: gl.constexpr):
    """Ŵ's step (BN, 64) from the stage's words and absmax, as the MMA's first operand (registers)."""
    word = words_smem.load(gl.SliceLayout(2, CL))                                   # (BN, 8)
    absmax = gl.convert_layout(absmax_smem.load(AL).reshape([BN]), gl.SliceLayout(1, gl.SliceLayout(2, CL)),
                               assert_trivial=True)                                  # (BN,)
    word3 = gl.expand_dims(word, 2) + sel * 0                                        # (BN, 8, 4)
    am3 = gl.expand_dims(gl.expand_dims(absmax, 1), 2) + (sel * 0).to(gl.float32)
    sel3 = sel + gl.expand_dims(word, 2) * 0
    if DTYPE == gl.bfloat16:
        lo, hi = gl.inline_asm_elementwise(_LOOKUP_BF16, "=h,=h,r,r,f,r", [word3, sel3, am3, table + sel3 * 0],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
    else:
        lo, hi = gl.inline_asm_elementwise(_LOOKUP_F16, "=h,=h,r,r,f,r", [word3, sel3, am3, table + sel3 * 0],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
    a = gl.reshape(gl.join(lo, hi), [BN, 64])          # column 8·word + 2·byte + (0 lo, 1 hi)
    return gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2), assert_trivial=True)


@gluon.jit
def _issue(x_desc, words_desc, absmax_desc, x_smem, words_smem, absmax_smem, loaded, g, k, off_m, off_n, go,
           STAGES: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    """Start this program's step g (counted over all its tiles; column step k of the tile at off_m, off_n): three
    copies into stage g % STAGES, if go."""
    s = g % STAGES
    mbarrier.expect(loaded.index(s), BM * 64 * 2 + BN * 8 * 4 + BN * 4, pred=go)
    _tma_load(x_desc, [off_m, k * 64], loaded.index(s), x_smem.index(s), pred=go)
    _tma_load(words_desc, [off_n, k * 8], loaded.index(s), words_smem.index(s), pred=go)
    _tma_load(absmax_desc, [k, off_n], loaded.index(s), absmax_smem.index(s), pred=go)


@gluon.jit
def _step(g, k, nk, here, there, more, acc, a, x_desc, words_desc, absmax_desc, x_smem, words_smem, absmax_smem,
          loaded, table, sel, ACC: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
          DTYPE: gl.constexpr, CL: gl.constexpr, AL: gl.constexpr):
    """Step g (column step k of this tile): Ŵ's step into registers, its MMA started; then step g - 1's stage
    refilled with step g + STAGES - 1 — of this tile (``here``: its off_m, off_n) or of the next (``there``;
    ``more``: there is a next). ``a``: step g - 1's operand, kept alive until the wait that retires its MMA."""
    s = g % STAGES
    mbarrier.wait(loaded.index(s), (g // STAGES) & 1)
    a_new = _weights(words_smem.index(s), absmax_smem.index(s), table, sel, ACC, BN, DTYPE, CL, AL)
    acc = warpgroup_mma(a_new, x_smem.index(s).permute((1, 0)), acc, is_async=True)
    acc, a, a_new = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a, a_new))   # step g - 1's MMA has retired
    _cta_barrier()   # ... in both warpgroups: its stage may be written again
    ahead = k + STAGES - 1
    on = (ahead >= nk).to(gl.int32)   # 1: the step ahead is the next tile's
    _issue(x_desc, words_desc, absmax_desc, x_smem, words_smem, absmax_smem, loaded, g + STAGES - 1, ahead - nk * on,
           here[0] + (there[0] - here[0]) * on, here[1] + (there[1] - here[1]) * on, (on == 0) | more, STAGES, BM,
           BN)
    return acc, a_new


@gluon.jit
def _nf4_rs_kernel(x_desc, words_desc, absmax_desc, y_desc, nf4_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, scaling, M, N,
                   K, R, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, R_PAD: gl.constexpr,
                   HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, TMA_STORE: gl.constexpr, CL: gl.constexpr,
                   AL: gl.constexpr):
    dtype: gl.constexpr = x_desc.dtype
    W: gl.constexpr = gl.num_warps()
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BM, 16])
    DOT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    x_smem = gl.allocate_shared_memory(dtype, [STAGES, BM, 64], x_desc.layout)
    words_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 8], words_desc.layout)
    absmax_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, BN], absmax_desc.layout)
    loaded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    if TMA_STORE:
        y_smem = gl.allocate_shared_memory(dtype, [BM, BN], y_desc.layout)
    if HAS_LORA:
        s_smem = gl.allocate_shared_memory(dtype, [BM, R_PAD], gl.NVMMASharedLayout.get_default_for([BM, R_PAD],
                                                                                                     dtype))
    for i in gl.static_range(STAGES):
        mbarrier.init(loaded.index(i), count=1)   # expect, then the copies' bytes
    fence_async_shared()
    nk = K // 64
    gl.assume(nk > 0)          # (else ptxas serializes the MMAs)
    tiles_n = gl.cdiv(N, BN)
    tiles = tiles_n * gl.cdiv(M, BM)
    my_tiles = (tiles - gl.program_id(0) + gl.num_programs(0) - 1) // gl.num_programs(0)
    for g in gl.static_range(STAGES - 1):   # the first tile's first steps (nk ≥ STAGES - 1: rs_fits)
        _issue(x_desc, words_desc, absmax_desc, x_smem, words_smem, absmax_smem, loaded, g, g,
               gl.program_id(0) // tiles_n * BM, gl.program_id(0) % tiles_n * BN, True, STAGES, BM, BN)
    base = _make_table(nf4_ptr)   # (under the first copies)
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, CL)))
    sel = gl.expand_dims(gl.expand_dims(0x4440 + q, 0), 1)                          # (1, 1, 4): PRMT selectors
    lane = gl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [sel], dtype=gl.int32, is_pure=True, pack=1)
    table = base + 8 * (lane % 16)                                                   # this lane's copy

    for t in range(my_tiles):
        tile = gl.program_id(0) + t * gl.num_programs(0)
        here = (tile // tiles_n * BM, tile % tiles_n * BN)
        nxt = tile + gl.num_programs(0)
        there = (nxt // tiles_n * BM, nxt % tiles_n * BN)
        more = t + 1 < my_tiles
        off_m, off_n = here
        acc = gl.zeros([BN, BM], gl.float32, ACC)
        if HAS_LORA:  # accᵀ = B[cols] · (scaling·S[rows])ᵀ: B the first operand from registers, S by shared memory
            SL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (R_PAD // 8), R_PAD // 8], [W, 1], [1, 0])
            rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, SL))
            r = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, SL))
            s_tile = gl.load(s_ptr + (rows * R)[:, None] + r[None, :],
                             mask=(rows < M)[:, None] & (r < R)[None, :], other=0.0)
            cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, DOT))
            rb = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, DOT))
            b_tile = gl.load(b_ptr + (cols * R)[:, None] + rb[None, :],
                             mask=(cols < N)[:, None] & (rb < R)[None, :], other=0.0)
            _cta_barrier()   # the last tile's low-rank MMA has read s_smem, in both warpgroups
            s_smem.store((s_tile.to(gl.float32) * scaling).to(dtype))
            fence_async_shared()
            _cta_barrier()
            acc = warpgroup_mma(b_tile, s_smem.permute((1, 0)), acc, use_acc=False)
        a = gl.zeros([BN, 64], dtype, DOT)
        g0 = t * nk
        for k in range(0, nk - 1, 2):   # two steps written out: their operands in two sets of registers
            acc, a = _step(g0 + k, k, nk, here, there, more, acc, a, x_desc, words_desc, absmax_desc, x_smem,
                           words_smem, absmax_smem, loaded, table, sel, ACC, BM, BN, STAGES, dtype, CL, AL)
            acc, a = _step(g0 + k + 1, k + 1, nk, here, there, more, acc, a, x_desc, words_desc, absmax_desc,
                           x_smem, words_smem, absmax_smem, loaded, table, sel, ACC, BM, BN, STAGES, dtype, CL,
                           AL)
        if nk % 2 == 1:                 # (a third set)
            acc, a = _step(g0 + nk - 1, nk - 1, nk, here, there, more, acc, a, x_desc, words_desc, absmax_desc,
                           x_smem, words_smem, absmax_smem, loaded, table, sel, ACC, BM, BN, STAGES, dtype, CL,
                           AL)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))

        n = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, ACC))
        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + n, mask=n < N, other=0.0).to(gl.float32)[:, None]
        if TMA_STORE:   # yᵀ into shared memory, then one TMA copy, which clips the tile at M and N
            tma.store_wait(0)   # the last tile's copy has left y_smem
            _cta_barrier()
            y_smem.permute((1, 0)).store(acc.to(dtype))
            fence_async_shared()
            _cta_barrier()
            _tma_store(y_desc, [off_m, off_n], y_smem)
        else:           # rows of y not 16-byte aligned (N not a multiple of 8): 8 neighbouring n a thread
            OUT: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, W], [0, 1])
            out = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), OUT)
            on = off_n + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))
            om = off_m + gl.arange(0, BM, layout=gl.SliceLayout(0, OUT))
            gl.store(y_ptr + (om * N)[None, :] + on[:, None], out, mask=(on < N)[:, None] & (om < M)[None, :])
    if TMA_STORE:
        tma.store_wait(0)


# --------------------------------------------------------------------------------------------------------
# Where it runs, and the launch.
# --------------------------------------------------------------------------------------------------------
def _hopper(device: torch.device) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device) == (9, 0)


def rs_fits(x2d: torch.Tensor, blocksize: int, codes: torch.Tensor, lora_A: torch.Tensor | None) -> bool:
    """Whether ``launch_rs`` takes this forward: at least ``MIN_ROWS`` rows of contiguous bf16 or fp16 x (16-byte
    aligned, as TMA reads it), no adapter or one of rank ≤ ``MAX_RANK`` in x's dtype, a blocksize of 64 or more and
    at least STAGES - 1 steps of 64 columns, 16-byte aligned codes, on a Hopper GPU (wgmma and TMA are sm_90's),
    not under the interpreter. Why 512 rows: a tile takes 256 rows of x, so fewer rows leave SMs idle (32 tiles at
    256 rows of a 4096-wide layer); on an H100 at K = N = 4096 with a rank-16 adapter this kernel took 3.48× the
    bf16 linear at 256 rows, 2.22× at 512 and 1.59× at 768, where the autotuned Triton GEMM took 2.98×, 4.25× and
    2.98× (benchmarks/RESULTS.md)."""
    return (not INTERPRETING and x2d.is_cuda and x2d.shape[0] >= MIN_ROWS and x2d.dtype in (torch.bfloat16,
            torch.float16) and x2d.is_contiguous() and x2d.data_ptr() % 16 == 0 and blocksize >= 64
            and x2d.shape[1] >= 64 * (STAGES - 1) and codes.data_ptr() % 16 == 0
            and (lora_A is None or (lora_A.shape[0] <= MAX_RANK and lora_A.dtype == x2d.dtype))
            and _hopper(x2d.device))


def launch_rs(x2d: torch.Tensor, state: tuple, N: int, K: int, blocksize: int, dq_blocksize: int,
              s: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, bias: torch.Tensor | None,
              y: torch.Tensor) -> torch.Tensor:
    """y (M, N) = x·Ŵᵀ + scaling·S·Bᵀ + bias, where ``rs_fits``; s = x·Aᵀ (M, r) from the shrink kernel, or None
    with lora_B None. K a multiple of the blocksize (whole blocks per row); y contiguous."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    M = x2d.shape[0]
    gl_dtype = gl.bfloat16 if x2d.dtype == torch.bfloat16 else gl.float16
    absmax64 = expand_absmax(state, N, K, blocksize, dq_blocksize)                   # (K/64, N) fp32
    x_desc = TensorDescriptor.from_tensor(x2d, [BM, 64], gl.NVMMASharedLayout.get_default_for([BM, 64], gl_dtype))
    words = codes.view(torch.int32).view(N, K // 8)
    words_desc = TensorDescriptor.from_tensor(words, [BN, 8], gl.NVMMASharedLayout.get_default_for([BN, 8], gl.int32))
    absmax_desc = TensorDescriptor.from_tensor(absmax64, [1, BN],
                                               gl.NVMMASharedLayout.get_default_for([1, BN], gl.float32))
    tma_store = N % 8 == 0   # TMA wants y's rows 16-byte aligned
    y_desc = (TensorDescriptor.from_tensor(y, [BM, BN], gl.NVMMASharedLayout.get_default_for([BM, BN], gl_dtype))
              if tma_store else x_desc)                                              # (unused then)
    rank = 0 if s is None else s.shape[1]
    tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
    _nf4_rs_kernel[(min(tiles, _num_sms(x2d.device)),)](
        x_desc, words_desc, absmax_desc, y_desc, nf4_values, x2d if s is None else s.contiguous(),
        x2d if lora_B is None else lora_B.contiguous(), x2d if bias is None else bias, y, float(scaling), M, N, K,
        rank, BM=BM, BN=BN, STAGES=STAGES, R_PAD=16 if rank <= 16 else 32, HAS_LORA=s is not None,
        HAS_BIAS=bias is not None, TMA_STORE=tma_store, CL=_code_layout(BN), AL=_absmax_layout(BN), num_warps=WARPS)
    return y
