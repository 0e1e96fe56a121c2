"""QLoRA's forward for a few rows of x on the tensor cores, the weight operand built in registers (Gluon).

For a batch of a few rows (decoding a few sequences at once), y = x·Ŵᵀ reads 4.13 bits per weight of NF4 state
and does almost no arithmetic per weight read (QLoRA, https://arxiv.org/abs/2305.14314):

    Ŵ[n, k] = nf4_values[code(n, k)] · absmax[n, k // blocksize]
    y[m, n] = Σ_chunks absmax[n, chunk] · Σ_{k in chunk} round(nf4_values[code(n, k)]) · x[m, k]

(the second line is what this kernel computes: a 64-column chunk lies in one quantization block, so its absmax
multiplies the chunk's fp32 product once, and the codebook value is rounded to x's dtype, bf16 or fp16, for the
tensor cores — one rounding per weight, as dequantize-then-GEMM's Ŵ = round(v · absmax) has.)

The tensor-core GEMM of kernels/nf4_lora_triton.py makes each tile of Ŵ in registers and then stores it to
shared memory, because the MMA it uses (Hopper's wgmma) takes its weight operand from there, or from registers
laid out as the MMA wants them. Here the weight goes from the loaded codes straight into the registers of
``mma.sync.m16n8k16`` (the MMA of Ampere, which Hopper runs too), with no shared memory and no barrier in the loop,
by two choices:

1. **Which k each lane holds.** In an m16n8k16 MMA, lane t holds A[t/4][2(t%4) + {0, 1}], A[t/4 + 8][...], and
   the same 8 columns on: two pairs of columns per row, per 16 columns. The sum over k does not care which
   column of the MMA a column of x is, so inside each 64-column chunk the MMA's column c = 32·jh + 16·f2 + 8·f1 +
   2·q + f0 is made to hold x's column 16·q + 8·jh + 4·f2 + 2·f1 + f0: lane t (q = t % 4) then needs columns
   16q .. 16q+15 of its two rows — two consecutive 32-bit words of codes per row, and one 32-byte run of x.
   ``gl.reshape`` and ``gl.permute`` say this on the tensors; ``gl.convert_layout(..., assert_trivial=True)``
   checks that no data moves (the compiler would refuse to build the kernel otherwise).
2. **The codebook lookup as byte permutes.** A 16-bit codebook value is two bytes. PRMT picks 4 bytes out of 8 by
   4 nibble-sized selectors, so one PRMT looks up 4 codes in half of a byte table (entries 0-7 or 8-15), a
   second PRMT the other half, and a third picks per byte by the codes' top bits: 3 PRMTs for 4 high bytes, 3 for
   the 4 low ones, 2 to put each value's two bytes together: 16 PRMTs and 9 shifts and masks for the 8 weights
   of a word, in inline PTX (``LOOKUP_ASM``). The eight table words are built from ``nf4_values`` in x's dtype.

Gluon (``triton.experimental.gluon``) is Triton's lower-level language, compiled by the same compiler: a kernel
names the layout of every tensor (which lane and register holds which element), which choice 1 needs. Triton's
interpreter does not run Gluon, so this kernel is tested on a GPU only (tests/test_nf4_rows.py); the CPU tests
check its lookup by running ``LOOKUP_ASM`` through a small PRMT emulator, and the routing around it.

    with an adapter, program 0 of each split of K:                  # short: done before the tiles need it
        s_part[split] = Σ_chunks mma(A[:, chunk], x[:, chunk])ᵀ     # A's 16 rows, k permuted as Ŵ's
        count[tiles] += 1
    the other programs, one per tile of 16·WARPS rows of Ŵ and split of K:   # a warp: 16 rows, one m16n8 tile
        for each step of UNROLL 64-column chunks of the split:
            load every chunk's words (2 per row a lane), x[:, chunk] (32 bytes a lane) and absmax first
            for each chunk: a = lookup(words) (registers, the MMA's layout), b = x (the same permutation of k)
                            acc += absmax[rows, chunk] · mma(a, b)
        part[split] = acc                                            # fp32 partial sums of y
        if count[tile] += 1 makes SPLITS (the last split of this tile to finish):
            wait until count[tiles] == SPLITS                        # S's programs (lower indices) started first
            y[:, tile] = Σ_split part[split] + (B[tile] · scaling·Sᵀ by one more MMA)ᵀ + bias
            (the first tile stores S; the counters go back to zero for the next launch)

The splits are added in a fixed order (split 0, 1, ...) whichever program finishes last, so a call gives the same
bits every time; the counters are kernels/nf4_decode_triton.py's (``counters``), whose module docstring states the
two things such a design assumes (programs start in the order of their index; no two launches count in one
buffer at once). Loading UNROLL = 4 chunks before their math (``unroll_for``) keeps 4 × 16 bytes of codes a
lane in flight: with one chunk a step the loads waited on memory's latency (on an H100, 10.1 against 9.1 µs at
3-4 rows without an adapter). ``nf4_lora_triton.nf4_forward`` launches it for 2 to 16 rows of
bf16 or fp16 x without a dropout mask, without an adapter or with one of rank 1 to 16, on an NVIDIA GPU and a
blocksize of 64 or more (``rows_fit``).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .nf4_decode_triton import counters
from .triton_interpreter import INTERPRETING

__all__ = ["MIN_ROWS", "MAX_ROWS", "LOOKUP_ASM", "table_words", "rows_fit", "launch_rows", "rows_split", "unroll_for"]

MIN_ROWS = 2     # one row: kernels/nf4_decode_triton.py (see rows_fit)
MAX_ROWS = 16    # x's rows: two n8 tiles of the MMA
WARPS = 8        # warps a program: 128 rows of Ŵ
CHUNK = 64       # columns of K an MMA chunk: one quantization block or part of one (blocksize ≥ 64)


def _prmt_group(src: str, outs: list[str]) -> str:
    """PTX for 4 codes (the 4 low nibbles of ``src``: weights 1, 0, 3, 2 of a word) into 4 16-bit outputs.

    s: each nibble's low 3 bits (PRMT's selectors; bit 3 would ask for a sign fill); t: 0x3210 plus 4 where a
    code is 8 or more, which picks per byte between the lookups in entries 0-7 and 8-15."""
    w0, w1, w2, w3 = outs
    return (f"and.b32 s, {src}, 0x7777; shr.u32 t, {src}, 1; and.b32 t, t, 0x4444; or.b32 t, t, 0x3210;\n"
            "prmt.b32 ha, $8, $9, s; prmt.b32 hb, $10, $11, s; prmt.b32 hh, ha, hb, t;\n"    # high bytes
            "prmt.b32 la, $12, $13, s; prmt.b32 lb, $14, $15, s; prmt.b32 ll, la, lb, t;\n"  # low bytes
            f"prmt.b32 p, ll, hh, 0x4051; mov.b32 {{{w0}, {w1}}}, p;\n"   # weight 0 = nibble 1 = byte 1 of ll, hh
            f"prmt.b32 p, ll, hh, 0x6273; mov.b32 {{{w2}, {w3}}}, p;\n")


# $0-$7: weights 0..7 of the word (16-bit); $8-$15: the tables (high bytes of entries 0-3, 4-7, 8-11, 12-15,
# then the low bytes); $16: the word (weight 2j is byte j's high nibble, 2j+1 its low one, as the codes store them)
LOOKUP_ASM = ("{ .reg .b32 s, t, u, ha, hb, la, lb, hh, ll, p;\n" + _prmt_group("$16", ["$0", "$1", "$2", "$3"])
              + "shr.u32 u, $16, 16;\n" + _prmt_group("u", ["$4", "$5", "$6", "$7"]) + "}")
_LOOKUP_ASM = gl.constexpr(LOOKUP_ASM)  # a kernel reads only constexpr globals
_CHUNK = gl.constexpr(CHUNK)
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (its name from Triton 3.7 on)


def table_words(nf4_values: torch.Tensor, dtype: torch.dtype) -> list[int]:
    """The eight 32-bit words ``_table_word`` builds in the kernel (``LOOKUP_ASM``'s $8-$15), on the host: the
    high bytes of the codebook's entries 0-3, 4-7, 8-11, 12-15 in ``dtype``, then the low bytes, lowest entry in
    the lowest byte. For the tests' PRMT emulator."""
    bits = [int(b) & 0xFFFF for b in nf4_values.to(dtype).view(torch.int16).tolist()]
    return [sum(((bits[first + i] >> shift) & 0xFF) << (8 * i) for i in range(4))
            for shift in (8, 0) for first in (0, 4, 8, 12)]


def _word_layout(warps: int) -> gl.DistributedLinearLayout:
    """The codes of a chunk, (16·warps rows, 8 words): lane t holds words 2(t%4), 2(t%4)+1 (two registers, one
    64-bit load) of rows t/4 and t/4 + 8 of its warp's 16 — the rows and columns its MMA fragment needs."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [8, 0]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(warps.bit_length() - 1)], block_bases=[], shape=[16 * warps, 8])


def _x_layout(warps: int, bm: int) -> gl.DistributedLinearLayout:
    """x's chunk as (bm rows, 4 quarters, 16 columns): lane t holds columns 16(t%4) .. +15 of row t/4 (and of row
    t/4 + 8 for bm = 16), the B fragment under the permutation of k; every warp holds the same x."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]] + ([[8, 0, 0]] if bm == 16 else []),
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[0, 0, 0]] * (warps.bit_length() - 1), block_bases=[], shape=[bm, 4, 16])


@gluon.jit
def _table_word(nf4_ptr, first: gl.constexpr, zero, SHIFT: gl.constexpr, DTYPE: gl.constexpr):
    """Bytes (bits >> SHIFT) & 0xFF of codebook entries first .. first+3 in DTYPE, packed lowest entry first.
    ``zero`` is a tensor of zeros the compiler cannot prove zero: its per-row addresses keep the words in ordinary
    registers (from uniform ones, ptxas would copy a word before every PRMT)."""
    word = zero
    for i in gl.static_range(4):
        bits = gl.load(nf4_ptr + first + i + zero).to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32)
        word = word | (((bits >> SHIFT) & 0xFF) << (8 * i))
    return word


@gluon.jit
def _lookup(word, tabs, DTYPE: gl.constexpr):
    """The 8 weights of every word, (rows, 8 words, 2, 2, 2) in DTYPE: weight f = 4·f2 + 2·f1 + f0 at [..., f2, f1,
    f0] (joined from the most significant bit of f down; the joins stay in registers)."""
    args = [tabs[0], tabs[1], tabs[2], tabs[3], tabs[4], tabs[5], tabs[6], tabs[7], word]
    if DTYPE == gl.bfloat16:  # (the dtypes written out: inline_asm_elementwise does not unwrap a constexpr)
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            _LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r", args, dtype=(gl.bfloat16,) * 8, is_pure=True,
            pack=1)
    else:
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            _LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r", args, dtype=(gl.float16,) * 8, is_pure=True,
            pack=1)
    return gl.join(gl.join(gl.join(v0, v4), gl.join(v2, v6)), gl.join(gl.join(v1, v5), gl.join(v3, v7)))


@gluon.jit
def _load_chunk(k0, w_ptrs, in_w, x_ptr, x_off, x_ok, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr,
                row_block, in_n, BLOCKSIZE: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """The chunk at column k0: its words (rows, 8), x (bm, 4, 16) and each row's absmax (rows,) in fp32."""
    word = gl.load(w_ptrs + k0 // 8, mask=in_w, other=0)
    x = gl.load(x_ptr + x_off + k0, mask=x_ok, other=0.0)
    block = row_block + k0 // BLOCKSIZE
    if DOUBLE_QUANT:  # dq_values[absmax code] · absmax_scale[block // DQ_BLOCKSIZE] + absmax_offset
        code = gl.load(absmax_ptr + block, mask=in_n, other=0).to(gl.int32)
        scale = gl.load(absmax_scale_ptr + block // DQ_BLOCKSIZE, mask=in_n, other=0.0)
        absmax = gl.load(dq_ptr + code) * scale + gl.load(absmax_offset_ptr)
    else:
        absmax = gl.load(absmax_ptr + block, mask=in_n, other=0.0)
    return word, x, absmax


@gluon.jit
def _x_operand(x, BM: gl.constexpr, MMA: gl.constexpr):
    """x's chunk (BM, 4, 16) as the MMA's second operand (64, BM): x's column 16·q + 8·jh + 4·f2 + 2·f1 + f0 at
    MMA column 32·jh + 16·f2 + 8·f1 + 2·q + f0, the permutation the weight's lookup gives."""
    b = gl.reshape(gl.permute(gl.reshape(x, [BM, 4, 2, 2, 2, 2]), [0, 2, 3, 4, 1, 5]), [BM, _CHUNK])
    return gl.convert_layout(gl.permute(b, [1, 0]), gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2),
                             assert_trivial=True)


@gluon.jit
def _mma_chunk(word, x, absmax, acc, tabs, ROWS: gl.constexpr, BM: gl.constexpr, DTYPE: gl.constexpr,
               MMA: gl.constexpr):
    """acc + absmax · (Ŵ's chunk without its absmax) · x's chunkᵀ: both operands in the MMA's registers."""
    v = _lookup(word, tabs, DTYPE)                                                 # (ROWS, 8, 2, 2, 2)
    # word 2q + jh, weight 4·f2 + 2·f1 + f0  ->  MMA column 32·jh + 16·f2 + 8·f1 + 2·q + f0
    a = gl.reshape(gl.permute(gl.reshape(v, [ROWS, 4, 2, 2, 2, 2]), [0, 2, 3, 4, 1, 5]), [ROWS, _CHUNK])
    a = gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2), assert_trivial=True)
    product = mma_v2(a, _x_operand(x, BM, MMA), gl.zeros([ROWS, BM], gl.float32, layout=MMA))  # (ROWS, BM)
    return acc + product * absmax[:, None]


@gluon.jit
def _s_chunk(k0, s_t, x_ptr, x_off, x_ok, a_ptr, a_off, a_ok, BM: gl.constexpr, MMA: gl.constexpr):
    """s_t + A's chunk (16, 64) · x's chunkᵀ, A's rows permuted along k as Ŵ's are."""
    x = gl.load(x_ptr + x_off + k0, mask=x_ok, other=0.0)                               # (BM, 4, 16)
    a = gl.load(a_ptr + a_off + k0, mask=a_ok, other=0.0)                               # (16, 4, 16)
    a = gl.reshape(gl.permute(gl.reshape(a, [16, 4, 2, 2, 2, 2]), [0, 2, 3, 4, 1, 5]), [16, _CHUNK])
    a = gl.convert_layout(a, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2), assert_trivial=True)
    return mma_v2(a, _x_operand(x, BM, MMA), s_t)                                       # (16, BM)


@gluon.jit
def _finish_tile(part_ptr, s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, n, in_n, M, N, R, stride_bn, stride_br,
                 stride_sm, stride_sr, scaling, first_tile, SPLITS: gl.constexpr, BM: gl.constexpr,
                 HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, MMA: gl.constexpr, WARPS_: gl.constexpr):
    """y[:, tile] = Σ_j part[j, :, tile] + scaling·S·B[tile]ᵀ + bias, S = Σ_j s_part[j] (stored by the first
    tile), by the last of a tile's splits to finish. The splits are added in the order j = 0, 1, ...: the same
    bits whichever program finishes last. Loads skip L1 (".cg"): other SMs wrote these values in this launch."""
    ym = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    ok = in_n[:, None] & (ym < M)[None, :]
    offs = (ym * N)[None, :] + n[:, None]                                              # (ROWS, BM): yᵀ
    acc = gl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
    for j in gl.static_range(1, SPLITS):
        acc += gl.load(part_ptr + j * M * N + offs, mask=ok, other=0.0, cache_modifier=".cg")
    if HAS_LORA:  # + (B's rows)·(scaling·S)ᵀ, one more MMA: B[tile] (ROWS, 16) and scaling·Sᵀ (16, BM)
        SL: gl.constexpr = gl.BlockedLayout([1, 1], [16, 2], [1, WARPS_], [0, 1])
        r = gl.arange(0, 16, layout=gl.SliceLayout(1, SL))
        sm = gl.arange(0, BM, layout=gl.SliceLayout(0, SL))
        s_offs = (sm * 16)[None, :] + r[:, None]                                       # (16, BM): Sᵀ
        s_ok = (r < 16)[:, None] & (sm < M)[None, :]
        s_t = gl.load(s_part_ptr + s_offs, mask=s_ok, other=0.0, cache_modifier=".cg")
        for j in gl.static_range(1, SPLITS):
            s_t += gl.load(s_part_ptr + j * M * 16 + s_offs, mask=s_ok, other=0.0, cache_modifier=".cg")
        s_t = s_t.to(y_ptr.dtype.element_ty)                  # S in x's dtype, as the shrink kernel makes it
        if first_tile:
            gl.store(s_ptr + (sm * stride_sm)[None, :] + (r * stride_sr)[:, None], s_t,
                     mask=(r < R)[:, None] & (sm < M)[None, :])
        low = (s_t.to(gl.float32) * scaling).to(y_ptr.dtype.element_ty)
        low = gl.convert_layout(low, gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
        BL: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [WARPS_, 1], [1, 0])
        nb = gl.convert_layout(n, gl.SliceLayout(1, BL))
        rb = gl.arange(0, 16, layout=gl.SliceLayout(0, BL))
        up = gl.load(b_ptr + (nb * stride_bn)[:, None] + (rb * stride_br)[None, :],
                     mask=(nb < N)[:, None] & (rb < R)[None, :], other=0.0)             # (ROWS, 16) = B[tile]
        up = gl.convert_layout(up, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
        acc = mma_v2(up, low, acc)
    if HAS_BIAS:
        acc += gl.load(bias_ptr + n, mask=in_n, other=0.0).to(gl.float32)[:, None]
    gl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


@gluon.jit
def _nf4_rows_kernel(
    # pointers (codes as int32 words; part: (SPLITS, M, N) fp32 partial sums of y; s_part: (SPLITS, M, 16);
    # count: tiles + 2 int32 counters, zero between launches)
    x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, a_ptr, part_ptr, s_part_ptr,
    b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr,
    # sizes (K_SPLIT: columns of K a split, a multiple of CHUNK)
    M, N, K, R, K_SPLIT, stride_xm, stride_ar, stride_bn, stride_br, stride_sm, stride_sr, scaling,
    # meta-parameters
    BM: gl.constexpr, WARPS_: gl.constexpr, BLOCKSIZE: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr,
    DOUBLE_QUANT: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, SPLITS: gl.constexpr,
    UNROLL: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
    A_LAYOUT: gl.constexpr,
):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS_, 1], instr_shape=[16, 8])
    pid_k = gl.program_id(1)
    k_lo = pid_k * K_SPLIT
    k_hi = gl.minimum(K, k_lo + K_SPLIT)
    STEP: gl.constexpr = _CHUNK * UNROLL
    k_main = k_lo + (k_hi - k_lo) // STEP * STEP      # UNROLL chunks a step up to here, then one at a time
    # x's addresses: row m, quarter q, column 16q + i of the chunk
    m = gl.arange(0, BM, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_LAYOUT)))
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_LAYOUT)))
    i = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_LAYOUT)))
    x_off = (m * stride_xm)[:, None, None] + (q * 16)[None, :, None] + i[None, None, :]
    x_ok = (m < M)[:, None, None] & (q < 4)[None, :, None] & (i < 16)[None, None, :]
    if HAS_LORA:  # program 0 of each split makes S
        tiles = gl.num_programs(0) - 1
        pid_n = gl.program_id(0) - 1
        if pid_n < 0:
            _s_program(x_ptr, a_ptr, s_part_ptr, count_ptr, x_off, x_ok, k_lo, k_hi, k_main, pid_k, tiles, M, R,
                       stride_ar, BM, UNROLL, MMA, A_LAYOUT)
    else:
        tiles = gl.num_programs(0)
        pid_n = gl.program_id(0)
    if pid_n >= 0:
        _tile_program(x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, part_ptr,
                      s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr, x_off, x_ok, k_lo, k_hi, k_main, pid_n,
                      pid_k, tiles, M, N, K, R, stride_bn, stride_br, stride_sm, stride_sr, scaling, BM, WARPS_,
                      BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT, HAS_LORA, HAS_BIAS, SPLITS, UNROLL, W_LAYOUT, MMA)


@gluon.jit
def _s_program(x_ptr, a_ptr, s_part_ptr, count_ptr, x_off, x_ok, k_lo, k_hi, k_main, pid_k, tiles, M, R, stride_ar,
               BM: gl.constexpr, UNROLL: gl.constexpr, MMA: gl.constexpr, A_LAYOUT: gl.constexpr):
    """The adapter's Sᵀ = A·xᵀ over one split into s_part[split], A's 16 rows as the MMA's first operand; then
    count[tiles] += 1. A short program (no lookup), started before its split's tiles: done long before they are."""
    r = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, A_LAYOUT)))
    ra = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, A_LAYOUT)))
    ia = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, A_LAYOUT)))
    a_off = (r * stride_ar)[:, None, None] + (ra * 16)[None, :, None] + ia[None, None, :]
    a_ok = (r < R)[:, None, None] & (ra < 4)[None, :, None] & (ia < 16)[None, None, :]
    s_t = gl.zeros([16, BM], gl.float32, layout=MMA)
    for k0 in range(k_lo, k_main, _CHUNK * UNROLL):
        for j in gl.static_range(UNROLL):
            s_t = _s_chunk(k0 + j * _CHUNK, s_t, x_ptr, x_off, x_ok, a_ptr, a_off, a_ok, BM, MMA)
    for k0 in range(k_main, k_hi, _CHUNK):
        s_t = _s_chunk(k0, s_t, x_ptr, x_off, x_ok, a_ptr, a_off, a_ok, BM, MMA)
    ym = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    sr = gl.arange(0, 16, layout=gl.SliceLayout(1, MMA))
    gl.store(s_part_ptr + ((pid_k * M + ym) * 16)[None, :] + sr[:, None], s_t, mask=(ym < M)[None, :])
    _cta_barrier()                                        # every warp's stores before the release below
    gl.atomic_add(count_ptr + tiles, 1)                   # count[tiles]: splits of S done


@gluon.jit
def _tile_program(x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, part_ptr,
                  s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr, x_off, x_ok, k_lo, k_hi, k_main, pid_n,
                  pid_k, tiles, M, N, K, R, stride_bn, stride_br, stride_sm, stride_sr, scaling, BM: gl.constexpr,
                  WARPS_: gl.constexpr, BLOCKSIZE: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr,
                  DOUBLE_QUANT: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, SPLITS: gl.constexpr,
                  UNROLL: gl.constexpr, W_LAYOUT: gl.constexpr, MMA: gl.constexpr):
    """x·Ŵ[tile]ᵀ over one split into part[split]; the last of the tile's splits to finish writes y[:, tile]."""
    ROWS: gl.constexpr = 16 * WARPS_
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    # the words' addresses: rows n of Ŵ, words w of a chunk (K % 64 == 0: every row starts on a word)
    n_w = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, W_LAYOUT))
    w = gl.arange(0, 8, layout=gl.SliceLayout(0, W_LAYOUT))
    in_w = (n_w < N)[:, None] & (w < 8)[None, :]
    w_ptrs = words_ptr + (n_w * (K // 8))[:, None] + w[None, :]
    # the rows of the accumulator, for the absmax and the store
    n = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))
    in_n = n < N
    row_block = n * (K // BLOCKSIZE)
    zero = ((n_w >= (1 << 30)).to(gl.int32))[:, None] + (w * 0)[None, :]           # (ROWS, 8) zeros
    tabs = (_table_word(nf4_ptr, 0, zero, 8, DTYPE), _table_word(nf4_ptr, 4, zero, 8, DTYPE),
            _table_word(nf4_ptr, 8, zero, 8, DTYPE), _table_word(nf4_ptr, 12, zero, 8, DTYPE),
            _table_word(nf4_ptr, 0, zero, 0, DTYPE), _table_word(nf4_ptr, 4, zero, 0, DTYPE),
            _table_word(nf4_ptr, 8, zero, 0, DTYPE), _table_word(nf4_ptr, 12, zero, 0, DTYPE))
    acc = gl.zeros([ROWS, BM], gl.float32, layout=MMA)
    # UNROLL chunks a step, all their loads issued before their math: UNROLL × 16 bytes of codes a lane in
    # flight, where one chunk's 16 leave the loads waiting on memory's latency
    for k0 in range(k_lo, k_main, _CHUNK * UNROLL):
        w0, x0, m0 = _load_chunk(k0, w_ptrs, in_w, x_ptr, x_off, x_ok, absmax_ptr, absmax_scale_ptr,
                                 absmax_offset_ptr, dq_ptr, row_block, in_n, BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)
        if UNROLL >= 2:
            w1, x1, m1 = _load_chunk(k0 + _CHUNK, w_ptrs, in_w, x_ptr, x_off, x_ok, absmax_ptr, absmax_scale_ptr,
                                     absmax_offset_ptr, dq_ptr, row_block, in_n, BLOCKSIZE, DQ_BLOCKSIZE,
                                     DOUBLE_QUANT)
        if UNROLL >= 4:
            w2, x2, m2 = _load_chunk(k0 + 2 * _CHUNK, w_ptrs, in_w, x_ptr, x_off, x_ok, absmax_ptr,
                                     absmax_scale_ptr, absmax_offset_ptr, dq_ptr, row_block, in_n, BLOCKSIZE,
                                     DQ_BLOCKSIZE, DOUBLE_QUANT)
            w3, x3, m3 = _load_chunk(k0 + 3 * _CHUNK, w_ptrs, in_w, x_ptr, x_off, x_ok, absmax_ptr,
                                     absmax_scale_ptr, absmax_offset_ptr, dq_ptr, row_block, in_n, BLOCKSIZE,
                                     DQ_BLOCKSIZE, DOUBLE_QUANT)
        acc = _mma_chunk(w0, x0, m0, acc, tabs, ROWS, BM, DTYPE, MMA)
        if UNROLL >= 2:
            acc = _mma_chunk(w1, x1, m1, acc, tabs, ROWS, BM, DTYPE, MMA)
        if UNROLL >= 4:
            acc = _mma_chunk(w2, x2, m2, acc, tabs, ROWS, BM, DTYPE, MMA)
            acc = _mma_chunk(w3, x3, m3, acc, tabs, ROWS, BM, DTYPE, MMA)
    for k0 in range(k_main, k_hi, _CHUNK):
        word, x, absmax = _load_chunk(k0, w_ptrs, in_w, x_ptr, x_off, x_ok, absmax_ptr, absmax_scale_ptr,
                                      absmax_offset_ptr, dq_ptr, row_block, in_n, BLOCKSIZE, DQ_BLOCKSIZE,
                                      DOUBLE_QUANT)
        acc = _mma_chunk(word, x, absmax, acc, tabs, ROWS, BM, DTYPE, MMA)
    ym = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    gl.store(part_ptr + pid_k * M * N + (ym * N)[None, :] + n[:, None], acc, mask=in_n[:, None] & (ym < M)[None, :])
    _cta_barrier()                                            # every warp's stores before the release below
    if gl.atomic_add(count_ptr + pid_n, 1) == SPLITS - 1:     # acq_rel: this program sees the other splits' sums
        if HAS_LORA:  # wait for S: its programs started before this one (lower indices), and are short
            while gl.atomic_add(count_ptr + tiles, 0) < SPLITS:
                pass
        _finish_tile(part_ptr, s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, n, in_n, M, N, R, stride_bn, stride_br,
                     stride_sm, stride_sr, scaling, pid_n == 0, SPLITS, BM, HAS_LORA, HAS_BIAS, MMA, WARPS_)
        gl.store(count_ptr + pid_n, 0)                        # ready for the next launch
        if HAS_LORA:  # the last tile to finish resets S's counters
            if gl.atomic_add(count_ptr + tiles + 1, 1) == tiles - 1:
                gl.store(count_ptr + tiles, 0)
                gl.store(count_ptr + tiles + 1, 0)


_LAYOUTS: dict[tuple[int, int], tuple] = {}


def rows_fit(x2d: torch.Tensor, blocksize: int, mask2d: torch.Tensor | None, lora_A: torch.Tensor | None) -> bool:
    """Whether ``launch_rows`` takes this forward: MIN_ROWS to MAX_ROWS contiguous rows of bf16 or fp16 x, no
    dropout mask, no adapter or one of rank 1 to 16 in x's dtype, a blocksize that is a multiple of CHUNK, on an
    NVIDIA GPU of compute capability 8.0 or more (mma.sync's bf16 form), and not under Triton's interpreter (no
    Gluon there). One row goes to kernels/nf4_decode_triton.py, 13-22% faster there; at two rows this kernel took
    23-28% less time than the decode kernel (H100, benchmarks/RESULTS.md)."""
    return (not INTERPRETING and x2d.is_cuda and torch.version.hip is None and MIN_ROWS <= x2d.shape[0] <= MAX_ROWS
            and mask2d is None and (lora_A is None or (1 <= lora_A.shape[0] <= 16 and lora_A.dtype == x2d.dtype))
            and x2d.dtype in (torch.bfloat16, torch.float16) and x2d.is_contiguous() and blocksize % CHUNK == 0
            and torch.cuda.get_device_capability(x2d.device)[0] >= 8)


def rows_split(N: int, K: int, num_sms: int) -> int:
    """Columns of K a split: about two programs an SM, at least 256 columns each, a multiple of 128 (the
    tensor-core GEMM's step; a split that is not a multiple of this kernel's UNROLL chunks ends in single
    chunks). At K = N = 4096 on an H100 (132 SMs): 512; splits of 256-1024 columns timed within
    11% of each other (the kernel's first version, benchmarks/RESULTS.md)."""
    tiles = triton.cdiv(N, 16 * WARPS)
    split = max(1, min(2 * num_sms // tiles, K // 256))
    return triton.cdiv(triton.cdiv(K, split), 128) * 128


def launch_rows(x2d: torch.Tensor, state: tuple, N: int, K: int, blocksize: int, dq_blocksize: int,
                lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, bias: torch.Tensor | None,
                y: torch.Tensor, s: torch.Tensor | None, k_split: int, unroll: int | None = None) -> None:
    """y = x·Ŵᵀ + scaling·S·Bᵀ + bias into y (M, N) and, with an adapter, S = x·Aᵀ into s (M, r), both in x's
    dtype, K split every k_split columns, in one launch; where ``rows_fit``, K a multiple of the blocksize.
    ``unroll``: chunks a loop step, 1, 2 or 4 (default ``unroll_for``)."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    M = x2d.shape[0]
    unroll = unroll or unroll_for(M)
    if unroll not in (1, 2, 4):  # the loop's body is written out for these
        raise ValueError(f"launch_rows: unroll={unroll}: expected 1, 2 or 4 chunks a step")
    if (lora_A is None) != (lora_B is None) or (lora_A is None) != (s is None) or not y.is_contiguous():
        raise ValueError("launch_rows: lora_A, lora_B and s together or none of them, and a contiguous y (M, N)")
    bm = 8 if M <= 8 else 16
    splits = triton.cdiv(K, k_split)
    tiles = triton.cdiv(N, 16 * WARPS)
    if (WARPS, bm) not in _LAYOUTS:
        _LAYOUTS[(WARPS, bm)] = (_word_layout(WARPS), _x_layout(WARPS, bm), _x_layout(WARPS, 16))
    w_layout, x_layout, a_layout = _LAYOUTS[(WARPS, bm)]
    part = torch.empty((splits, M, N), device=x2d.device, dtype=torch.float32)
    s_part = torch.empty((splits, M, 16), device=x2d.device, dtype=torch.float32) if lora_A is not None else part
    count = counters(x2d.device, tiles + 2)
    double_quant = absmax_scale is not None
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    a_arg = x2d if lora_A is None else lora_A.contiguous()  # A's rows read as runs of 16 columns, like x's
    b_arg = x2d if lora_B is None else lora_B
    s_arg = y if s is None else s
    with torch.cuda.device_of(x2d):
        _nf4_rows_kernel[(tiles + (lora_A is not None), splits)](  # with an adapter, S's program first
            x2d, codes.view(torch.int32), absmax, scale_arg, offset_arg, nf4_values, dq_arg, a_arg, part, s_part,
            b_arg, y if bias is None else bias, y, s_arg, count,
            M, N, K, 0 if lora_A is None else lora_A.shape[0], k_split, x2d.stride(0), a_arg.stride(0),
            b_arg.stride(0), b_arg.stride(-1), s_arg.stride(0), s_arg.stride(-1), scaling,
            BM=bm, WARPS_=WARPS, BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant,
            HAS_LORA=lora_A is not None, HAS_BIAS=bias is not None, SPLITS=splits,
            UNROLL=unroll, W_LAYOUT=w_layout, X_LAYOUT=x_layout, A_LAYOUT=a_layout,
            num_warps=WARPS,
        )


def unroll_for(M: int) -> int:
    """Chunks a loop step: 4 at every row count. On an H100 at K = N = 4096 (benchmarks/RESULTS.md), of 1, 2 and 4
    chunks a step, 4 was the fastest or within 2% of it at 1-16 rows, with and without an adapter."""
    return 4
