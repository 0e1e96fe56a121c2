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
2. **The codebook lookup as a table of pairs in shared memory.** A byte of codes is two neighbouring weights,
   and the MMA's registers hold exactly such pairs (two 16-bit values of neighbouring k). So each program first
   writes a table of the 256 byte values' pairs in x's dtype — entry e = 16·hi + lo holds nf4_values[hi] (low
   half) and nf4_values[lo] (high half) — 32 times over, one copy per lane at word e·32 + lane, so that the 32
   lanes of a warp, whatever bytes they look up, read 32 different banks (no bank conflict). A byte then costs
   three instructions: PRMT moves it into a register of its own, IMAD makes the address e·128 + 4·lane + base,
   LDS loads the MMA's register (``LOOKUP_ASM``, 12 for the 8 weights of a word, where byte permutes of a
   16-entry table took 25). The table is 32 KB a program, declared in the inline PTX that fills it
   (``TABLE_ASM``), which returns its address. With double quantization the absmax's own codebook (256 fp32
   values) follows it, so a chunk's absmax, dq_values[code] · scale + offset, waits for one load from memory (its
   8-bit code) and one from shared memory (``DQ_ASM``), not for two from memory one after the other.

Gluon (``triton.experimental.gluon``) is Triton's lower-level language, compiled by the same compiler: a kernel
names the layout of every tensor (which lane and register holds which element), which choice 1 needs. Triton's
interpreter does not run Gluon, so this kernel is tested on a GPU only (tests/test_nf4_rows.py); the CPU tests
check its lookups by running ``TABLE_ASM``, ``LOOKUP_ASM`` and ``DQ_ASM`` through a small emulator of their
instructions, and the routing around it.

    with an adapter, program 0 of each split of K:                  # short: almost always done first
        s_part[..., split] = Σ_chunks mma(A[:, chunk], x[:, chunk])ᵀ    # A's 16 rows, k permuted as Ŵ's
        count[tile] += 1 for every tile                              # (and finish a tile it arrived at last)
    the other programs, one per tile of 16·WARPS rows of Ŵ and split of K:   # a warp: 16 rows, one m16n8 tile
        load the tile's rows of B and of the bias                    # used only by the finishing, if at all
        (on Hopper, from minipeft's codebooks: make the tables, then wait for the kernel before)
        (up to 8 rows: load the first step's chunks)                 # their latency hides the tables' making
        make the tables (unless made); then for each step of UNROLL 64-column chunks of the split:
            load every chunk's words (2 per row a lane), x[:, chunk] (32 bytes a lane) and absmax first
            for each chunk: a = lookup(words) (registers, the MMA's layout), b = x (the same permutation of k)
                            acc += absmax[rows, chunk] · mma(a, b)
        part[tile, split] = acc                                      # fp32 partial sums of yᵀ
        if count[tile] += 1 makes SPLITS (with an adapter 2·SPLITS: S's splits arrive too), the last arrival:
            y[:, tile] = Σ_split part[tile, split]ᵀ + (B[tile] · scaling·Sᵀ by one more MMA)ᵀ + bias
            (the first tile stores S; the tile's counter goes back to zero for the next launch)

The splits are added in a fixed order (split 0, 1, ...) whichever program finishes last, so a call gives the same
bits every time. No program waits for another: the last arrival at a tile finishes it. The counters are
kernels/nf4_decode_triton.py's (``counters``), whose module docstring states what such a design assumes (no two
launches count in one buffer at once). Loading UNROLL = 4 chunks before their math (``unroll_for``) keeps
4 × 16 bytes of codes a lane in flight: with one chunk a step the loads waited on memory's latency (on an H100,
10.1 against 9.1 µs at 3-4 rows without an adapter). What a program needs only at its end, the rows of B and of the
bias, is loaded at its start, so that the last arrival at a tile finishes it after one more trip to memory (the
splits' sums and S), not two: on an H100 this took 17-20% off at 1-8 rows with a rank-16 adapter
(benchmarks/RESULTS.md). And that trip's loads go out together: a thread's parts of S lie side by side (s_part is
(M, 16, SPLITS): one or two vector loads, where SPLITS loads into one register, one after another, were what ptxas
made of them), and a tile's partial sums lie split after split, each (16·WARPS, BM) whole, at constant offsets from
one address (8-byte loads at 16 rows): 13% less time at 16 rows with an adapter, 7% without, 1-5% at 2-8 rows, 3%
more at one. On Hopper the kernel is launched as the previous kernel's programmatic dependent (``launch_pdl``):
its programs may be placed on the SMs while that kernel's last programs still run, and wait for all of it
(``griddepcontrol.wait``) before any access to memory the previous kernel might write. Each program, once past its
loop, lets the next launch in (``griddepcontrol.launch_dependents``), so that launch's programs take the SMs this
one's programs leave while its last arrivals still finish their tiles (a launch let in at its programs' start lets
in the next, and so on: launches holding the SMs while they wait, up to 27% slower). And the tables are made
before the wait, from codebooks that no kernel writes (kernels/constants.py). Where the first step is peeled (1-8
rows), a CTA barrier follows its loads and each later step's: the tables' making no longer sits between a step's
loads and its math, and without the barrier ptxas spread the loads among the MMAs, one load's latency after
another (at one row 26% slower than with the tables after the wait). On an H100, against a plain launch: 11-15%
less at 4096², 19-26% at 2304 × 768 (GPT-2's c_attn), 0-6% at 11008 × 4096; at 1-8 rows the tables before the
wait with the barriers took 4-7% off the tables after it at 4096², 4-16% at 2304 × 768, and at 11008 × 4096
1% off to 3% more (benchmarks/RESULTS.md).
``nf4_lora_triton.nf4_forward`` launches it for 1 to 16 rows of bf16 or fp16 x without a
dropout mask, without an adapter or with one of rank 1 to 16, on an NVIDIA GPU and a blocksize of 64 or more
(``rows_fit``). Such a call is a decode step, whose host time (eager) is many times its GPU time: the launch goes
through kernels/launcher.py, which keeps the compiled kernel per specialization and launches it again without
Triton's JIT path (on an H100 machine's host, 92 µs a call of ``launch_rows`` against 152 through the JIT), and
the layouts are made inside the kernel, not passed (the JIT hashed them on every call).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .constants import is_constant
from .launcher import launch
from .lora_triton import _device_info
from .nf4_decode_triton import counters
from .triton_interpreter import INTERPRETING

__all__ = ["MIN_ROWS", "MAX_ROWS", "DQ_AT", "TABLE_ASM", "LOOKUP_ASM", "DQ_ASM", "rows_fit", "launch_rows",
           "rows_split", "unroll_for"]

MIN_ROWS = 1     # a decode step too (see rows_fit)
MAX_ROWS = 16    # x's rows: two n8 tiles of the MMA
WARPS = 8        # warps a program: 128 rows of Ŵ
CHUNK = 64       # columns of K an MMA chunk: one quantization block or part of one (blocksize ≥ 64)


def _table_asm() -> str:
    """PTX run once by each of a program's 256 threads: declares the tables (the pairs: 256 entries × 32 lanes × 4
    bytes; then the 256 fp32 values of the absmax's codebook, ``DQ_AT`` bytes on), writes thread t's part of them
    — entries t/8 + 32i of the pairs for i < 8, lanes 4(t%8) .. 4(t%8)+3 of each, one 16-byte store an entry, and
    value t of the absmax's codebook — waits for the whole program (``bar.sync``) and returns the tables' address.

    $0: the address; $1: t; $2: nf4_values[(t/8) % 16] (the entry's lo, the same for all 8 of t's entries);
    $3-$10: P_j = nf4_values[2j] | nf4_values[2j+1] << 16; $11: dq_values[t]'s 32 bits (0 without double
    quantization). Entry t/8 + 32i has hi = t/128 + 2i, so its low half is half t/128 of P_i: one PRMT picks it and
    lo's 16 bits (selector 0x5410, or 0x5432 for the upper half)."""
    lines = [f"{{ .shared .align 16 .b8 nf4_pairs[{DQ_AT + 1024}]; .reg .b32 base, a, s, sel, p;",
             "mov.u32 base, nf4_pairs; shr.u32 a, $1, 3; shl.b32 a, a, 7; and.b32 s, $1, 7; shl.b32 s, s, 4;",
             "add.u32 a, a, s; add.u32 a, a, base; shr.u32 sel, $1, 7; mul.lo.u32 sel, sel, 0x22;",
             "add.u32 sel, sel, 0x5410;"]
    for i in range(8):
        lines.append(f"prmt.b32 p, ${3 + i}, $2, sel; st.shared.v4.b32 [a+{4096 * i}], {{p, p, p, p}};")
    lines.append(f"shl.b32 a, $1, 2; add.u32 a, a, base; st.shared.b32 [a+{DQ_AT}], $11;")
    return "\n".join(lines + ["bar.sync 0; mov.u32 $0, base; }"])


def _lookup_asm() -> str:
    """PTX for the 8 weights of a word ($8) from the table, $9 = its address + 4·lane: byte j (weights 2j, 2j+1:
    its high nibble, then its low one, as the codes store them) becomes outputs $2j and $2j+1 (16-bit halves)."""
    lines = ["{ .reg .b32 b, a, p;"]
    for j in range(4):
        lines.append(f"prmt.b32 b, $8, 0, {hex(0x4440 + j)}; mad.lo.u32 a, b, 128, $9; ld.shared.b32 p, [a]; "
                     f"mov.b32 {{${2 * j}, ${2 * j + 1}}}, p;")
    return "\n".join(lines + ["}"])


DQ_AT = 32768   # where the absmax's codebook starts, in bytes from the table of pairs
TABLE_ASM = _table_asm()
LOOKUP_ASM = _lookup_asm()
DQ_ASM = f"ld.shared.b32 $0, [$1+{DQ_AT}];"   # $1 = the tables' address + 4·code: dq_values[code]'s bits
_TABLE_ASM = gl.constexpr(TABLE_ASM)  # a kernel reads only constexpr globals
_LOOKUP_ASM = gl.constexpr(LOOKUP_ASM)
_DQ_ASM = gl.constexpr(DQ_ASM)
_CHUNK = gl.constexpr(CHUNK)
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # (its name from Triton 3.7 on)


@gluon.constexpr_function
def _word_layout(warps: int) -> gl.DistributedLinearLayout:
    """The codes of a chunk, (16·warps rows, 8 words): lane t holds words 2(t%4), 2(t%4)+1 (two registers, one
    64-bit load) of rows t/4 and t/4 + 8 of its warp's 16 — the rows and columns its MMA fragment needs."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [8, 0]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(warps.bit_length() - 1)], block_bases=[], shape=[16 * warps, 8])


@gluon.constexpr_function
def _x_layout(warps: int, bm: int) -> gl.DistributedLinearLayout:
    """x's chunk as (bm rows, 4 quarters, 16 columns): lane t holds columns 16(t%4) .. +15 of row t/4 (and of row
    t/4 + 8 for bm = 16), the B fragment under the permutation of k; every warp holds the same x."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]] + ([[8, 0, 0]] if bm == 16 else []),
        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
        warp_bases=[[0, 0, 0]] * (warps.bit_length() - 1), block_bases=[], shape=[bm, 4, 16])


@gluon.jit
def _codebook_bits(nf4_ptr, i, DTYPE: gl.constexpr):
    """nf4_values[i] rounded to DTYPE, its 16 bits in the low half of an int32."""
    return gl.load(nf4_ptr + i).to(DTYPE).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF


@gluon.jit
def _codebook_pair(nf4_ptr, j: gl.constexpr, t, DTYPE: gl.constexpr):
    """P_j = nf4_values[2j] | nf4_values[2j+1] << 16 in DTYPE, laid out as t."""
    return _codebook_bits(nf4_ptr, 2 * j + t * 0, DTYPE) | (_codebook_bits(nf4_ptr, 2 * j + 1 + t * 0, DTYPE) << 16)


@gluon.jit
def _pair_table(nf4_ptr, dq_ptr, like, DTYPE: gl.constexpr, WARPS_: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """Writes this program's tables (``TABLE_ASM``, every thread once); returns the pairs' address + 4·lane in
    every element of a tensor shaped and laid out as ``like`` (the words: LOOKUP_ASM's $9), and the tables'
    address (a scalar: DQ_ASM's base)."""
    gl.static_assert(WARPS_ == 8, "TABLE_ASM fills the table with 256 threads")
    t = gl.arange(0, 32 * WARPS_, layout=gl.BlockedLayout([1], [32], [WARPS_], [0]))   # one element a thread
    if DOUBLE_QUANT:
        dq_bits = gl.load(dq_ptr + t).to(gl.int32, bitcast=True)
    else:
        dq_bits = t * 0
    address = gl.inline_asm_elementwise(
        _TABLE_ASM, "=r,r,r,r,r,r,r,r,r,r,r,r",
        [t, _codebook_bits(nf4_ptr, (t >> 3) & 15, DTYPE), _codebook_pair(nf4_ptr, 0, t, DTYPE),
         _codebook_pair(nf4_ptr, 1, t, DTYPE), _codebook_pair(nf4_ptr, 2, t, DTYPE),
         _codebook_pair(nf4_ptr, 3, t, DTYPE), _codebook_pair(nf4_ptr, 4, t, DTYPE),
         _codebook_pair(nf4_ptr, 5, t, DTYPE), _codebook_pair(nf4_ptr, 6, t, DTYPE),
         _codebook_pair(nf4_ptr, 7, t, DTYPE), dq_bits], dtype=gl.int32, is_pure=False, pack=1)
    base = gl.max(address, axis=0)   # the same in every thread: a scalar, which any layout can take
    table = gl.inline_asm_elementwise("{ .reg .b32 l; mov.u32 l, %laneid; shl.b32 l, l, 2; add.u32 $0, $1, l; }",
                                      "=r,r", [like + base], dtype=gl.int32, is_pure=True, pack=1)
    return table, base


@gluon.jit
def _lookup(word, table, DTYPE: gl.constexpr):
    """The 8 weights of every word, (rows, 8 words, 2, 2, 2) in DTYPE: weight f = 4·f2 + 2·f1 + f0 at [..., f2, f1,
    f0] (joined from the most significant bit of f down; the joins stay in registers). ``table``: the pair
    table's address + 4·lane, laid out as ``word``."""
    if DTYPE == gl.bfloat16:  # (the dtypes written out: inline_asm_elementwise does not unwrap a constexpr)
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            _LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, table], dtype=(gl.bfloat16,) * 8, is_pure=True,
            pack=1)
    else:
        v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
            _LOOKUP_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [word, table], dtype=(gl.float16,) * 8, is_pure=True,
            pack=1)
    return gl.join(gl.join(gl.join(v0, v4), gl.join(v2, v6)), gl.join(gl.join(v1, v5), gl.join(v3, v7)))


@gluon.jit
def _load_chunk(k0, j: gl.constexpr, words, xs, absmax_ptr, absmax_scale_ptr, row_block, BLOCKSIZE: gl.constexpr,
                DQ_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """Chunk j of the step at column k0: its words (rows, 8), x (bm, 4, 16) and each row's absmax (rows,) as
    loaded — with double quantization its 8-bit code and its scale, made a value by ``_absmax`` from the table in
    shared memory, so no load waits for another. ``words`` and ``xs`` point at the step's first chunk (so chunk j's
    addresses are theirs plus a constant); the rows are clamped to the last (their results are not stored), so no
    load needs a mask."""
    word = gl.load(words + 8 * j)
    x = gl.load(xs + _CHUNK * j)
    block = row_block + (k0 + _CHUNK * j) // BLOCKSIZE
    if DOUBLE_QUANT:
        code = gl.load(absmax_ptr + block).to(gl.int32)
        scale = gl.load(absmax_scale_ptr + block // DQ_BLOCKSIZE)
    else:
        code = gl.load(absmax_ptr + block)
        scale = code
    return word, x, code, scale


@gluon.jit
def _load_step(k0, w_ptrs, xs, absmax_ptr, absmax_scale_ptr, row_block, BLOCKSIZE: gl.constexpr,
               DQ_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr, UNROLL: gl.constexpr):
    """The UNROLL chunks of the step at column k0 (``_load_chunk``), flat: (word, x, code, scale) × UNROLL."""
    step = ()
    for j in gl.static_range(UNROLL):
        step = step + _load_chunk(k0, j, w_ptrs + (k0 >> 3), xs + k0, absmax_ptr, absmax_scale_ptr, row_block,
                                  BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)
    return step


@gluon.jit
def _absmax(code, scale, offset, base, DOUBLE_QUANT: gl.constexpr):
    """A chunk's absmax for each row in fp32: with double quantization dq_values[code] · scale + absmax_offset,
    dq_values read from the program's table in shared memory (``DQ_ASM``); without, the loaded fp32 value."""
    if DOUBLE_QUANT:
        bits = gl.inline_asm_elementwise(_DQ_ASM, "=r,r", [base + 4 * code], dtype=gl.int32,
                                         is_pure=True, pack=1)
        absmax = bits.to(gl.float32, bitcast=True) * scale + offset
    else:
        absmax = code
    return absmax


@gluon.jit
def _x_operand(x, BM: gl.constexpr, MMA: gl.constexpr):
    """x's chunk (BM, 4, 16) as the MMA's second operand (64, BM): x's column 16·q + 8·jh + 4·f2 + 2·f1 + f0 at
    MMA column 32·jh + 16·f2 + 8·f1 + 2·q + f0, the permutation the weight's lookup gives."""
    b = gl.reshape(gl.permute(gl.reshape(x, [BM, 4, 2, 2, 2, 2]), [0, 2, 3, 4, 1, 5]), [BM, _CHUNK])
    return gl.convert_layout(gl.permute(b, [1, 0]), gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2),
                             assert_trivial=True)


@gluon.jit
def _mma_chunk(word, x, absmax, acc, table, ROWS: gl.constexpr, BM: gl.constexpr, DTYPE: gl.constexpr,
               MMA: gl.constexpr):
    """acc + absmax · (Ŵ's chunk without its absmax) · x's chunkᵀ: both operands in the MMA's registers."""
    v = _lookup(word, table, DTYPE)                                                 # (ROWS, 8, 2, 2, 2)
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
def _finish_tile(part_ptr, s_part_ptr, y_ptr, s_ptr, tile, n, in_n, M, R, N, stride_sm, stride_sr, scaling,
                 first_tile, up, bias_v, SPLITS: gl.constexpr, BM: gl.constexpr, HAS_LORA: gl.constexpr,
                 HAS_BIAS: gl.constexpr, MMA: gl.constexpr, WARPS_: gl.constexpr, S_PAD: gl.constexpr):
    """y[:, tile] = Σ_j part[tile, j]ᵀ + scaling·S·B[tile]ᵀ + bias, S = Σ_j s_part[..., j] (stored by the
    first tile), by the last of a tile's splits to finish; ``up`` and ``bias_v``: the tile's B and bias
    (``_tile_extras``). The splits are added in a fixed order whichever program finishes last: the same bits
    every time. Loads skip L1 (".cg"): other SMs wrote these values in this launch."""
    ym = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    if HAS_LORA:  # S's parts first, a thread's splits side by side: one or two vector loads, not SPLITS in a row
        SL: gl.constexpr = gl.BlockedLayout([1, 1, S_PAD], [16, 2, 1], [1, WARPS_, 1], [2, 0, 1])
        r = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, SL)))
        sm = gl.arange(0, BM, layout=gl.SliceLayout(0, gl.SliceLayout(2, SL)))
        sj = gl.arange(0, S_PAD, layout=gl.SliceLayout(0, gl.SliceLayout(1, SL)))
        s_offs = ((sm * 16)[None, :, None] + r[:, None, None]) * SPLITS + sj[None, None, :]   # (16, BM, S_PAD)
        s_ok = (r < 16)[:, None, None] & (sm < M)[None, :, None] & (sj < SPLITS)[None, None, :]
        s_t = gl.sum(gl.load(s_part_ptr + s_offs, mask=s_ok, other=0.0, cache_modifier=".cg"), axis=2)  # Sᵀ
    ROWS: gl.constexpr = 16 * WARPS_
    # the tile's splits lie one after another, each (ROWS, BM) whole: no masks, and one address for all of them
    part_at = (part_ptr + tile * SPLITS * ROWS * BM + (gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA)) * BM)[:, None]
               + ym[None, :])
    acc = gl.load(part_at, cache_modifier=".cg")
    for j in gl.static_range(1, SPLITS):
        acc += gl.load(part_at + j * ROWS * BM, cache_modifier=".cg")
    if HAS_LORA:  # + (B's rows)·(scaling·S)ᵀ, one more MMA: B[tile] (ROWS, 16) and scaling·Sᵀ (16, BM)
        s_t = s_t.to(y_ptr.dtype.element_ty)                  # S in x's dtype, as the shrink kernel makes it
        if first_tile:
            gl.store(s_ptr + (sm * stride_sm)[None, :] + (r * stride_sr)[:, None], s_t,
                     mask=(r < R)[:, None] & (sm < M)[None, :])
        low = (s_t.to(gl.float32) * scaling).to(y_ptr.dtype.element_ty)
        low = gl.convert_layout(low, gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
        acc = mma_v2(gl.convert_layout(up, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)), low, acc)
    if HAS_BIAS:
        acc += bias_v[:, None]
    gl.store(y_ptr + (ym * N)[None, :] + n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=in_n[:, None] & (ym < M)[None, :])


@gluon.jit
def _tile_extras(b_ptr, bias_ptr, tile, N, R, stride_bn, stride_br, DTYPE: gl.constexpr, HAS_LORA: gl.constexpr,
                 HAS_BIAS: gl.constexpr, MMA: gl.constexpr, WARPS_: gl.constexpr):
    """Tile ``tile``'s rows of B (ROWS, 16) and of the bias in fp32 (zeros where there is none): loaded by a
    tile's program before its loop, so that finishing the tile waits for neither."""
    ROWS: gl.constexpr = 16 * WARPS_
    BL: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [WARPS_, 1], [1, 0])
    if HAS_LORA:
        nb = tile * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, BL))
        rb = gl.arange(0, 16, layout=gl.SliceLayout(0, BL))
        up = gl.load(b_ptr + (nb * stride_bn)[:, None] + (rb * stride_br)[None, :],
                     mask=(nb < N)[:, None] & (rb < R)[None, :], other=0.0)             # (ROWS, 16) = B[tile]
    else:
        up = gl.zeros([ROWS, 16], DTYPE, layout=BL)
    n = tile * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))
    if HAS_BIAS:
        bias_v = gl.load(bias_ptr + n, mask=n < N, other=0.0).to(gl.float32)
    else:
        bias_v = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, MMA))
    return up, bias_v


@gluon.jit
def _nf4_rows_kernel(
    # pointers (codes as int32 words; part: (tiles, SPLITS, 16·WARPS_, BM) fp32 partial sums of yᵀ; s_part:
    # (M, 16, SPLITS);
    # count: an int32 counter a tile, zero between launches)
    x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, a_ptr, part_ptr, s_part_ptr,
    b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr,
    # sizes (K_SPLIT: columns of K a split, a multiple of CHUNK)
    M, N, K, R, K_SPLIT, stride_xm, stride_ar, stride_bn, stride_br, stride_sm, stride_sr, scaling,
    # meta-parameters
    BM: gl.constexpr, WARPS_: gl.constexpr, BLOCKSIZE: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr,
    DOUBLE_QUANT: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr, SPLITS: gl.constexpr,
    UNROLL: gl.constexpr, S_FIRST: gl.constexpr, T_PAD: gl.constexpr, PEEL: gl.constexpr, S_PAD: gl.constexpr,
    PDL: gl.constexpr, TRIGGER: gl.constexpr, TABLES_FIRST: gl.constexpr,
):
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    W_LAYOUT: gl.constexpr = _word_layout(WARPS_)     # made here from ints, not passed: a layout argument is hashed
    X_LAYOUT: gl.constexpr = _x_layout(WARPS_, BM)    # by the JIT on every launch
    A_LAYOUT: gl.constexpr = _x_layout(WARPS_, 16)
    if TABLES_FIRST:  # codebooks no kernel writes (kernels/constants.py): the tables while the previous kernel ends
        table0, base0 = _pair_table(nf4_ptr, dq_ptr, gl.zeros([16 * WARPS_, 8], gl.int32, layout=W_LAYOUT), DTYPE,
                                    WARPS_, DOUBLE_QUANT)
    else:
        table0 = 0
        base0 = 0
    if PDL:  # a programmatic dependent: wait for all of the previous kernel (it may write x)
        _gdc("griddepcontrol.wait;")
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS_, 1], instr_shape=[16, 8])
    pid_k = gl.program_id(1)
    k_lo = pid_k * K_SPLIT
    k_hi = gl.minimum(K, k_lo + K_SPLIT)
    STEP: gl.constexpr = _CHUNK * UNROLL
    k_main = k_lo + (k_hi - k_lo) // STEP * STEP      # UNROLL chunks a step up to here, then one at a time
    # x's addresses: row m (rows past M read row M - 1, whose products are not stored), quarter q, column 16q + i
    m = gl.arange(0, BM, layout=gl.SliceLayout(1, gl.SliceLayout(2, X_LAYOUT)))
    q = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, X_LAYOUT)))
    i = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, X_LAYOUT)))
    x_off = (gl.minimum(m, M - 1) * stride_xm)[:, None, None] + (q * 16)[None, :, None] + i[None, None, :]
    x_ok = (m < M)[:, None, None] & (q < 4)[None, :, None] & (i < 16)[None, None, :]
    # which program: with an adapter, program 0 of each split makes S (the last one with S_FIRST off: a test's
    # order); the others make a tile's split
    tiles = gl.num_programs(0) - 1 if HAS_LORA else gl.num_programs(0)
    pid_n = gl.program_id(0) - 1 if HAS_LORA and S_FIRST else gl.program_id(0)
    if HAS_LORA:
        # the tiles this program arrived at last, and must finish: for S's programs any (``last``; almost never
        # one), for a tile's its own or none
        makes_s = pid_n == (-1 if S_FIRST else tiles)
        t = gl.arange(0, T_PAD, layout=gl.BlockedLayout([T_PAD // (32 * WARPS_)], [32], [WARPS_], [0]))
        last = t < 0
        up, bias_v = _tile_extras(b_ptr, bias_ptr, gl.maximum(pid_n, 0), N, R, stride_bn, stride_br, DTYPE, HAS_LORA,
                                  HAS_BIAS, MMA, WARPS_)
        if makes_s:
            last = _s_program(x_ptr, a_ptr, s_part_ptr, count_ptr, x_off, x_ok, k_lo, k_hi, k_main, pid_k, tiles, t,
                              M, R, stride_ar, BM, SPLITS, UNROLL, MMA, A_LAYOUT)
            n_last = gl.sum(last.to(gl.int32), axis=0)
        else:
            n_last = _tile_program(x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
                                   part_ptr, count_ptr, x_off, k_lo, k_hi, k_main, pid_n, pid_k, M, N, K, BM, WARPS_,
                                   BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT, HAS_LORA, SPLITS, UNROLL, W_LAYOUT, MMA, PEEL,
                                   table0, base0, TABLES_FIRST, TRIGGER)
        for _ in range(n_last):                               # one place finishes a tile: a smaller kernel
            if makes_s:
                tile = gl.min(gl.where(last, t, tiles), axis=0)   # the lowest first
                last = last & (t != tile)
                up, bias_v = _tile_extras(b_ptr, bias_ptr, tile, N, R, stride_bn, stride_br, DTYPE, HAS_LORA,
                                          HAS_BIAS, MMA, WARPS_)
            else:
                tile = pid_n
            _finish(part_ptr, s_part_ptr, y_ptr, s_ptr, count_ptr, tile, M, N, R, stride_sm, stride_sr, scaling, up,
                    bias_v, SPLITS, BM, HAS_LORA, HAS_BIAS, MMA, WARPS_, S_PAD)
    else:
        up, bias_v = _tile_extras(b_ptr, bias_ptr, pid_n, N, R, stride_bn, stride_br, DTYPE, HAS_LORA, HAS_BIAS, MMA,
                                  WARPS_)
        if _tile_program(x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, part_ptr,
                         count_ptr, x_off, k_lo, k_hi, k_main, pid_n, pid_k, M, N, K, BM, WARPS_, BLOCKSIZE,
                         DQ_BLOCKSIZE, DOUBLE_QUANT, HAS_LORA, SPLITS, UNROLL, W_LAYOUT, MMA, PEEL, table0, base0,
                         TABLES_FIRST, TRIGGER) > 0:
            _finish(part_ptr, s_part_ptr, y_ptr, s_ptr, count_ptr, pid_n, M, N, R, stride_sm, stride_sr, scaling, up,
                    bias_v, SPLITS, BM, HAS_LORA, HAS_BIAS, MMA, WARPS_, S_PAD)


@gluon.jit
def _gdc(ASM: gl.constexpr):
    """Hopper's PTX for a programmatic launch (``griddepcontrol.wait``): a no-op in a launch that is not one."""
    gl.inline_asm_elementwise(ASM + " // $0 $1", "=r,r", [gl.program_id(0)], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _finish(part_ptr, s_part_ptr, y_ptr, s_ptr, count_ptr, tile, M, N, R, stride_sm, stride_sr, scaling, up, bias_v,
            SPLITS: gl.constexpr, BM: gl.constexpr, HAS_LORA: gl.constexpr, HAS_BIAS: gl.constexpr,
            MMA: gl.constexpr, WARPS_: gl.constexpr, S_PAD: gl.constexpr):
    """Tile ``tile`` of y (``_finish_tile``), and its counter back to zero for the next launch."""
    n = tile * 16 * WARPS_ + gl.arange(0, 16 * WARPS_, layout=gl.SliceLayout(1, MMA))
    _finish_tile(part_ptr, s_part_ptr, y_ptr, s_ptr, tile, n, n < N, M, R, N, stride_sm, stride_sr, scaling, tile == 0,
                 up, bias_v, SPLITS, BM, HAS_LORA, HAS_BIAS, MMA, WARPS_, S_PAD)
    gl.store(count_ptr + tile, 0)


@gluon.jit
def _s_program(x_ptr, a_ptr, s_part_ptr, count_ptr, x_off, x_ok, k_lo, k_hi, k_main, pid_k, tiles, t, M, R, stride_ar,
               BM: gl.constexpr, SPLITS: gl.constexpr, UNROLL: gl.constexpr, MMA: gl.constexpr,
               A_LAYOUT: gl.constexpr):
    """The adapter's Sᵀ = A·xᵀ over one split into s_part[..., split], A's 16 rows as the MMA's first operand; then one
    more arrival at every tile's counter (t: 0 .. T_PAD - 1). Returns where it was a tile's last arrival: a short
    program (no lookup), started before its split's tiles, so almost never."""
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
    gl.store(s_part_ptr + ((ym * 16)[None, :] + sr[:, None]) * SPLITS + pid_k, s_t, mask=(ym < M)[None, :])
    _cta_barrier()                                        # every warp's stores before the release below
    arrived = gl.atomic_add(count_ptr + t, t * 0 + 1, mask=t < tiles)    # acq_rel, each thread's side by side
    return (arrived == 2 * SPLITS - 1) & (t < tiles)


@gluon.jit
def _tile_program(x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, part_ptr,
                  count_ptr, x_off, k_lo, k_hi, k_main, pid_n, pid_k, M, N, K, BM: gl.constexpr, WARPS_: gl.constexpr,
                  BLOCKSIZE: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr, DOUBLE_QUANT: gl.constexpr,
                  HAS_LORA: gl.constexpr, SPLITS: gl.constexpr, UNROLL: gl.constexpr, W_LAYOUT: gl.constexpr,
                  MMA: gl.constexpr, PEEL: gl.constexpr, table0, base0, TABLES_FIRST: gl.constexpr,
                  TRIGGER: gl.constexpr):
    """x·Ŵ[tile]ᵀ over one split into part[split], then one more arrival at the tile's counter. Returns 1 if it
    was the last (its splits', and with an adapter S's), which finishes the tile; 0 otherwise."""
    ROWS: gl.constexpr = 16 * WARPS_
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    STEP: gl.constexpr = _CHUNK * UNROLL
    # the words' addresses: rows n of Ŵ (past N: row N - 1, not stored), words w of a chunk (K % 64 == 0: every
    # row starts on a word)
    n_w = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, W_LAYOUT))
    w = gl.arange(0, 8, layout=gl.SliceLayout(0, W_LAYOUT))
    w_ptrs = words_ptr + (gl.minimum(n_w, N - 1) * (K // 8))[:, None] + w[None, :]
    xs = x_ptr + x_off
    # the rows of the accumulator, for the absmax
    n = pid_n * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))
    row_block = gl.minimum(n, N - 1) * (K // BLOCKSIZE)
    if DOUBLE_QUANT:
        offset = gl.load(absmax_offset_ptr)
    else:
        offset = 0.0
    k_first = k_lo
    if PEEL:
        # the first step's loads before the tables are made, so that their latency hides the making (at column
        # k_lo; where the split has no whole step, at K - STEP, inside the row and not used: the launch peels only
        # where STEP ≤ K, so no load needs a mask)
        first = _load_step(gl.minimum(k_lo, K - STEP), w_ptrs, xs, absmax_ptr, absmax_scale_ptr, row_block, BLOCKSIZE,
                           DQ_BLOCKSIZE, DOUBLE_QUANT, UNROLL)
    if TABLES_FIRST:  # made before the wait (the kernel's start)
        table = table0
        base = base0
        if PEEL:  # all of the first step's loads issued before any of its math (see the loop)
            _cta_barrier()
    else:
        table, base = _pair_table(nf4_ptr, dq_ptr, gl.zeros([ROWS, 8], gl.int32, layout=W_LAYOUT), DTYPE, WARPS_,
                                  DOUBLE_QUANT)                                 # table: laid out as the words
    acc = gl.zeros([ROWS, BM], gl.float32, layout=MMA)
    if PEEL:
        if k_main > k_lo:
            for j in gl.static_range(UNROLL):
                acc = _mma_chunk(first[4 * j], first[4 * j + 1],
                                 _absmax(first[4 * j + 2], first[4 * j + 3], offset, base, DOUBLE_QUANT), acc, table,
                                 ROWS, BM, DTYPE, MMA)
            k_first = k_lo + STEP
    # UNROLL chunks a step, all their loads issued before their math: UNROLL × 16 bytes of codes a lane in
    # flight, where one chunk's 16 leave the loads waiting on memory's latency
    for k0 in range(k_first, k_main, STEP):
        step = _load_step(k0, w_ptrs, xs, absmax_ptr, absmax_scale_ptr, row_block, BLOCKSIZE, DQ_BLOCKSIZE,
                          DOUBLE_QUANT, UNROLL)
        if TABLES_FIRST:
            if PEEL:  # a step's loads issued together: without the tables' making between the loads and the math,
                _cta_barrier()  # ptxas spreads the loads among the MMAs, each load's latency after another's
        for j in gl.static_range(UNROLL):
            acc = _mma_chunk(step[4 * j], step[4 * j + 1],
                             _absmax(step[4 * j + 2], step[4 * j + 3], offset, base, DOUBLE_QUANT), acc, table, ROWS,
                             BM, DTYPE, MMA)
    for k0 in range(k_main, k_hi, _CHUNK):
        word, x, code, scale = _load_chunk(k0, 0, w_ptrs + (k0 >> 3), xs + k0, absmax_ptr, absmax_scale_ptr,
                                           row_block, BLOCKSIZE, DQ_BLOCKSIZE, DOUBLE_QUANT)
        acc = _mma_chunk(word, x, _absmax(code, scale, offset, base, DOUBLE_QUANT), acc, table, ROWS, BM, DTYPE, MMA)
    if TRIGGER:  # past the loop: the next launch's programs may take the SMs this launch's programs leave
        _gdc("griddepcontrol.launch_dependents;")   # (its launch starts once every program here has said so)
    ym = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
    nl = gl.arange(0, ROWS, layout=gl.SliceLayout(1, MMA))           # part[tile, split]: (ROWS, BM), all of it
    gl.store(part_ptr + (pid_n * SPLITS + pid_k) * ROWS * BM + (nl * BM)[:, None] + ym[None, :], acc)
    _cta_barrier()                                            # every warp's stores before the release below
    # acq_rel: the last of the tile's arrivals sees the others' sums
    arrived = gl.atomic_add(count_ptr + pid_n, 1)
    return (arrived == (2 * SPLITS if HAS_LORA else SPLITS) - 1).to(gl.int32)


def rows_fit(x2d: torch.Tensor, blocksize: int, mask2d: torch.Tensor | None, lora_A: torch.Tensor | None) -> bool:
    """Whether ``launch_rows`` takes this forward: MIN_ROWS to MAX_ROWS contiguous rows of bf16 or fp16 x, no
    dropout mask, no adapter or one of rank 1 to 16 in x's dtype, a blocksize that is a multiple of CHUNK, on an
    NVIDIA GPU of compute capability 8.0 or more (mma.sync's bf16 form), and not under Triton's interpreter (no
    Gluon there). At one row this kernel and kernels/nf4_decode_triton.py took the same time with a rank-16
    adapter (0.809 and 0.812 × the bf16 linear) and this one 4% less without one (H100, 2026-12-07,
    benchmarks/RESULTS.md); the decode kernel keeps the one- and two-row calls this one cannot take."""
    return (not INTERPRETING and x2d.is_cuda and torch.version.hip is None and MIN_ROWS <= x2d.shape[0] <= MAX_ROWS
            and mask2d is None and (lora_A is None or (1 <= lora_A.shape[0] <= 16 and lora_A.dtype == x2d.dtype))
            and x2d.dtype in (torch.bfloat16, torch.float16) and x2d.is_contiguous() and blocksize % CHUNK == 0
            and _device_info(x2d.get_device())[1] >= 8)


@functools.cache
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
                y: torch.Tensor, s: torch.Tensor | None, k_split: int, unroll: int | None = None,
                s_first: bool = True, pdl: bool | None = None) -> None:
    """y = x·Ŵᵀ + scaling·S·Bᵀ + bias into y (M, N) and, with an adapter, S = x·Aᵀ into s (M, r), both in x's
    dtype, K split every k_split columns, in one launch; where ``rows_fit``, K a multiple of the blocksize.
    ``unroll``: chunks a loop step, 1, 2 or 4 (default ``unroll_for``). ``s_first=False`` puts the programs
    that make S after the tiles' (a test's: then they come last at some tiles and finish them). ``pdl``: launch
    as the previous kernel's programmatic dependent (default: on Hopper and later, the only GPUs that have it),
    letting the next launch in once every program is past its loop, and making the tables before the wait if the
    codebooks are constants (kernels/constants.py)."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    M = x2d.shape[0]
    device = x2d.get_device()
    hopper = _device_info(device)[1] >= 9
    if pdl is None:
        pdl = hopper
    elif pdl and not hopper:
        raise ValueError("launch_rows: pdl=True needs a GPU of compute capability 9.0 or more (griddepcontrol)")
    unroll = unroll or unroll_for(M)
    if unroll not in (1, 2, 4):  # the loop's body is written out for these
        raise ValueError(f"launch_rows: unroll={unroll}: expected 1, 2 or 4 chunks a step")
    if (lora_A is None) != (lora_B is None) or (lora_A is None) != (s is None) or not y.is_contiguous():
        raise ValueError("launch_rows: lora_A, lora_B and s together or none of them, and a contiguous y (M, N)")
    bm = 8 if M <= 8 else 16
    splits = -(-K // k_split)     # ceil(K / k_split): plain ints (triton.cdiv is a constexpr function, ~2 µs a call)
    tiles = -(-N // (16 * WARPS))
    peel = bm == 8 and K >= CHUNK * unroll   # the first step's loads issued before the tables (see the kernel)
    tables_first = pdl and is_constant(nf4_values) and (dq_values is None or is_constant(dq_values))
    part = torch.empty((tiles, splits, 16 * WARPS, bm), device=x2d.device, dtype=torch.float32)
    s_part = torch.empty((M, 16, splits), device=x2d.device, dtype=torch.float32) if lora_A is not None else part
    count = counters(x2d.device, tiles)
    double_quant = absmax_scale is not None
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    a_arg = x2d if lora_A is None else lora_A.contiguous()  # A's rows read as runs of 16 columns, like x's
    b_arg = x2d if lora_B is None else lora_B
    s_arg = y if s is None else s
    args = (x2d, codes.view(torch.int32), absmax, scale_arg, offset_arg, nf4_values, dq_arg, a_arg, part, s_part,
            b_arg, y if bias is None else bias, y, s_arg, count,
            M, N, K, 0 if lora_A is None else lora_A.shape[0], k_split, x2d.stride(0), a_arg.stride(0),
            b_arg.stride(0), b_arg.stride(-1), s_arg.stride(0), s_arg.stride(-1), scaling)
    meta = dict(BM=bm, WARPS_=WARPS, BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant,
                HAS_LORA=lora_A is not None, HAS_BIAS=bias is not None, SPLITS=splits, UNROLL=unroll,
                S_FIRST=s_first, T_PAD=max(32 * WARPS, 1 << (tiles - 1).bit_length()), PEEL=peel,  # powers of 2
                S_PAD=1 << (splits - 1).bit_length(), PDL=pdl, TRIGGER=pdl, TABLES_FIRST=tables_first)
    grid = (tiles + (lora_A is not None), splits)  # with an adapter, S's program first (one a split)
    with torch.cuda.device(device):                # the kept compiled kernel after the first call (kernels/launcher.py)
        launch(_nf4_rows_kernel, grid, args, meta, dict(num_warps=WARPS, launch_pdl=pdl), device)


def unroll_for(M: int) -> int:
    """Chunks a loop step: 4 at every row count. On an H100 at K = N = 4096 (benchmarks/RESULTS.md), of 1, 2 and 4
    chunks a step, 4 was the fastest or within 2% of it at 1-16 rows, with and without an adapter."""
    return 4
