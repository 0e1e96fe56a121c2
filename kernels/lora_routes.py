"""The "auto" backend on CUDA: for each call, the LoRA route that measured fastest for its shape and device.

A LoRA layer can be computed several ways that give the same numbers to rounding; which is fastest depends
on the rows M, on whether a gradient is wanted, and on the host: on the GPUs measured a torch op costs
15-35 µs of Python and launch time and a Triton forward 150-300 µs, so at small M the host, not the GPU,
sets the time. This module holds the routes, the measured constants that pick one, and the merged-weight
cache (LoRA: https://arxiv.org/abs/2106.09685).

    y = x·Wᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ

What "auto" runs for CUDA tensors (``choose_path``; "floor" = a frozen layer's forward + dX GEMM; bf16, r = 16;
benchmarks/RESULTS.md: H200 2026-12-02 and 2026-12-04 at GPT-2 widths, H100 2026-11-24 at K = N = 4096, the GPT-2
step's merged_train row H100 2026-12-06):

| the call                                                   | route       | measured                                 |
|------------------------------------------------------------|-------------|------------------------------------------|
| eager, no gradient wanted, no mask, W' cached (2nd call    | "merged"    | fwd 0.99-1.02× base, GPU time, every M   |
| with one adapter state)                                    |             | and width (H200)                         |
| eager, no gradient wanted: 1st call with a state, a mask,  | "cublas"    | fwd 1.30-2.35× base, no autograd graph   |
| or the cache's byte budget full                            |             | (H100)                                   |
| eager, gradient wanted, M < FUSED_MIN_ROWS                 | "unfused"   | host-bound: fwd+bwd 1.60× floor at M =   |
|                                                            |             | 4096 (cublas 2.20×, fused_tma 3.99×;     |
|                                                            |             | H100, host included)                     |
| eager, gradient wanted, M ≥ FUSED_MIN_ROWS, fp16/bf16,     | "fused_tma" | fwd+bwd 1.17× floor at 4096², M = 16384; |
| TMA-ready (``lora_triton.tma_ready``: Hopper, unit last    |             | 1.45× at 768 → 2304 (reference 2.27×)    |
| stride, 16-byte rows of x, W and dY)                       |             |                                          |
| eager, gradient wanted, M ≥ FUSED_MIN_ROWS, otherwise      | "cublas"    | fwd+bwd 1.24× floor at M = 16384 (H100)  |
| (fp32, before Hopper, other strides)                       |             |                                          |
| torch.compile tracing, gradient wanted,                    | "merged_    | GPU time (graphs replay the launches):   |
| M ≥ MERGED_TRAIN_MIN_ROWS, fp16/bf16, no mask, in and out  | train"      | fwd+bwd 1.36-1.46× floor at M = 7936     |
| features ≤ MERGED_TRAIN_MAX_WIDTH                          |             | (Triton op 1.44-1.55×), 768 → 768 even,  |
|                                                            |             | W' by addmm twice a step (H200); with    |
|                                                            |             | today's W' (one Triton pass, kept for dX)|
|                                                            |             | a GPT-2-small step 0.97× the floor (H100)|
| torch.compile tracing, gradient wanted,                    | "triton"    | fwd+bwd 1.44-2.17× floor at GPT-2 widths |
| M ≥ COMPILED_FUSED_MIN_ROWS, otherwise (a mask, fp32,      | (the op)    | against reference 2.0-2.7×, cublas       |
| wider layers, fewer rows)                                  |             | 1.75-1.96× (M 4096-16384); 1.09-1.11× at |
|                                                            |             | 4096² (merged_train, W' by addmm twice a |
|                                                            |             | step, 1.13-1.15×); a step                |
|                                                            |             | 1.11× the reference's (H200)             |
| torch.compile tracing, otherwise                           | "unfused"   | Inductor fuses the reference's ops       |

CPU tensors, float64, a missing Triton and a call with a tensor past the kernels' 32-bit offsets (kernels/limits.py)
never reach this module: ``kernels.lora_linear`` sends them to the reference. The pointer-load Triton route
("fused") is never chosen on CUDA: the persistent TMA kernel does the same work, and no run in
benchmarks/RESULTS.md has the pointer kernel ahead; ``path="fused"`` still reaches it (it is the kernel the CPU
interpreter runs).

The routes, as plain-Python sketches:

    "unfused":   the reference's torch ops (kernels/reference.py: three GEMMs, a scale, an add); autograd runs their
                 backward in C++.
    "cublas":    S = (x ⊙ mask)·Aᵀ;  Y = x·Wᵀ + bias;  Y += scaling·S·Bᵀ                # 3 GEMMs, in place
                 backward in one autograd.Function, 5 GEMMs:
                 dS = scaling·dY·B;  dX = dY·W + mask ⊙ (dS·A);  dA = dSᵀ·(x ⊙ mask);  dB = scaling·dYᵀ·S
    "merged":    W' = W + scaling·B·A (cached);  Y = x·W'ᵀ + bias                          # 1 GEMM
    "merged_train": S = x·Aᵀ (Triton);  W' = W + scaling·B·A (built per call);  Y = x·W'ᵀ + bias
                 backward: G, dB, dbias in one pass over dY and dA (Triton);  dX = dY·W' (the forward's W')
    "fused", "fused_tma": the Triton kernels of kernels/lora_triton.py (pointer / TMA GEMM).

"merged" and "merged_train" round W + scaling·B·A to the dtype once (fp32 inside cuBLAS for "merged", inside the
Triton pass of kernels/lora_merge_triton.py for "merged_train"), so their outputs differ
from the unmerged routes by about one rounding of the weight; "merged_train"'s gradients of A and B are the
unmerged routes' (its G and S are exact products of dY and x).
"""

from __future__ import annotations

import math
import os

import torch
import torch.utils.weak

from . import lora_merge_triton, lora_triton, reference
from .limits import OFFSET_LIMIT, span
from .triton_interpreter import INTERPRETING
from .versions import version

__all__ = ["FUSED_MIN_ROWS", "COMPILED_FUSED_MIN_ROWS", "MERGED_TRAIN_MAX_WIDTH", "MERGED_TRAIN_MIN_ROWS",
           "MERGED_CACHE_BYTES", "PATHS",
           "choose_path", "route", "clear_cache", "merged_train_op", "lora_linear"]

# From this many rows on, a training call runs the persistent TMA kernels. Below it a training step is
# host-bound: H100, bf16 K = N = 4096, r = 16 (benchmarks/RESULTS.md): at M = 4096 forward+backward costs
# 1.60× the frozen floor on the reference's ops, 2.20× on "cublas" (its Python backward: 640 µs of host time
# against the floor's 200 µs) and 3.99× on fused_tma; at M = 16384, 1.42×, 1.24× and 1.17×. 8192 sits between
# the two measured rows. An eager H200 run of 2026-12-02 (its Triton columns were not kept in RESULTS.md) tied
# fused_tma with "cublas" at 4096 → 4096, M = 16384, and had every Triton route losing at GPT-2 widths, where the
# floor itself is host-bound (RESULTS.md, "LoRA layer at GPT-2 widths"): re-measure before trusting this there.
FUSED_MIN_ROWS = 8192

# Under torch.compile with CUDA graphs the host cost of a launch is paid once, at recording, so the GPU time
# decides: from this many rows on, training calls run the Triton op. Measured on the H200 (2026-12-02, GPU time):
# the Triton op beats the reference at M = 4096-16384 at 768 → 2304, 3072 → 768 and 4096 → 4096, the widths
# RESULTS.md ("LoRA layer at GPT-2 widths") has the reference's column for, and tied it at M = 256 (3.72× vs 3.73×
# the floor at 768 → 2304; RESULTS.md keeps the reference's 3.73×); 1024 sits between the measured rows.
COMPILED_FUSED_MIN_ROWS = 1024

# Under torch.compile a 16-bit training call without a dropout mask trains on the merged weight built per call
# ("merged_train": both base GEMMs on cuBLAS) for layers up to this width, the Triton op above it. Measured on
# the H200 (2026-12-04, M = 7936, bf16, r = 16; forward + backward GPU time × the frozen floor, merged_train vs
# the Triton op, two rounds): 768 → 2304 1.45-1.46 vs 1.55; 768 → 3072 1.36-1.37 vs 1.44-1.47; 3072 → 768 1.42
# vs 1.46-1.47; 768 → 768 1.93-1.97 vs 1.92-1.95 (even); 4096 → 4096 1.13-1.15 vs 1.09-1.11: there Triton's
# GEMM runs at cuBLAS speed and the merge reads and writes W (32 MB) twice per step. (Measured with W' built twice
# a step by cuBLAS's addmm; since 2026-12-06 it is built once, by a Triton pass twice as fast: not measured again.)
MERGED_TRAIN_MAX_WIDTH = 3072
# ... and from this many rows on: building W' costs the same at every M, the GEMM time it saves shrinks with M.
# Measured on the H200 (2026-12-04 21:45, same setup, two rounds; the four widths of a GPT-2 block, 768 → 2304,
# 768 → 768, 768 → 3072, 3072 → 768), merged_train vs the Triton op:
#   M = 1024: 2.70-2.77 vs 2.33-2.34, 3.54-3.55 vs 2.86-2.90, 2.46-2.58 vs 2.09-2.18, 2.97-2.99 vs 2.48-2.50
#   M = 2048: 2.22-2.24 vs 2.14-2.17, 2.98-3.01 vs 2.55-2.59, 2.15 vs 1.87-1.91, 2.26-2.29 vs 2.01-2.03
#   M = 4096: 1.77-1.83 vs 1.82-1.91, 2.47-2.48 vs 2.40, 1.66-1.68 vs 1.63-1.64, 1.79-1.82 vs 1.81-1.84
#   M = 7936: 1.44-1.47 vs 1.48-1.52, 2.00-2.01 vs 1.97-1.99, 1.37-1.38 vs 1.41-1.42, 1.45-1.49 vs 1.48-1.51
# Weighted by the floor's µs (4096 rows: 46.2-48.2, 19.0-19.2, 60.9-62.1, 59.8-61.1; 7936 rows: 92.0-93.5,
# 33.9-34.2, 118.8-119.4, 116.5-119.4), a block's four layers tie at 4096 rows (345 vs 346 µs) and merged_train
# is 2% faster at 7936 (540 vs 551 µs); below 4096 it loses at every width.
MERGED_TRAIN_MIN_ROWS = 4096

# The merged-weight cache (inference): one (N, K) copy of W per cached layer, at most this many bytes in all.
# A budget, not a measurement: 2048 MiB holds a merged copy of every linear weight of a ~1B-parameter bf16
# model. MINIPEFT_MERGED_CACHE_MB=0 turns "merged" off for path=None (inference then takes "cublas").
MERGED_CACHE_BYTES = int(float(os.environ.get("MINIPEFT_MERGED_CACHE_MB", "2048")) * 2**20)

PATHS = ("fused", "fused_tma", "cublas", "merged", "merged_train", "unfused")


def choose_path(M: int, N: int, K: int, x: torch.Tensor, weight: torch.Tensor,
                needs_grad: bool = True, has_mask: bool = False, compiling: bool = False) -> str:
    """The route "auto" takes for a call on CUDA tensors x (..., K) with M rows: the table of the module doc.

    Eager, no gradient wanted: "merged" ("cublas" with a dropout mask; ``lora_linear`` also falls back to
    "cublas" before the merged weight is cached). Eager, gradients wanted: "unfused" below FUSED_MIN_ROWS rows,
    then "fused_tma" where TMA applies, else "cublas". While torch.compile traces (``compiling``), the choice
    can use shapes only (no data pointers, no cache): for training calls from COMPILED_FUSED_MIN_ROWS rows on,
    "merged_train" for 16-bit layers without a mask up to MERGED_TRAIN_MAX_WIDTH features and from
    MERGED_TRAIN_MIN_ROWS rows, else "triton" (the custom op; it picks its GEMM kernel when it runs); below,
    or without a gradient, "unfused", whose ops Inductor fuses. The interpreter never runs here by choice: it
    is for tests that ask for "triton" by name.
    """
    if compiling:
        if not needs_grad or M < COMPILED_FUSED_MIN_ROWS:
            return "unfused"
        if (has_mask or x.dtype not in lora_triton.TMA_DTYPES or max(N, K) > MERGED_TRAIN_MAX_WIDTH
                or M < MERGED_TRAIN_MIN_ROWS):
            return "triton"
        return "merged_train"
    if not needs_grad:
        return "cublas" if has_mask else "merged"
    if M < FUSED_MIN_ROWS:
        return "unfused"
    if not INTERPRETING and lora_triton.tma_ready(x.reshape(-1, K), weight):
        return "fused_tma"
    return "cublas"


# --------------------------------------------------------------------------------------------------------
# "merged": W' = W + scaling·B·A, cached per weight tensor while W, A, B and scaling stay the same.
# --------------------------------------------------------------------------------------------------------
class _Merged:
    """One cache entry: the adapter state W' was built from (weak references + versions) and W' itself."""

    __slots__ = ("a_ref", "b_ref", "state", "merged")

    def __init__(self):
        self.a_ref = self.b_ref = None
        self.state = None          # (W's, A's and B's versions, scaling, A.shape, B.shape)
        self.merged = None         # (N, K) tensor, or None until the state is seen a second time


_MERGED: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()


def clear_cache() -> None:
    """Drop every cached merged weight (they are also dropped with their base weight tensor)."""
    _MERGED.clear()


def _state(weight, lora_A, lora_B, scaling: float) -> tuple | None:
    """What a cached W' was built from: the versions of W, A and B, scaling and the shapes; None for an
    inference tensor, which has no version."""
    versions = (version(weight), version(lora_A), version(lora_B))
    return None if None in versions else (*versions, scaling, lora_A.shape, lora_B.shape)


def _seen(entry: _Merged | None, state: tuple, lora_A, lora_B) -> bool:
    """Whether the cache entry was made from this adapter state (the same A and B tensors, unchanged)."""
    return entry is not None and entry.state == state and entry.a_ref() is lora_A and entry.b_ref() is lora_B


def _fits(weight) -> bool:
    """Whether one more W' the size of ``weight`` fits the byte budget beside the live entries (those of dead
    weights are gone from the cache)."""
    held = sum(e.merged.numel() * e.merged.element_size() for e in _MERGED.values() if e.merged is not None)
    return held + weight.numel() * weight.element_size() <= MERGED_CACHE_BYTES


def _merged_serves(weight, lora_A, lora_B, scaling: float) -> bool:
    """Whether a call now would be served by the merged weight (``_merged_weight`` without ``force`` returning
    one): W' cached for this adapter state, or the state seen once before and W' fitting the budget. Reads the
    cache, changes nothing."""
    state = _state(weight, lora_A, lora_B, scaling)
    if MERGED_CACHE_BYTES <= 0 or state is None:
        return False
    entry = _MERGED.get(weight)
    return _seen(entry, state, lora_A, lora_B) and (entry.merged is not None or _fits(weight))


def _merged_weight(weight, lora_A, lora_B, scaling: float, force: bool) -> torch.Tensor | None:
    """W + scaling·B·A (N, K) from the cache, or built now; None where the cache declines (see choose_path).

    A state is (the identities of A and B, the versions of W, A and B, scaling). Without ``force`` W' is built
    only on the second call in a row with one state, so a training step (A and B change every step) or an
    autocast that hands new A/B copies each call never pays an (N, K) rebuild per call. An inference tensor
    (made under torch.inference_mode) has no version (kernels/versions.py): nothing would tell a stale W' from
    a good one, so none is kept; ``force`` builds one for this call alone, else the cache declines.
    """
    state = _state(weight, lora_A, lora_B, scaling)
    if state is None:
        if not force:
            return None
        with torch.no_grad():
            return _addmm_merge(weight, lora_A, lora_B, scaling)
    entry = _MERGED.get(weight)
    if _seen(entry, state, lora_A, lora_B):
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
    if not force and not _fits(weight):  # counted here, on a rebuild only
        return None
    with torch.no_grad():
        entry.merged = _addmm_merge(weight, lora_A, lora_B, scaling).detach()
    return entry.merged


def _addmm_merge(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """The "merged" route's W' (built once per adapter state, on any device): fp32 accumulation of B·A and W in
    one BLAS call, one rounding to W's dtype: (N, r)·(r, K) + (N, K)."""
    return torch.addmm(weight, lora_B, lora_A, alpha=scaling)


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
# "merged_train": training on W' = W + scaling·B·A, built on every call (never cached: A and B change every
# step), so both base GEMMs are cuBLAS's own; the LoRA gradients come from the Triton thin passes.
#
#     forward:   S = x·Aᵀ (Triton shrink);  W' = W + scaling·B·A (one Triton pass);  Y = x·W'ᵀ + bias (cuBLAS)
#     backward:  G, dB, dbias from one pass over dY (Triton);  dX = dY·W' (the forward's W', cuBLAS);
#                dA = scaling·Gᵀ·x (Triton)
#
# Exact algebra, dY·W' = dY·W + scaling·(dY·B)·A; the only difference from the fused kernels is where W' is
# rounded: once to the weight's dtype, as the "merged" inference route rounds it (one rounding of each
# weight, an error of the size of the GEMM's own rounding of Y). No dropout mask: with one, x ⊙ mask feeds the
# low-rank branch only and the weights cannot be merged. Why it exists: at GPT-2's widths Triton's GEMM runs
# 1.1-1.3× cuBLAS's and a fused step loses that twice per layer (RESULTS.md, "A LoRA training step, kernel by
# kernel"); building W' costs a read and a write of W (3.5 MB at 768 × 2304). The backward multiplies by the
# forward's W', saved for it, rather than building it again: one weight-sized tensor per layer more between the
# forward and the backward (0.16 GiB at GPT-2 small), one read and write of W per layer less. An H100 step
# (2026-12-06, with dS/dB's `tl.assume`, two processes of each variant, 3 rounds each) went 0.937× → 0.946× the
# frozen floor by the median of per-round ratios, peak 3.03 → 3.19 GiB, within the rounds' spread (a later run
# with it gave 0.937×); what moved the step was building W' in one Triton pass (RESULTS.md, H100 2026-12-06).
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minipeft::lora_linear_merged_train", mutates_args=())
def merged_train_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y (..., N), S (M, r), W' (N, K)): S is kept for the backward's dB = scaling·dYᵀ·S, W' for its dX = dY·W'.
    The inputs share one dtype (``kernels.lora_linear`` checks it), and an enclosing autocast does not recast
    them in here."""
    with torch.autocast(x.device.type, enabled=False), torch.cuda.device_of(x):  # launch on x's GPU
        s = lora_triton.shrink(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), None, lora_A)     # (M, r)
        merged = lora_merge_triton.merge(weight, lora_A, lora_B, scaling)   # W' (N, K): one Triton pass over W
        return torch.nn.functional.linear(x, merged, bias), s, merged


@merged_train_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling):
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((math.prod(x.shape[:-1]), lora_A.shape[0])),
            weight.new_empty(weight.shape))


@torch.library.custom_op("minipeft::lora_linear_merged_train_backward", mutates_args=())
def merged_train_backward_op(
    dy: torch.Tensor, x: torch.Tensor, merged: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    s: torch.Tensor, scaling: float, need_x: bool, need_A: bool, need_B: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias) from the forward's W' (``merged``, N × K) and S; each one not asked for comes back
    empty (an op cannot return None)."""
    N, K = merged.shape
    M = math.prod(x.shape[:-1])
    x2d, dy2d = x.reshape(M, K), dy.reshape(M, N)                                     # (M, K), (M, N)
    if span(dy2d) >= OFFSET_LIMIT:  # a slice of a larger gradient: the switch checked M·N (kernels/limits.py)
        dy2d = dy2d.contiguous()
    empty = lambda: dy.new_empty(0)  # noqa: E731  (a fresh tensor each: outputs may not alias each other)
    d_x, d_a, d_b, d_bias = empty(), empty(), empty(), empty()
    with torch.autocast(dy.device.type, enabled=False), torch.cuda.device_of(dy):  # launch on dY's GPU
        if need_x:
            d_x = torch.mm(dy2d, merged).view(x.shape)
        if need_A or need_B:
            ws = lora_triton.workspace(M, N, K if need_A else 0, lora_A.shape[0], dy.device)  # one zero fill
            g, d_b, d_bias = lora_triton.dsdb(dy2d, lora_B, s, scaling, need_bias, ws)  # G, dB, dbias
            if need_A:
                d_a = lora_triton.da(g, x2d, None, lora_A.shape[0], scaling, lora_A.dtype, ws)
        elif need_bias:  # only the bias learns: no pass for G
            d_bias = dy2d.sum(0)
    return d_x, d_a, d_b if need_B else empty(), d_bias if need_bias else empty()


@merged_train_backward_op.register_fake
def _(dy, x, merged, lora_A, lora_B, s, scaling, need_x, need_A, need_B, need_bias):
    empty = lambda: dy.new_empty(0)  # noqa: E731
    return (dy.new_empty(x.shape) if need_x else empty(), lora_A.new_empty(lora_A.shape) if need_A else empty(),
            lora_B.new_empty(lora_B.shape) if need_B else empty(),
            dy.new_empty((merged.shape[0],)) if need_bias else empty())


def _merged_train_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling = inputs
    ctx.save_for_backward(x, output[2], lora_A, lora_B, output[1])        # x, W', A, B and S; not W
    ctx.scaling = scaling
    ctx.mark_non_differentiable(output[1], output[2])


def _merged_train_grads(ctx, dy, _ds, _dw):
    x, merged, lora_A, lora_B, s = ctx.saved_tensors
    need_x, _, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    d_x, d_a, d_b, d_bias = torch.ops.minipeft.lora_linear_merged_train_backward(
        dy, x, merged, lora_A, lora_B, s, ctx.scaling, need_x, need_A, need_B, need_bias)
    keep = lambda t, wanted: t if wanted else None  # noqa: E731
    return keep(d_x, need_x), None, keep(d_bias, need_bias), keep(d_a, need_A), keep(d_b, need_B), None


merged_train_op.register_autograd(_merged_train_grads, setup_context=_merged_train_setup)


# --------------------------------------------------------------------------------------------------------
# The route runner.
# --------------------------------------------------------------------------------------------------------
def _wants_grad(x, bias, lora_A, lora_B) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                        or (bias is not None and bias.requires_grad))


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
          lora_B: torch.Tensor, scaling: float, dropout_mask: torch.Tensor | None = None) -> str:
    """The path ``lora_linear`` (``path=None``) takes for this call if made now, the grad mode and the merged-weight
    cache as they are: ``choose_path``'s answer, except "cublas" where it says "merged" but the cache would not
    serve W' (the first call with an adapter state, an inference tensor, the byte budget full), and "unfused"
    for an empty x. Changes nothing."""
    if x.numel() == 0:
        return "unfused"
    K = x.shape[-1]
    path = choose_path(x.numel() // K, weight.shape[0], K, x, weight, _wants_grad(x, bias, lora_A, lora_B),
                       dropout_mask is not None, torch.compiler.is_compiling())
    if path == "merged" and not _merged_serves(weight, lora_A, lora_B, float(scaling)):
        return "cublas"
    return path


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
    """y = x·Wᵀ + bias + scaling·((x ⊙ mask)·Aᵀ)·Bᵀ on one route (inputs checked by ``kernels.lora_linear``).

    ``path``: None picks per call (``choose_path``); "fused" (Triton, pointer GEMM), "fused_tma" (Triton, TMA
    GEMM; Hopper), "cublas" (3 cuBLAS GEMMs forward, 5 backward), "merged" (one GEMM on a cached
    W + scaling·B·A; only without a mask and when no gradient is wanted), "merged_train" (training on W'
    built per call, the LoRA gradients by the Triton passes; no mask) or "unfused" (the reference's torch
    ops, autograd backward). "cublas", "merged" and "unfused" also run on CPU tensors; "fused" and
    "merged_train" run wherever the Triton backend does (the interpreter included).
    """
    needs_grad = _wants_grad(x, bias, lora_A, lora_B)
    if path is None:
        if x.numel() == 0:  # nothing to compute
            return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
        K = x.shape[-1]
        path = choose_path(x.numel() // K, weight.shape[0], K, x, weight, needs_grad, dropout_mask is not None,
                           torch.compiler.is_compiling())
        if path == "triton":
            return lora_triton.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
        if path == "merged_train":
            return torch.ops.minipeft.lora_linear_merged_train(x, weight, bias, lora_A, lora_B, float(scaling))[0]
        if path == "merged":
            merged = None if MERGED_CACHE_BYTES <= 0 else _merged_weight(weight, lora_A, lora_B, scaling, False)
            if merged is not None:
                return torch.nn.functional.linear(x, merged, bias)
            path = "cublas"
    elif path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    elif path == "merged_train":
        if dropout_mask is not None:
            raise ValueError("path 'merged_train' takes no dropout mask: x ⊙ mask feeds the low-rank branch only")
        return torch.ops.minipeft.lora_linear_merged_train(x, weight, bias, lora_A, lora_B, float(scaling))[0]
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
    if path == "unfused":
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_mask)
    if path == "fused_tma" and not lora_triton.tma_ready(x.reshape(-1, x.shape[-1]), weight):
        raise ValueError(f"path 'fused_tma' needs fp16/bf16 CUDA tensors on Hopper or newer, x and the weight with "
                         f"unit last stride and 16-byte aligned rows, and out_features · {weight.element_size()} "
                         f"bytes a multiple of 16 (dY's rows); got x {x.dtype} {tuple(x.shape)} on {x.device}, "
                         f"weight {tuple(weight.shape)} with strides {weight.stride()}")
    return lora_triton.apply(x, weight, bias, lora_A, lora_B, float(scaling), dropout_mask, path == "fused_tma")
