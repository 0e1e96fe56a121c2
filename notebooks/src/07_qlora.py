# %% [markdown]
# # Chapter 7 — Quantization and QLoRA
#
# QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) stores the frozen base in 4 bits and trains
# LoRA adapters in higher precision on top. Its 4-bit type, NF4, puts 16 levels at quantiles of a normal
# distribution, scales each block of 64 weights by its absolute maximum, and stores those scales in 8 bits
# too (double quantization):
#
# $$\hat w_i = \mathrm{NF4}[c_i]\cdot \mathrm{absmax}_{b(i)},\qquad
# c_i = \arg\min_k \left|\frac{w_i}{\mathrm{absmax}_{b(i)}} - \mathrm{NF4}[k]\right|.$$
#
# This chapter answers Exercise 5 of the PEFT exercises (5.1 – 5.5) with minipeft's `minipeft.quant`, and
# puts an 8-bit base (LLM.int8()) beside the 4-bit one and the 16-bit one throughout: the rounding error of
# each, LoRA trained on each, and the memory each leaves for training — down to the arithmetic of a 65B model
# on one 48 GB GPU and what "reduce the batch size" buys.
#
# ### Exercise 5.1 — what quantization is
#
# Quantization stores a tensor as small integers plus a scale, w ≈ s·q: fewer bits per weight, so less
# memory and less traffic when the weights are read (inference at batch 1 is bound by reading weights). The
# price is rounding error, which the cells below measure — and time, unless a kernel reads the codes directly:
# minipeft's `NF4Linear` dequantizes its weight on every call, so unmerged QLoRA pays for that on every generated
# token. Chapter 9 times decoding with QLoRA against the base (round-robin, on this CPU) and prints the ratio with
# its interval.

# %%
# %matplotlib inline
import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from statistics import NormalDist

import course
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from checks.ch07 import check_bits_per_parameter, check_blockwise_nf4, check_int8_rowwise, check_normal_float_levels

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import state_bytes
from minipeft.memory_report import format_memory_table
from minipeft.pretrain import load_base
from minipeft.quant import (
    NF4_CODEBOOK,
    NF4_OFFSET,
    Int8Linear,
    NF4Linear,
    dequantize_int8,
    dequantize_nf4,
    int8_nbytes,
    nf4_codebook_from_quantiles,
    nf4_nbytes,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    weight_bytes_report,
)
from minipeft.stats import wilson
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

course.setup(seed=0)
NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")
tok = ByteTokenizer()
base = load_base("default")
report = weight_bytes_report(base)
print(f"default base: {report['params']:,d} parameters, {report['quantized_params']:,d} of them in Linear layers "
      f"that QLoRA quantizes")
for k in ("fp32", "bf16", "int8", "nf4", "nf4_dq"):
    print(f"  weights stored as {k:7s}: {report[k] / 2**20:6.3f} MiB  ({report[k] / report['fp32']:.3f} of fp32)")

# %% [markdown]
# ### Exercise 5.3 (a) — NF4 derived from normal quantiles
#
# Weights of a trained network are roughly normal, so levels that each take an equal share of the normal
# distribution's probability waste no code. To keep an exact 0, the positive half gets 8 levels at quantiles
# Φ⁻¹(p) for p evenly spaced from 0.9677 down to 0.5, the negative half 7, then all are divided by the
# largest. Five lines, then the library's version, against the table QLoRA's appendix prints:

# %%
def nf4_levels(offset=0.9677083):
    pos = [NormalDist().inv_cdf(p) for p in torch.linspace(offset, 0.5, 9)[:-1].tolist()]  # 8 levels > 0
    neg = [-NormalDist().inv_cdf(p) for p in torch.linspace(offset, 0.5, 8)[:-1].tolist()]  # 7 levels < 0
    levels = torch.tensor(sorted(neg + [0.0] + pos))
    return levels / levels.max()


print("stored NF4 table:      ", [round(v, 4) for v in NF4_CODEBOOK.tolist()])
print(f"five-line version: max |diff| = {(nf4_levels() - NF4_CODEBOOK).abs().max():.1e}")
print(f"nf4_codebook_from_quantiles(): max |diff| = {(nf4_codebook_from_quantiles() - NF4_CODEBOOK).abs().max():.1e}")
course.claim((nf4_levels() - NF4_CODEBOOK).abs().max() < 1e-6,
             "NF4's 16 levels are normal quantiles: five lines of NormalDist reproduce the stored table")

int4_levels = torch.arange(-7, 8) / 7  # plain absmax int4: 15 evenly spaced levels
g = torch.randn(4096, 64)
normed = (g / g.abs().amax(1, keepdim=True)).flatten()  # what a block of 64 Gaussian weights looks like after absmax
fig, ax = plt.subplots(figsize=(7, 3))
ax.hist(normed.numpy(), bins=120, density=True, color="0.8", label="w / absmax, Gaussian blocks of 64")
ax.vlines(NF4_CODEBOOK.numpy(), 0, 1.6, color="C0", label="NF4 levels (16)")
ax.vlines(int4_levels.numpy(), 0, 0.8, color="C3", ls="--", label="int4 absmax levels (15)")
ax.set_xlabel("normalised weight w / absmax (unitless)")
ax.set_ylabel("density")
ax.set_title("NF4 puts its levels where normal weights are")
ax.legend(fontsize=7, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Blockwise absmax and the nibbles
#
# Two blocks of 64 weights: each is divided by its own absmax, each value goes to the nearest level, and two
# 4-bit codes share a byte, element 2i in the **high** nibble (as bitsandbytes packs them).

# %%
w = torch.randn(2, 64) * torch.tensor([[0.02], [0.5]])  # two blocks of very different scale
absmax = w.abs().amax(1, keepdim=True)  # (2, 1): one scale per block
idx = ((w / absmax)[..., None] - NF4_CODEBOOK).abs().argmin(-1).flatten()  # (128,) nearest level, 0 … 15
packed = (idx[0::2] << 4) | idx[1::2]  # (64,) bytes: element 2i high, 2i+1 low
q = quantize_nf4(w, blocksize=64, double_quant=False)
print(f"absmax per block: {absmax.flatten().tolist()}  (library: {q.absmax.tolist()})")
print(f"codes {tuple(q.codes.shape)} {q.codes.dtype} for {w.numel()} weights; five-line codes equal: "
      f"{torch.equal(packed.to(torch.uint8), q.codes)}")
print("first 4 weights:", [f"{v:+.4f}" for v in w[0, :4].tolist()], "→ level indices", idx[:4].tolist())
print("first 2 bytes:  ", [f"0x{b:02x}" for b in q.codes[:2].tolist()],
      f"= high nibble {q.codes[0].item() >> 4} (element 0), low nibble {q.codes[0].item() & 15} (element 1)")
w_hat = dequantize_nf4(q)
print(f"relative error per block: {((w_hat - w).norm(dim=1) / w.norm(dim=1)).tolist()} — the same, whatever the scale")

# %% [markdown]
# ### Exercise 5.3 (b) — double quantization: bits per parameter
#
# With blocks of 64, one fp32 absmax costs 32/64 = 0.5 bits per weight on top of the 4-bit code. Double
# quantization stores each absmax as an 8-bit code instead, with one fp32 scale per 256 absmax values:
#
# $$4 + \frac{8}{64} + \frac{32}{64\cdot 256} = 4.127\ \text{bits per parameter (vs } 4 + 32/64 = 4.5).$$
#
# Checked against the sizes of the real tensors, for a 1024 × 1024 weight:

# %%
w = torch.randn(1024, 1024) * 0.02
for dq in (False, True):
    q = quantize_nf4(w, blocksize=64, double_quant=dq)
    sizes = {k: f"{tuple(t.shape)} {t.dtype} = {t.numel() * t.element_size():,d} B" for k, t in q.tensors().items()}
    err = ((dequantize_nf4(q) - w).norm() / w.norm()).item()
    print(f"double_quant={dq}: {q.bits_per_parameter():.4f} bits/parameter, relative error {err:.4f}")
    for k, v in sizes.items():
        print(f"    {k:14s} {v}")
print(f"formula: 4 + 8/64 + 32/(64·256) = {4 + 8 / 64 + 32 / (64 * 256):.4f}; without: 4 + 32/64 = {4 + 32 / 64}")
print("(the measured value also counts the one fp32 mean subtracted before quantizing the absmax values)")
BITS_NF4_DQ = q.bits_per_parameter()  # the last q: double quantization on
course.claim(abs(BITS_NF4_DQ - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3,
             f"double quantization stores {BITS_NF4_DQ:.3f} bits per weight, the formula's 4 + 8/64 + 32/(64·256)")

# %% [markdown]
# ### An error histogram: NF4 against plain int4
#
# Plain int4 here: the same blocks of 64 and absmax scale, but 15 evenly spaced levels (k/7, k = −7 … 7).
# Both on Gaussian weights and on every quantized weight of the default base.

# %%
def int4_absmax(w, blocksize=64):
    """Blockwise absmax int4: round(w / s) with s = absmax / 7, clamped to ±7, then back."""
    blocks = w.reshape(-1, blocksize)
    s = blocks.abs().amax(1, keepdim=True) / 7
    return ((blocks / s).round().clamp(-7, 7) * s).reshape(w.shape)


real = torch.cat([m.weight.detach().flatten() for n_, m in base.named_modules()
                  if isinstance(m, nn.Linear) and n_ != "lm_head"])
weights = {"Gaussian N(0, 0.02²), 1M weights": torch.randn(1 << 20) * 0.02,
           f"default base, {real.numel():,d} Linear weights": real}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
for ax, (name, wt) in zip(axes, weights.items(), strict=True):
    e_nf4 = dequantize_nf4(quantize_nf4(wt, 64, double_quant=True)) - wt
    e_int4 = int4_absmax(wt) - wt
    rms = lambda e: e.pow(2).mean().sqrt().item()  # noqa: E731
    print(f"{name}: RMS error NF4 {rms(e_nf4):.2e}, int4 {rms(e_int4):.2e} → NF4/int4 = {rms(e_nf4) / rms(e_int4):.3f}")
    lim = 4 * rms(e_int4)
    bins = torch.linspace(-lim, lim, 101).numpy()
    ax.hist(e_int4.numpy(), bins=bins, alpha=0.6, color="C3", label="int4 absmax")
    ax.hist(e_nf4.numpy(), bins=bins, alpha=0.6, color="C0", label="NF4 + double quant")
    ax.set_yscale("log")
    ax.set_xlabel("quantization error ŵ − w (weight units)")
    ax.set_ylabel("count (log)")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 8 bits: LLM.int8()
#
# Before QLoRA, LLM.int8() (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339) stored a base in 8 bits:
# each **row** of a weight (one output feature) is divided by its absolute maximum and rounded to an integer
# in [−127, 127], and the row's absmax is kept in fp32:
#
# $$\hat w_{rj} = \mathrm{round}\left(127\,\frac{w_{rj}}{a_r}\right)\cdot\frac{a_r}{127},\qquad a_r = \max_j |w_{rj}|.$$
#
# 255 evenly spaced levels against NF4's 16: the cell below measures both on the same weights of the base,
# layer by layer.

# %%
print(f"{'layer':28s} {'shape':>11s} {'int8 bits/w':>11s} {'NF4 bits/w':>10s} {'RMS err int8':>12s} "
      f"{'RMS err NF4':>11s} {'int8 / NF4':>10s}")
errors = {"int8": [], "nf4": []}
for name, m in base.named_modules():
    if not isinstance(m, nn.Linear) or name == "lm_head":
        continue
    w = m.weight.detach()  # (out, in)
    q8, q4 = quantize_int8(w), quantize_nf4(w, 64, double_quant=True)
    e8, e4 = dequantize_int8(q8) - w, dequantize_nf4(q4) - w  # (out, in) each
    errors["int8"].append(e8.flatten())
    errors["nf4"].append(e4.flatten())
    if name.startswith("transformer.h.0."):  # the first block's four layers; the total below covers all 16
        print(f"{name:28s} {str(tuple(w.shape)):>11s} {q8.bits_per_parameter():11.3f} {q4.bits_per_parameter():10.3f} "
              f"{e8.pow(2).mean().sqrt():12.2e} {e4.pow(2).mean().sqrt():11.2e} "
              f"{(e8.pow(2).mean() / e4.pow(2).mean()).sqrt():10.3f}")
rms8, rms4 = (torch.cat(errors[k]).pow(2).mean().sqrt().item() for k in ("int8", "nf4"))
print(f"all {len(errors['int8'])} Linear layers: RMS error int8 {rms8:.2e}, NF4 {rms4:.2e} "
      f"→ int8 / NF4 = {rms8 / rms4:.3f}")
course.claim(rms8 < 0.25 * rms4,
             f"on the same weights, 8-bit row-wise rounding errs {rms4 / rms8:.0f}× less than NF4 (RMS over all "
             f"Linear layers), for about twice the bits")

# %% [markdown]
# The error is not the whole story of LLM.int8(). Its matmul quantizes the **activations** row-wise too, and
# large models have a few feature dimensions with outliers (|x| ≥ 6): one such value sets its row's absmax and
# flattens every other value of the row to a handful of codes. `Int8Linear` therefore sends the input columns
# that hold an outlier through a 16-bit matmul (`threshold`, 6.0 as in the paper; 0 turns that off). One layer
# of the base, an input with one outlier feature:

# %%
layer = base.transformer.h[0].mlp.c_fc  # Linear(160, 640)
x = torch.randn(64, layer.in_features, generator=torch.Generator().manual_seed(4))  # (64, 160)
x[:, 7] *= 40  # feature 7 carries outliers, as in LLM.int8()'s large models
with torch.no_grad():
    y = layer(x)  # (64, 640) the dense reference
    for threshold in (0.0, 6.0):
        y8 = Int8Linear.from_linear(layer, threshold=threshold)(x)
        print(f"Int8Linear, threshold {threshold:3.1f}: relative error of the output "
              f"{((y8 - y).norm() / y.norm()).item():.4f}")
int8_errors = {t: ((Int8Linear.from_linear(layer, threshold=t)(x) - y).norm() / y.norm()).item() for t in (0.0, 6.0)}
print(f"the outlier column in 16 bits cuts the error {int8_errors[0.0] / int8_errors[6.0]:.1f}×")

# %% [markdown]
# ### Two measurements in fresh processes, started now
#
# Peak memory on the CPU is the process's peak resident set (VmHWM in `/proc/self/status`; `minipeft.measure`'s
# `reset_peak_memory` resets it through `/proc/self/clear_refs` and returns the memory in use, `peak_memory_mb`
# reads the peak). A process's resident memory never shrinks back, and this notebook's own process holds a few
# hundred MiB of Python, PyTorch and earlier cells, so each measurement runs in a **fresh process**. They are
# started here, one after another in the background, and read later in the chapter, while the training below
# runs:
#
# - `python -m minipeft.memory_report`: LoRA (r = 8, every Linear) on the base in 16, 8 and 4 bits, one fresh
#   process per row; the module's docstring says what each column counts.
# - a training step of LoRA on the base at batch sizes 1 … 32, each measured three times: the peak above the
#   memory in use before the step; and, in the same process, the bytes of the tensors the model keeps between
#   steps (weights, buffers, AdamW's state).

# %%
BATCH_PROBE = textwrap.dedent("""
    import json, sys, torch
    from minipeft import kernels
    from minipeft.measure import peak_memory_mb, reset_peak_memory
    from minipeft.pretrain import load_base
    from minipeft.tuners import LoraConfig, get_peft_model
    kernels.set_backend("reference"); torch.manual_seed(0)  # noqa: E702
    model = get_peft_model(load_base("default"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    T = model.base_model.config.block_size
    def step(batch):
        idx = torch.randint(0, 256, (batch, T + 1))  # (batch, T + 1) tokens: inputs and next-token targets
        model(idx[:, :-1], targets=idx[:, 1:])[1].backward(); opt.step(); opt.zero_grad(set_to_none=True)  # noqa: E702
    step(1)  # the first step creates AdamW's state and loads the math kernels: no batch size's cost
    tensors = [*model.parameters(), *model.buffers(),
               *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    resident = sum(t.numel() * t.element_size() for t in tensors) / 2**20  # MiB kept between steps
    peaks, in_use = {}, []
    for batch in map(int, sys.argv[1].split(",")):
        for _ in range(3):
            before = reset_peak_memory("cpu")  # MiB in use now; the peak starts here
            in_use.append(before)
            step(batch)
            peaks.setdefault(batch, []).append(peak_memory_mb("cpu") - before)
    print(json.dumps({"peaks": peaks, "resident_mib": resident, "in_use_mib": in_use}))
""")
BATCHES = [1, 2, 4, 8, 16, 32]
MEMORY_ARGS = ["--preset", "default", "--device", "cpu", "--batch", "8", "--seq", "128", "--r", "8", "--steps", "2"]
# `--worker BITS` is what `python -m minipeft.memory_report` runs in a fresh process for each row of its table
commands = {bits: [sys.executable, "-m", "minipeft.memory_report", *MEMORY_ARGS, "--worker", str(bits)]
            for bits in (16, 8, 4)}
commands["batch"] = [sys.executable, "-c", BATCH_PROBE, ",".join(map(str, BATCHES))]
env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS
fresh = {}


def run_fresh():  # one process after another, on the core this notebook's single thread leaves free
    for key, cmd in commands.items():
        fresh[key] = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


background = threading.Thread(target=run_fresh)
background.start()


def fresh_result(key):
    """The JSON that fresh process `key` printed last (waits for the background measurements)."""
    background.join()
    if fresh[key].returncode:
        raise RuntimeError(f"the fresh process {key!r} failed:\n{fresh[key].stderr[-2000:]}")
    return json.loads(fresh[key].stdout.strip().splitlines()[-1])


# %% [markdown]
# ### Exercise 5.2 — LoRA on a 16-, an 8- and a 4-bit base
#
# Same LoRA (r = 8, α = 16, every Linear of the blocks), same 80 steps of batch 8 on `sentiment`, same rate
# 5e-3, same batches. The only difference is the base's Linear layers: dense (fp32 on this CPU; on a GPU the
# dense reference would be bf16), `quantize_model(..., bits=8)` (`Int8Linear`, LLM.int8()) or
# `quantize_model(..., bits=4)` (`NF4Linear`: codes + double-quantized absmax, dequantized in each forward).

# %%
task = load_task("sentiment")
lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
get_batch = lambda g: task_batch(task, tok, 16, base.config.block_size, g)  # noqa: E731  (probes, 16 rows)
train_batch = lambda g: task_batch(task, tok, 8, base.config.block_size, g)  # noqa: E731
LR = 5e-3
models = {"LoRA, dense base": get_peft_model(load_base("default"), lora_cfg),
          "LoRA, int8 base": get_peft_model(quantize_model(load_base("default"), bits=8), lora_cfg),
          "QLoRA, NF4 base": get_peft_model(quantize_model(load_base("default"), bits=4), lora_cfg)}
print(models["QLoRA, NF4 base"].base_model.transformer.h[0].attn.c_attn)
runs = {}
for name, model in models.items():
    torch.manual_seed(0)
    res = train(model, train_batch, TrainConfig(steps=80, lr=LR, batch_size=8, warmup_steps=10),
                loss_fn=task_loss(task, tok), progress=False)
    runs[name] = (res, evaluate(model, task, tok, "validation"))
    print(f"{name:17s}: validation accuracy {runs[name][1]:.2f}, mean loss of the last 10 steps "
          f"{sum(res.losses[-10:]) / 10:.4f} ({res.seconds:.0f} s)")
ref_res, ref_acc = runs["LoRA, dense base"]
n_val = len(task.validation)
ref_lo, ref_hi = wilson(ref_acc, n_val)
for name, (res, acc) in list(runs.items())[1:]:
    gap = sum(res.losses[-10:]) / 10 - sum(ref_res.losses[-10:]) / 10
    lo, hi = wilson(acc, n_val)
    shown = "a loss shown" if hi < ref_lo else "a gain shown" if lo > ref_hi else "no difference shown"
    print(f"{name} − dense: loss {gap:+.4f} nats, accuracy {acc - ref_acc:+.2f} ([{lo:.2f}, {hi:.2f}] against "
          f"[{ref_lo:.2f}, {ref_hi:.2f}], 95% Wilson on {n_val} reviews: {shown} for this seed)")
print("one run each: a gap that shows here is this seed's; the QLoRA paper's comparison is over many runs")

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name, (res, acc) in runs.items():
    ax.plot(res.losses, label=f"{name} (val acc {acc:.2f})", alpha=0.8)
ax.set_xlabel("step")
ax.set_ylabel("verbalizer loss (nats)")
ax.set_title("LoRA on a dense, an int8 and an NF4 base, sentiment, batch 8")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The gaps above are one seed each, after 80 steps, so they do not measure what rounding the base costs: the
# accuracy lines say whether a gap shows on the validation reviews at all, and how far the loss moves from one
# seed to the next is not measured here, so a loss gap of this size may be one run's noise. Nor is the base's
# weight error the only difference between the rows: `Int8Linear` also rounds the *activations* to 8 bits in
# every forward (LLM.int8(): every input column but the outliers), while `NF4Linear` multiplies unrounded
# activations by its dequantized weight. So the 8-bit base's smaller weight error (the table above) need not
# give it the smaller gap. The QLoRA paper found NF4 with double quantization recovering 16-bit LoRA's results
# on LLaMA models of 7B–65B parameters (Dettmers et al. §4); larger models have more redundancy to absorb the
# rounding.
#
# ### Exercise 5.2 (continued) — 65 B parameters on one 48 GB GPU
#
# The QLoRA paper's headline: fine-tuning a 65B model on a single 48 GB GPU. The arithmetic, with this
# chapter's measured format. The model is LLaMA-65B (Touvron et al. 2023, Table 2: 80 layers, width 8192,
# 64 heads; SwiGLU MLP of width 22016; vocabulary 32000). Stated assumptions:
#
# - weights: every Linear of the blocks in NF4 with double quantization, **bits per weight from minipeft's
#   format** (`nf4_nbytes`, the bytes `quantize_nf4` allocates, for each matrix's exact size); the embeddings,
#   the output layer and the norms stay in bf16;
# - adapter: LoRA r = 64 on every Linear of the blocks (QLoRA's setting), its weights and gradients in bf16
#   and AdamW's two moments in fp32, no fp32 master copy: 2 + 2 + 8 = 12 bytes per adapter parameter;
# - activations: batch 1 × 512 tokens, gradient checkpointing at every block's input (16-bit), plus one
#   block recomputed in backward (Korthikanti et al. 2022's s·b·h·(34 + 5·a·s/h) bytes of one block) and
#   the logits with their fp32 loss copy and gradient;
# - not counted: the CUDA context and allocator fragmentation (a few hundred MB to a few GB).

# %%
L, d, d_ff, vocab, heads = 80, 8192, 22016, 32000, 64  # LLaMA-65B
linears = [(d, d)] * 4 + [(d_ff, d)] * 2 + [(d, d_ff)]  # (out, in): q, k, v, o; gate, up; down
n_linear = L * sum(o * i for o, i in linears)
n_other = 2 * vocab * d + (2 * L + 1) * d  # embeddings, output layer, RMSNorm weights: kept in bf16
GiB, GPU = 2**30, 48  # a "48 GB" card (RTX A6000, A40) holds 48 GiB
r = 64
n_lora = L * sum(r * (o + i) for o, i in linears)  # A (r, in) and B (out, r) per Linear


def activation_bytes(b, s):
    """Batch b × s tokens, gradient checkpointing: the 80 block inputs, one block recomputed, the logits."""
    checkpoints = L * b * s * d * 2
    one_block = b * s * d * (34 + 5 * heads * s / d)
    logits = b * s * vocab * (2 + 4 + 4)  # bf16 logits, fp32 copy for the loss, fp32 gradient
    return checkpoints + one_block + logits


base_bytes = {16: 2 * n_linear, 8: L * sum(int8_nbytes(o, i) for o, i in linears),
              4: L * sum(nf4_nbytes(o * i, 64, double_quant=True) for o, i in linears)}
bits_measured = 8 * base_bytes[4] / n_linear
print(f"LLaMA-65B: {n_linear + n_other:,d} parameters ({n_linear / 1e9:.2f} B in the blocks' Linear layers); "
      f"NF4 + double quant: {bits_measured:.4f} bits per weight (minipeft's format)")
print(f"LoRA r={r} on all {7 * L} Linear layers: {n_lora / 1e6:,.0f} M parameters "
      f"({100 * n_lora / (n_linear + n_other):.2f}% of the model)")
columns_65b = ["Linear weights", "other (bf16)", "adapter+grad+AdamW", "activations", "total"]
print("\nbase    " + "".join(f"{c:>20s}" for c in columns_65b) + f"   fits {GPU} GiB?")
totals = {}
for bits, wb in base_bytes.items():
    parts = [wb, 2 * n_other, 12 * n_lora, activation_bytes(1, 512)]  # bytes
    totals[bits] = sum(parts)
    print(f"{bits:>2d}-bit  " + "".join(f"{v / GiB:16.1f} GiB" for v in [*parts, totals[bits]])
          + f"   {'yes' if totals[bits] < GPU * GiB else 'no'}")
full_16 = (n_linear + n_other) * (2 + 2 + 8)  # bf16 weights and gradients, fp32 AdamW moments, no master copy
full_master = (n_linear + n_other) * (2 + 2 + 8 + 4)  # the same plus an fp32 master copy (chapter 1's 16 B/param)
print(f"full 16-bit fine-tuning, 12 bytes per parameter (bf16 weights and gradients, AdamW's moments in 32 bits, "
      f"no fp32 master copy — the accounting of the QLoRA paper's 'more than 780 GB'): {full_16 / 1e9:,.0f} GB "
      f"({full_16 / GiB:,.0f} GiB) before any activation")
print(f"with chapter 1's fp32 master copy, 16 bytes per parameter: {full_master / 1e9:,.0f} GB "
      f"({full_master / GiB:,.0f} GiB)")
no_dq = L * sum(nf4_nbytes(o * i, 64, double_quant=False) for o, i in linears)
print(f"double quantization saves {8 * (no_dq - base_bytes[4]) / n_linear:.3f} bits per weight here, "
      f"{(no_dq - base_bytes[4]) / GiB:.1f} GiB of the 4-bit total")
longest = max(s for s in (256, 512, 1024, 2048, 4096, 8192)
              if totals[4] - activation_bytes(1, 512) + activation_bytes(1, s) < GPU * GiB)
print(f"with the 4-bit base, the longest sequence (batch 1, powers of two) that fits: {longest} tokens")
course.claim(totals[4] < GPU * GiB <= totals[8],
             f"65B with QLoRA fits one {GPU} GiB GPU ({totals[4] / GiB:.1f} GiB by this arithmetic, "
             f"{GPU - totals[4] / GiB:.1f} GiB to spare), and only with the 4-bit base: on 8 bits it needs "
             f"{totals[8] / GiB:.0f} GiB")

# %% [markdown]
# The 4-bit weights are most of it; the adapter with its optimizer state is the second item, and the reason
# QLoRA also pages AdamW's state to CPU memory when a long sequence spikes the activations (its "paged
# optimizers"). The last line above says what double quantization contributes to the margin.
#
# ### The memory table
#
# Weights, gradients and AdamW state, summed over the real tensors after one optimizer step (NF4 codes and
# scales are buffers, so buffers are counted too). Activations are not included.

# %%
def one_batch_loss(m):
    return task_loss(task, tok)(m, *get_batch(torch.Generator().manual_seed(1)))


# `state_bytes` runs one real AdamW step on a copy; its "weights" are parameters and buffers
table = {"full fine-tuning": state_bytes(load_base("default"), one_batch_loss),
         "LoRA (dense fp32 base)": state_bytes(models["LoRA, dense base"], one_batch_loss),
         "LoRA (int8 base)": state_bytes(models["LoRA, int8 base"], one_batch_loss),
         "QLoRA (NF4 base)": state_bytes(models["QLoRA, NF4 base"], one_batch_loss)}
columns = ("weights", "gradients", "optimizer_state")
print(f"{'MiB':24s} {'weights':>10s} {'gradients':>10s} {'AdamW':>10s} {'total':>10s}")
for name, t in table.items():
    print(f"{name:24s} " + " ".join(f"{t[c] / 2**20:10.3f}" for c in columns)
          + f" {sum(t[c] for c in columns) / 2**20:10.3f}")

# %% [markdown]
# The same question for training as a whole, from the fresh processes started above: `minipeft.memory_report`
# casts the base to bf16 (the 16-bit row), quantizes its Linear layers to 8 or 4 bits for the other rows and
# attaches the same LoRA to each, then trains two AdamW steps at batch 8 × 128 tokens. "kept for bwd" is what
# autograd saves for backward that the model does not own (activations); "peak" is the process's peak
# resident memory during training, counted from before the model was built.

# %%
mem_rows = [fresh_result(bits) for bits in (16, 8, 4)]
print(format_memory_table(mem_rows, f"CPU · preset default · batch 8 × 128 · LoRA r=8 on every Linear · bf16 · "
                                    f"torch {torch.__version__}"))
m16, m8, m4 = mem_rows
same_adapter = all(r[k] == m16[k] for r in mem_rows for k in ("adapter", "gradients", "optimizer"))
course.claim(m16["weights"] > 1.5 * m8["weights"] and m8["weights"] > 1.2 * m4["weights"] and same_adapter,
             f"of the training state, the base's precision changes only the weights: 8-bit holds "
             f"{m8['weights'] / m16['weights']:.2f}× "
             f"and 4-bit {m4['weights'] / m16['weights']:.2f}× the 16-bit weights, adapter, gradients and AdamW "
             f"state are the same bytes in all three rows")
peaks = [r["peak_mb"] for r in mem_rows]
kept_bytes = [r["kept_for_backward"] for r in mem_rows]   # bytes autograd saves, per row
kept_spread = max(kept_bytes) - min(kept_bytes)
kept_text = (f"{m16['kept_for_backward'] / 2**20:.1f} MiB for backward in every row"
             + (" (the same bytes)" if kept_spread == 0 else f" (the rows differ by {kept_spread:,} bytes)")
             if kept_spread < 0.05 * 2**20 else   # the same to the 0.1 MiB printed
             "for backward " + ", ".join(f"{r['bits']}-bit {r['kept_for_backward'] / 2**20:.1f} MiB" for r in mem_rows))
print(f"peak in training: 16-bit {m16['peak_mb']:.1f} MiB, 8-bit {m8['peak_mb']:.1f} MiB, 4-bit {m4['peak_mb']:.1f} "
      f"MiB, of which autograd keeps {kept_text}")
print(f"the rows' peaks span {max(peaks) - min(peaks):.1f} MiB, their weights "
      f"{(m16['weights'] - m4['weights']) / 2**20:.1f} MiB: at this size the weights are "
      f"{m16['weights'] / 2**20 / m16['peak_mb']:.0%} of the 16-bit peak")

# %% [markdown]
# Reading it: on this 1.3 M-parameter base the weights are a small part of the peak (the last line), which is
# mostly what one training step allocates around them (activations, temporaries, the runtime's own growth);
# so the weights column tells the rows apart where the peak hardly can. On a 65B model the proportions
# reverse (the arithmetic above): there the weights are the peak, and their bits decide whether it fits.
# `Int8Linear` and `NF4Linear` keep it that way in backward: each saves only its codes and dequantizes again
# for the input gradient (as bitsandbytes' `MatMul8bitLt` and `MatMul4Bit` do), so no layer's dense weight
# outlives its own forward.
#
# ### "Reduce batch size" — what it buys
#
# The prompt- and prefix-tuning notes list "Reduce batch size" among their fixes for memory trouble (second,
# after "Use 8-bit training", which the rows above measure). What a smaller batch shrinks is the activations:
# they scale with batch × tokens, while weights, adapter and optimizer state do not move. The fresh process
# above measured the peak of one training step at each batch size (three times each; 128 tokens a row), above
# the memory in use just before the step. A straight line through them gives the slope, what each example
# costs. Its intercept is *not* what stays: the memory in use before the step already holds the weights and
# AdamW's state, so subtracting it makes the intercept about zero by construction. What no batch size removes
# is counted instead from the tensors the model keeps between steps, in the same process. Beside them, the
# bytes autograd saves for backward per example, counted in this process with `saved_tensors_hooks` at batch 1.

# %%
probe_result = fresh_result("batch")
batch_peaks = {int(b): v for b, v in probe_result["peaks"].items()}  # batch -> [MiB, MiB, MiB]
resident = probe_result["resident_mib"]  # weights, buffers and AdamW's state, kept between steps
in_use = sorted(probe_result["in_use_mib"])[len(probe_result["in_use_mib"]) // 2]  # the process before a step
xs = torch.tensor([b for b, v in batch_peaks.items() for _ in v], dtype=torch.float64)
ys = torch.tensor([p for v in batch_peaks.values() for p in v], dtype=torch.float64)
design = torch.stack([xs, torch.ones_like(xs)], 1)  # (n, 2): batch, 1
slope, intercept = torch.linalg.lstsq(design, ys[:, None]).solution.flatten().tolist()  # least squares
r2 = 1 - ((ys - (slope * xs + intercept)) ** 2).sum().item() / ((ys - ys.mean()) ** 2).sum().item()

lora16 = get_peft_model(load_base("default"), lora_cfg)
owned = {t.untyped_storage().data_ptr() for t in [*lora16.parameters(), *lora16.buffers()]}
kept = {}


def pack(t):  # called for every tensor autograd saves for backward
    if t.untyped_storage().data_ptr() not in owned:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t


one = torch.randint(0, 256, (1, base.config.block_size + 1), generator=torch.Generator().manual_seed(5))  # (1, T + 1)
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    lora16(one[:, :-1], targets=one[:, 1:])[1]
saved_per_example = sum(kept.values()) / 2**20

print(f"{'batch':>5s} {'peak above the memory in use (MiB), 3 runs':>45s}")
for b, v in batch_peaks.items():
    print(f"{b:>5d} {', '.join(f'{p:6.1f}' for p in v):>45s}")
print(f"fit: peak above the memory in use ≈ {slope:.2f} MiB × batch {intercept:+.1f} MiB (R² = {r2:.4f}); the "
      f"intercept is ~0 because the baseline already holds the model; autograd saves {saved_per_example:.2f} MiB "
      f"per example")
print(f"kept between steps (weights, buffers, AdamW state, from the tensors): {resident:.2f} MiB, inside the "
      f"{in_use:.0f} MiB the process held before a step (mostly Python and PyTorch themselves)")
b_max = max(BATCHES)
total_max = resident + slope * b_max + intercept
print(f"verdict: halving the batch from {b_max} to {b_max // 2} saves {slope * b_max / 2:.0f} MiB of the "
      f"{total_max:.0f} MiB that the model's tensors and one step at batch {b_max} need "
      f"({slope * b_max / 2 / total_max:.0%}); the {resident:.2f} MiB kept between steps stay at every batch size")
cross = next((b for b in range(1, b_max + 1) if slope * b + intercept > resident), None)
where = ("the step is the larger part at every batch size" if cross == 1 else
         f"the model's tensors stay the larger part up to batch {b_max}" if cross is None else
         f"from batch {cross} on, the step is the larger part")
print(f"one step's own memory is {(slope + intercept) / resident:.2f}× the model's tensors at batch 1 and "
      f"{(slope * b_max + intercept) / resident:.0f}× at batch {b_max}: {where}")
course.claim(slope > 0 and r2 > 0.95 and 0.5 < slope / saved_per_example < 2,
             f"a training step's peak grows linearly with the batch (R² {r2:.3f}), {slope:.2f} MiB per example, "
             f"within 2× of what autograd saves per example ({saved_per_example:.2f} MiB): reducing the batch "
             f"reduces the activations and nothing else")

fig, ax = plt.subplots(figsize=(6.5, 3.6))
ax.scatter(xs, ys, color="C0", zorder=3, label="measured peak, 3 runs per batch size")
grid = torch.linspace(0, b_max, 50)
ax.plot(grid, slope * grid + intercept, color="C1", label=f"fit: {slope:.2f} MiB/example {intercept:+.1f} MiB")
ax.plot(grid, saved_per_example * grid, color="C2", ls="--",
        label=f"saved for backward: {saved_per_example:.2f} MiB/example")
ax.axhline(resident, color="0.4", ls=":", label=f"kept between steps (weights, AdamW): {resident:.2f} MiB")
ax.set_xlabel("batch size (rows of 128 tokens)")
ax.set_ylabel("peak above memory in use (MiB)")
ax.set_title("one LoRA training step on the default base (CPU, fresh process)")
ax.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# The slope and the saved bytes differ by what a step allocates besides the saved tensors (gradients of the
# activations flowing back, temporaries); both are proportional to the batch, which is the point: a smaller
# batch cuts the activations and their gradients, and only those. When the weights are the problem (the 65B
# arithmetic above), no batch size helps; that is what quantizing the base is for. To keep the number of
# examples per update while the batch shrinks, accumulate gradients over several smaller batches.
#
# ### Merging a QLoRA adapter into a 16-bit base
#
# `merge_and_unload` on an NF4 base gives dense layers, dequantize(W₀) + (α/r)·B·A: exact, but no longer
# 4-bit. Cast to bf16, that is the 16-bit model one would serve. `merge_and_requantize` instead rounds the
# merged weight back to NF4 and reports what that costs.

# %%
qlora = models["QLoRA, NF4 base"]
probe, _, probe_mask = get_batch(torch.Generator().manual_seed(2))
with torch.no_grad():
    adapted = qlora(probe, attention_mask=probe_mask)[0]
_, requant = copy.deepcopy(qlora).merge_and_requantize(probe)
merged = qlora.merge_and_unload().to(torch.bfloat16)  # a plain GPT with dense bf16 Linear layers
print(type(merged).__name__, "| layer:", merged.transformer.h[0].attn.c_attn,
      "| NF4Linear left:", any(isinstance(m, NF4Linear) for m in merged.modules()))
with torch.no_grad():
    d16 = (merged(probe, attention_mask=probe_mask)[0].float() - adapted).abs().max()
print(f"max |logits| difference against the unmerged QLoRA model: bf16 merged {d16:.3f}; "
      f"fp32 merged {requant['dense_max_abs']:.1e}; "
      f"merged and re-quantized to NF4 {requant['requantized_max_abs']:.3f}")
acc_merged = evaluate(merged, task, tok, "validation")
print(f"validation accuracy: QLoRA {runs['QLoRA, NF4 base'][1]:.2f}, merged into bf16 {acc_merged:.2f}")

# %% [markdown]
# ### Exercise 5.4 — why the adapters stay in higher precision
#
# Two measurements. First, quantize the trained LoRA matrices themselves to NF4 and see what the model
# loses. Second, the training argument: an optimizer step changes a weight by about the learning rate
# (Adam's steps are ≈ lr per entry). Stored in NF4, a change smaller than half the gap between two levels
# (the gaps are absmax × 0.08 … 0.30) is rounded away. How many steps that loses depends on the step against
# the gaps, so the cell measures it at the schedule's peak rate and at its final rate.

# %%
lora = models["LoRA, dense base"]
state = {k: v.clone() for k, v in lora.adapter_state_dict("default").items()}
with torch.no_grad():
    logits_16 = lora(probe, attention_mask=probe_mask)[0]
    lora.load_adapter_state_dict("default", {k: dequantize_nf4(quantize_nf4(v, 64)) for k, v in state.items()})
    logits_q = lora(probe, attention_mask=probe_mask)[0]
    acc_q = evaluate(lora, task, tok, "validation")
    lora.load_adapter_state_dict("default", state)
delta_err = []
for layer in (m for m in lora.modules() if isinstance(m, LoraLinear)):
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    dW = B @ A
    dW_q = dequantize_nf4(quantize_nf4(B, 64)) @ dequantize_nf4(quantize_nf4(A, 64))
    delta_err.append(((dW_q - dW).norm() / dW.norm()).item())
print(f"LoRA matrices in NF4: relative error of ΔW = B·A {sum(delta_err) / len(delta_err):.3f} (mean over "
      f"{len(delta_err)} layers); validation accuracy {runs['LoRA, dense base'][1]:.2f} → {acc_q:.2f}; "
      f"max |logit change| {(logits_q - logits_16).abs().max():.3f}")

B = next(m for m in lora.modules() if isinstance(m, LoraLinear)).lora_B["default"].weight.detach()
stored = {"fp32": lambda x: x, "bf16": lambda x: x.bfloat16().float(),
          "NF4": lambda x: dequantize_nf4(quantize_nf4(x, 64))}
print(f"a trained lora_B {tuple(B.shape)}: median |entry| {B.abs().median():.1e}, median block absmax "
      f"{B.reshape(-1, 64).abs().amax(1).median():.1e}")
print("share of entries that move by at least half of one optimizer step when stored in")
took = {}
for lr in (LR, LR / 10):  # the schedule's peak rate and its final rate (min_lr_ratio 0.1)
    step = lr * torch.sign(torch.randn_like(B))  # an Adam step is about ±lr per entry
    took[lr] = {name: (((store(store(B) + step) - store(B)) * step.sign()) > lr / 2).float().mean().item()
                for name, store in stored.items()}
    print(f"   step ±{lr:g}: " + ", ".join(f"{k} {100 * v:5.1f}%" for k, v in took[lr].items()))
acc_16 = runs["LoRA, dense base"][1]
lo, hi = wilson(acc_16, len(task.validation))  # the 95% interval of one accuracy on these reviews
effect = "no change shown" if lo <= acc_q <= hi else "a loss" if acc_q < lo else "a gain"
print(f"so: a finished adapter stored in NF4: accuracy {acc_16:.2f} → {acc_q:.2f}, {effect} on "
      f"{len(task.validation)} reviews (95% interval [{lo:.2f}, {hi:.2f}]); during training NF4 keeps "
      f"{took[LR]['NF4']:.0%} of the steps at the peak rate and {took[LR / 10]['NF4']:.0%} at the final rate, "
      f"bf16 {min(took[LR]['bf16'], took[LR / 10]['bf16']):.0%} at both")
course.claim(took[LR / 10]["bf16"] > 0.99 and took[LR / 10]["NF4"] < 0.5,
             f"an adapter stored in NF4 loses its updates as the learning rate decays: at the schedule's final rate "
             f"only {took[LR / 10]['NF4']:.0%} of its steps move a weight (at the peak rate "
             f"{took[LR]['NF4']:.0%}), while bf16 keeps {took[LR / 10]['bf16']:.0%}")

# %% [markdown]
# Storing a *finished* adapter in NF4 costs the ΔW error printed above; the decisive problem is training:
# the smaller the step against the gaps between NF4 levels, the more steps round to nothing (the shares
# above, at two rates of the same schedule), so a 4-bit adapter would stop learning as its rate decays.
# QLoRA therefore keeps the adapter and its gradients in 16 bits and AdamW's state in 32 bits, and only the
# frozen base, which never receives an update, is stored in 4 bits (Dettmers et al. §3).
#
# ### Exercise 5.5 (challenge) — bitsandbytes and peft
#
# minipeft's NF4 is written to be bit-identical with bitsandbytes' CPU path. `bitsandbytes.functional.
# quantize_4bit` on a real weight of the base, field by field:

# %%
# On a CPU with AVX512-BF16, importing bitsandbytes asks the `kernels` package for an optional matmul kernel from
# the Hugging Face Hub, and either may log a warning when it is not there; this cell uses only bitsandbytes' own
# quantize/dequantize functions.
for name in ("bitsandbytes", "kernels"):
    logging.getLogger(name).setLevel(logging.ERROR)
try:
    import bitsandbytes
    import bitsandbytes.functional as bnbF
except ImportError as e:  # pragma: no cover - the dev extra installs it
    bnbF = None
    print(f"bitsandbytes not installed ({e}); `pip install -e .[dev]` adds it")
if bnbF is not None:
    w = base.transformer.h[0].attn.c_attn.weight.detach()  # (480, 160)
    packed, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, blocksize=64, double_quant=True)
    print(f"bitsandbytes {bitsandbytes.__version__}: packed {tuple(packed.shape)} {packed.dtype}")
    print(f"  codes         identical: {torch.equal(packed.flatten(), ours.codes)}")
    print(f"  absmax codes  identical: {torch.equal(st.absmax, ours.absmax_codes)}")
    print(f"  absmax scales identical: {torch.equal(st.state2.absmax, ours.absmax_scale)}")
    print(f"  offset        identical: {torch.equal(st.offset, ours.absmax_offset)}")
    flat_packed, flat_st = bnbF.quantize_4bit(w.flatten(), blocksize=64, quant_type="nf4", compress_statistics=True)
    d1 = (bnbF.dequantize_4bit(flat_packed, flat_st) - dequantize_nf4(ours).flatten()).abs().max().item()
    d2 = (bnbF.dequantize_4bit(packed, st) - dequantize_nf4(ours)).abs().max().item()
    print(f"  dequantized (1-D): max |bnb − minipeft| = {d1:.1e}")
    rounding = (dequantize_nf4(ours) - w).abs().max().item()
    print(f"  dequantized (2-D, 160 columns): max |bnb − minipeft| = {d2:.1e}; "
          f"max |minipeft − w| = {rounding:.3f} (NF4's own rounding error on this weight)")
    if d2 > 1e-6 and d1 < 1e-6:
        times = d2 / rounding
        size = (f"{times:.1f}× NF4's own largest rounding error of {rounding:.3f}" if times >= 1.5 else
                f"about NF4's own largest rounding error of {rounding:.3f}" if times > 0.67 else
                f"{times:.0%} of NF4's own largest rounding error of {rounding:.3f}")
        print(f"  finding: this bitsandbytes dequantizes the same bytes correctly as a 1-D tensor but not as the "
              f"2-D weight (off by up to {d2:.3f}, {size}): rows of 160 are not a multiple of the block size, so "
              f"blocks of 64 cross rows")
    cb, scb, _ = bnbF.int8_vectorwise_quant(w)  # LLM.int8()'s weight format: codes (480, 160) int8, absmax (480,)
    q8 = quantize_int8(w)
    print(f"  int8 row-wise (int8_vectorwise_quant): codes identical {torch.equal(cb, q8.codes)}, "
          f"absmax identical {torch.equal(scb, q8.absmax)}")

# %% [markdown]
# The lines above compare field by field. The 2-D dequantization is worth a look on any bitsandbytes
# version: this weight's rows (160) are not a multiple of the block size, so blocks of 64 cross rows, which a
# CPU path that restarts blocks per row gets wrong (a "finding" line above says when this version does).
# GPT-2-sized models have rows of 768, a multiple of 64, and do not meet it.
#
# peft's own QLoRA path (`bnb.nn.Linear4bit` under `peft.LoraConfig`) trains only on a CUDA device. The
# cell below runs it when one is present:

# %%
if torch.cuda.is_available() and bnbF is not None:
    import peft
    from bitsandbytes.nn import Linear4bit

    dense = nn.Sequential(nn.Linear(160, 480), nn.GELU(), nn.Linear(480, 160))
    q4 = nn.Sequential(Linear4bit(160, 480, quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16),
                       nn.GELU(),
                       Linear4bit(480, 160, quant_type="nf4", compress_statistics=True, compute_dtype=torch.bfloat16))
    q4.load_state_dict(dense.state_dict())
    q4 = q4.cuda()  # the weights are quantized when they move to the GPU
    torch.cuda.reset_peak_memory_stats()
    model = peft.get_peft_model(q4, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0", "2"]))
    model.print_trainable_parameters()
    x = torch.randn(64, 160, device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        loss = (model(x).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"peft + bitsandbytes QLoRA: 3 steps ran, loss {loss.item():.4f}, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
else:
    print("no CUDA device here: on a GPU this cell builds two bnb.nn.Linear4bit layers (NF4, double quant), "
          "wraps them with peft.LoraConfig(r=8), prints the trainable parameters (LoRA only), runs 3 training "
          "steps and prints the peak GPU memory.")

# %% [markdown]
# ## Summary
#
# - NF4 is 16 levels at quantiles of a normal, each block of 64 weights scaled by its absmax; double
#   quantization stores those scales in 8 bits, for the bits per weight measured above instead of 4.5.
# - LLM.int8()'s row-wise 8-bit format errs far less than NF4 on the same weights (the ratio measured above)
#   for twice the bits; its matmul keeps outlier input columns in 16 bits.
# - LoRA trains the same way on a dense, an 8-bit and a 4-bit base: the base's precision changes only the
#   weights column of the memory table, not the adapter, its gradients or its optimizer state.
# - A smaller batch shrinks the activations, linearly (the slope per example measured above), and nothing else;
#   when the weights do not fit, only fewer bits per weight help — which is how 65B fits one 48 GB GPU.
# - The adapter stays in 16 bits (AdamW's state in 32) because its updates would round away in NF4 as the
#   learning rate decays (the shares measured above); the frozen base, which never receives an update, is the
#   part that can be 4-bit.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks on them.
#
# ### Exercise 1 — NormalFloat with k bits
#
# Generalise the five-line `nf4_levels` above: `normal_float_levels(bits, offset)` returns the 2^bits sorted
# levels of NF-k: 2^(bits−1) positive quantiles Φ⁻¹(p) at p evenly spaced from `offset` down to 0.5 (0.5
# dropped), 2^(bits−1) − 1 negative ones built the same way and mirrored, an exact 0, all divided by the
# largest. The check compares bits = 4 with the stored table and bits = 3, 2 with a recomputation.

# %%
def normal_float_levels(bits, offset=NF4_OFFSET):
    """The (2**bits,) sorted NF-k levels in [-1, 1]."""
    return None  # your code here


# %%
check_normal_float_levels(normal_float_levels)

# %% [markdown]
# ### Exercise 2 — blockwise absmax, both ways
#
# Write `blockwise_quantize(w, blocksize)` → (codes, absmax): flatten `w`, one absmax per run of `blocksize`
# weights (fp32, shape (n / blocksize,)), each value to the nearest level of `NF4_CODEBOOK` after dividing by
# its block's absmax, two 4-bit indices per uint8 (element 2i in the high nibble). And
# `blockwise_dequantize(codes, absmax, shape, blocksize)`, its inverse. The check compares both with
# `quantize_nf4(w, blocksize, double_quant=False)` and `dequantize_nf4` for several shapes and block sizes.

# %%
def blockwise_quantize(w, blocksize):
    """w (any shape, numel a multiple of blocksize) -> (codes (numel/2,) uint8, absmax (numel/blocksize,) fp32)."""
    return None  # your code here


def blockwise_dequantize(codes, absmax, shape, blocksize):
    """The inverse: codes (numel/2,) uint8, absmax (numel/blocksize,) -> w_hat of `shape`."""
    return None  # your code here


# %%
check_blockwise_nf4(blockwise_quantize, blockwise_dequantize)

# %% [markdown]
# ### Exercise 3 — bits per parameter, every tensor counted
#
# Write `bits_per_parameter(numel, blocksize, double_quant)`: the storage bits per weight of
# `quantize_nf4(torch.randn(numel), blocksize, double_quant)`, from a formula: 4-bit codes (two per byte); per
# block an fp32 absmax, or with double quantization an 8-bit absmax code plus one fp32 scale per 256 blocks and
# the one fp32 mean subtracted first. Count partial blocks as whole ones. The check compares with the real
# tensors' bytes for six sizes.

# %%
def bits_per_parameter(numel, blocksize=64, double_quant=True):
    """Storage bits per weight of an NF4 tensor of `numel` weights."""
    return None  # your code here


# %%
check_bits_per_parameter(bits_per_parameter)

# %% [markdown]
# ### Exercise 4 — int8, row by row
#
# Write `int8_rowwise(w)` → (codes, absmax) for a 2-D weight (out, in): each row's absmax in fp32, shape
# (out,), and codes = round(127 · w / absmax_row) as int8. The check compares with `quantize_int8` on three
# shapes, one with an outlier.

# %%
def int8_rowwise(w):
    """w (out, in) -> (codes (out, in) int8, absmax (out,) fp32)."""
    return None  # your code here


# %%
check_int8_rowwise(int8_rowwise)

# %% [markdown]
# ### Open questions
#
# 1. The 65B arithmetic assumed batch 1 × 512 tokens. Which term grows fastest as the sequence lengthens, and
#    at what length would you turn on QLoRA's paged optimizer (or shorten the sequences) with 48 GB?
# 2. Row-wise int8 errs less than NF4 here, yet QLoRA reports no loss of quality with 4 bits. Which
#    measurement in this chapter would you repeat on a 7B model to see whether the gap still matters?
# 3. An outlier in a *weight* (not an activation) sets its NF4 block's absmax. How does the block size trade
#    the error of the other 63 weights against the bits spent on scales?

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
course.claims_report()
