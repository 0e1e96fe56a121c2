"""The "auto" backend on CUDA for a mixed-adapter batch: which route runs, and the one route that is not a Triton
kernel — every sequence's adapter gathered, then two batched GEMMs (punica's BGMV idea,
https://arxiv.org/abs/2310.18547, on cuBLAS).

When every sequence of a batch x (B, L, K) uses one adapter (a server's requests; ``pm(idx,
adapter_names=[...])`` names one adapter per row of idx), each sequence can get its own copy of its adapter's
factors, and the low-rank terms of the whole batch become two batched matrix products, whatever the number of
adapters:

    stack  (once per packing):  Â (n+2, R, K): slot 0 zero, slot i+1 = A_i with zero rows up to the largest
                                               rank R, slot n+1 zero
                                B̂ (n+2, R, N): the same with s_i·B_iᵀ       (kept side by side: [Â | B̂])
    gather (once per index):    A_b = Â[j_b] (B, R, K),  B_b = B̂[j_b] (B, R, N)    j_b = clamp(i_b + 1, 0, n+1):
                                                          sequence b's adapter i_b, and a zero slot for -1 (none)
                                                          or any value outside [0, n); one index_select
    every call:                 y  = x·Wᵀ + bias     (B, L, N)   cuBLAS, every row
                                S  = x·A_bᵀ          (B, L, R)   one batched GEMM (bmm), rounded to x's dtype
                                y += S·B_b           (B, L, N)   one batched GEMM, in place (baddbmm_)

The zero padding adds exactly nothing, and a row without an adapter multiplies by a zero slot. Three launches
per layer, as many as one adapter's unmerged LoRA (the "cublas" route of lora_routes.py): a decode step of a
mixed batch then costs the host what a single-adapter step does, where the segmented Triton kernels
(multi_lora_triton.py) pay a Python launch of ~20 arguments that costs more than the GPU work at a decode
step's 64 rows. The price is memory: the gathered factors hold B·R·(K + N) values per layer (64 sequences of
r = 16 at 768 → 2304: 6.3 MB in bf16), one copy per sequence instead of one per adapter. A caller that runs
several calls on one batch gathers once (``gather_adapters``) and passes the copies in: ``PeftModel.generate``
gathers once per layer for its whole call, and each new token runs the three launches alone — so a call holds
every layer's copies at once (GPT-2 small, 64 sequences, r = 16: 302 MB), and so does the stack each packing
keeps (n+2 slots a layer).

CUDA graphs: a captured call reads the stack the warm-up made. Warm up before capturing (the stack is made on a
first call, with a host→device copy a capture cannot hold), and capture again after changing the adapters. A
packing of inference tensors (made under torch.inference_mode) keeps no stack, so it cannot be captured.

What "auto" runs for CUDA tensors (``choose_route``; benchmarks/RESULTS.md, "Many adapters in one batch"):

| the call                                                    | route      | measured (H200, GPT-2 small, 64 rows)  |
|-------------------------------------------------------------|------------|----------------------------------------|
| no gradient wanted, one adapter per sequence (index (B,)    | "gathered" | decode faster than the Triton kernels  |
| for x (B, L, K), or (M,) for x (M, K)), gathered factors ≤  |            | in every run (N=64: 0.94-1.11× one     |
| GATHER_MAX_BYTES, not while torch.compile traces            |            | adapter against 1.05-1.31×); prefill   |
|                                                             |            | within the runs' spread of them        |
| otherwise: training, an index per token, a batch too large  | "triton"   | the segmented kernels: one or two      |
| to gather                                                   |            | launches a layer for all adapters      |

Where the table says "triton" but the kernels' 32-bit offsets cannot reach the call, "auto" takes the reference
instead (the switch decides: kernels/__init__.py, ``_multi_too_large``). CPU tensors never reach this module (the
switch sends them to the reference); the functions below are plain torch and run on any device, which is how the
CPU tests check them against the reference.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.utils.weak

from .reference import PackedAdapters
from .versions import version

__all__ = ["DTYPES", "GATHER_MAX_BYTES", "AdapterStack", "GatheredAdapters", "choose_route",
           "stack_adapters", "gather_adapters", "multi_lora_linear_gathered", "clear_cache"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # "auto" on CUDA; float64 goes to the reference

# A budget, not a measurement: the gathered factors of one layer, B·R·(K + N) values. 256 MiB holds 256 sequences
# of r = 64 at 4096 → 4096 in bf16 (a generate keeps one such copy per layer for the whole call).
# MINIPEFT_GATHER_MAX_MB=0 sends every call to the Triton kernels.
GATHER_MAX_BYTES = int(float(os.environ.get("MINIPEFT_GATHER_MAX_MB", "256")) * 2**20)


class AdapterStack(NamedTuple):
    """n adapters padded to one rank, between two zero slots (``stack_adapters``); Â and B̂ side by side in one
    tensor, so that one gather copies both."""

    ab: torch.Tensor  # (n+2, R, K + N)  [Â | B̂]: slot 0 zero, slot i+1 = [A_i | s_i·B_iᵀ] over zero rows
    K: int            # where Â ends and B̂ begins


class GatheredAdapters(NamedTuple):
    """Each sequence's adapter (``gather_adapters``)."""

    a: torch.Tensor  # (B, R, K)
    b: torch.Tensor  # (B, R, N)


def choose_route(x: torch.Tensor, adapter_index: torch.Tensor, adapters: PackedAdapters, needs_grad: bool) -> str:
    """The route "auto" takes for a call on CUDA tensors: the table of the module docstring."""
    if needs_grad or torch.compiler.is_compiling():
        return "triton"
    per_sequence = adapter_index.dim() == 1 and x.dim() >= 2 and adapter_index.shape[0] == x.shape[0]
    if not per_sequence:
        return "triton"
    R, N, K = max(adapters.ranks), adapters.b_cat.shape[0], adapters.a_cat.shape[1]
    if x.shape[0] * R * (K + N) * x.element_size() > GATHER_MAX_BYTES:
        return "triton"
    return "gathered"


def stack_adapters(adapters: PackedAdapters) -> AdapterStack:
    """Â (n+2, R, K) and B̂ (n+2, R, N) from the packed adapters: two scatters into zeros, the scalings folded
    into B̂ (one rounding to the dtype, as ``scaling·B`` would be)."""
    a_cat, b_cat, ranks, scalings = adapters
    n, R = len(ranks), max(ranks)
    K, N = a_cat.shape[1], b_cat.shape[0]
    # Row j of a_cat belongs to adapter i at rank position j - rank_start[i]: its place in the (n+2)·R stack.
    slot = [(i + 1) * R + j for i, r in enumerate(ranks) for j in range(r)]             # (Σr,) host list
    slot = torch.tensor(slot, dtype=torch.long, device=a_cat.device)
    wide = torch.promote_types(b_cat.dtype, torch.float32)  # s_i·B_i in fp32 (fp64 for fp64), rounded once
    scale = torch.tensor([s for s, r in zip(scalings, ranks, strict=True) for _ in range(r)],
                         dtype=wide, device=a_cat.device)                               # (Σr,) s_i per row
    ab = a_cat.new_zeros((n + 2) * R, K + N)                                            # ((n+2)·R, K + N)
    ab[:, :K].index_copy_(0, slot, a_cat)                                               # Â
    ab[:, K:].index_copy_(0, slot, (b_cat.t().to(wide) * scale[:, None]).to(b_cat.dtype))  # B̂: s_i·B_iᵀ
    return AdapterStack(ab.view(n + 2, R, K + N), K)


def gather_adapters(adapters: PackedAdapters, adapter_index: torch.Tensor) -> GatheredAdapters:
    """Each sequence's adapter: (B, R, K) and (B, R, N) from index (B,), -1 (or any value outside [0, n)) → a
    zero slot. Three small launches (one gather copies A and B); the stack they read is made once per packing
    and kept (``_stack``)."""
    stack = _stack(adapters)
    slot = (adapter_index + 1).clamp_(0, stack.ab.shape[0] - 1)                         # (B,) in [0, n+1]
    rows = stack.ab.index_select(0, slot)                                               # (B, R, K + N)
    return GatheredAdapters(rows[..., :stack.K], rows[..., stack.K:])                   # views


def multi_lora_linear_gathered(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: PackedAdapters,
    adapter_index: torch.Tensor,
    gathered: GatheredAdapters | None = None,
) -> torch.Tensor:
    """y[b, l] = x[b, l]·Wᵀ + bias + s_i·(x[b, l]·A_iᵀ)·B_iᵀ with i = adapter_index[b]: the "gathered" route.

    x (B, ..., K) with adapter_index (B,), one adapter per sequence (x (M, K) with (M,): one per row); the rest as
    ``kernels.multi_lora_linear_packed`` (which checks the inputs). No autograd: this route serves inference.
    ``gathered``: ``gather_adapters(adapters, adapter_index)`` made by the caller for several calls on one
    batch (it must be of this index: a copy gathered before the index changed serves the old adapters); None
    gathers in the call.
    """
    N, K = weight.shape
    B = x.shape[0]
    x3d = x.reshape(B, math.prod(x.shape[1:-1]), K)                          # (B, L, K)
    rows = gather_adapters(adapters, adapter_index) if gathered is None else gathered  # (B, R, K), (B, R, N)
    y = torch.nn.functional.linear(x3d, weight, bias)                        # (B, L, N) the base: cuBLAS
    s = torch.bmm(x3d, rows.a.transpose(1, 2))                               # (B, L, R) S = x·A_bᵀ
    y.baddbmm_(s, rows.b)                                                    # (B, L, N) += S·B_b
    return y.view(*x.shape[:-1], N)


# --------------------------------------------------------------------------------------------------------
# The stack, kept per packing: a server (or PeftModel, between calls without autograd) reuses one packing for
# many batches, and the stack is what each batch gathers from. Weak keys: an entry goes with its packed tensors;
# versions catch an in-place change. A packing of inference tensors (made under torch.inference_mode) has no
# versions (kernels/versions.py): its stack is made on every call and never kept, so a capture cannot hold it.
# --------------------------------------------------------------------------------------------------------
class _Entry(NamedTuple):
    b_ref: torch.utils.weak.WeakIdRef  # the b_cat the stack was made from
    state: tuple                       # (a_cat's version, b_cat's version, ranks, scalings)
    stack: AdapterStack


_STACKS: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()  # a_cat → _Entry
# Stacks a captured CUDA graph reads, by id (each held once, however many captures read it): a graph keeps addresses,
# not references, so these are never freed.
_HELD_BY_GRAPHS: dict[int, AdapterStack] = {}


def clear_cache() -> None:
    """Drop every kept stack (they also go with their packed tensors)."""
    _STACKS.clear()


def _capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured and t is a CUDA tensor."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _stack(adapters: PackedAdapters) -> AdapterStack:
    a_cat, b_cat = adapters.a_cat, adapters.b_cat
    state = (version(a_cat), version(b_cat), adapters.ranks, adapters.scalings)
    keep = None not in state[:2]  # inference tensors: no versions, so nothing kept (see above)
    entry = _STACKS.get(a_cat) if keep else None
    capturing = _capturing(a_cat)
    if entry is None or entry.state != state or entry.b_ref() is not b_cat:
        if capturing:
            why = ("packed from inference tensors (made under torch.inference_mode), whose in-place changes cannot be "
                   "seen, so it is made on every call: pack under torch.no_grad instead" if not keep else
                   "made on a first call: run the call once before capturing, and capture again after changing "
                   "the adapters")
            raise RuntimeError(f"the gathered route's stack of adapters needs a host→device copy, which a CUDA graph "
                               f"capture cannot hold; this one is {why}")
        with torch.no_grad():
            entry = _Entry(torch.utils.weak.WeakIdRef(b_cat), state, stack_adapters(adapters))
        if keep:
            _STACKS[a_cat] = entry
    elif capturing:
        _HELD_BY_GRAPHS[id(entry.stack)] = entry.stack  # never freed: the graph gathers from it at every replay
    return entry.stack
