"""A decode step on an NF4 base: QLoRA's forward for a few rows of x, as matrix-vector products on CUDA cores.

For one to a few rows of x, the forward of a LoRA layer on a 4-bit weight (QLoRA, https://arxiv.org/abs/2305.14314)

    y = x·Ŵᵀ + scaling·(x·Aᵀ)·Bᵀ + bias,    Ŵ[n, k] = nf4_values[code(n, k)] · absmax[block(n, k)]

does one multiply-add per row of x for every 4.13 bits of weight it reads: far too little arithmetic to keep
tensor cores busy. A tensor-core GEMM (kernels/nf4_lora_triton.py) pads x to 16 rows and sends every dequantized tile
through shared memory into the MMA's layout. Here each weight is made in registers and multiplied straight into
x, so the kernel can read 0.52 bytes per weight where the bf16 linear reads 2.

    # programs 0 .. M·SPLIT_K-1 make S; then one program per (row m of x, tile of BN rows of Ŵ, slice j of K)
    program (m, slice j) of S:    s_part[j, m] = x[m, slice j] · A[:, slice j]ᵀ
                                  count[m, n] += 1 for every tile n;  finish the tiles it arrived at last
    program (m, tile n, slice j):
        acc = zeros(BN, BW)
        for each chunk of BW words (8·BW columns) in slice j:          the next chunk's words load meanwhile
            word = codes32[n-rows, chunk]                             (BN, BW): 8 weights per word
            for byte b in 0..3:                                       columns 8w + 2b (high nibble), 8w + 2b + 1
                t += book[word >> (8b + 4) & 15] · x[m, 8w + 2b] + book[word >> 8b & 15] · x[m, 8w + 2b + 1]
            acc += t · absmax[n-rows, block of each word]
        part[j, m, n-rows] = Σ_w acc
        count[m, n] += 1 (atomically);  finish tile n if it arrived last
    finish (m, n), by the last of its SPLIT_K slices and (with an adapter) SPLIT_K parts of S to arrive:
        y[m, n-rows] = Σ_j part[j, m, n-rows] + scaling · (Σ_j s_part[j, m]) · B[n-rows]ᵀ + bias[n-rows]
        count[m, n] = 0

The lookup is what costs: on an H200, one forward at K = N = 4096 took 17.3 µs with the codebook read from
memory (one load per weight), 12.1 µs with ``tl.gather`` from a (rows, 16) codebook (Triton emits several
shuffles and selects per weight), 7.9 µs with a 1-D ``tl.gather`` (one warp shuffle per weight: ``book`` is a
(16,) tensor and the words are flattened for the lookup), and 7.6 µs with no lookup at all (wrong values: the
floor). RESULTS.md has the sweep. K is split across programs so that a layer fills every SM; the slices' partial
sums are added in a fixed order (one ``tl.sum``, whichever program finishes last), so every run gives the same
bits. The counters reset themselves, so one buffer per device and stream serves every call, with no memset
launch. No program waits for another: S's parts count into every tile's counter, as the tile's slices do, so
whichever comes last — almost always a slice, since S's programs are short and start first — finishes the tile
(S's programs had a counter of their own, which the finishers waited on and the last tile reset: two more trips
to L2 at the end of every launch). One thing this design assumes, and says so: no two launches count in one
buffer at once. Eager calls on one stream run one after another, but two CUDA graphs captured on one stream must
not be replayed at the same time on two streams.

A row's result depends on the batch it came in: the split of K depends on the number of rows, and from
``MAX_ROWS + 1`` rows on the tensor-core GEMM, which rounds Ŵ to x's dtype, takes over. The same call gives
the same bits every time.

Ŵ stays in fp32 (x is promoted), a little more precise than dequantize-then-GEMM, which rounds Ŵ to x's dtype
first. Dropout is not handled here: ``nf4_lora_triton.nf4_forward`` sends a call with a mask to the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lora_triton
from .lora_triton import _operands, _pad_rank, shrink
from .nf4_triton import absmax_at
from .triton_interpreter import interpreter_lock

__all__ = ["MAX_ROWS", "counters", "nf4_decode"]
# The most rows of x a call may have to run here (a decode step without dropout: ``nf4_forward`` checks); more rows
# go to the tensor-core forward. H200, K = N = 4096, × the bf16 linear: 0.95 / 1.48 / 2.36 / 2.49 for 1-4
# rows here, 2.51 / 2.44 / 2.39 / 2.43 for the GEMM (RESULTS.md): a program serves one row, so the lookups repeat
# for every row, and from 3 rows on the two kernels are even.
MAX_ROWS = 2


@triton.jit
def _pair(word, byte: tl.constexpr, book):
    """The two fp32 codebook values of byte ``byte`` of each word: (high nibble: even column, low: odd).

    ``book`` holds the 16 values in registers; a gather along a 1-D tensor is one warp shuffle per weight."""
    flat = tl.reshape(word, (word.shape[0] * word.shape[1],))
    even = tl.gather(book, (flat >> (8 * byte + 4)) & 0x0F, 0)
    odd = tl.gather(book, (flat >> (8 * byte)) & 0x0F, 0)
    return tl.reshape(even, word.shape), tl.reshape(odd, word.shape)


@triton.jit
def _x_row(x_ptr, cols, in_k, stride_xk):
    """x[m, cols] as fp32, (1, len(cols)); 0 outside (x_ptr points at row m)."""
    return tl.load(x_ptr + cols * stride_xk, mask=in_k, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _words(words_ptr, row_word, kw, k_start, in_n, k_hi, EVEN_K: tl.constexpr):
    """Words kw (from column k_start on) of the rows that start at word row_word, (BN, BW) int32; 0 past row N
    or column k_hi. With EVEN_K every chunk is whole or wholly past k_hi: one mask bit per row, and the loads
    are 16-byte vectors."""
    in_chunk = in_n & (row_word * 0 + k_start < k_hi)  # a tensor: the interpreter takes no scalar mask
    if EVEN_K:
        ok = in_chunk[:, None]
    else:
        ok = in_chunk[:, None] & (8 * kw < k_hi)[None, :]
    return tl.load(words_ptr + row_word[:, None] + kw[None, :], mask=ok, other=0)


TILES_AT_ONCE = tl.constexpr(256)  # tile counters an S program adds to in one vector of atomics


@triton.jit
def _fence_acq_rel(FENCES: tl.constexpr):
    """``fence.acq_rel.gpu``: with relaxed atomics after it, a release; after them, an acquire. Off under the
    interpreter (which runs programs one after another and has no inline PTX)."""
    if FENCES:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _nf4_decode_kernel(
    # pointers (codes as int32 words; part (SPLIT_K, M, N) and s_part (SPLIT_K, M, R_PAD): fp32 workspaces;
    # count: M·tiles int32 counters, zero between launches)
    x_ptr, words_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr,
    a_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, part_ptr, s_part_ptr, count_ptr,
    # sizes (KW = K / 8: words per row of Ŵ; K_SPLIT: columns of K per slice, a multiple of 8·BW)
    M, N, K, KW, R, K_SPLIT,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_ym, stride_yn, stride_sm, stride_sr,
    scaling,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
    EVEN_K: tl.constexpr, S_FIRST: tl.constexpr, FENCES: tl.constexpr,
):
    """Programs 0 .. M·SPLIT_K - 1 (with an adapter): S's part for one row of x and one slice of K. The rest:
    one row of x, BN rows of Ŵ, one slice of K. Whichever of a tile's arrivals comes last writes y there.
    S_FIRST=False puts S's programs after the tiles' (a test's way to make them the last arrivals)."""
    n_tiles = tl.cdiv(N, BN)
    n_s = M * SPLIT_K if HAS_LORA else 0
    arrivals = SPLIT_K + (SPLIT_K if HAS_LORA else 0)   # count[m·n_tiles + n] when tile n of row m is complete
    pid = tl.program_id(0)
    s_pid = pid if S_FIRST else pid - M * n_tiles * SPLIT_K
    offs_w = tl.arange(0, BW)
    offs_r = tl.arange(0, R_PAD)
    if HAS_LORA and s_pid >= 0 and s_pid < n_s:       # S[m] over slice j: (R_PAD,)
        m = s_pid // SPLIT_K
        k_lo = (s_pid % SPLIT_K) * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        S_COLS: tl.constexpr = 2048 // R_PAD          # (R_PAD, S_COLS) fp32: 64 registers a thread
        offs_c = tl.arange(0, S_COLS)
        s_acc = tl.zeros((R_PAD, S_COLS), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, S_COLS):
            cols = k0 + offs_c
            in_k = cols < k_hi
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=(offs_r < R)[:, None] & in_k[None, :], other=0.0)           # (R_PAD, S_COLS)
            s_acc += a.to(tl.float32) * _x_row(x_ptr + m * stride_xm, cols, in_k, stride_xk)
        tl.store(s_part_ptr + ((s_pid % SPLIT_K) * M + m) * R_PAD + offs_r, tl.sum(s_acc, 1))
        tl.debug_barrier()                            # every thread's stores before the release below
        # one more arrival at every tile of row m: one fence, then relaxed atomics side by side (an acq_rel
        # atomic each would wait for the one before: eight round trips to L2 a lane)
        _fence_acq_rel(FENCES)                        # release: S's part before the counts
        offs_t = tl.arange(0, TILES_AT_ONCE)
        for t0 in range(0, n_tiles, TILES_AT_ONCE):
            tiles = t0 + offs_t
            arrived = tl.atomic_add(count_ptr + m * n_tiles + tiles, 1, mask=tiles < n_tiles, sem="relaxed")
            last = (tiles < n_tiles) & (arrived == arrivals - 1)
            n_last = tl.sum(last.to(tl.int32))
            if n_last > 0:                            # rare: this part of S came after some tiles' slices
                _fence_acq_rel(FENCES)                # acquire: the slices' partial sums
                for _ in range(n_last):               # those tiles, the lowest first
                    t = tl.min(tl.where(last, tiles, n_tiles))
                    last = last & (tiles != t)
                    offs_n = t * BN + tl.arange(0, BN)
                    _finish(part_ptr, s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr, m, t, n_tiles, offs_n,
                            offs_n < N, offs_r, M, N, R, stride_bn, stride_br, stride_ym, stride_yn, stride_sm,
                            stride_sr, scaling, SPLIT_K, HAS_LORA, HAS_BIAS, R_PAD)
    else:
        tile = pid - n_s if S_FIRST else pid
        m = tile % M                                  # a tile's rows of x run side by side: Ŵ's codes once from HBM
        pid_n = (tile // M) % n_tiles
        pid_k = tile // (M * n_tiles)
        k_lo = pid_k * K_SPLIT
        k_hi = tl.minimum(K, k_lo + K_SPLIT)
        offs_n = pid_n * BN + tl.arange(0, BN)
        in_n = offs_n < N
        row_word = offs_n * KW                         # K % BLOCKSIZE == 0: every row starts on a word and a block
        row_block = offs_n * (K // BLOCKSIZE)
        x_row = x_ptr + m * stride_xm
        book = tl.load(nf4_ptr + tl.arange(0, 16))                                      # the codebook
        acc = tl.zeros((BN, BW), dtype=tl.float32)
        word_next = _words(words_ptr, row_word, k_lo // 8 + offs_w, k_lo, in_n, k_hi, EVEN_K)
        for k0 in range(k_lo, k_hi, 8 * BW):
            kw = k0 // 8 + offs_w                                                        # (BW,) words of the rows
            in_kw = (8 * kw < k_hi) | EVEN_K                                             # x's columns in K
            word = word_next                                                             # (BN, BW) int32
            # the next chunk's words are on their way while this one is dequantized
            word_next = _words(words_ptr, row_word, kw + BW, k0 + 8 * BW, in_n, k_hi, EVEN_K)
            t = tl.zeros((BN, BW), dtype=tl.float32)
            for b in tl.static_range(4):
                even, odd = _pair(word, b, book)
                t += even * _x_row(x_row, 8 * kw + 2 * b, in_kw, stride_xk)
                t += odd * _x_row(x_row, 8 * kw + 2 * b + 1, in_kw, stride_xk)
            if BLOCKSIZE >= 8 * BW:  # the chunk lies in one block of each row (k0 is a multiple of 8·BW)
                am = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, row_block + k0 // BLOCKSIZE,
                                in_n, DQ_BLOCKSIZE, DOUBLE_QUANT)                         # (BN,)
                acc += t * am[:, None]
            else:                    # NB blocks of WPB words each
                NB: tl.constexpr = 8 * BW // BLOCKSIZE
                WPB: tl.constexpr = BLOCKSIZE // 8
                offs_b = tl.arange(0, NB)
                am = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr,
                                row_block[:, None] + (k0 // BLOCKSIZE + offs_b)[None, :],
                                in_n[:, None] & (k0 + BLOCKSIZE * offs_b < k_hi)[None, :],
                                DQ_BLOCKSIZE, DOUBLE_QUANT)                               # (BN, NB)
                acc += t * tl.reshape(tl.broadcast_to(am[:, :, None], (BN, NB, WPB)), (BN, BW))  # word's block
        tile_sum = tl.sum(acc, 1)                                                        # (BN,)
        if arrivals == 1:  # nothing to wait for
            if HAS_BIAS:
                tile_sum += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, tile_sum.to(y_ptr.dtype.element_ty), mask=in_n)
        else:
            tl.store(part_ptr + (pid_k * M + m) * N + offs_n, tile_sum, mask=in_n)
            tl.debug_barrier()                        # every thread's stores before the release below
            # acq_rel: the last arrival sees the others' partial sums (and S's)
            if tl.atomic_add(count_ptr + m * n_tiles + pid_n, 1) == arrivals - 1:
                _finish(part_ptr, s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr, m, pid_n, n_tiles,
                        offs_n, in_n, offs_r, M, N, R, stride_bn, stride_br, stride_ym, stride_yn, stride_sm,
                        stride_sr, scaling, SPLIT_K, HAS_LORA, HAS_BIAS, R_PAD)


@triton.jit
def _finish(part_ptr, s_part_ptr, b_ptr, bias_ptr, y_ptr, s_ptr, count_ptr, m, pid_n, n_tiles, offs_n, in_n, offs_r,
            M, N, R, stride_bn, stride_br, stride_ym, stride_yn, stride_sm, stride_sr, scaling,
            SPLIT_K: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr):
    """y[m, tile] = Σ_j part[j, m] + scaling·S[m]·B[tile]ᵀ + bias; S[m] = Σ_j s_part[j, m], stored by tile 0.

    The slices are loaded at once and summed by one tl.sum: a fixed order, whichever program finishes last.
    Loads skip L1 (".cg"): other SMs wrote these values during this launch."""
    SPLITS: tl.constexpr = triton.next_power_of_2(SPLIT_K)
    offs_j = tl.arange(0, SPLITS)[:, None]
    part = tl.load(part_ptr + (offs_j * M + m) * N + offs_n[None, :],
                   mask=(offs_j < SPLIT_K) & in_n[None, :], other=0.0, cache_modifier=".cg")  # (SPLITS, BN)
    acc = tl.sum(part, 0)
    if HAS_LORA:
        in_r = offs_r < R
        s_part = tl.load(s_part_ptr + (offs_j * M + m) * R_PAD + offs_r[None, :],
                         mask=offs_j < SPLIT_K, other=0.0, cache_modifier=".cg")          # (SPLITS, R_PAD)
        s = tl.sum(s_part, 0).to(s_ptr.dtype.element_ty)           # S in x's dtype, as the shrink kernel makes it
        if pid_n == 0:
            tl.store(s_ptr + m * stride_sm + offs_r * stride_sr, s, mask=in_r)
        up = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                     mask=in_n[:, None] & in_r[None, :], other=0.0)                       # (BN, R_PAD) = B
        low = (s.to(tl.float32) * scaling).to(up.dtype).to(tl.float32)                   # (R_PAD,)
        acc += tl.sum(low[None, :] * up.to(tl.float32), 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=in_n)
    tl.store(count_ptr + m * n_tiles + pid_n, 0)      # ready for the next launch


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------
_COUNTERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counter buffers: a captured CUDA graph may still point at one


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 zeros for this device and stream; each launch leaves them zero again (this kernel's and
    kernels/nf4_rows_gluon.py's split counters: launches on one stream run one after another). One buffer per
    stream: two launches running at once on different streams must not count into one counter. A buffer that
    grows keeps its old storage alive (a CUDA graph holds addresses, not references)."""
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0  # the stream's id
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        size = max(n, 4096, 2 * (0 if buf is None else buf.numel()))
        buf = _COUNTERS[key] = torch.zeros(size, device=device, dtype=torch.int32)
    return buf


def _config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tiles of 16 rows of Ŵ × 32 words (256 columns), one warp each, and K split so that a launch has about 8
    programs per SM (the best of 36 tilings measured on an H200 at K = N = 4096, RESULTS.md). The interpreter
    takes smaller chunks, so that the tests' small shapes still split K."""
    bn, bw = (16, 8) if lora_triton.INTERPRETING else (16, 32)
    split = max(1, min(8 * lora_triton._num_sms(device) // (M * triton.cdiv(N, bn)), K // (8 * bw)))
    return dict(BN=bn, BW=bw, SPLIT_K=split, num_warps=1, num_stages=1)


def nf4_decode(
    x2d: torch.Tensor, state: tuple, out_features: int, in_features: int, blocksize: int, dq_blocksize: int,
    lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, bias: torch.Tensor | None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, S) as ``nf4_lora_triton.nf4_forward`` gives them, for at most ``MAX_ROWS`` rows and no dropout mask:
    y = x·Ŵᵀ + scaling·S·Bᵀ + bias (M, out), S = x·Aᵀ (M, r) in x's dtype (None without an adapter). The caller
    checks that the codes can be read as words (``nf4_lora_triton.forward_fits``). ``config``: the tiling, as
    ``_config`` gives it, and optionally ``S_FIRST=False`` (S's programs after the tiles': a test's)."""
    M, K = x2d.shape
    N = out_features
    if M > MAX_ROWS or K != in_features or in_features % blocksize or in_features % 8:
        raise ValueError(f"nf4_decode: x {tuple(x2d.shape)}, in_features={in_features}, blocksize {blocksize}: "
                         f"needs at most {MAX_ROWS} rows of in_features columns, a multiple of the blocksize")
    codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values = state
    rank = 0 if lora_A is None else lora_A.shape[0]
    r_pad = _pad_rank(max(rank, 1))
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    if y.numel() == 0:
        return y, None if lora_A is None else shrink(x2d, None, lora_A)
    s = None if lora_A is None else torch.empty((M, rank), device=x2d.device, dtype=x2d.dtype)
    cfg = dict(config or _config(M, N, K, x2d.device))
    bn, bw, split = cfg.pop("BN"), cfg.pop("BW"), cfg.pop("SPLIT_K")
    k_split = triton.cdiv(triton.cdiv(K, split), 8 * bw) * 8 * bw
    split = triton.cdiv(K, k_split)                                    # no slice left without columns
    tiles = triton.cdiv(N, bn)
    part = torch.empty((split, M, N), device=x2d.device, dtype=torch.float32)
    s_part = torch.empty((split, M, r_pad), device=x2d.device, dtype=torch.float32) if rank else part
    count = counters(x2d.device, M * tiles)
    s_arg, a_arg, b_arg, bias_arg = _operands(y, s, lora_A, lora_B, bias)
    double_quant = absmax_scale is not None
    scale_arg, offset_arg, dq_arg = (absmax_scale, absmax_offset, dq_values) if double_quant else (absmax,) * 3
    s_first = cfg.pop("S_FIRST", True)
    grid = (M * ((split if rank else 0) + tiles * split),)  # S's programs first: short, done early
    with interpreter_lock():
        _nf4_decode_kernel[grid](
            x2d, codes.view(torch.int32), absmax, scale_arg, offset_arg, nf4_values, dq_arg,
            a_arg, b_arg, bias_arg, y, s_arg, part, s_part, count,
            M, N, K, K // 8, rank, k_split,
            x2d.stride(0), x2d.stride(1), a_arg.stride(0), a_arg.stride(-1), b_arg.stride(0), b_arg.stride(-1),
            y.stride(0), y.stride(1), s_arg.stride(0), s_arg.stride(-1),
            scaling,
            BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, DOUBLE_QUANT=double_quant, SPLIT_K=split,
            HAS_LORA=rank > 0, HAS_BIAS=bias is not None, R_PAD=r_pad,
            BN=bn, BW=bw, EVEN_K=K % (8 * bw) == 0, S_FIRST=s_first, FENCES=not lora_triton.INTERPRETING, **cfg,
        )
    return y, s
