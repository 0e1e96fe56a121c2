"""A QLoRA layer's merged weight W' = Ŵ + scaling·B·A from the 4-bit codes, made in the MMA's own layout (Gluon).

The same function as kernels/nf4_merge_triton.py (QLoRA, https://arxiv.org/abs/2305.14314):

    W'[n, k] = Ŵ[n, k] + scaling · Σ_r B[n, r] · A[r, k],  Ŵ[n, k] = nf4_values[code(n, k)] · absmax[n, k // blocksize]

(Ŵ and the low-rank product in fp32, one rounding to A's dtype). That kernel makes each tile twice over: Ŵ in
the layout its loads give, B·A in the layout the tensor cores leave it in, so adding them sends a 32 × 128 fp32
tile through shared memory, and the sum goes through it again on its way to the store. At 4096 × 4096 on an H100
the merge took 27.5 µs where the dequantization alone, the same bytes read and written, took 14.5
(benchmarks/RESULTS.md). Here Ŵ is made in the MMA's layout from the start, and no tile of it or of W' moves
between threads (A's small tile still goes through shared memory into the MMA's operand registers).

The accumulator of ``mma.sync.m16n8k16`` puts rows t/4 and t/4 + 8 of a warp's 16, columns 2(t % 4) and
2(t % 4) + 1 of every 8-column tile, in lane t. Which column of W' an MMA column stands for is free — A's columns
are loaded in the same order — so MMA column c = 8j + 2q + e holds W's column

    π(c) = 32·(j // 4) + 8q + 2·(j % 4) + e,    c = 8j + 2q + e,  q = t % 4,  e ∈ {0, 1}

and lane t then holds eight consecutive columns of each 32: one 32-bit word of codes to read, 16 bytes of W' to
write. ``gl.reshape`` and ``gl.permute`` say π on the tensors; the ``gl.convert_layout`` calls that follow them
only rename registers (benchmarks/compiled.py's row ``nf4_merge_4096`` shows the shared memory: 2 KiB a program,
for A's and B's tiles on their way into the MMA's operand registers).

    for each tile of 16·WARPS rows × BK columns:
        low = mma(B[rows, :], A[:, π(columns)])                       # fp32, the MMA's layout
        word = codes[rows, word of π(columns)]                        # the same layout: 8 weights a word
        Ŵ = nf4_values[nibbles of word] · absmax[rows, block]         # fp32, the codebook by shuffle
        W'[rows, columns] = (Ŵ + scaling · low).to(A.dtype)           # 16 bytes a store

Gluon (``triton.experimental.gluon``) is Triton's lower-level language, compiled by the same compiler; Triton's
interpreter does not run it, so this kernel is tested on a GPU only (tests/test_nf4_merge.py), against
kernels/nf4_merge_triton.py, which the CPU tests check against ``nf4_reference.nf4_merge_reference``.
``nf4_merge_triton.nf4_merge_triton`` launches it where ``merge_fits``: an NVIDIA GPU, A and B in bf16 or fp16, a
rank of at most 64.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .lora_triton import _num_sms, _pad_rank
from .triton_interpreter import INTERPRETING

__all__ = ["merge_fits", "launch_merge", "tiles_for", "MAX_RANK"]

MAX_RANK = 64  # B's tile (16 rows a warp × the padded rank) stays in registers up to here
WARPS = 4      # warps a program: 64 rows of W'
BK = 64        # columns a tile: 8 words of codes a row (tiles_for: how many a program)


def _word_layout(warps: int, words: int) -> gl.DistributedLinearLayout:
    """A tile's words of codes, (16·warps rows, words): lane t holds words t % 4, 4 + t % 4, ... of rows t/4 and
    t/4 + 8 of its warp's 16: the rows of the MMA's accumulator, and under π the columns."""
    return gl.DistributedLinearLayout(
        reg_bases=[[8, 0]] + [[0, 4 << i] for i in range(words.bit_length() - 3)],
        lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(warps.bit_length() - 1)], block_bases=[], shape=[16 * warps, words])


def _out_layout(warps: int, bk: int) -> gl.DistributedLinearLayout:
    """W''s tile in column order, (16·warps rows, bk): lane t holds columns 8(t % 4) .. +7 of each 32, of the same
    rows as ``_word_layout``: the accumulator's registers renamed, eight consecutive columns first (one store)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]] + [[0, 32 << i] for i in range(bk.bit_length() - 6)],
        lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16 << i, 0] for i in range(warps.bit_length() - 1)], block_bases=[], shape=[16 * warps, bk])


@gluon.jit
def _pi(t, ROWS: gl.constexpr, BK: gl.constexpr):
    """(ROWS, BK) with its columns reordered: 32i + 8q + 2u + e <-> 32i + 8u + 2q + e (q, u < 4, e < 2). From W's
    column order to the MMA's (MMA column π⁻¹(k) holds W's column k), and back: swapping two digits, π is its own
    inverse."""
    return gl.reshape(gl.permute(gl.reshape(t, [ROWS, BK // 32, 4, 4, 2]), [0, 1, 3, 2, 4]), [ROWS, BK])


@gluon.jit
def _absmax(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, block, ok, DQ_BLOCKSIZE: gl.constexpr,
            DQ_BITS: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """The fp32 absmax of quantization blocks ``block`` (any shape); with double quantization dq_values[8-bit
    code] · absmax_scale[block // DQ_BLOCKSIZE] + absmax_offset (the division a shift where DQ_BLOCKSIZE =
    2**DQ_BITS; DQ_BITS = -1 otherwise). Where not ``ok``, 0 (absmax_offset with double quantization): values
    of weights that are never stored."""
    if DOUBLE_QUANT:
        code = gl.load(absmax_ptr + block, mask=ok, other=0).to(gl.int32)
        if DQ_BITS >= 0:
            group = block >> DQ_BITS
        else:
            group = block // DQ_BLOCKSIZE
        scale = gl.load(absmax_scale_ptr + group, mask=ok, other=0.0)
        absmax = gl.load(dq_ptr + code) * scale + gl.load(absmax_offset_ptr)
    else:
        absmax = gl.load(absmax_ptr + block, mask=ok, other=0.0)
    return absmax


@gluon.jit
def _weight(word, absmax, book, U: gl.constexpr):
    """Weight U of every word, fp32: byte U // 2, its high nibble for even U (as the codes store them). The
    codebook lookup is a shuffle from the lane that holds the entry (``book``: lane t holds entry t % 16) within
    16-lane segments (0x100f: segment mask 0x10, clamp 15), so it takes the index's low 4 bits itself: no mask
    after the shift. (A load through L1 instead, ``nf4_values[code]``, took 2-7% more time on an H100.)"""
    bits = word >> (8 * (U // 2) + 4 - 4 * (U % 2))
    value = gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x100f, -1;", "=f,f,r", [book, bits],
                                      dtype=gl.float32, is_pure=True, pack=1)
    return value * absmax


@gluon.jit
def _tile_state(words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, n, w, k0, wanted, N, K,
                BK: gl.constexpr, BLOCKSIZE: gl.constexpr, BLOCK_BITS: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr,
                DQ_BITS: gl.constexpr, DOUBLE_QUANT: gl.constexpr):
    """The words (ROWS, WORDS) of the tile at column k0 and their absmax, (ROWS, 1) or (ROWS, WORDS); zeros past
    the weight's edges, or everywhere where not ``wanted`` (the prefetch after a program's last tile)."""
    ok = ((n < N) & wanted)[:, None] & (k0 + 8 * w < K)[None, :]
    word = gl.load(words_ptr + (n * (K // 8))[:, None] + (k0 // 8 + w)[None, :], mask=ok, other=0)
    if BLOCKSIZE >= BK:  # one block per row of the tile (k0 is a multiple of BK): one absmax a row
        absmax = _absmax(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr,
                         n * (K >> BLOCK_BITS) + (k0 >> BLOCK_BITS), (n < N) & wanted & (k0 < K), DQ_BLOCKSIZE,
                         DQ_BITS, DOUBLE_QUANT)[:, None]
    else:                # one a word: its 8 columns lie in one block (BLOCKSIZE ≥ 32)
        block = (n * (K >> BLOCK_BITS))[:, None] + ((k0 + 8 * w) >> BLOCK_BITS)[None, :]
        absmax = _absmax(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, block, ok, DQ_BLOCKSIZE, DQ_BITS,
                         DOUBLE_QUANT)
    return word, absmax


@gluon.jit
def _nf4_merge_mma_kernel(
    # pointers (codes as int32 words)
    words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, a_ptr, b_ptr, out_ptr,
    # sizes and strides
    N, K, R, stride_ar, stride_ak, stride_bn, stride_br, scaling,
    # meta-parameters
    BLOCKSIZE: gl.constexpr, BLOCK_BITS: gl.constexpr, DQ_BLOCKSIZE: gl.constexpr, DQ_BITS: gl.constexpr,
    DOUBLE_QUANT: gl.constexpr, R_PAD: gl.constexpr,
    BK: gl.constexpr, TILES: gl.constexpr, WARPS_: gl.constexpr, W_LAYOUT: gl.constexpr,
    OUT_LAYOUT: gl.constexpr,
):
    ROWS: gl.constexpr = 16 * WARPS_
    WORDS: gl.constexpr = BK // 8
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS_, 1], instr_shape=[16, 8])
    LOAD: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS_, 1], [1, 0])   # A's and B's tiles
    k_first = gl.program_id(0) * (BK * TILES)    # neighbouring programs write neighbouring columns of a row
    n0 = gl.program_id(1) * ROWS

    # B's rows as the MMA's first operand, for every tile of the program
    nb = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, LOAD))
    rb = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, LOAD))
    b = gl.load(b_ptr + (nb * stride_bn)[:, None] + (rb * stride_br)[None, :],
                mask=(nb < N)[:, None] & (rb < R)[None, :], other=0.0)                    # (ROWS, R_PAD)
    b = gl.convert_layout(b, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
    ra = gl.arange(0, R_PAD, layout=gl.SliceLayout(1, LOAD))
    ka = gl.arange(0, BK, layout=gl.SliceLayout(0, LOAD))
    # Ŵ's rows and words (word w of a tile holds its columns 8w .. 8w + 7; K % 32 == 0: rows start on a word)
    n = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, W_LAYOUT))
    w = gl.arange(0, WORDS, layout=gl.SliceLayout(0, W_LAYOUT))
    book = gl.load(nf4_ptr + ((w & 3)[None, :] | ((n & 3) << 2)[:, None]))        # lane t: entry t % 16
    no = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT_LAYOUT))
    ko = gl.arange(0, BK, layout=gl.SliceLayout(0, OUT_LAYOUT))

    word, absmax = _tile_state(words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, n, w, k_first,
                               True, N, K, BK, BLOCKSIZE, BLOCK_BITS, DQ_BLOCKSIZE, DQ_BITS, DOUBLE_QUANT)
    for t in range(TILES):
        k0 = k_first + t * BK
        # the next tile's codes and absmax in flight while this one is made
        word_next, absmax_next = _tile_state(words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr,
                                             n, w, k0 + BK, t + 1 < TILES, N, K, BK, BLOCKSIZE, BLOCK_BITS,
                                             DQ_BLOCKSIZE, DQ_BITS, DOUBLE_QUANT)
        # low = B[rows, :] · A[:, π(columns)], fp32 in the MMA's layout
        a = gl.load(a_ptr + (ra * stride_ar)[:, None] + ((k0 + ka) * stride_ak)[None, :],
                    mask=(ra < R)[:, None] & (k0 + ka < K)[None, :], other=0.0)          # (R_PAD, BK)
        a = gl.convert_layout(_pi(a, R_PAD, BK), gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
        low = mma_v2(b, a, gl.zeros([ROWS, BK], gl.float32, layout=MMA))                 # (ROWS, BK) fp32
        # weight 4·f2 + 2·f1 + f0 of word w at [:, w, f0, f1, f2] (each join adds the last dimension)
        w_hat = gl.join(gl.join(gl.join(_weight(word, absmax, book, 0),
                                        _weight(word, absmax, book, 1)),
                                gl.join(_weight(word, absmax, book, 2),
                                        _weight(word, absmax, book, 3))),
                        gl.join(gl.join(_weight(word, absmax, book, 4),
                                        _weight(word, absmax, book, 5)),
                                gl.join(_weight(word, absmax, book, 6),
                                        _weight(word, absmax, book, 7))))
        w_hat = gl.reshape(gl.permute(w_hat, [0, 1, 4, 3, 2]), [ROWS, BK])              # W's column order
        merged = gl.convert_layout(_pi(w_hat, ROWS, BK), MMA) + scaling * low          # (ROWS, BK) fp32
        # back to W's column order for the store: 8 consecutive columns a lane
        out = gl.convert_layout(_pi(merged.to(out_ptr.dtype.element_ty), ROWS, BK), OUT_LAYOUT)
        gl.store(out_ptr + (no * K)[:, None] + (k0 + ko)[None, :], out,
                 mask=(no < N)[:, None] & (k0 + ko < K)[None, :])
        word, absmax = word_next, absmax_next


def merge_fits(codes: torch.Tensor, lora_A: torch.Tensor, out_features: int) -> bool:
    """Whether ``launch_merge`` takes this merge: codes on an NVIDIA GPU of compute capability 8.0 or more
    (mma.sync's bf16 form), 4-byte aligned (read as words); A (and B, of the same dtype) in bf16 or fp16; a rank
    of 1 to ``MAX_RANK``; fewer than 65,536 tiles of rows (the grid's second axis); not under Triton's
    interpreter (no Gluon there)."""
    return (not INTERPRETING and codes.is_cuda and torch.version.hip is None and codes.data_ptr() % 4 == 0
            and triton.cdiv(out_features, 16 * WARPS) < 65536
            and lora_A.dtype in (torch.bfloat16, torch.float16) and 1 <= lora_A.shape[0] <= MAX_RANK
            and torch.cuda.get_device_capability(codes.device)[0] >= 8)


def tiles_for(N: int, K: int, bk: int, warps: int, num_sms: int) -> int:
    """Tiles a program: 2 where the weight has at least 16 tiles an SM (the next tile's codes then load while
    one is made), else 1 (more programs, for GPT-2's widths). On an H100 (benchmarks/RESULTS.md), of 1, 2, 4 and 8
    tiles of 64 × 64, 2 was the fastest or within 1% of it at 4096², 11008 × 4096, 4096 × 11008 and 8192², 1 at
    2304 × 768 and 768 × 3072."""
    return 2 if triton.cdiv(N, 16 * warps) * triton.cdiv(K, bk) >= 16 * num_sms else 1


_LAYOUTS: dict[tuple[int, int], tuple] = {}


def launch_merge(state: tuple, N: int, K: int, blocksize: int, dq_blocksize: int, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scaling: float, out: torch.Tensor, bk: int = BK, warps: int = WARPS,
                 tiles: int | None = None) -> None:
    """Ŵ + scaling·B·A into out (N, K), contiguous, of A's dtype; where ``merge_fits``, the checks of
    ``nf4_merge_triton.nf4_merge_triton`` passed. ``bk`` (64, 128 or 256 columns) and ``warps`` (16 rows each):
    the tile; ``tiles`` a program, along a row (default ``tiles_for``)."""
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    tiles = tiles or tiles_for(N, K, bk, warps, _num_sms(codes.device))
    if bk not in (64, 128, 256) or warps not in (1, 2, 4, 8) or tiles < 1 or not out.is_contiguous():
        raise ValueError(f"launch_merge: bk={bk}, warps={warps}, tiles={tiles}: expected bk of 64, 128 or 256, "
                         f"warps of 1, 2, 4 or 8, at least one tile, and a contiguous out")
    if (warps, bk) not in _LAYOUTS:
        _LAYOUTS[(warps, bk)] = (_word_layout(warps, bk // 8), _out_layout(warps, bk))
    w_layout, out_layout = _LAYOUTS[(warps, bk)]
    double_quant = absmax_scale is not None
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    with torch.cuda.device_of(codes):
        _nf4_merge_mma_kernel[(triton.cdiv(K, bk * tiles), triton.cdiv(N, 16 * warps))](
            codes.view(torch.int32), absmax, scale_arg, offset_arg, nf4_values, dq_arg, lora_A, lora_B, out,
            N, K, lora_A.shape[0], lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), scaling,
            BLOCKSIZE=blocksize, BLOCK_BITS=blocksize.bit_length() - 1, DQ_BLOCKSIZE=dq_blocksize,
            DQ_BITS=dq_blocksize.bit_length() - 1 if dq_blocksize & (dq_blocksize - 1) == 0 else -1,
            DOUBLE_QUANT=double_quant, R_PAD=_pad_rank(lora_A.shape[0]), BK=bk, TILES=tiles, WARPS_=warps,
            W_LAYOUT=w_layout, OUT_LAYOUT=out_layout, num_warps=warps,
        )
