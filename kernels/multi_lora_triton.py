"""Mixed-adapter LoRA in Triton: a batch whose rows each use their own adapter, every adapter in one launch.

Serving (or training) many LoRA adapters on one base model, the rows of one batch belong to different users,
each with an adapter of their own. The base GEMM is the same for every row; only the rank-r branch differs.
Punica's SGMV (https://arxiv.org/abs/2310.18547) and S-LoRA (https://arxiv.org/abs/2311.03285) group the rows
by adapter and run the branches of all adapters in one kernel launch; this file does that, and the backward too.

    y[m] = x[m]·Wᵀ + bias + s_i·(x[m]·A_iᵀ)·B_iᵀ,    i = adapter_index[m]    (no LoRA term where i = -1)

Shapes (x flattened to 2-D): x (M, K), W (N, K), bias (N,), A_i (r_i, K), B_i (N, r_i), adapter_index (M,) with
values in [-1, n). The ranks r_i may differ from adapter to adapter.

A worked example: M = 6 rows, n = 3 adapters of ranks (4, 8, 2), adapter_index = [1, -1, 0, 1, 1, 0].

    sorted index   [-1,  0,  0,  1,  1,  1]        order = [1, 2, 5, 0, 3, 4]   (stable: row order kept)
    positions p      0 | 1   2 | 3   4   5 |       seg_start = [1, 3, 6, 6]      (adapter 2: no rows, empty)
                     ^ the -1 row: in no segment, it gets the base only
    A_cat = cat(A_0, A_1, A_2)        (14, K)      rank_start = [0, 4, 12, 14]
    B_cat = cat(B_0, B_1, B_2, dim=1) (N, 14)      adapter 1 owns rows 4..11 of A_cat and columns 4..11 of B_cat

The plan:
  1. The base term y = x·Wᵀ + bias is ONE cuBLAS GEMM (``F.linear``) for every row, whatever its adapter: it is
     the big product, and nothing in it depends on the adapter. (The single-adapter kernel of
     kernels/lora_triton.py folds its low-rank term into its own GEMM; here the base GEMM is left to cuBLAS and
     the Triton kernels do only the adapter work, in place on cuBLAS's output.)
  2. Rows are grouped by adapter ON THE DEVICE, with no host sync (no ``.item()``, ``.tolist()``, ``nonzero``),
     so that the call can be captured in a CUDA graph and replayed with other adapter indices:
         index_sorted, order = sort(adapter_index, stable=True)   # order[p]: the row at sorted position p
         seg_start = searchsorted(index_sorted, [0, 1, ..., n])  # adapter i: positions seg_start[i]..seg_start[i+1]-1
     Nothing is permuted in memory: the kernels read row order[p] of x through the index (SGMV's "gather").
  3. Adapters of different ranks are packed by concatenation (A_cat, B_cat and rank_start above; the packed
     form is ``reference.PackedAdapters``). torch.cat is differentiable, so autograd splits the gradients of
     A_cat and B_cat back into each adapter's. A caller that runs many batches on the same adapters (a server;
     ``PeftModel.generate`` for the length of one call) packs once and calls ``multi_lora_linear_packed``.
  4. Three segmented kernels, each launched ONCE for all adapters together:
       shrink:  S[p, :r_i] = c_i · P[order[p], :] · Q_iᵀ            Q_i: the r_i rows of a (Σr, K) stack
       expand:  out[order[p], :] += c_i · L[p, :r_i] · U_i         U_i: the r_i rows of a (Σr, T) stack
       reduce:  C[:, rank_start[i]:rank_start[i+1]] = c_i · P[rows of i]ᵀ · L[positions of i]
     where c_i is s_i or 1. The forward is a shrink (P = x, Q = A_cat: S = x·A_iᵀ) and an expand into y
     (L = S, U = B_catᵀ, c_i = s_i). The backward, with dY the gradient of y:
         dS   = s_i · dY·B_i                   shrink, P = dY, Q = B_catᵀ, c_i = s_i
         dX   = dY·W  (cuBLAS)  +  dS·A_i      expand into cuBLAS's output, L = dS, U = A_cat, c_i = 1
         dA_i = dS_segᵀ · x_seg                reduce, P = x,  L = dS   (stored transposed: (Σr, K))
         dB_i = s_i · dY_segᵀ · S_seg          reduce, P = dY, L = S
         dbias = dY.sum(0)                     (torch; the base weight is frozen: no dW)
     S is saved for the backward, not recomputed: it is M×max(r) values (32 KB for M = 1000, r = 16 in bf16)
     where recomputing it would read x (M×K) again with one more launch.
  5. Inference (no autograd) of at most ``FUSED_MAX_ROWS`` = 4096 rows — a decode step, or a prefill of that
     size — runs shrink and expand as ONE kernel (``segment_shrink_expand``): every (row tile, column tile)
     program computes its tile's S itself. For a decode step the host's cost of a launch exceeds the GPU work of
     the whole layer, so one launch fewer is what counts; S is computed cdiv(N, BN) times per tile, which costs
     the GPU little while few rows are read, and more as the rows grow (the constant's comment has the times).

How a program of shrink or expand finds its work: the rows are cut into tiles of BM = ``ROW_BLOCK`` rows, each
tile inside one segment, and a tile map, made on the device with a few torch ops (``tile_map``), says for every
program id t which segment its tile belongs to and where the tile starts:

    tiles     = cdiv(seg_start[1:] - seg_start[:-1], BM)    # (n,) tiles of each segment; 0 for an empty one
    tile_end  = cumsum(tiles)                               # (n,) one past each segment's last tile
    segment_t = searchsorted(tile_end, t, right=True)       # the segment of tile t (n: past the last tile)
    first_t   = seg_start[segment_t] + (t - (tile_end - tiles)[segment_t]) * BM
    kernel:   if segment_t == n: return;  rows = order[first_t : min(first_t + BM, seg_start[segment_t + 1])]

    Σ_i cdiv(M_i, BM) ≤ cdiv(M, BM) + n - 1, so a grid of cdiv(M, BM) + n programs always covers every tile, and
    the host knows it without reading seg_start (no sync). Each tile holds the rows of one adapter only, so one
    adapter's A_i (or B_i) serves the whole tile. The grouping and its tile map (``group_rows``) depend only on
    the adapter index: a model makes them once per batch and hands them to every layer. The reduce kernel needs
    no map: one program per (adapter, output tile) loops over all of that adapter's rows, and writes its result
    once (no atomics: deterministic).

Precision: fp16/bf16 operands, fp32 accumulation; S and dS are rounded to x's dtype (as the reference's
autograd rounds them), outputs are in x's dtype. fp32 follows torch's setting for fp32 matmuls, as
kernels/lora_triton.py does: "ieee" dots by default (exact fp32), "tf32" when the caller allowed tf32.
Block sizes: BLOCK_R = the largest rank padded to a power of two, at least 16 (``tl.dot`` needs every
dimension ≥ 16); each adapter masks it to its own r_i. The configs are fixed, not autotuned: the expand kernel
adds into its output in place, so an autotuner's trial runs would add the term several times (it would need
``restore_value``), and tuning on first use would run inside a CUDA graph's warm-up. Tuning is a next step, as
is splitting a long segment of the reduce kernel over several programs (a single adapter holding every row
is one serial loop per output tile).
CUDA graphs: the one host→device copy, the per-adapter table (rank_start, s_i), is made once per (ranks,
scalings, device) and kept (``adapter_table``), so a warm-up call makes it and a captured call copies nothing.
Limits: the gathered rows use 64-bit offsets; a row's columns, S and the stacked factors must stay below 2**31
elements (the switch checks it: kernels/__init__.py, ``_multi_too_large``). fp16, bf16, fp32.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .lora_triton import _precision
from .reference import PackedAdapters, pack_adapters
from .triton_interpreter import INTERPRETING, interpreter_lock

__all__ = ["Segments", "TileMap", "RowGroups", "AdapterTable", "segments", "tile_map", "group_rows",
           "adapter_table", "segment_shrink", "segment_expand", "segment_shrink_expand", "segment_reduce",
           "multi_lora_linear", "multi_lora_linear_packed", "ROW_BLOCK", "FUSED_MAX_ROWS"]

# Fixed block sizes (see the module docstring for why they are not autotuned). The interpreter runs every
# program as Python, so there the tiles are small and the test shapes (tens of rows) still span several.
# ROW_BLOCK is the row tile of shrink and expand alike, so one tile map serves both.
if INTERPRETING:
    ROW_BLOCK = 16
    SHRINK_BLOCKS = dict(BK=32, num_warps=4)
    EXPAND_BLOCKS = dict(BN=32, num_warps=4)
    REDUCE_BLOCKS = dict(BM=16, BT=32, num_warps=4)
else:
    ROW_BLOCK = 64
    SHRINK_BLOCKS = dict(BK=64, num_warps=4)
    EXPAND_BLOCKS = dict(BN=128, num_warps=4)
    REDUCE_BLOCKS = dict(BM=64, BT=64, num_warps=4)
# Inference calls of at most this many rows (a decode step of 64 rows, or a prefill of up to 4096) take the
# one-launch shrink-expand kernel; more rows take shrink + expand, which compute each tile's S once instead of
# once per column tile. Measured on an H200 (64 adapters of rank 16, K→N = 768→2304, bf16), in a one-off run whose
# table was not kept: one launch cost the host ~72 µs against ~118 µs for two, and the GPU 27 µs against 16 µs
# at 64 rows, 51 against 43 at 4096 rows and 204 against 155 at 16384 rows. So up to 4096 rows the launch the
# host saves outweighs the GPU time the one launch adds (in eager serving; in a CUDA graph the GPU alone counts,
# and two launches would win); beyond it the GPU sets the pace. benchmarks/RESULTS.md ("Many adapters in one
# batch") has the one-launch kernel at 64 rows: 26.4 µs of GPU time, 85.2 µs host-included.
FUSED_MAX_ROWS = 4096


# --------------------------------------------------------------------------------------------------------
# The bookkeeping, all on the device: which rows each adapter owns, and where its rank sits in A_cat/B_cat.
# --------------------------------------------------------------------------------------------------------
class Segments(NamedTuple):
    """The rows of a batch grouped by adapter (made by ``segments``)."""

    order: torch.Tensor  # (M,) int64: order[p] is the row at sorted position p
    start: torch.Tensor  # (n + 1,) int32: adapter i owns sorted positions [start[i], start[i + 1])


class TileMap(NamedTuple):
    """For each program of shrink and expand, its tile of ROW_BLOCK rows (made by ``tile_map``)."""

    segment: torch.Tensor  # (T,) int32: the segment (adapter) of tile t; n for a program past the last tile
    first: torch.Tensor    # (T,) int32: the tile's first sorted position


class RowGroups(NamedTuple):
    """The rows grouped by adapter, and the tiles of that grouping: all the kernels need to know about the
    adapter index (made by ``group_rows``, once per batch; every layer of a model can share it)."""

    segments: Segments
    tiles: TileMap


class AdapterTable(NamedTuple):
    """Where each adapter sits in A_cat / B_cat, and its scaling (made by ``adapter_table``)."""

    ranks: tuple[int, ...]    # r_i, on the host: they size the blocks
    rank_start: torch.Tensor  # (n + 1,) int32: adapter i owns rows [rank_start[i], rank_start[i + 1]) of A_cat
    scale: torch.Tensor       # (n,) fp32: s_i
    sum_r: int                # Σr: the rows of A_cat         (kept, not recomputed: a decode step reads
    max_r: int                # max r: the columns of S         them 48 times, and n may be in the hundreds)
    block_r: int              # BLOCK_R: max r padded to a power of two ≥ 16 (tl.dot needs every dimension ≥ 16)


def segments(adapter_index: torch.Tensor, n_adapters: int) -> Segments:
    """Group the rows by adapter without a host sync: a stable sort, then a binary search for each segment start.

    adapter_index: (...) int64 with values in [-1, n_adapters). Rows with -1 (and any value outside the range)
    fall before seg_start[0] or after seg_start[n]: they belong to no segment, and get the base layer only.
    """
    index_sorted, order = torch.sort(adapter_index.reshape(-1), stable=True)              # (M,), (M,)
    bounds = torch.arange(n_adapters + 1, device=adapter_index.device, dtype=index_sorted.dtype)  # 0, 1, ..., n
    return Segments(order, torch.searchsorted(index_sorted, bounds, out_int32=True))     # (n + 1,) int32


def tile_map(segs: Segments, M: int, BM: int = ROW_BLOCK) -> TileMap:
    """The tile of each of the cdiv(M, BM) + n programs, on the device, without a host sync (module docstring)."""
    n = segs.start.numel() - 1
    tiles = (segs.start[1:] - segs.start[:-1] + BM - 1) // BM                       # (n,) int32
    tile_end = torch.cumsum(tiles, 0)                                               # (n,) int64
    t = torch.arange(_row_tiles_bound(M, n, BM), device=segs.start.device)          # (T,) program ids
    segment = torch.searchsorted(tile_end, t, right=True)                           # (T,) in [0, n]
    inside = segment.clamp(max=n - 1)                                               # a valid index for the gathers
    first = segs.start[inside] + (t - (tile_end - tiles)[inside]) * BM              # (T,)
    return TileMap(segment.to(torch.int32), first.to(torch.int32))


def group_rows(adapter_index: torch.Tensor, n_adapters: int) -> RowGroups:
    """``segments`` and their ``tile_map``: everything about the adapter index that the kernels read."""
    segs = segments(adapter_index, n_adapters)
    return RowGroups(segs, tile_map(segs, segs.order.numel()))


@functools.cache
def adapter_table(ranks: tuple[int, ...], scalings: tuple[float, ...], device: torch.device) -> AdapterTable:
    """The per-adapter table on ``device``, made once per (ranks, scalings, device) and kept.

    It is the only host→device copy of a call. Keeping it means later calls copy nothing, which a CUDA graph
    capture requires (it cannot capture a copy from pageable host memory): capture after a warm-up call, as
    CUDA graphs want anyway. The entries are never evicted, because a captured graph keeps their addresses.
    """
    rank_start = [0, *itertools.accumulate(ranks)]                # [0, r_0, r_0 + r_1, ..., Σr]
    return AdapterTable(ranks, torch.tensor(rank_start, dtype=torch.int32, device=device),
                        torch.tensor(scalings, dtype=torch.float32, device=device),
                        sum_r=rank_start[-1], max_r=max(ranks), block_r=max(16, triton.next_power_of_2(max(ranks))))


def _row_tiles_bound(M: int, n_adapters: int, BM: int) -> int:
    """Programs enough for every adapter's row tiles: Σ_i cdiv(M_i, BM) ≤ cdiv(M, BM) + n - 1."""
    return triton.cdiv(M, BM) + n_adapters


@triton.jit
def _segment_tile(tile_segment_ptr, tile_first_ptr, seg_start_ptr, n_segments):
    """This program's tile, from the tile map: (segment, first sorted position, end of the segment); the
    segment is n_segments for a program past the last tile."""
    pid = tl.program_id(0)
    segment = tl.load(tile_segment_ptr + pid)
    first = tl.load(tile_first_ptr + pid)
    last = tl.load(seg_start_ptr + tl.minimum(segment, n_segments - 1) + 1)
    return segment, first, last


@triton.jit
def _tile_rows(order_ptr, rank_start_ptr, segment, first, last, BM: tl.constexpr, BLOCK_R: tl.constexpr):
    """The rows of this program's tile and its adapter's slice of the packed ranks: (offs_p (BM,) sorted
    positions, in_m (BM,) which are inside the segment, rows (BM,) int64 rows of x they stand for, r0 the
    adapter's first packed rank, offs_r (BLOCK_R,), in_r (BLOCK_R,) which are below its rank r_i)."""
    offs_p = first + tl.arange(0, BM)
    in_m = offs_p < last
    rows = tl.load(order_ptr + offs_p, mask=in_m, other=0)
    r0 = tl.load(rank_start_ptr + segment)
    rank = tl.load(rank_start_ptr + segment + 1) - r0         # r_i: BLOCK_R is masked down to it
    offs_r = tl.arange(0, BLOCK_R)
    return offs_p, in_m, rows, r0, offs_r, offs_r < rank


@triton.jit
def _shrink_rows(p_ptr, q_ptr, rows, in_m, r0, offs_r, in_r, K, stride_pm, stride_pk, stride_qr, stride_qk,
                 PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BLOCK_R: tl.constexpr):
    """(BM, BLOCK_R) fp32: the gathered rows P[rows, :] times Q_iᵀ = q[r0 : r0 + r_i, :]ᵀ, summed over K."""
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BK):
        in_k = (k0 + offs_k) < K
        p = tl.load(p_ptr + rows[:, None] * stride_pm + (k0 + offs_k)[None, :] * stride_pk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)                    # (BM, BK) gathered rows
        q_t = tl.load(q_ptr + (r0 + offs_r)[None, :] * stride_qr + (k0 + offs_k)[:, None] * stride_qk,
                      mask=in_r[None, :] & in_k[:, None], other=0.0)                  # (BK, BLOCK_R) = Q_iᵀ
        acc = tl.dot(p, q_t, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _expand_rows(out_ptr, low, u_ptr, rows, in_m, r0, offs_r, in_r, scale, T, stride_om, stride_ot, stride_ur,
                 stride_ut, PRECISION: tl.constexpr, BN: tl.constexpr):
    """out[rows, this program's BN columns] += scale · low · U_i, with low (BM, BLOCK_R) in the operand dtype and
    U_i = u[r0 : r0 + r_i, :]; the sum in fp32, rounded once to out's dtype."""
    offs_t = tl.program_id(1) * BN + tl.arange(0, BN)
    in_t = offs_t < T
    up = tl.load(u_ptr + (r0 + offs_r)[:, None] * stride_ur + offs_t[None, :] * stride_ut,
                 mask=in_r[:, None] & in_t[None, :], other=0.0)                       # (BLOCK_R, BN) = U_i
    delta = tl.dot(low.to(up.dtype), up, input_precision=PRECISION) * scale           # (BM, BN) fp32
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_t[None, :] * stride_ot      # the gathered rows, again
    keep = in_m[:, None] & in_t[None, :]
    acc = tl.load(out_ptrs, mask=keep, other=0.0).to(tl.float32) + delta
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=keep)


# --------------------------------------------------------------------------------------------------------
# Kernel 1 ("shrink"): S[p, :r_i] = c_i · P[order[p], :] · Q_iᵀ, every adapter in one launch.
#   forward: P = x (M, K),  Q = A_cat (Σr, K),    c_i = 1    → S
#   dS:      P = dY (M, N), Q = B_catᵀ (Σr, N),   c_i = s_i  → dS
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_shrink_kernel(
    # pointers
    p_ptr, q_ptr, order_ptr, seg_start_ptr, tile_segment_ptr, tile_first_ptr, rank_start_ptr, scale_ptr, s_ptr,
    # sizes
    n_segments, K,
    # strides
    stride_pm, stride_pk, stride_qr, stride_qk, stride_sp, stride_sr,
    # meta-parameters
    APPLY_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    segment, first, last = _segment_tile(tile_segment_ptr, tile_first_ptr, seg_start_ptr, n_segments)
    if segment >= n_segments:                                 # past the last tile: nothing to do
        return
    offs_p, in_m, rows, r0, offs_r, in_r = _tile_rows(order_ptr, rank_start_ptr, segment, first, last, BM, BLOCK_R)
    acc = _shrink_rows(p_ptr, q_ptr, rows, in_m, r0, offs_r, in_r, K, stride_pm, stride_pk, stride_qr, stride_qk,
                       PRECISION, BM, BK, BLOCK_R)
    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + segment)
    tl.store(s_ptr + offs_p[:, None] * stride_sp + offs_r[None, :] * stride_sr, acc.to(s_ptr.dtype.element_ty),
             mask=in_m[:, None] & in_r[None, :])


def segment_shrink(p: torch.Tensor, q: torch.Tensor, groups: RowGroups, table: AdapterTable,
                   apply_scale: bool) -> torch.Tensor:
    """S (M, max r) in p's dtype, row p for sorted position p: S[p, :r_i] = c_i·P[order[p]]·Q_iᵀ.

    p (M, K), any strides; q (Σr, K), any strides (Q_i = q[rank_start[i]:rank_start[i+1]]); c_i = s_i when
    ``apply_scale`` else 1. Rows of S at positions in no segment (the -1 rows) are left unwritten.
    """
    M, K = p.shape
    n, width = len(table.ranks), table.max_r
    segs, tiles = groups
    if q.shape != (table.sum_r, K) or segs.order.shape != (M,) or segs.start.shape != (n + 1,):
        raise ValueError(f"segment_shrink: p {tuple(p.shape)}, q {tuple(q.shape)} and ranks {table.ranks} do not "
                         "fit (M, K), (Σr, K)")
    s = torch.empty((M, width), device=p.device, dtype=p.dtype)
    if M == 0 or K == 0:  # no rows, or an empty sum over K (and an empty tensor's null pointer would fail a launch)
        return s.zero_()
    with interpreter_lock():
        _segment_shrink_kernel[(tiles.segment.numel(),)](
            p, q, segs.order, segs.start, tiles.segment, tiles.first, table.rank_start, table.scale, s,
            n, K,
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1),
            APPLY_SCALE=apply_scale, BLOCK_R=table.block_r, PRECISION=_precision(p.dtype),
            BM=ROW_BLOCK, **SHRINK_BLOCKS,
        )
    return s


# --------------------------------------------------------------------------------------------------------
# Kernel 2 ("expand"): out[order[p], :] += c_i · L[p, :r_i] · U_i, in place, every adapter in one launch.
#   forward: out = y  (cuBLAS's x·Wᵀ + bias), L = S,  U = B_catᵀ (Σr, N), c_i = s_i
#   dX:      out = dX (cuBLAS's dY·W),        L = dS, U = A_cat (Σr, K),  c_i = 1
# Each row is in one segment at most, so no two programs write the same element: no atomics.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_expand_kernel(
    # pointers
    out_ptr, l_ptr, u_ptr, order_ptr, seg_start_ptr, tile_segment_ptr, tile_first_ptr, rank_start_ptr, scale_ptr,
    # sizes
    n_segments, T,
    # strides
    stride_om, stride_ot, stride_lp, stride_lr, stride_ur, stride_ut,
    # meta-parameters
    APPLY_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    segment, first, last = _segment_tile(tile_segment_ptr, tile_first_ptr, seg_start_ptr, n_segments)
    if segment >= n_segments:                                 # past the last tile: nothing to do
        return
    offs_p, in_m, rows, r0, offs_r, in_r = _tile_rows(order_ptr, rank_start_ptr, segment, first, last, BM, BLOCK_R)
    low = tl.load(l_ptr + offs_p[:, None] * stride_lp + offs_r[None, :] * stride_lr,
                  mask=in_m[:, None] & in_r[None, :], other=0.0)                      # (BM, BLOCK_R)
    scale = tl.load(scale_ptr + segment) if APPLY_SCALE else 1.0
    _expand_rows(out_ptr, low, u_ptr, rows, in_m, r0, offs_r, in_r, scale, T, stride_om, stride_ot, stride_ur,
                 stride_ut, PRECISION, BN)


def segment_expand(out: torch.Tensor, low: torch.Tensor, u: torch.Tensor, groups: RowGroups, table: AdapterTable,
                   apply_scale: bool) -> torch.Tensor:
    """out[order[p], :] += c_i·L[p, :r_i]·U_i in place, and returns out.

    out (M, T) and u (Σr, T) with any strides (U_i = u[rank_start[i]:rank_start[i+1]]); low (M, max r) in
    sorted order (``segment_shrink``'s output); c_i = s_i when ``apply_scale`` else 1.
    """
    M, T = out.shape
    segs, tiles = groups
    if low.shape != (M, table.max_r) or u.shape != (table.sum_r, T) or segs.order.shape != (M,):
        raise ValueError(f"segment_expand: out {tuple(out.shape)}, low {tuple(low.shape)}, u {tuple(u.shape)} "
                         f"and ranks {table.ranks} do not fit (M, T), (M, max r), (Σr, T)")
    if M == 0 or T == 0:
        return out
    grid = (tiles.segment.numel(), triton.cdiv(T, EXPAND_BLOCKS["BN"]))
    with interpreter_lock():
        _segment_expand_kernel[grid](
            out, low, u, segs.order, segs.start, tiles.segment, tiles.first, table.rank_start, table.scale,
            len(table.ranks), T,
            out.stride(0), out.stride(1), low.stride(0), low.stride(1), u.stride(0), u.stride(1),
            APPLY_SCALE=apply_scale, BLOCK_R=table.block_r, PRECISION=_precision(out.dtype),
            BM=ROW_BLOCK, **EXPAND_BLOCKS,
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Kernel 2' ("shrink-expand", inference of few rows): y[order[p], :] += s_i · (x[order[p], :]·A_iᵀ)·B_iᵀ in ONE
# launch. Each (row tile, column tile) program computes its tile's S itself, so a tile's S is computed once per
# column tile (cdiv(N, BN) times): for a decode step's few rows that is nothing, and it saves a launch, which at
# those sizes costs more than all the GPU work (benchmarks/RESULTS.md). Nothing is saved for a backward.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_shrink_expand_kernel(
    # pointers
    x_ptr, a_ptr, b_ptr, out_ptr, order_ptr, seg_start_ptr, tile_segment_ptr, tile_first_ptr, rank_start_ptr,
    scale_ptr,
    # sizes
    n_segments, K, N,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_bn, stride_br, stride_om, stride_on,
    # meta-parameters
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):
    segment, first, last = _segment_tile(tile_segment_ptr, tile_first_ptr, seg_start_ptr, n_segments)
    if segment >= n_segments:                                 # past the last tile: nothing to do
        return
    offs_p, in_m, rows, r0, offs_r, in_r = _tile_rows(order_ptr, rank_start_ptr, segment, first, last, BM, BLOCK_R)
    s = _shrink_rows(x_ptr, a_ptr, rows, in_m, r0, offs_r, in_r, K, stride_xm, stride_xk, stride_ar, stride_ak,
                     PRECISION, BM, BK, BLOCK_R)                                      # (BM, BLOCK_R) S = x·A_iᵀ
    s = s.to(x_ptr.dtype.element_ty)       # rounded to x's dtype, as the two-kernel path stores it
    _expand_rows(out_ptr, s, b_ptr, rows, in_m, r0, offs_r, in_r, tl.load(scale_ptr + segment), N, stride_om,
                 stride_on, stride_br, stride_bn, PRECISION, BN)                      # U_i = B_iᵀ: (r_i, N)


def segment_shrink_expand(out: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                          groups: RowGroups, table: AdapterTable) -> torch.Tensor:
    """out[m, :] += s_i·(x[m]·A_iᵀ)·B_iᵀ in place for every row m of adapter i, in one launch; returns out.

    out (M, N), x (M, K), a_cat (Σr, K), b_cat (N, Σr), any strides. The same result as ``segment_shrink``
    then ``segment_expand`` (S rounded to x's dtype in between), with S never written to memory.
    """
    M, N = out.shape
    K = x.shape[1]
    segs, tiles = groups
    sum_r = table.sum_r
    if x.shape[0] != M or a_cat.shape != (sum_r, K) or b_cat.shape != (N, sum_r) or segs.order.shape != (M,):
        raise ValueError(f"segment_shrink_expand: out {tuple(out.shape)}, x {tuple(x.shape)}, a_cat "
                         f"{tuple(a_cat.shape)} and b_cat {tuple(b_cat.shape)} do not fit (M, N), (M, K), (Σr, K), "
                         "(N, Σr)")
    if M == 0 or N == 0 or K == 0:  # an empty sum over K adds nothing
        return out
    grid = (tiles.segment.numel(), triton.cdiv(N, EXPAND_BLOCKS["BN"]))
    with interpreter_lock():
        _segment_shrink_expand_kernel[grid](
            x, a_cat, b_cat, out, segs.order, segs.start, tiles.segment, tiles.first, table.rank_start, table.scale,
            len(table.ranks), K, N,
            x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), b_cat.stride(0), b_cat.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_R=table.block_r, PRECISION=_precision(x.dtype), BM=ROW_BLOCK,
            BK=SHRINK_BLOCKS["BK"], BN=EXPAND_BLOCKS["BN"], num_warps=EXPAND_BLOCKS["num_warps"],
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Kernel 3 ("reduce"): C[:, r_i's columns] = c_i · P[rows of i]ᵀ · L[positions of i], a sum over each segment.
#   dA: P = x (M, K),  L = dS, c_i = 1   → (K, Σr), stored rank-major so that its transpose is dA_cat (Σr, K)
#   dB: P = dY (M, N), L = S,  c_i = s_i → (N, Σr) = dB_cat
# Grid (adapters, output tiles): each program walks all rows of its adapter and stores once. An adapter with
# no rows stores zeros, as its gradient must be.
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_reduce_kernel(
    # pointers
    p_ptr, l_ptr, order_ptr, seg_start_ptr, rank_start_ptr, scale_ptr, c_ptr,
    # sizes
    T,
    # strides
    stride_pm, stride_pt, stride_lp, stride_lr, stride_ct, stride_cr,
    # meta-parameters
    APPLY_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BT: tl.constexpr,
):
    segment = tl.program_id(0)
    first = tl.load(seg_start_ptr + segment)
    last = tl.load(seg_start_ptr + segment + 1)
    r0 = tl.load(rank_start_ptr + segment)
    rank = tl.load(rank_start_ptr + segment + 1) - r0
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < rank
    offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
    in_t = offs_t < T
    acc = tl.zeros((BT, BLOCK_R), dtype=tl.float32)
    for p0 in range(first, last, BM):
        offs_p = p0 + tl.arange(0, BM)
        in_m = offs_p < last
        rows = tl.load(order_ptr + offs_p, mask=in_m, other=0)                       # (BM,) int64
        p = tl.load(p_ptr + rows[:, None] * stride_pm + offs_t[None, :] * stride_pt,
                    mask=in_m[:, None] & in_t[None, :], other=0.0)                    # (BM, BT) gathered rows
        low = tl.load(l_ptr + offs_p[:, None] * stride_lp + offs_r[None, :] * stride_lr,
                      mask=in_m[:, None] & in_r[None, :], other=0.0)                  # (BM, BLOCK_R)
        acc = tl.dot(tl.trans(p), low.to(p.dtype), acc, input_precision=PRECISION)   # (BT, BLOCK_R)
    if APPLY_SCALE:
        acc = acc * tl.load(scale_ptr + segment)
    tl.store(c_ptr + offs_t[:, None] * stride_ct + (r0 + offs_r)[None, :] * stride_cr,
             acc.to(c_ptr.dtype.element_ty), mask=in_t[:, None] & in_r[None, :])


def segment_reduce(p: torch.Tensor, low: torch.Tensor, segs: Segments, table: AdapterTable, apply_scale: bool,
                   rank_major: bool = False) -> torch.Tensor:
    """C (T, Σr) in p's dtype: C[:, rank_start[i]:rank_start[i+1]] = c_i·P[rows of i]ᵀ·L[positions of i, :r_i].

    p (M, T), any strides; low (M, max r) in sorted order; c_i = s_i when ``apply_scale`` else 1.
    ``rank_major``: C's memory is laid out as its transpose (Σr, T), contiguous (what dA_cat wants).
    """
    M, T = p.shape
    n, sum_r = len(table.ranks), table.sum_r
    if low.shape != (M, table.max_r) or segs.order.shape != (M,):
        raise ValueError(f"segment_reduce: p {tuple(p.shape)} and low {tuple(low.shape)} do not fit (M, T), "
                         f"(M, max r) for ranks {table.ranks}")
    c = torch.empty((sum_r, T), device=p.device, dtype=p.dtype).t() if rank_major else \
        torch.empty((T, sum_r), device=p.device, dtype=p.dtype)
    if M == 0 or T == 0:  # no rows at all: every adapter's sum is empty
        return c.zero_()
    blocks = REDUCE_BLOCKS
    with interpreter_lock():
        _segment_reduce_kernel[(n, triton.cdiv(T, blocks["BT"]))](
            p, low, segs.order, segs.start, table.rank_start, table.scale, c,
            T,
            p.stride(0), p.stride(1), low.stride(0), low.stride(1), c.stride(0), c.stride(1),
            APPLY_SCALE=apply_scale, BLOCK_R=table.block_r, PRECISION=_precision(p.dtype), **blocks,
        )
    return c


# --------------------------------------------------------------------------------------------------------
# The autograd op: the forward and backward of the module docstring, on the three kernels and two cuBLAS GEMMs.
# --------------------------------------------------------------------------------------------------------
class _MultiLoraTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a_cat, b_cat, adapter_index, ranks, scalings, groups):
        groups, table = _groups_and_table(adapter_index, ranks, scalings, groups)
        N, K = weight.shape
        x2d = x.reshape(math.prod(x.shape[:-1]), K)                       # (M, K), a view when strides allow
        y2d = F.linear(x2d, weight, bias)                                 # (M, N) the base, every row: cuBLAS
        with torch.cuda.device_of(x):  # launch on x's GPU (Triton launches on the current one)
            s = segment_shrink(x2d, a_cat, groups, table, apply_scale=False)  # (M, max r) S = x·A_iᵀ, sorted
            segment_expand(y2d, s, b_cat.t(), groups, table, apply_scale=True)  # y += s_i·S·B_iᵀ, in place
        segs, tiles = groups
        ctx.save_for_backward(x, weight, a_cat, b_cat, s, segs.order, segs.start, tiles.segment, tiles.first)
        ctx.table = table
        return y2d.view(*x.shape[:-1], N)                                 # (..., N)

    @staticmethod
    def backward(ctx, dy):
        x, weight, a_cat, b_cat, s, order, start, tile_segment, tile_first = ctx.saved_tensors
        groups, table = RowGroups(Segments(order, start), TileMap(tile_segment, tile_first)), ctx.table
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        N, K = weight.shape
        M = s.shape[0]
        dy2d = dy.reshape(M, N)                                           # (M, N)
        if dy2d.stride(-1) != 1:  # a transposed dY: its column offsets could pass 2³¹, which the guard never saw
            dy2d = dy2d.contiguous()
        d_x = d_a = d_b = d_bias = None
        with torch.cuda.device_of(dy):  # launch on dY's GPU
            if need_x or need_a:
                ds = segment_shrink(dy2d, b_cat.t(), groups, table, apply_scale=True)   # (M, max r) s_i·dY·B_i
            if need_x:
                d_x = torch.mm(dy2d, weight)                              # (M, K) dY·W: cuBLAS
                segment_expand(d_x, ds, a_cat, groups, table, apply_scale=False)  # dX += dS·A_i, in place
                d_x = d_x.view(x.shape)
            if need_a:
                d_a = segment_reduce(x.reshape(M, K), ds, groups.segments, table, apply_scale=False,
                                     rank_major=True).t()                 # (Σr, K)
            if need_b:
                d_b = segment_reduce(dy2d, s, groups.segments, table, apply_scale=True)  # (N, Σr)
        if need_bias:
            d_bias = dy2d.sum(0)                                          # (N,)
        return d_x, None, d_bias, d_a, d_b, None, None, None, None       # never a gradient for the weight


# Not a registered custom op (kernels/lora_triton.py says what one buys): torch.compile breaks the graph here and
# runs these functions in eager, rather than trying to trace Triton's launcher.
@torch.compiler.disable
def multi_lora_linear_packed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: PackedAdapters,
    adapter_index: torch.Tensor,
    groups: RowGroups | None = None,
) -> torch.Tensor:
    """y[m] = x[m]·Wᵀ + bias + s_i·(x[m]·A_iᵀ)·B_iᵀ with i = adapter_index[m], on the Triton kernels above.

    The reference's arguments (kernels/reference.py); inputs are checked by the caller,
    ``kernels.multi_lora_linear_packed``. ``groups``: ``group_rows(adapter_index, n)``, made here when None.
    Gradients reach x, a_cat and b_cat (and through them every A_i and B_i, when they were packed with
    torch.cat) and a bias that requires one; never the weight.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, adapters.a_cat, adapters.b_cat)):
        return _MultiLoraTriton.apply(x, weight, bias, adapters.a_cat, adapters.b_cat, adapter_index,
                                      adapters.ranks, adapters.scalings, groups)
    # Inference: no autograd node, nothing saved; few rows take the one-launch kernel.
    groups, table = _groups_and_table(adapter_index, adapters.ranks, adapters.scalings, groups)
    N, K = weight.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)                           # (M, K)
    y2d = F.linear(x2d, weight, bias)                                     # (M, N) the base: cuBLAS
    with torch.cuda.device_of(x):  # launch on x's GPU (Triton launches on the current one)
        if x2d.shape[0] <= FUSED_MAX_ROWS:
            segment_shrink_expand(y2d, x2d, adapters.a_cat, adapters.b_cat, groups, table)
        else:
            s = segment_shrink(x2d, adapters.a_cat, groups, table, apply_scale=False)
            segment_expand(y2d, s, adapters.b_cat.t(), groups, table, apply_scale=True)
    return y2d.view(*x.shape[:-1], N)                                     # (..., N)


def _groups_and_table(adapter_index, ranks, scalings, groups) -> tuple[RowGroups, AdapterTable]:
    """The rows grouped (unless the caller did) and the adapter table, for one call."""
    if groups is None:
        groups = group_rows(adapter_index, len(ranks))
    return groups, adapter_table(ranks, scalings, adapter_index.device)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    scalings: Sequence[float],
    adapter_index: torch.Tensor,
) -> torch.Tensor:
    """``multi_lora_linear_packed`` on the adapters packed for this one call (the reference's arguments)."""
    return multi_lora_linear_packed(x, weight, bias, pack_adapters(lora_As, lora_Bs, scalings), adapter_index)
