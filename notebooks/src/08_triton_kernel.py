# %% [markdown]
# # Chapter 8 — The Triton kernel: LoRA inside the GEMM
#
# Every LoRA layer of minipeft calls one function, `kernels.lora_linear`:
#
# $$Y = xW^\top + b + s\,\big((x \odot m)A^\top\big)B^\top,\qquad x\in\mathbb{R}^{M\times K},\;
# W\in\mathbb{R}^{N\times K},\; A\in\mathbb{R}^{r\times K},\; B\in\mathbb{R}^{N\times r},$$
#
# with s = α/r and m an optional dropout mask. Two backends implement it with one signature: `kernels/reference.py`
# (three GEMMs, a scale and an add, as torch ops) and `kernels/lora_triton.py` (Triton kernels that fold the
# low-rank term into the base matrix multiply). This chapter shows the blocked matmul, the fused-LoRA idea and its
# byte count, runs the real kernel (in the Triton interpreter when there is no GPU), swaps the backend under a whole
# model, and then reads what was measured on GPUs: one layer on an H100, where a layer's GPU time goes on an H200,
# and what the kernel changes in a whole GPT-2-small training run on the H200 — each against its target, met or not
# — and last compiles the kernel for an H100/H200 to read the instructions a GPU would run.
#
# Sources: LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685); the split S = x·Aᵀ first, then the
# low-rank term in the GEMM, follows LoRAFusion (https://arxiv.org/abs/2510.00206); the blocked matmul follows
# Triton's matrix-multiplication tutorial
# (https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html).
#
# ### Words this chapter uses
#
# - **Tiling** (section 1): the output Y is cut into tiles of BM × BN; one GPU *program* computes one tile,
#   walking the shared dimension K in slabs of BK, so each slab of x and W is loaded into fast on-chip memory
#   once and reused by the whole tile.
# - **MMA**, matrix multiply-accumulate (sections 2–3): the tensor-core operation `acc += a·b` on small tiles of
#   fp16/bf16 with an fp32 accumulator; Triton's `tl.dot` compiles to it. "One more MMA step" = one more `tl.dot`
#   into the same accumulator.
# - **Epilogue** (sections 2–3): what a GEMM program does with its finished accumulator before the one write of
#   its tile — add the bias, cast to bf16, and here add the low-rank term. Work done there needs no extra pass
#   over Y.
# - **TMA**, Hopper's tensor memory accelerator (sections 3 and 5): a copy engine on H100/H200 GPUs that moves a
#   whole tile between global and shared memory from one descriptor (address, shape, strides) instead of every
#   thread computing its own addresses. `lora_triton` has a TMA GEMM for Hopper and a pointer-load GEMM that
#   runs anywhere, the CPU interpreter included.
# - **Autotuning** (section 5): on the first call with a new shape, time several kernel configurations (tile
#   sizes, warps, pipeline stages) and keep the fastest. `MINIPEFT_KERNEL_AUTOTUNE=0` runs one fixed config,
#   which can be far from the best.
# - **Host-bound** (section 5): the GPU finishes each op before Python and the launch path (the *host*) can
#   launch the next one, so it waits. Time then counts ops, not FLOPs or bytes. **CUDA graphs** remove this:
#   a step's launches are recorded once and replayed by one call.
# - **Frozen floor** (section 5): the least a LoRA layer can cost with its base frozen — the base forward plus
#   the dX GEMM of the backward, no LoRA at all; for a whole training step, the same model with no adapters.
#   "× floor" is a time (or a throughput) against it.

# %%
# The Triton interpreter runs kernels on CPU tensors with NumPy. Triton reads TRITON_INTERPRET when a kernel
# is decorated, i.e. when `kernels` is imported, so it must be set first (kernels/__init__.py says why).
import os

import course
import torch

course.setup(seed=0)  # seeds, one thread (in a Jupyter kernel on 2 cores, 2 OpenMP threads made small ops far slower)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:  # on a GPU: one fixed kernel config; the checks below test correctness, so tuning would only cost time
    os.environ.setdefault("MINIPEFT_KERNEL_AUTOTUNE", "0")

from minipeft import kernels  # noqa: E402  (after the environment variable, on purpose)

# ruff: noqa: E402  (every later import follows the environment set-up above)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print("device:", DEVICE, "| TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET", "0"))
print("backends:", kernels.available_backends())

# %%
# %matplotlib inline
import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
from checks.ch08 import check_host_ms_removed, check_lora_forward, check_lowrank_flops, check_shrink_bytes

from minipeft.data import build_world, corpus_tokens, pretraining_batch, pretraining_corpus
from minipeft.kernels import lora_routes, lora_triton, reference
from minipeft.model import GPT, LOSS_CHUNK_BYTES, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, get_peft_model

NOTEBOOK_START = time.perf_counter()
REPO = Path(kernels.__file__).resolve().parents[1]


def show(header, rows):
    """Print rows (lists of cells) under `header` as a plain-text table, every column right-aligned."""
    lines = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for j, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


# %% [markdown]
# ## 1. The blocked matmul, as pseudo-code that runs
#
# A GPU computes Y = x·Wᵀ by tiling: each program owns one (BM × BN) tile of Y, keeps an fp32 accumulator
# for it in registers, and walks K in steps of BK, loading a (BM × BK) slab of x and a (BN × BK) slab of W per
# step. Each tile of Y is written to memory **once**. A few lines of Python do the same on the CPU:

# %%
def blocked_matmul(x, W, BM=16, BN=16, BK=8):
    """Y = x·Wᵀ, one (BM, BN) output tile at a time, accumulating over K in BK steps (the tutorial's loop)."""
    M, K = x.shape
    N = W.shape[0]
    Y = torch.empty(M, N)
    for m in range(0, M, BM):
        for n in range(0, N, BN):                       # on a GPU: one program per (m, n) tile
            acc = torch.zeros(min(BM, M - m), min(BN, N - n))  # fp32, lives in registers
            for k in range(0, K, BK):
                acc += x[m:m + BM, k:k + BK] @ W[n:n + BN, k:k + BK].T   # one MMA step
            Y[m:m + BM, n:n + BN] = acc                 # the only write of this tile
    return Y


x = torch.randn(40, 24)  # M = 40, K = 24: neither a multiple of the tiles, so the edges are exercised
W = torch.randn(36, 24)  # N = 36
blocked_err = (blocked_matmul(x, W) - x @ W.T).abs().max().item()
course.claim(blocked_err < 1e-4, f"the tiled loop computes x·Wᵀ: max |blocked − x·Wᵀ| = {blocked_err:.1e}, fp32 "
                                 f"rounding of a different summation order")

# %% [markdown]
# ## 2. The fused-LoRA idea
#
# The unfused LoRA layer (the reference) runs the base GEMM, then S = x·Aᵀ, then T = S·Bᵀ, then s·T, then
# Y + s·T: T = S·Bᵀ writes a full (M × N) tensor, s·T reads one and writes one, and Y + s·T reads two and writes
# the sum. The fused kernel first computes the thin
# S = (x ⊙ m)·Aᵀ (M × r, a "shrink" pass over x), then, in the epilogue of each tile of Y, adds **one more MMA
# step** to the accumulator before the tile is written — `acc += s · S[m-block] · B[n-block]ᵀ`, an
# (BM × r)·(r × BN) product. The same loop, with that one extra line, agrees with the reference:

# %%
def blocked_lora(x, W, bias, A, B, scaling, BM=16, BN=16, BK=8):
    """Y = x·Wᵀ + bias + scaling·(x·Aᵀ)·Bᵀ with the low-rank term folded into each tile's accumulator."""
    M, K = x.shape
    N = W.shape[0]
    S = x @ A.T                                          # kernel 1, "shrink": (M, r), one pass over x
    Y = torch.empty(M, N)
    for m in range(0, M, BM):
        for n in range(0, N, BN):
            acc = torch.zeros(min(BM, M - m), min(BN, N - n))
            for k in range(0, K, BK):
                acc += x[m:m + BM, k:k + BK] @ W[n:n + BN, k:k + BK].T
            acc += scaling * S[m:m + BM] @ B[n:n + BN].T  # epilogue: the whole LoRA branch, one more MMA step
            Y[m:m + BM, n:n + BN] = acc + bias[n:n + BN]
    return Y


A, B, bias = torch.randn(4, 24), torch.randn(36, 4), torch.randn(36)  # r = 4
ref = reference.lora_linear(x, W, bias, A, B, 2.0)  # (40, 36)
epilogue_err = (blocked_lora(x, W, bias, A, B, 2.0) - ref).abs().max().item()
course.claim(epilogue_err < 1e-4, f"one more MMA step per tile adds the whole LoRA branch: max |blocked LoRA − "
                                  f"kernels.reference| = {epilogue_err:.1e}")

# %% [markdown]
# ### What fusion saves: count the bytes and the FLOPs
#
# Compulsory memory traffic of each op (every operand read once, every result written once; element size e),
# for the shape of the H100 layer benchmark of section 5 (K = N = 4096, r = 16, bf16: e = 2 bytes):
#
# | route | ops | bytes moved |
# |---|---|---|
# | base linear | x·Wᵀ | e·(MK + NK + MN) |
# | unfused (reference) | x·Wᵀ; S = x·Aᵀ; T = S·Bᵀ; s·T; Y + s·T | e·(2MK + NK + rK + 2Mr + Nr + **7MN**) |
# | fused (Triton) | shrink S; GEMM with S·(sB)ᵀ in the epilogue | e·(2MK + NK + rK + 2Mr + Nr + **MN**) |
#
# Fusion removes 6·M·N elements of traffic: T written; T read and s·T written; Y and s·T read and the sum
# written — only the one write of Y remains. It removes almost no FLOPs: the low-rank term costs 2Mr(K + N) on
# either route, a fraction r(K + N)/(NK) of the base GEMM's 2MNK.

# %%
K_BENCH = N_BENCH = 4096
R_BENCH = 16
E = 2  # bytes per bf16 element


def traffic_bytes(M, N=N_BENCH, K=K_BENCH, r=R_BENCH, e=E):
    """(base, unfused, fused) compulsory bytes of one LoRA layer's forward: the table above."""
    base = e * (M * K + N * K + M * N)
    lora_small = e * (M * K + r * K + 2 * M * r + N * r)   # the second read of x, A, S written + read, B
    return base, base + lora_small + e * 6 * M * N, base + lora_small


MS = (1, 16, 256, 4096, 16384)
traffic = {M: traffic_bytes(M) for M in MS}
print(f"LoRA FLOPs on top of the base GEMM: r(K+N)/(NK) = "
      f"{R_BENCH * (K_BENCH + N_BENCH) / (N_BENCH * K_BENCH):.2%} (the same fused or not)\n")
show(["M", "base MB", "unfused MB", "fused MB", "saved MB", "unfused/base", "fused/base"],
     [[M, f"{b / 1e6:.1f}", f"{u / 1e6:.1f}", f"{f / 1e6:.1f}", f"{(u - f) / 1e6:.1f}", f"{u / b:.2f}",
       f"{f / b:.2f}"] for M, (b, u, f) in traffic.items()])

small_saved = max((u - f) / u for M, (b, u, f) in traffic.items() if M <= 256)
b, u, f = traffic[max(MS)]
print(f"\nAt M ≤ 256 the weight W ({N_BENCH * K_BENCH * E / 2**20:.0f} MiB) dominates every route's traffic: fusion "
      f"saves at most {small_saved:.0%} of the unfused bytes. At M = {max(MS)} the unfused route moves {u / b:.2f}× "
      f"the base's bytes and the fused one {f / b:.2f}×.")

# %% [markdown]
# Bytes only matter when the GEMM waits on memory, which section 5 checks against measured times.
#
# ## 3. The real kernel in the interpreter
#
# `kernels/lora_triton.py` holds the kernels: "shrink" (S), the GEMM with the low-rank epilogue (forward, and
# again for dX = dY·W + m ⊙ (s·G·A) in the backward), "dS/dB" (one pass over dY gives G = dY·B, dB and dbias)
# and "dA". Its module docstring has the full pseudo-code. `lora_triton.lora_linear` has the reference's
# arguments and runs those kernels on every call (the pointer-load GEMM here — the one the interpreter can run;
# a Hopper GPU with fp16/bf16 takes the TMA version). Here they are against the reference on small fp32 shapes,
# forward and all four gradients, with and without a dropout mask (odd sizes, so the tile edges are exercised):

# %%
def compare_fused(M, K, N, r, with_mask, scaling=2.0, device=DEVICE):
    """max |Triton − reference| of (Y, dx, dbias, dA, dB) for one random problem of this shape."""
    g = torch.Generator().manual_seed(M * 1000 + K)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x, W, b = rnd(M, K), rnd(N, K) / K ** 0.5, rnd(N)
    A, B = rnd(r, K) / K ** 0.5, rnd(N, r) / r ** 0.5
    mask = (torch.rand(M, K, generator=g) > 0.1).float().div(0.9).to(device) if with_mask else None
    dy = rnd(M, N)
    out = {}
    for name, fn in [("triton", lora_triton.lora_linear), ("reference", reference.lora_linear)]:
        leaves = [t.clone().requires_grad_(True) for t in (x, b, A, B)]
        xl, bl, Al, Bl = leaves
        y = fn(xl, W, bl, Al, Bl, scaling, mask)
        out[name] = (y, *torch.autograd.grad(y, leaves, dy))
    return [(t - r_).abs().max().item() for t, r_ in zip(out["triton"], out["reference"], strict=True)]


start = time.perf_counter()
errors = {(M, K, N, r, with_mask): compare_fused(M, K, N, r, with_mask)
          for M, K, N, r, with_mask in [(1, 48, 40, 4, False), (37, 64, 80, 8, True), (64, 96, 72, 16, False)]}
print("max |Triton − reference|, fp32:")
show(["M, K, N, r", "mask", "Y", "dx", "dbias", "dA", "dB"],
     [[f"{M}, {K}, {N}, {r}", with_mask, *(f"{e:.1e}" for e in errs)]
      for (M, K, N, r, with_mask), errs in errors.items()])
worst = max(max(errs) for errs in errors.values())
print(f"({time.perf_counter() - start:.1f} s for {len(errors)} shapes in the interpreter)")
course.claim(worst < 1e-4, f"the Triton kernels' output and all four gradients match the reference on "
                           f"{len(errors)} shapes, with and without a dropout mask: worst |Δ| {worst:.1e} (the fp32 "
                           f"dots run in 'ieee' precision)")

# %% [markdown]
# The errors are fp32 rounding: the kernels sum in a different order (tiles, and atomics for dA/dB). On the
# CPU each `tl.dot` runs as NumPy in the interpreter, one program at a time — correct, and far slower than the
# reference, so the interpreter is for checking, never for training.
#
# ## 4. One switch for the whole model
#
# A LoRA-wrapped GPT calls `kernels.lora_linear` in every adapted Linear, so one context manager switches all
# of them. A tiny GPT (2 layers, width 32; random init, because the interpreter is slow), LoRA r = 4 on every
# Linear, three AdamW steps on text from the built-in corpus from the same starting weights, once per
# backend. The autograd graph names the code that ran: in eager mode the Triton backend is one
# `autograd.Function` per layer, `_EagerLoraTriton`, whose backward node is named after it; the reference shows
# as plain `AddmmBackward`/`MmBackward` nodes. (While torch.compile traces, the same kernels run as a registered
# custom op, `minipeft::lora_linear_triton`, so the compiled graph holds one opaque node per layer instead of a
# graph break; eager mode skips the op's dispatch because it costs host time on every call.)

# %%
tok = ByteTokenizer()
stream = corpus_tokens(pretraining_corpus(build_world(0), 40, 0), tok)
TINY = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny_lora_gpt():
    torch.manual_seed(0)
    model = get_peft_model(GPT(TINY), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at 0 (LoRA's init); give it values so the LoRA branch matters from step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.to(DEVICE)


def graph_nodes(loss):
    """Names of the autograd nodes behind `loss` (a walk of grad_fn.next_functions)."""
    seen, todo, names = set(), [loss.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def batch(g):
    idx, targets = pretraining_batch(stream, 2, 32, g)
    return idx.to(DEVICE), targets.to(DEVICE), None


runs = {}
for backend in ("reference", "triton"):
    model = tiny_lora_gpt()
    with kernels.use_backend(backend):
        idx, targets, _ = batch(torch.Generator().manual_seed(123))
        _, loss = model(idx, targets)
        fused_nodes = sum("LoraTriton" in name for name in graph_nodes(loss))
        start = time.perf_counter()
        result = train(model, batch, TrainConfig(steps=3, lr=1e-2, batch_size=2, warmup_steps=0),
                       progress=False)
        seconds = time.perf_counter() - start
    runs[backend] = dict(losses=result.losses, seconds=seconds, fused=fused_nodes,
                         params={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

n_lora = sum(1 for n in runs["reference"]["params"] if "lora_A" in n)
LORA_PER_BLOCK = n_lora // TINY.n_layer  # every Linear of a block: attention's c_attn and c_proj, the MLP's two
print(f"{n_lora} LoRA layers ({LORA_PER_BLOCK} per block); Triton nodes in one loss graph: "
      f"reference {runs['reference']['fused']}, triton {runs['triton']['fused']}")
for step, (a, b) in enumerate(zip(runs["reference"]["losses"], runs["triton"]["losses"], strict=True)):
    print(f"step {step}: loss reference {a:.6f}   triton {b:.6f}   |Δ| = {abs(a - b):.1e}")
drift = max((runs["reference"]["params"][n] - runs["triton"]["params"][n]).abs().max().item()
            for n in runs["reference"]["params"])
print(f"after 3 AdamW steps, max |Δ| over every LoRA weight = {drift:.1e}")
loss_gap = max(abs(a - b) for a, b in zip(runs["reference"]["losses"], runs["triton"]["losses"], strict=True))
course.claim(runs["triton"]["fused"] == n_lora and runs["reference"]["fused"] == 0 and loss_gap < 1e-4 and drift < 1e-4,
             f"the switch reaches every layer: the 'triton' loss graph has {runs['triton']['fused']} Triton nodes, one "
             f"per LoRA layer, the 'reference' graph none; the 3-step runs agree to {loss_gap:.1e} in the loss and "
             f"{drift:.1e} in the weights")

# %% [markdown]
# Same losses, same weights after training, to fp32 rounding. The "triton" backend runs the kernels on every
# call, on a GPU too: a backend name is a promise. The default backend, "auto", is the one that chooses per
# call (`lora_routes.choose_path`): on a GPU, inference multiplies by a cached merged weight W' = W + s·B·A (the
# LoRA chapter's merge, done automatically); an eager training call takes the reference's ops below
# `lora_routes.FUSED_MIN_ROWS` rows and the Triton kernels above; under `torch.compile`, from
# `lora_routes.COMPILED_FUSED_MIN_ROWS` rows on, the Triton op, except that from `lora_routes.MERGED_TRAIN_MIN_ROWS`
# rows a 16-bit layer without dropout and at most `lora_routes.MERGED_TRAIN_MAX_WIDTH` features wide trains on the
# merged weight built on every call (cuBLAS for the two big products, the Triton passes for the LoRA gradients:
# section 5.4).
# Those thresholds come from the measurements below. On the CPU "auto" always runs the reference.
#
# ## 5. Is it fast? What was measured on GPUs
#
# The chapter reads the numbers committed in `benchmarks/RESULTS.md` (on a CPU there is nothing to time; on a GPU
# you can rerun them), where each run has its own section with the device, versions, date and the command that
# produced it. A script may have changed since an older section's run: that section then gives today's command. Two
# small helpers read it: `results_section` finds a section by the start of its heading, `results_table` turns one
# markdown table into a list of rows, each a dict from column header to cell text, and `num` takes the first number
# out of a cell.

# %%
RESULTS_MD = (REPO / "benchmarks" / "RESULTS.md").read_text()


def results_section(heading):
    """The first section of RESULTS.md whose '## ' heading starts with `heading`, heading line included."""
    return next(s for s in RESULTS_MD.split("\n## ") if s.startswith(heading))


def results_table(section, n=0):
    """The n-th markdown table of `section` as a list of dicts {column header: cell text}, bold marks dropped."""
    block = re.findall(r"(?:^\|.*\n)+", section, flags=re.MULTILINE)[n]   # a run of lines starting with '|'
    head, _rule, *body = [[c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
                          for line in block.splitlines()]
    return [dict(zip(head, cells, strict=True)) for cells in body]


def run_line(section):
    """'date · device · versions' from the line under a section's heading (the command after it dropped)."""
    return section.splitlines()[2].split(" · `")[0].rstrip(" ·")


def num(cell):
    """The first number in a table cell: '131,506' → 131506.0, '1.00 (merged)' → 1.0, '92.8: 44.9 + …' → 92.8."""
    return float(re.search(r"\d[\d,]*(?:\.\d+)?", cell).group().replace(",", ""))


def span(values, fmt=".2f", unit="×"):
    """'1.06–1.12×' for several values, '1.06×' for one."""
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}{unit}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}–{hi:{fmt}}{unit}"


def verdict(value, limit, at_most=True):
    """'met' or 'not met' for a measured value against a target limit (≤ limit, or ≥ limit)."""
    return "met" if (value <= limit if at_most else value >= limit) else "not met"


# %% [markdown]
# ### 5.1 One layer, K = N = 4096, on an H100
#
# `benchmarks/lora_kernel.py` timed every route of one LoRA layer (bf16, K = N = 4096, r = 16) against the
# cuBLAS base linear `F.linear(x, W)` measured in the same run: the forward alone, then forward + backward
# against the frozen floor. "backend, inference" is the merged-weight route "auto" takes without gradients;
# "backend, final dispatch" is the route "auto" takes for training today (the reference's ops below
# `FUSED_MIN_ROWS`, the fused Triton kernels above). The forward of a training call takes the same route, so its
# column at small M is "unfused (reference)". The targets its first version was built to reach (the runs at
# GPT-2's widths in RESULTS.md ask ≤ 1.05× of the forward at M ≥ 4096):
#
# - forward ≤ 1.15× the base at M ≤ 256 and ≤ 1.03× at M ≥ 4096;
# - forward + backward ≤ 1.10× the frozen floor.

# %%
TARGET_FWD_SMALL_M = 1.15   # forward ≤ 1.15× the cuBLAS base at M ≤ 256
TARGET_FWD_LARGE_M = 1.03   # forward ≤ 1.03× the cuBLAS base at M ≥ 4096
TARGET_FWD_BWD = 1.10       # forward + backward ≤ 1.10× the frozen floor

layer_md = results_section("LoRA kernel")
LAYER_SOURCE = run_line(layer_md)
fwd = {int(row["M"]): {k: num(v) for k, v in row.items()} for row in results_table(layer_md, 0)}
fb = {int(row["M"]): {k: num(v) for k, v in row.items()} for row in results_table(layer_md, 1)}
host = {int(row["M"]): {k: num(v) for k, v in row.items()} for row in results_table(layer_md, 2)}
FWD_COLS = ["unfused (reference)", "peft LoRA", "Triton GEMM alone, TMA (untuned)", "fused_tma (untuned)",
            "backend, inference"]
FB_COLS = ["unfused (reference)", "peft LoRA", "fused_tma (untuned)", "backend, final dispatch"]

print("source: benchmarks/RESULTS.md —", LAYER_SOURCE, "\n\nforward, time ÷ cuBLAS base linear:")
show(["M", "base µs", *FWD_COLS], [[M, row["base µs"], *(f"{row[c]:.2f}×" for c in FWD_COLS)]
                                   for M, row in fwd.items()])
print("\nforward + backward (dx, dA, dB), time ÷ frozen floor (base forward + dX GEMM):")
show(["M", "floor µs", *FB_COLS], [[M, row["floor µs"], *(f"{row[c]:.2f}×" for c in FB_COLS)]
                                   for M, row in fb.items()])

# %%
fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
for ax, rows, cols, title, ylabel in [
    (axes[0], fwd, FWD_COLS, "forward", "time ÷ cuBLAS base linear (×)"),
    (axes[1], fb, FB_COLS, "forward + backward", "time ÷ frozen floor: base fwd + dX GEMM (×)"),
]:
    Ms = list(rows)
    width = 0.8 / len(cols)
    for j, col in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(Ms))]
        ax.bar(xs, [rows[M][col] for M in Ms], width, label=col)
    ax.axhline(1.0, color="black", lw=1)
    if title == "forward":
        small_i = [i for i, M in enumerate(Ms) if M <= 256]
        large_i = [i for i, M in enumerate(Ms) if M >= 4096]
        ax.hlines(TARGET_FWD_SMALL_M, min(small_i) - 0.45, max(small_i) + 0.45, colors="red", ls="--",
                  label=f"target {TARGET_FWD_SMALL_M}× (M ≤ 256)")
        ax.hlines(TARGET_FWD_LARGE_M, min(large_i) - 0.45, max(large_i) + 0.45, colors="purple", ls="--",
                  label=f"target {TARGET_FWD_LARGE_M}× (M ≥ 4096)")
    else:
        ax.axhline(TARGET_FWD_BWD, color="red", ls="--", label=f"target {TARGET_FWD_BWD:.2f}×")
    ax.set_xticks(range(len(Ms)), [str(M) for M in Ms])
    ax.set_xlabel("M = rows of x (tokens in the batch)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"LoRA layer, bf16, K = N = 4096, r = 16: {title}")
    ax.legend(fontsize=8)
fig.suptitle(f"Time of each route as a multiple of the cuBLAS baseline (lower is better) — {LAYER_SOURCE[:80]}",
             fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# The targets, checked against those tables, and what the host-time table of the same run says about the
# small rows:

# %%
small = [M for M in fwd if M <= 256]
large = [M for M in fwd if M >= 4096]
checks = [
    (f"forward ≤ {TARGET_FWD_SMALL_M}× base at M ≤ 256, inference (merged weight)",
     max(fwd[M]["backend, inference"] for M in small), TARGET_FWD_SMALL_M),
    (f"forward ≤ {TARGET_FWD_SMALL_M}× base at M ≤ 256, training forward (the reference's ops)",
     max(fwd[M]["unfused (reference)"] for M in small), TARGET_FWD_SMALL_M),
    (f"forward ≤ {TARGET_FWD_LARGE_M}× base at M ≥ 4096, inference (merged weight)",
     max(fwd[M]["backend, inference"] for M in large), TARGET_FWD_LARGE_M),
    (f"forward ≤ {TARGET_FWD_LARGE_M}× base at M ≥ 4096, the fused Triton kernel",
     max(fwd[M]["fused_tma (untuned)"] for M in large), TARGET_FWD_LARGE_M),
    *[(f"forward + backward ≤ {TARGET_FWD_BWD:.2f}× floor at M = {M}", fb[M]["backend, final dispatch"], TARGET_FWD_BWD)
      for M in fb],
]
show(["target", "worst measured", "verdict"], [[name, f"{v:.2f}×", verdict(v, lim)] for name, v, lim in checks])

gpu_small = [fwd[M]["base µs"] for M in small]
print(f"\nHost-bound at small M: the GPU needs {span(gpu_small, '.1f', ' µs')} for the base GEMM at M ≤ 256, while "
      f"one F.linear costs {span([host[M]['base `F.linear`'] for M in host], '.0f', ' µs')} of host time "
      f"and the reference's forward (five ops: three GEMMs, a scale, an add) "
      f"{span([host[M]['reference fwd'] for M in host], '.0f', ' µs')}; "
      f"the fused Triton forward, launched from Python, "
      f"{span([host[M]['fused_tma fwd'] for M in host], '.0f', ' µs')}. With the GPU waiting on the host, "
      f"a route with more launches loses whatever its GPU work: at M ≤ 256 the training forward measured "
      f"{span([fwd[M]['unfused (reference)'] for M in small])} and forward + backward "
      f"{span([fb[M]['backend, final dispatch'] for M in small])}.")

# %% [markdown]
# ### Does the byte count explain the large-M times?
#
# At M ≥ 4096 the base GEMM is compute-bound, so to first order the extra bytes of a route add their memory
# time to the base time: predicted ratio = 1 + (route bytes − base bytes) / copy rate / base time, with the
# copy rate that `benchmarks/nf4.py` measured on the same kind of machine (RESULTS.md, NF4 section).

# %%
nf4_md = results_section("NF4 dequantization")
COPY_BYTES_PER_S = float(re.search(r"copy ceiling measured in the same run: (\d+) GB/s", nf4_md).group(1)) * 1e9
print(f"copy rate {COPY_BYTES_PER_S / 1e9:.0f} GB/s (read + write) — {run_line(nf4_md)}\n")

predicted = {}
for M in large:
    b, u, f = traffic_bytes(M)
    base_s = fwd[M]["base µs"] * 1e-6
    predicted[M] = (1 + (u - b) / COPY_BYTES_PER_S / base_s, 1 + (f - b) / COPY_BYTES_PER_S / base_s)
show(["M", "base µs", "unfused: predicted", "measured", "fused: predicted", "measured (fused_tma)",
      "GEMM alone (untuned)"],
     [[M, fwd[M]["base µs"], f"{pu:.2f}×", f"{fwd[M]['unfused (reference)']:.2f}×", f"{pf:.2f}×",
       f"{fwd[M]['fused_tma (untuned)']:.2f}×", f"{fwd[M]['Triton GEMM alone, TMA (untuned)']:.2f}×"]
      for M, (pu, pf) in predicted.items()])

# The H200 run at GPT-2 widths measured the Triton TMA GEMM alone *tuned*, and the merged route again
widths_md = results_section("LoRA layer at GPT-2 widths")
h200_4096 = [row for row in results_table(widths_md, 1) if row["K → N"] == "4096 → 4096"]
unfused_err = max(abs(pu - fwd[M]["unfused (reference)"]) for M, (pu, _) in predicted.items())
print(f"\nThe byte model predicts the unfused route's cost to within {unfused_err:.2f}× of the measurement, and says "
      f"what fusion could reach: {span([pf for _, pf in predicted.values()])}. The fused kernel measured "
      f"{span([fwd[M]['fused_tma (untuned)'] for M in large])}, and its GEMM alone, with no LoRA term, already "
      f"{span([fwd[M]['Triton GEMM alone, TMA (untuned)'] for M in large])} of cuBLAS in this run (autotuning "
      f"off: one fixed config). Tuned, on the H200 at 4096 → 4096, that GEMM alone measured "
      f"{span([num(row['Triton TMA GEMM alone × base (GPU)']) for row in h200_4096])} of cuBLAS: the fusion's "
      f"saving is real, the untuned GEMM around it was not yet as fast as cuBLAS's.")
print(f"The merged inference route, the same F.linear on a weight of the base's shape, read "
      f"{span([fwd[M]['backend, inference'] for M in large])} here at M ≥ 4096; the H200 run measured it at "
      f"{span([num(row['merged (inference) × base, GPU / host']) for row in results_table(widths_md, 1)])} of "
      f"the base (GPU time, every width and M), so the H100's excess was not reproduced.")

# %% [markdown]
# ### 5.2 Where a LoRA layer's GPU time goes (H200 profile)
#
# `torch.profiler` timed every GPU kernel of one LoRA layer's forward + backward on the "triton" backend at the
# GPT-2-small step's row count, against the frozen floor (cuBLAS's forward and dX GEMMs, plus the add into
# x.grad that both sides pay). The LoRA side has the same two GEMMs, done by Triton with the low-rank term in
# their epilogues, plus its own thin passes (shrink, dS/dB, dA). The layer targets:
#
# - forward + backward ≤ 1.25× the floor at the GPT-2 widths 768 → 2304 and 2304 → 768;
# - forward + backward ≤ 1.10× the floor at 4096 → 4096.

# %%
TARGET_LAYER_GPT2 = 1.25    # layer forward + backward ≤ 1.25× the frozen floor at 768 ↔ 2304 (GPU time)
TARGET_LAYER_4096 = 1.10    # ≤ 1.10× at 4096 → 4096

profile_md = results_section("Where a LoRA layer's GPU time goes")
print("source: benchmarks/RESULTS.md —", profile_md.splitlines()[0], "|", profile_md.splitlines()[1][:80], "…\n")
profile = []
for row in results_table(profile_md):
    shape = row["shape (K → N)"].split(" (")[0]
    passes = {name: float(us) for name, us in re.findall(r"([\w/]+) ([\d.]+)", row["LoRA's extra passes"])}
    profile.append(dict(shape=shape, floor=num(row["floor µs: cuBLAS fwd + dX (+ x.grad add)"]),
                        triton=num(row["triton µs"]), ratio=num(row["× floor"]),
                        triton_gemms=num(row["Triton's two GEMMs"]), cublas_gemms=num(row["cuBLAS's two GEMMs"]),
                        passes=passes, target=TARGET_LAYER_4096 if shape == "4096 → 4096" else TARGET_LAYER_GPT2))
show(["K → N", "floor µs", "triton µs", "× floor", "target", "verdict", "Triton GEMMs ÷ cuBLAS's",
      "GEMM gap µs", "LoRA passes µs"],
     [[p["shape"], p["floor"], p["triton"], f"{p['ratio']:.2f}×", f"≤ {p['target']:.2f}×",
       verdict(p["ratio"], p["target"]), f"{p['triton_gemms'] / p['cublas_gemms']:.2f}×",
       f"{p['triton_gemms'] - p['cublas_gemms']:.1f}", f"{sum(p['passes'].values()):.1f}"] for p in profile])
print()
for p in profile:
    gap = p["triton"] - p["floor"]
    gemm_gap = p["triton_gemms"] - p["cublas_gemms"]
    passes = sum(p["passes"].values())
    bigger = "LoRA's own passes" if passes > gemm_gap else "the slower GEMM"
    print(f"{p['shape']}: {gap:.1f} µs over the floor; Triton's two GEMMs cost {gemm_gap:.1f} µs more than "
          f"cuBLAS's ({p['triton_gemms'] / p['cublas_gemms']:.2f}×), LoRA's passes "
          f"({', '.join(f'{k} {v:.1f}' for k, v in p['passes'].items())}) {passes:.1f} µs, other kernels "
          f"(adds into the gradients) {gap - gemm_gap - passes:.1f} µs — the larger part: {bigger}.")

# %% [markdown]
# Neither part is the low-rank arithmetic itself. The Triton GEMM is slower than cuBLAS's hand-tuned Hopper
# kernels before any LoRA work, most of all at GPT-2 widths, and that gap is paid twice (forward and dX). The thin
# passes each read a full (M × K) or (M × N) tensor for an (M × r) result: memory time that no GEMM hides.
# Closing the gap needs both a GEMM at cuBLAS speed and fewer passes over x and dY.
#
# ### 5.3 The kernel in a whole training run (H200)
#
# `benchmarks/e2e.py` trains GPT-2 small (12 blocks × 768, LoRA r = 16 on every Linear but the head) on a batch
# of 8 × 992 tokens and reports tokens/s and peak memory, for each backend in each mode: **eager** (Python
# launches every op), **compiled** (`torch.compile`, no graphs) and **graphs** (`torch.compile(mode=
# "reduce-overhead")`: the compiled step replayed as CUDA graphs). The frozen floor here is the same model with
# no adapters and only the embedding trainable: the least a step on this frozen base can cost. The targets:
#
# - a LoRA step ≥ 0.95× the frozen floor's tokens/s end to end, each in its best mode;
# - ≥ 1.5× the tokens/s of transformers + peft LoRA on the same shape;
# - peak memory ≤ 4.5 GiB;
# - the "triton" backend ≥ 1.10× the "reference" backend in the same mode.
#
# The one run with every backend in every mode is the earliest; the cells below give its date with its numbers,
# then the later runs of some of its rows (here and in section 5.4), whose verdicts replace its own.

# %%
TARGET_E2E_FLOOR = 0.95       # LoRA step ≥ 0.95× the frozen floor's tokens/s, each in its best mode
TARGET_E2E_HF = 1.5           # ≥ 1.5× transformers + peft LoRA
TARGET_E2E_PEAK_GIB = 4.5     # peak memory ≤ 4.5 GiB
TARGET_TRITON_VS_REF = 1.10   # backend "triton" ≥ 1.10× backend "reference", same mode

e2e_md = results_section("End to end (H200")


def row_key(name):
    """'mp lora r16 all-linear, reference, eager' → ('mp lora', 'reference', 'eager'); notes in (…) dropped."""
    first, *rest = [part.strip() for part in re.sub(r"\(.*?\)", "", name).split(",")]
    return (" ".join(first.split()[:2]), *rest)


E2E = {row_key(row["row"]): dict(tps=num(row["tokens/s (median)"]), gib=num(row["peak GiB"]))
       for row in results_table(e2e_md)}
E2E_DATE = re.search(r"\d{4}-\d\d-\d\d", e2e_md.splitlines()[0]).group()   # the run's date, from its heading
B_E2E, T_E2E = map(int, re.search(r"batch (\d+) × (\d+)", e2e_md).groups())
TOKENS_PER_STEP = B_E2E * T_E2E
BACKENDS, MODES = ("reference", "auto", "triton"), ("eager", "compiled", "graphs")
floor = {mode: E2E.get(("mp floor", mode)) for mode in MODES}
best_floor = max(v["tps"] for v in floor.values() if v)

print("source: benchmarks/RESULTS.md —", e2e_md.splitlines()[0], "\n")
table = []
for who, mode_row in [("frozen floor", floor)] + [(f"LoRA, {b}", {m: E2E.get(("mp lora", b, m)) for m in MODES})
                                                   for b in BACKENDS]:
    for mode, row in mode_row.items():
        if row:
            table.append([who, mode, f"{row['tps']:,.0f}", f"{row['tps'] / floor[mode]['tps']:.2f}×",
                          f"{row['tps'] / best_floor:.2f}×", f"{row['gib']:.2f}"])
show(["row", "mode", "tokens/s", "× floor, same mode", "× floor, best mode", "peak GiB"], table)

# %%
lora = {(b, m): E2E[("mp lora", b, m)] for b in BACKENDS for m in MODES if ("mp lora", b, m) in E2E}
hf_lora = E2E[("hf lora",)]
ratio = lambda b1, b2, mode: lora[(b1, mode)]["tps"] / lora[(b2, mode)]["tps"]  # noqa: E731
step_ms = {key: 1e3 * TOKENS_PER_STEP / row["tps"] for key, row in lora.items()}
n_lora_gpt2 = 12 * LORA_PER_BLOCK   # GPT-2 small has 12 blocks
triton_vs_ref = ratio("triton", "reference", "graphs")

print(f"Eager, in the {E2E_DATE} run: the frozen floor itself ran "
      f"{floor['graphs']['tps'] / floor['eager']['tps']:.2f}× faster as CUDA graphs, so an eager step is host-bound: "
      f"it measures Python and launch time as much as GPU work. The 'triton' backend ran at "
      f"{ratio('triton', 'reference', 'eager'):.2f}× the 'reference' in eager mode: its "
      f"{n_lora_gpt2} LoRA layers launch Triton kernels from Python, forward and backward, and those launches cost "
      f"more host time than the GPU time they save (an eager step: reference {step_ms[('reference', 'eager')]:.1f} "
      f"ms, triton {step_ms[('triton', 'eager')]:.1f} ms; the graphs steps below put the GPU time saved at "
      f"{step_ms[('reference', 'graphs')] - step_ms[('triton', 'graphs')]:.1f} ms).")
print(f"'auto' in eager mode follows the reference ({ratio('auto', 'reference', 'eager'):.2f}×): a step has "
      f"{TOKENS_PER_STEP} rows, below lora_routes.FUSED_MIN_ROWS = {lora_routes.FUSED_MIN_ROWS}, so it takes the "
      f"reference's ops. Compiled without graphs, 'auto' gains only "
      f"{lora[('auto', 'compiled')]['tps'] / lora[('auto', 'eager')]['tps']:.2f}× over eager (the floor "
      f"{floor['compiled']['tps'] / floor['eager']['tps']:.2f}×): the compiled step still calls the Triton op, a "
      f"Python function, once per layer and direction.")
merged_date = re.search(r"\d{4}-\d\d-\d\d", results_section("LoRA trained on the merged weight")).group()
print("\nCUDA graphs record those launches once and replay them, so the GPU time decides: graphs ÷ eager = "
      + ", ".join(f"{b} {lora[(b, 'graphs')]['tps'] / lora[(b, 'eager')]['tps']:.2f}×" for b in BACKENDS)
      + f". In graphs mode 'triton' ran at {triton_vs_ref:.2f}× the 'reference' on {E2E_DATE}, and 'auto' at "
      f"{ratio('auto', 'triton', 'graphs'):.2f}× 'triton': in that run 'auto' took the Triton op under "
      f"torch.compile at this step's {TOKENS_PER_STEP} rows (since {merged_date} it trains these layers on the "
      f"merged weight: section 5.4). A graphs step: reference {step_ms[('reference', 'graphs')]:.1f} ms, triton "
      f"{step_ms[('triton', 'graphs')]:.1f} ms.")


def tps_ratio(row, base):
    """A row's tokens/s over a baseline row's, from RESULTS.md's cells: (ratio of the medians, lowest and highest
    ratio of any round of the row to any round of the baseline)."""
    (lo, hi), (base_lo, base_hi) = ([num(v) for v in r["spread (min–max)"].split("–")] for r in (row, base))
    return num(row["tokens/s (median)"]) / num(base["tokens/s (median)"]), lo / base_hi, hi / base_lo


latest_md = results_section("A LoRA training step, kernel by kernel")   # a later run of the same rows
latest = {r["row"]: r for r in results_table(latest_md, 2)}
t_vs_r, t_lo, t_hi = tps_ratio(latest["mp lora/triton graphs"], latest["mp lora/reference graphs"])
latest_date = re.search(r"\d{4}-\d\d-\d\d", latest_md).group()
every_pairing = "every pairing of rounds clears it" if t_lo >= TARGET_TRITON_VS_REF else "not every pairing clears it"
print(f"The latest measurement of the two ({latest_date}, RESULTS.md "
      f"section \"A LoRA training step, kernel by kernel\", after LoRA's passes were retuned): 'triton' at "
      f"{t_vs_r:.2f}× the 'reference' in graphs mode, any round of one over any round of the other "
      f"{t_lo:.2f}–{t_hi:.2f}× (target ≥ {TARGET_TRITON_VS_REF:.2f}×: "
      f"{verdict(t_vs_r, TARGET_TRITON_VS_REF, at_most=False)} by the medians; {every_pairing}).")

best_mode, best = max(((m, lora[("auto", m)]) for m in MODES if ("auto", m) in lora), key=lambda mr: mr[1]["tps"])
vs_floor, vs_hf = best["tps"] / best_floor, best["tps"] / hf_lora["tps"]
peak = best["gib"]
eager_peak = lora[("auto", "eager")]["gib"]
print(f"\nTargets in the {E2E_DATE} run, for the default backend 'auto' in its best mode ({best_mode}, "
      f"{best['tps']:,.0f} tokens/s; section 5.4 has the later runs):")
print(f"- ≥ {TARGET_E2E_FLOOR}× the frozen floor in its best mode: {vs_floor:.2f}× — "
      f"{verdict(vs_floor, TARGET_E2E_FLOOR, at_most=False)}")
print(f"- ≥ {TARGET_E2E_HF}× transformers + peft LoRA ({hf_lora['tps']:,.0f} tokens/s, {hf_lora['gib']:.2f} GiB): "
      f"{vs_hf:.2f}× — {verdict(vs_hf, TARGET_E2E_HF, at_most=False)}")
fine = re.search(r"\((\d\.\d{3}); target", e2e_md)   # the run's prose gives this peak to the MB
precise = float(fine.group(1)) if fine and round(float(fine.group(1)), 2) == peak else peak
print(f"- peak ≤ {TARGET_E2E_PEAK_GIB} GiB: {peak:.2f} GiB in the table"
      + (f", {precise:.3f} GiB unrounded" if precise != peak else "")
      + f" — {verdict(precise, TARGET_E2E_PEAK_GIB)}"
      + (f", by {(precise - TARGET_E2E_PEAK_GIB) * 1024:.0f} MiB" if precise > TARGET_E2E_PEAK_GIB else ""))
print(f"  The {best_mode} row holds {peak - eager_peak:.2f} GiB more than the eager one: section 5.4 finds it in the "
      f"compiled loss.")

# %%
fig, ax = plt.subplots(figsize=(9, 4.2))
width = 0.25
for j, b in enumerate(BACKENDS):
    modes = [m for m in MODES if (b, m) in lora]
    xs = [MODES.index(m) + (j - 1) * width for m in modes]
    ax.bar(xs, [lora[(b, m)]["tps"] / 1e3 for m in modes], width, label=f"LoRA, backend {b}")
for i, mode in enumerate(MODES):
    if floor[mode]:
        ax.hlines(floor[mode]["tps"] / 1e3, i - 0.45, i + 0.45, colors="black",
                  label="frozen floor" if i == 0 else None)
ax.axhline(TARGET_E2E_FLOOR * best_floor / 1e3, color="red", ls="--",
           label=f"target: {TARGET_E2E_FLOOR}× the floor's best")
ax.set_xticks(range(len(MODES)), MODES)
ax.set_ylabel("thousand tokens/s (higher is better)")
ax.set_title(f"GPT-2 small, LoRA r = 16, batch {B_E2E} × {T_E2E}, H200, {E2E_DATE} — from benchmarks/RESULTS.md",
             fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### 5.4 Keep cuBLAS for the big products: the merged weight in training
#
# §5.2 profiled single layers. A later profile counts every kernel of a whole CUDA-graph step, the floor's and
# LoRA's, in two runs on two starts of the machine: one before the LoRA passes were retuned into fewer kernels, one
# after (the second did not break out the floor's GEMMs). Within the first run:

# %%
step_md = results_section("A LoRA training step, kernel by kernel")
step = {r[""]: r for r in results_table(step_md)}
row_of = lambda prefix: next(r for k, r in step.items() if k.startswith(prefix))  # noqa: E731
gpu, gemms, passes = row_of("GPU kernel time"), row_of("the 95 base GEMMs"), row_of("dS/dB")
gap = num(gpu["LoRA, before"]) - num(gpu["floor, before"])
gemm_gap = num(gemms["LoRA, before"]) - num(gemms["floor, before"])
passes_ms = {run: sum(float(v) for v in passes[f"LoRA, {run}"].split(",")) for run in ("before", "after")}
embedding_ms = float(re.search(r"embedding gradient, ~([\d.]+) ms", step_md).group(1))
outside = gap - gemm_gap                      # what everything but the base GEMMs adds to LoRA's step
net_saved = passes_ms["before"] - outside     # the floor's extra work less LoRA's other small kernels
print("source: benchmarks/RESULTS.md —", step_md.splitlines()[0], "\n")
print(f"GPU kernel time per step: floor {num(gpu['floor, before']):.2f} ms, LoRA {num(gpu['LoRA, before']):.2f} ms: "
      f"{gap:+.2f} ms. The 95 base GEMMs: cuBLAS {num(gemms['floor, before']):.2f} ms, Triton "
      f"{num(gemms['LoRA, before']):.2f} ms: {gemm_gap:+.2f} ms, {gemm_gap / gap:.0%} of the gap. LoRA's passes "
      f"(dS/dB, dA, shrink) take {passes_ms['before']:.2f} ms, yet everything outside the GEMMs adds only "
      f"{outside:+.2f} ms: the floor's own extra work, which a LoRA step skips, less LoRA's other small kernels, "
      f"comes to {net_saved:.2f} ms. The profile counts ~{embedding_ms} ms of kernels for the floor's embedding "
      f"gradient; if that is all of the floor's extra work, LoRA's other small kernels take "
      f"~{embedding_ms - net_saved:.2f} ms.")
print(f"After the retune (the other run): LoRA's GEMMs {num(gemms['LoRA, after']):.2f} ms, its passes "
      f"{passes_ms['after']:.2f} ms, the step {num(gpu['LoRA, after']) - num(gpu['floor, after']):+.2f} ms over that "
      f"run's floor — runs on two starts of the machine, so not subtracted from the first.")

# %% [markdown]
# The LoRA chapter's merge gives another way to train, with cuBLAS for both big products. Since
# x·(W + s·B·A)ᵀ = x·Wᵀ + s·(x·Aᵀ)·Bᵀ and dY·(W + s·B·A) = dY·W + s·(dY·B)·A, a layer can build
# W' = W + s·B·A on every forward (a pass that reads W and writes W'), run the forward and dX with cuBLAS on W',
# and take the gradients of A and B from the Triton passes as before (they need S = x·Aᵀ and G = dY·B, not W').
# W' is rounded to bf16 once: the output and dX move by one rounding of the weight, while dA and dB come from S
# and G exactly as before. The first version built W' with `torch.addmm`, twice a step; now a small Triton kernel
# builds it once (kernels/lora_merge_triton.py) and the backward reuses the forward's W'.
# It is the "merged_train" route of `lora_routes`, which "auto" takes under `torch.compile` where it measured
# faster (16-bit layers without dropout, at most `MERGED_TRAIN_MAX_WIDTH` features wide, from
# `MERGED_TRAIN_MIN_ROWS` rows). The numbers, from a later run:

# %%
merged_md = results_section("LoRA trained on the merged weight")
layers, e2e_merged = results_table(merged_md, 0), results_table(merged_md, 1)
rounds = lambda cell: [float(v) for v in re.findall(r"\d+\.\d+", cell)]  # noqa: E731  (one value per round)


def faster(row):
    """Which route won the layer in every round, or 'even'."""
    op, merged = rounds(row["Triton op × floor"]), rounds(row["merged_train × floor"])
    return "merged weight" if max(merged) < min(op) else "Triton op" if max(op) < min(merged) else "even"


print("source: benchmarks/RESULTS.md —", merged_md.splitlines()[0], "\n")
show(["layer K → N", "Triton op × floor", "merged weight × floor", "faster in every round"],
     [[r["K → N"], span(rounds(r["Triton op × floor"])), span(rounds(r["merged_train × floor"])), faster(r)]
      for r in layers])
floor_m, lora_m = (next(r for r in e2e_merged if r["row"].startswith(p)) for p in ("mp floor", "mp lora"))
vs_floor_m = tps_ratio(lora_m, floor_m)[0]   # the ratio of the two medians
# each round's LoRA over the same round's floor, as the section's prose gives them
per_round = [float(v) for v in re.search(r"round by round ([\d., ]+?) against the same round's floor",
                                         merged_md).group(1).split(", ")]
per_round_median = sorted(per_round)[len(per_round) // 2]   # an odd number of rounds
h100_md = results_section("On an H100")   # the latest run of these rows, on another GPU, with today's code
h100 = next(r for r in results_table(h100_md) if r["row"] == "mp lora/auto graphs")
h100_median, h100_lo, h100_hi = (float(v) for v in re.findall(r"\d+\.\d+", h100["× mp floor (best mode)"]))
h100_date = re.search(r"\d{4}-\d\d-\d\d", h100_md).group()
h100_peak = num(h100["peak GiB"])
merge_rows = results_table(h100_md, 2)                  # the merge kernel against torch.addmm, µs
merge_speedup = [num(r["torch.addmm"]) / num(r["Triton, 32 × 128 tiles (landed)"]) for r in merge_rows]
print(f"\nEnd to end, graphs mode, 'auto' on the merged weight ({merged_date}, H200, W' built by addmm twice a "
      f"step): {num(lora_m['tokens/s (median)']):,.0f} tokens/s against the floor's "
      f"{num(floor_m['tokens/s (median)']):,.0f}. Two statistics of the same {len(per_round)} rounds: the ratio of the "
      f"medians, {vs_floor_m:.3f}×, and the median of the per-round ratios (each round's LoRA over the same round's "
      f"floor: {', '.join(f'{v:.3f}' for v in per_round)}), {per_round_median:.3f}× — the one benchmarks/e2e.py now "
      f"reports, since it pairs rows measured at the same time.")
print(f"Later ({h100_date}, on an H100: no H200 was to be had) W' came from the Triton kernel, "
      f"{min(merge_speedup):.1f}-{max(merge_speedup):.1f}× faster than addmm at this model's four widths, once a "
      f"step instead of twice; the step ran at {h100_median:.2f}× [{h100_lo:.2f}–{h100_hi:.2f}] the floor by the "
      f"median of the per-round ratios, peak {h100_peak:.2f} GiB (each layer keeps its W' for the backward).")
print(f"Target ≥ {TARGET_E2E_FLOOR}× the floor, by the median of the per-round ratios: "
      f"{verdict(h100_median, TARGET_E2E_FLOOR, False)} with today's code on the H100 ({h100_median:.2f}×); "
      f"{verdict(per_round_median, TARGET_E2E_FLOOR, False)} by the first version on the H200 "
      f"({per_round_median:.3f}×, rounds {min(per_round):.3f}–{max(per_round):.3f}×), which has not run today's.")
peak_m = float(re.search(r"\((\d\.\d+)\)", lora_m["peak GiB"]).group(1))   # the unrounded peak in (…)
print(f"Peak {peak_m:.4f} GiB against ≤ {TARGET_E2E_PEAK_GIB} GiB: {verdict(peak_m, TARGET_E2E_PEAK_GIB)}"
      + (f", by {(peak_m - TARGET_E2E_PEAK_GIB) * 1024:.0f} MiB." if peak_m > TARGET_E2E_PEAK_GIB else "."))

# %% [markdown]
# That peak was not LoRA's. A memory snapshot of the step put it in the compiled forward of the loss: the model's
# chunked loss (`return_logits=False`) ran `F.cross_entropy` on each chunk's logits, which works on their fp32
# log-softmax, and Inductor kept five chunks of those fp32 buffers alive at once. Compiled, each chunk's loss is
# now written out as logsumexp(z) − z[target]: the cast to fp32 fuses into the reductions that read the 16-bit
# logits. (Eagerly `F.cross_entropy` stays: its fused kernels are faster on the CPU.) A probe of the same rows:

# %%
loss_md = results_section("The chunked loss under torch.compile")
chunk = f"{LOSS_CHUNK_BYTES >> 20} MiB"   # the library's chunk size: the probe's rows at that size
rows = [r for r in results_table(loss_md) if r["LOSS_CHUNK_BYTES"] == chunk]
assert rows, f"RESULTS.md has no probe rows at LOSS_CHUNK_BYTES = {chunk}"
peak_of = {(when, who): num(r["peak GiB"]) for r in rows for when in ("before", "now") for who in ("floor", "lora")
           if f"({when})" in r["chunk's loss"] and r["row"].startswith(f"mp {who}")}
print(f"source: benchmarks/RESULTS.md — {loss_md.splitlines()[0]}\n")
show(["row", "peak GiB, F.cross_entropy (before)", "peak GiB, logsumexp − gather (now)"],
     [[who, f"{peak_of[('before', who)]:.2f}", f"{peak_of[('now', who)]:.2f}"] for who in ("floor", "lora")])
print(f"\nThe LoRA step's peak {peak_of[('before', 'lora')]:.2f} → {peak_of[('now', 'lora')]:.2f} GiB: ≤ "
      f"{TARGET_E2E_PEAK_GIB} GiB {verdict(peak_of[('now', 'lora')], TARGET_E2E_PEAK_GIB)}; the gap to the floor's "
      f"peak is {peak_of[('now', 'lora')] - peak_of[('now', 'floor')]:.2f} GiB. (Single rounds of a probe: its "
      f"tokens/s are in RESULTS.md and not compared here.)")

# %% [markdown]
# Fusing removes bytes, not FLOPs; it pays only where the layer waits on memory and the host is out of the way.
# In a whole step the order is: first remove the host cost (CUDA graphs), then the GPU time decides, and only
# then does a fused kernel show its gain — which the measurements, not the idea, decide, per call, in the
# "auto" backend.
#
# ## 6. What a GPU would run: the kernel compiled for an H100/H200, on this machine
#
# Triton can compile for a GPU it is not running on: the same passes that run at a launch turn the kernel into
# PTX, and the ptxas and cuobjdump shipped with Triton turn that into the GPU's own instructions (SASS).
# `benchmarks/compiled.py` does it for sm_90a (H100, H200), with the arguments specialized as a launch at
# c_attn's shape would (7936 × 768 → 2304), and finds the loop over K that every tile repeats. It runs in a
# process of its own: the interpreter this chapter uses replaces each kernel with Python, which has nothing to
# compile.

# %%
import subprocess
import sys

env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
compiled = subprocess.run([sys.executable, str(REPO / "benchmarks" / "compiled.py"), "--kernels", "lora_forward",
                           "--sass"], capture_output=True, text=True, env=env, check=True).stdout
print(compiled.split("\n\n")[0])                      # the version line and the table
table_lines = [line for line in compiled.splitlines() if line.startswith("|")]
head, row = ([c.strip() for c in line.strip("|").split("|")] for line in (table_lines[0], table_lines[2]))
row = dict(zip(head, row, strict=True))
loop = compiled.strip().splitlines()[-1].split()       # the loop's opcodes, in order
count = lambda prefix: sum(op.startswith(prefix) for op in loop)  # noqa: E731
print(f"\nOne step of K: {len(loop)} instructions. {count('HGMMA')} HGMMA (what one warpgroup runs for its "
      f"64 × 128 half of the 128 × 128 tile, 16 columns of K each), {count('UTMALDG')} TMA copies (x's tile and "
      f"W's, started by one elected thread), "
      f"{count('SYNCS.PHASECHK')} wait for a copy to land, {count('SYNCS.ARRIVE')} arrival that announces the next "
      f"one's bytes, {count('BAR')} barriers that every warp of the program meets, and "
      f"{sum(op.startswith('U') and not op.startswith('UTMALDG') for op in loop)} instructions of the uniform "
      f"datapath (scalar bookkeeping: addresses, stage indices). MMA groups in flight at a wait: {row['in flight']}. "
      f"Warp-specialized: {row['warp-spec.']}. §5.2 measured Triton's two GEMMs at "
      f"{span([p['triton_gemms'] / p['cublas_gemms'] for p in profile])} cuBLAS's.")

# %% [markdown]
# The tensor cores are busy for those HGMMAs; everything else is instruction slots and waits. Hopper's MMA is
# asynchronous, so the table's "in flight" says how many MMA groups keep running while the program starts the next
# copies, and "serialized" whether ptxas had to give that up. What the loop also shows: every warp takes part in
# every step — the same warps wait for the copies, meet at the barriers and start the MMAs. cuBLAS's Hopper kernels
# are *warp-specialized*: a producer warp only starts TMA copies, the other warps only compute, and the two meet at
# barriers in shared memory, so the copies, the MMAs and a tile's epilogue overlap. `benchmarks/RESULTS.md` ("What
# the compiler makes of the kernels") records what it takes for Triton to warp-specialize this loop: S and B must
# come by TMA too. The numbers depend on the Triton version, which the first line prints; RESULTS.md's table was
# compiled with the version the H200 runs. Static counts are not times, but they say where a kernel's instructions go
# without a GPU in reach. Whether warp specialization closes the gap of §5.2 takes a GPU, and one measured it:

# %%
ws_md = results_section("Two designs timed")
ws_rows = results_table(ws_md)
rounds = lambda cell: [float(v) for v in re.findall(r"\d+\.\d+", cell.split("(")[0])]  # noqa: E731
committed = {(r["M × K → N"], r["pass"]): rounds(r["committed × cuBLAS"]) for r in ws_rows}
special = {(r["M × K → N"], r["pass"]): rounds(r["warp-specialized, best tiling"]) for r in ws_rows}
wins = [k for k in committed if max(special[k]) < min(committed[k])]
print("source: benchmarks/RESULTS.md —", ws_md.splitlines()[0], "\n")
both = lambda values: "/".join(f"{v:.2f}" for v in values)  # noqa: E731  (round 1 / round 2)
show(["shape", "pass", "committed × cuBLAS", "warp-specialized × cuBLAS"],
     [[shape, pas, both(committed[shape, pas]), both(special[shape, pas])] for shape, pas in committed])
all_special = [v for vs in special.values() for v in vs]
print(f"\nThe warp-specialized kernel is faster in both rounds on {len(wins)} of {len(committed)} rows"
      + (f" ({', '.join(f'{shape} {pas}' for shape, pas in wins)})" if wins else "") + f": {span(all_special)} "
      f"cuBLAS's time, against {span([v for vs in committed.values() for v in vs])} for the committed kernel.")
course.claim(min(all_special) > 1.0, f"no warp-specialized tiling reached cuBLAS's time on any row: the best was "
                                     f"{min(all_special):.2f}×")

# %% [markdown]
# So warp specialization alone does not bring Triton's GEMM to cuBLAS here, and the same run found a worse problem:
# at two pipeline stages the warp-specialized kernel computed wrong results with no error from the compiler. It was
# not landed; a tiling that an autotuner might pick must never do that. What closes the gap in training is §5.4's
# merged weight, which keeps cuBLAS's own kernels.
#
# ## Summary
#
# - A GPU matmul is tiled: each program owns one output tile and an fp32 accumulator fed by MMA steps over K.
#   The fused LoRA kernel computes the thin S = (x ⊙ m)·Aᵀ first and adds s·S·Bᵀ in the GEMM's epilogue, so Y is
#   written once.
# - Fusion removes 6·M·N elements of memory traffic and almost no FLOPs (the low-rank term is r(K + N)/(NK) of
#   the base's); it can only pay where the layer waits on memory.
# - The Triton interpreter runs the real kernels on a CPU: outputs, all gradients and a whole training run match
#   the reference to fp32 rounding. It is a correctness tool, never a speed one.
# - On a GPU, small batches and eager steps are host-bound: extra launches from Python cost more than the GPU
#   time they save. CUDA graphs remove the host cost; then the GEMM's own speed against cuBLAS, and LoRA's thin
#   passes over x and dY, set the gap to the frozen floor.
# - The "auto" backend writes those measurements down as rules per call (merged weight for inference, the
#   reference's ops for eager training below a row count, under compile the merged weight built per call or the
#   Triton op), and the targets are checked against committed numbers, met or not.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks on them.
#
# ### Exercise 1 — the bytes of the shrink pass
#
# Kernel 1 computes S = x·Aᵀ (no dropout mask) in one pass. Write `shrink_bytes(M, K, r, e)`: the bytes it
# reads and the bytes it writes, each operand moved exactly once, e bytes per element. The check adds the bytes
# the fused GEMM then reads for its epilogue and compares the total with the table of section 2.

# %%
def shrink_bytes(M, K, r, e=2):
    """(bytes read, bytes written) by the shrink pass S = x·Aᵀ, x (M, K), A (r, K), e bytes per element."""
    return None  # your code here


# %%
passed = check_shrink_bytes(shrink_bytes)  # True when right

# %% [markdown]
# ### Exercise 2 — the FLOPs of the low-rank term
#
# Write `lowrank_flops(M, K, N, r)`: the FLOPs of the low-rank term's two matmuls, S = x·Aᵀ and S·Bᵀ (one
# multiply-add counts as 2 FLOPs; leave out the scaling and the final add). The check counts the FLOPs of the
# reference's ops with `torch.utils.flop_counter.FlopCounterMode` and subtracts the base linear's.

# %%
def lowrank_flops(M, K, N, r):
    """FLOPs of (x·Aᵀ)·Bᵀ for x (M, K), A (r, K), B (N, r); a multiply-add is 2 FLOPs."""
    return None  # your code here


# %%
passed = check_lowrank_flops(lowrank_flops)  # True when right

# %% [markdown]
# ### Exercise 3 — the LoRA forward in plain torch
#
# Write `lora_forward` with the reference's signature: y = x·Wᵀ + bias + s·((x ⊙ m)·Aᵀ)·Bᵀ for x of shape
# (..., K), bias or mask possibly None, the mask on the LoRA branch only. Use torch ops (`@`, `F.linear`); do not
# call `kernels`. The check compares it with `kernels.reference.lora_linear`, with and without a mask and bias.

# %%
def lora_forward(x, W, bias, A, B, scaling, dropout_mask=None):
    """y = x·Wᵀ + bias + scaling·((x ⊙ dropout_mask)·Aᵀ)·Bᵀ; x (..., K), W (N, K), A (r, K), B (N, r)."""
    return None  # your code here


# %%
passed = check_lora_forward(lora_forward)  # True when right

# %% [markdown]
# ### Exercise 4 — what CUDA graphs take away from a step
#
# Write `host_ms_removed(tokens_per_step, eager_tokens_per_s, graphs_tokens_per_s)`: the milliseconds per step
# that replaying the step as CUDA graphs removed — the eager step's time minus the graphs step's time. The check
# tries it on made-up step rates; once it is right, the cell applies it to the end-to-end rows of section 5.3 and
# turns the answer into host time per LoRA call.

# %%
def host_ms_removed(tokens_per_step, eager_tokens_per_s, graphs_tokens_per_s):
    """Milliseconds per training step by which the graphs step is shorter than the eager one."""
    return None  # your code here


# %%
if check_host_ms_removed(host_ms_removed):  # then, on the end-to-end rows of section 5.3:
    removed = {b: host_ms_removed(TOKENS_PER_STEP, lora[(b, "eager")]["tps"], lora[(b, "graphs")]["tps"])
               for b in BACKENDS}
    print("Per step, CUDA graphs removed " + ", ".join(f"{b} {ms:.1f} ms" for b, ms in removed.items()) + ".")
    extra_us = (removed["triton"] - removed["reference"]) * 1e3 / (2 * n_lora_gpt2)
    print(f"Graphs removed {removed['triton'] - removed['reference']:.1f} ms more from the 'triton' step than from "
          f"the 'reference' one: over {2 * n_lora_gpt2} LoRA calls a step ({n_lora_gpt2} layers, forward and "
          f"backward), about {extra_us:.0f} µs more per call — Python launching Triton kernels. (Graphs mode also "
          f"compiles the step, so these figures mix in what Inductor's fusion saves on the GPU; they are estimates "
          f"of host time, not measurements of it.)")

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")

# %% [markdown]
# ### Questions
#
# 1. Fusion removes 6·M·N elements of traffic, yet section 5 found that it only pays where the layer waits on
#    memory and the host is out of the way. For a layer you care about (your model's widths, your batch's rows),
#    which measurement from section 5 would you take first to decide between the reference's ops, the fused
#    kernel and a merged weight, and why that one?
# 2. The profile of section 5.2 splits the gap to the frozen floor into a slower GEMM and LoRA's thin passes over
#    x and dY. Which of the thin passes could be folded into a GEMM that already reads the same tensor, and what
#    would that cost in registers or in a second output?

# %%
course.claims_report()
