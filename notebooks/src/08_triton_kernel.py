# %% [markdown]
# # Chapter 8 — The Triton kernel: LoRA inside the GEMM
#
# Every LoRA layer of minipeft calls one function, `kernels.lora_linear`:
#
# $$Y = xW^\top + b + s\,\big((x \odot m)A^\top\big)B^\top,\qquad x\in\mathbb{R}^{M\times K},\;
# W\in\mathbb{R}^{N\times K},\; A\in\mathbb{R}^{r\times K},\; B\in\mathbb{R}^{N\times r},$$
#
# with s = α/r and m an optional dropout mask. Two backends implement it with one signature:
# `kernels/reference.py` (four torch ops) and `kernels/lora_triton.py` (Triton kernels that fold the low-rank
# term into the base matrix multiply). This chapter shows the blocked matmul, the fused-LoRA idea and its
# byte count, runs the real kernel (in the Triton interpreter when there is no GPU), swaps the backend under
# a whole model, and reads the H100 benchmark — including the targets the kernel did **not** meet.
#
# Sources: LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685); the split S = x·Aᵀ first, then the
# low-rank term in the GEMM, follows LoRAFusion (https://arxiv.org/abs/2510.00206); the blocked matmul follows
# Triton's tutorial 03 (https://triton-lang.org/main/getting-started/tutorials/03-matrix-multiplication.html).

# %%
# The Triton interpreter runs kernels on CPU tensors with NumPy. Triton reads TRITON_INTERPRET when a kernel
# is decorated, i.e. when `kernels` is imported, so it must be set first (kernels/__init__.py says why).
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:  # on a GPU: one fixed kernel config instead of autotuning, so the live benchmark below stays short
    os.environ.setdefault("MINIPEFT_KERNEL_AUTOTUNE", "0")

from minipeft import kernels  # noqa: E402  (after the environment variable, on purpose)

# ruff: noqa: E402  (every later import follows the environment set-up above)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print("device:", DEVICE, "| TRITON_INTERPRET =", os.environ.get("TRITON_INTERPRET", "0"))
print("backends:", kernels.available_backends())

# %%
# %matplotlib inline
import re
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt

from minipeft.data import build_world, corpus_tokens, pretraining_batch, pretraining_corpus
from minipeft.kernels import lora_triton, reference
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, get_peft_model

NOTEBOOK_START = time.perf_counter()
REPO = Path(kernels.__file__).resolve().parents[1]
_ = torch.manual_seed(0)
torch.set_num_threads(1)  # in a Jupyter kernel on 2 cores, 2 OpenMP threads made small ops far slower

# %% [markdown]
# ## 1. The blocked matmul, as pseudo-code that runs
#
# A GPU computes Y = x·Wᵀ tile by tile: each program owns one (BM × BN) tile of Y, keeps an fp32 accumulator
# for it in registers, and walks K in steps of BK, loading a (BM × BK) slab of x and a (BN × BK) slab of W per
# step. Each tile of Y is written to memory **once**. Five lines of Python do the same on the CPU:

# %%
def blocked_matmul(x, W, BM=16, BN=16, BK=8):
    """Y = x·Wᵀ, one (BM, BN) output tile at a time, accumulating over K in BK steps (tutorial 03's loop)."""
    M, K = x.shape
    N = W.shape[0]
    Y = torch.empty(M, N)
    for m in range(0, M, BM):
        for n in range(0, N, BN):                       # on a GPU: one program per (m, n) tile
            acc = torch.zeros(min(BM, M - m), min(BN, N - n))  # fp32, lives in registers
            for k in range(0, K, BK):
                acc += x[m:m + BM, k:k + BK] @ W[n:n + BN, k:k + BK].T
            Y[m:m + BM, n:n + BN] = acc                 # the only write of this tile
    return Y


x = torch.randn(40, 24)
W = torch.randn(36, 24)
print(f"max |blocked − x·Wᵀ| = {(blocked_matmul(x, W) - x @ W.T).abs().max():.1e}")

# %% [markdown]
# ## 2. The fused-LoRA idea
#
# The unfused LoRA layer (the reference) runs the base GEMM, then S = x·Aᵀ, then T = S·Bᵀ, then s·T, then
# Y + s·T: the last three each read and write a full (M × N) tensor. The fused kernel first computes the thin
# S = (x ⊙ m)·Aᵀ (M × r, a "shrink" pass over x), then, per tile of Y, adds **one more MMA step** to the
# accumulator before the tile is written — `acc += s · S[m-block] · B[n-block]ᵀ`, an (BM × r)·(r × BN)
# product. The same five lines, with that one extra line, agree with the reference:

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
            acc += scaling * S[m:m + BM] @ B[n:n + BN].T  # the whole LoRA branch: one more step per tile
            Y[m:m + BM, n:n + BN] = acc + bias[n:n + BN]
    return Y


A, B, bias = torch.randn(4, 24), torch.randn(36, 4), torch.randn(36)
ref = reference.lora_linear(x, W, bias, A, B, 2.0)
print(f"max |blocked LoRA − kernels.reference| = {(blocked_lora(x, W, bias, A, B, 2.0) - ref).abs().max():.1e}")

# %% [markdown]
# ### What fusion saves: count the bytes and the FLOPs
#
# Compulsory memory traffic of each op (every operand read once, every result written once; element size e),
# for the shape of the H100 benchmark below (K = N = 4096, r = 16, bf16: e = 2 bytes):
#
# | route | ops | bytes moved |
# |---|---|---|
# | base linear | x·Wᵀ | e·(MK + NK + MN) |
# | unfused (reference) | x·Wᵀ; S = x·Aᵀ; T = S·Bᵀ; s·T; Y + s·T | e·(2MK + NK + rK + 2Mr + Nr + **7MN**) |
# | fused (Triton) | shrink S; GEMM with S·(sB)ᵀ in the accumulator | e·(2MK + NK + rK + 2Mr + Nr + **MN**) |
#
# Fusion removes 6·M·N elements of traffic: T written; T read and s·T written; Y and s·T read and the sum
# written — only the one write of Y remains. It removes almost no FLOPs: the low-rank term costs 2Mr(K + N) on
# either route, r(K + N)/(NK) of the base GEMM's 2MNK.

# %%
K_BENCH = N_BENCH = 4096
R_BENCH = 16
E = 2  # bytes per bf16 element


def traffic_bytes(M, N=N_BENCH, K=K_BENCH, r=R_BENCH, e=E):
    base = e * (M * K + N * K + M * N)
    lora_small = e * (M * K + r * K + 2 * M * r + N * r)   # the second read of x, A, S written+read, B
    return base, base + lora_small + e * 6 * M * N, base + lora_small


print(f"LoRA FLOPs on top of the base GEMM: r(K+N)/(NK) = "
      f"{R_BENCH * (K_BENCH + N_BENCH) / (N_BENCH * K_BENCH):.2%} (the same fused or not)")
print(f"{'M':>6} {'base MB':>9} {'unfused MB':>11} {'fused MB':>9} {'saved MB':>9} {'unfused/base':>13} "
      f"{'fused/base':>11}")
for M in (1, 16, 256, 4096, 16384):
    b, u, f = traffic_bytes(M)
    print(f"{M:>6} {b / 1e6:9.1f} {u / 1e6:11.1f} {f / 1e6:9.1f} {(u - f) / 1e6:9.1f} {u / b:13.2f} {f / b:11.2f}")

# %% [markdown]
# At M ≤ 256 the weight W (32 MiB) dominates every route's traffic, so fusion saves < 10 % of the bytes; at
# M = 16384 the unfused route moves 2.4× the base's bytes and the fused one 1.2×. Bytes only matter when the
# GEMM waits on memory, which section 5 checks against the measured times.
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


print(f"{'M, K, N, r':>18} {'mask':>5} | max |Triton − reference|: {'Y':>8} {'dx':>8} {'dbias':>8} {'dA':>8} "
      f"{'dB':>8}")
worst = 0.0
start = time.perf_counter()
for M, K, N, r, with_mask in [(1, 48, 40, 4, False), (37, 64, 80, 8, True), (64, 96, 72, 16, False)]:
    errs = compare_fused(M, K, N, r, with_mask)
    worst = max(worst, *errs)
    print(f"{f'{M}, {K}, {N}, {r}':>18} {str(with_mask):>5} | {'':>25}" + " ".join(f"{e:8.1e}" for e in errs))
print(f"worst {worst:.1e} (fp32; the fp32 dots run in 'ieee' precision) — "
      f"{time.perf_counter() - start:.1f} s for three shapes")
assert worst < 1e-4

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
# backend. The autograd graph names the code that ran: the Triton backend is one registered custom op per
# layer, `minipeft::lora_linear_triton` (so torch.compile sees one node, not a graph break), whose autograd node
# is named after it; the reference shows as plain `AddmmBackward`/`MmBackward` nodes.

# %%
tok = ByteTokenizer()
stream = corpus_tokens(pretraining_corpus(build_world(0), 40, 0), tok)


def tiny_lora_gpt():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    model = get_peft_model(gpt, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
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
        fused_nodes = sum("lora_linear_triton" in name for name in graph_nodes(loss))
        start = time.perf_counter()
        result = train(model, batch, TrainConfig(steps=3, lr=1e-2, batch_size=2, warmup_steps=0),
                       progress=False)
        seconds = time.perf_counter() - start
    runs[backend] = dict(losses=result.losses, seconds=seconds, fused=fused_nodes,
                         params={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

n_lora = sum(1 for n in runs["reference"]["params"] if "lora_A" in n)
print(f"{n_lora} LoRA layers; Triton op nodes in one loss graph: reference {runs['reference']['fused']}, "
      f"triton {runs['triton']['fused']}")
for step, (a, b) in enumerate(zip(runs["reference"]["losses"], runs["triton"]["losses"], strict=True)):
    print(f"step {step}: loss reference {a:.6f}   triton {b:.6f}   |Δ| = {abs(a - b):.1e}")
drift = max((runs["reference"]["params"][n] - runs["triton"]["params"][n]).abs().max().item()
            for n in runs["reference"]["params"])
print(f"after 3 AdamW steps, max |Δ| over every LoRA weight = {drift:.1e}")

# %% [markdown]
# Same losses, same weights after training, to fp32 rounding. The "triton" backend runs the kernels on every
# call, on a GPU too: a backend name is a promise. The default backend, "auto", is the one that chooses per
# call: on a GPU `lora_routes.choose_path` sends training calls below 8192 rows to the reference's ops and
# inference to a cached merged weight, because those measured faster (the next section says why); on the CPU
# "auto" always runs the reference.
#
# ## 5. The benchmark: is it fast?
#
# `benchmarks/lora_kernel.py` times every route of one LoRA layer (bf16, K = N = 4096, r = 16) on a GPU
# against the cuBLAS base linear `F.linear(x, W)` measured in the same run. With a GPU this cell runs it
# live (short repeats, one untuned kernel config); without one it reads the committed table from
# `benchmarks/RESULTS.md` and says so. The "backend" columns are the "auto" backend's dispatch
# (`kernels/lora_routes.py`; RESULTS.md measured it when the "triton" backend still did the dispatching).

# %%
FWD_COLS = {  # our name: (RESULTS.md column, lora_kernel.measure() key)
    "unfused (reference)": ("unfused (reference)", "reference"),
    "peft LoRA": ("peft LoRA", "peft"),
    "fused_tma (Triton)": ("fused_tma (untuned)", "fused_tma"),
    "backend, inference": ("backend, inference", "auto_backend"),
    "backend, training fwd": ("backend, training fwd", "auto_backend_grad"),
}
FB_COLS = {
    "unfused (reference)": ("unfused (reference)", "reference"),
    "peft LoRA": ("peft LoRA", "peft"),
    "fused_tma (Triton)": ("fused_tma (untuned)", "fused_tma"),
    "backend": ("backend, final dispatch", "auto_backend"),
}


def number(cell):
    """'**1.00** (merged)' → 1.0; '-' → None."""
    m = re.search(r"[-+]?\d+(?:\.\d+)?", cell.replace(",", ""))
    return float(m.group()) if m else None


def markdown_tables(text):
    """Every markdown table in `text` as a list of rows (lists of cell strings), header first."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| separator
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def from_results_md(path):
    text = path.read_text()
    section = text.split("## LoRA kernel", 1)[1].split("\n## ", 1)[0]
    header_line = section.strip().splitlines()[0]
    fwd, fb = markdown_tables(section)[:2]

    def parse(table, cols, base_col):
        head = table[0]
        rows = {}
        for cells in table[1:]:
            row = dict(zip(head, cells, strict=True))
            rows[int(row["M"])] = {"base µs": number(row[base_col]),
                                   **{ours: number(row[theirs]) for ours, (theirs, _) in cols.items()}}
        return rows

    return parse(fwd, FWD_COLS, "base µs"), parse(fb, FB_COLS, "floor µs"), header_line


def live_benchmark(ms=(16, 256, 4096)):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import lora_kernel  # benchmarks/lora_kernel.py

    lora_kernel.REP_MS, lora_kernel.SKIP_POINTER = 30, True
    torch.backends.cuda.matmul.allow_tf32 = False
    fwd, fb = {}, {}
    for M in ms:
        t = lora_kernel.measure(M)["times"]
        fwd[M] = {"base µs": t["fwd_base"], **{o: t[f"fwd_{k}"] / t["fwd_base"] for o, (_, k) in FWD_COLS.items()
                                               if f"fwd_{k}" in t}}
        fb[M] = {"base µs": t["fb_floor"], **{o: t[f"fb_{k}"] / t["fb_floor"] for o, (_, k) in FB_COLS.items()
                                              if f"fb_{k}" in t}}
        torch.cuda.empty_cache()
    return fwd, fb, f"live run, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}, do_bench 30 ms"


if torch.cuda.is_available():
    fwd, fb, SOURCE = live_benchmark()
else:
    print("No GPU here: on a GPU this cell runs benchmarks/lora_kernel.py's measure() for M = 16, 256, 4096 "
          "and prints the same tables from that run. Reading benchmarks/RESULTS.md instead.")
    fwd, fb, header = from_results_md(REPO / "benchmarks" / "RESULTS.md")
    SOURCE = "benchmarks/RESULTS.md — " + header.split(" · `")[0]
print("source:", SOURCE)


def show(rows, base_name, title):
    cols = [c for c in next(iter(rows.values())) if c != "base µs"]
    print(f"\n{title}\n{'M':>6} {base_name:>10} " + " ".join(f"{c:>22}" for c in cols))
    for M, row in rows.items():
        print(f"{M:>6} {row['base µs']:10.1f} " + " ".join(
            f"{'-' if row.get(c) is None else format(row[c], '.2f') + '×':>22}" for c in cols))


show(fwd, "base µs", "forward, time ÷ cuBLAS base linear")
show(fb, "floor µs", "forward + backward (dx, dA, dB), time ÷ frozen floor (base fwd + dX GEMM)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(14, 4.6))
for ax, rows, title, ylabel in [
    (axes[0], fwd, "forward", "time ÷ cuBLAS base linear (×)"),
    (axes[1], fb, "forward + backward", "time ÷ frozen floor: base fwd + dX GEMM (×)"),
]:
    Ms = list(rows)
    cols = [c for c in rows[Ms[0]] if c != "base µs"]
    width = 0.8 / len(cols)
    for j, col in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(Ms))]
        ax.bar(xs, [rows[M].get(col) or 0 for M in Ms], width, label=col)
    ax.axhline(1.0, color="black", lw=1)
    if title == "forward":
        small = [i for i, M in enumerate(Ms) if M <= 256]
        large = [i for i, M in enumerate(Ms) if M >= 4096]
        if small:
            ax.hlines(1.15, min(small) - 0.45, max(small) + 0.45, colors="red", ls="--", label="target 1.15× (M ≤ 256)")
        if large:
            ax.hlines(1.03, min(large) - 0.45, max(large) + 0.45, colors="purple", ls="--",
                      label="target 1.03× (M ≥ 4096)")
    else:
        ax.axhline(1.10, color="red", ls="--", label="target 1.10×")
    ax.set_xticks(range(len(Ms)), [str(M) for M in Ms])
    ax.set_xlabel("M = rows of x (tokens in the batch)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"LoRA layer, bf16, K = N = 4096, r = 16: {title}")
    ax.legend(fontsize=8)
fig.suptitle(f"Time of each route as a multiple of the cuBLAS baseline (lower is better) — {SOURCE[:90]}",
             fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ### The targets, checked against that table
#
# The kernel's plan set three targets. The cell reads them off the table above rather than restating them:

# %%
def verdict(values, limit):
    worst = max(values)
    return f"{'MET' if worst <= limit else 'NOT MET'} (worst {worst:.2f}×, limit {limit:.2f}×)"


small = [M for M in fwd if M <= 256]
large = [M for M in fwd if M >= 4096]
print("forward ≤ 1.15× base at M ≤ 256")
print("   inference (backend, merged weight):   ", verdict([fwd[M]["backend, inference"] for M in small], 1.15))
print("   training forward (adapter changing): ", verdict([fwd[M]["backend, training fwd"] for M in small], 1.15))
print("forward ≤ 1.03× base at M ≥ 4096")
print("   inference (backend, merged weight):   ", verdict([fwd[M]["backend, inference"] for M in large], 1.03))
print("   the fused Triton kernel (fused_tma):   ", verdict([fwd[M]["fused_tma (Triton)"] for M in large], 1.03))
print("forward + backward ≤ 1.10× the frozen floor")
for M in fb:
    print(f"   M = {M:>5}: backend {fb[M]['backend']:.2f}×, "
          f"best route shown {min(v for k, v in fb[M].items() if k != 'base µs' and v):.2f}× → "
          f"{'MET' if fb[M]['backend'] <= 1.10 else 'NOT MET'}")

# %% [markdown]
# ### Does the byte count explain the large-M times?
#
# At M ≥ 4096 the base GEMM is compute-bound, so to first order the extra bytes of a route add their
# memory time to the base time. The copy rate of that H100 was measured at 3003 GB/s (read + write) by
# `benchmarks/nf4.py` on the same machine and day (RESULTS.md, NF4 section). Predicted ratio = 1 + (route
# bytes − base bytes) / 3.0 TB/s / base time:

# %%
COPY_BYTES_PER_S = 3003e9  # RESULTS.md, NF4 section: copy ceiling measured on the H100
print(f"{'M':>6} {'base µs':>8} | {'unfused: predicted':>18} {'measured':>9} | {'fused: predicted':>16} "
      f"{'measured (fused_tma)':>21}")
for M in large:
    b, u, f = traffic_bytes(M)
    base_s = fwd[M]["base µs"] * 1e-6
    pred_u = 1 + (u - b) / COPY_BYTES_PER_S / base_s
    pred_f = 1 + (f - b) / COPY_BYTES_PER_S / base_s
    print(f"{M:>6} {fwd[M]['base µs']:8.1f} | {pred_u:17.2f}× {fwd[M]['unfused (reference)']:8.2f}× | "
          f"{pred_f:15.2f}× {fwd[M]['fused_tma (Triton)']:20.2f}×")

# %% [markdown]
# What the numbers say (RESULTS.md states the same verdicts for the committed H100 run):
#
# - **Met:** inference forward at M ≤ 256, 1.00× — but not by the fused kernel. With no gradient wanted the
#   "auto" backend multiplies by a cached merged weight W' = W + s·B·A (chapter 3's merge, done automatically), so it
#   *is* the base GEMM.
# - **Not met:** inference at M ≥ 4096 (1.06–1.12× for that same single GEMM; RESULTS.md calls it
#   unexplained in a 30 ms run); the training forward at small M (1.6–3.9×); forward + backward at every M
#   (best 1.17–1.18× at M = 16384, by the fused TMA kernel).
# - **Small M is host-bound:** the GPU work is ~25 µs and each extra op costs 15–35 µs of Python/launch time
#   (RESULTS.md's host table); a LoRA training step is ≥ 8 ops against the floor's 2. No kernel fixes that;
#   CUDA graphs or `torch.compile` of the whole step would.
# - **Large M is byte-bound, as counted:** the byte model above predicts the unfused route's cost to within
#   ~0.1× of the measurement. It also says what fusion *could* reach (≈ 1.06×); the fused kernel measured
#   1.33–1.38× because its GEMM ran one untuned config (1.22× cuBLAS alone in that run, ≈ 1.00× tuned in an
#   earlier one) — the fusion's gain is real, the GEMM around it is not yet as fast as cuBLAS's.
#
# Fusing removes bytes, not FLOPs; it pays only where the layer waits on memory, and the benchmark — not the
# idea — decides which route the "auto" backend takes.

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
