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
# This chapter answers Exercise 5 of the PEFT exercises (5.1 – 5.5) with minipeft's `minipeft.quant`.
#
# ### Exercise 5.1 — what quantization is
#
# Quantization stores a tensor as small integers plus a scale, w ≈ s·q: fewer bits per weight, so less
# memory and less traffic when the weights are read (inference at batch 1 is bound by reading weights). The
# price is rounding error, which the cells below measure.

# %%
# %matplotlib inline
import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from statistics import NormalDist

import matplotlib.pyplot as plt
import torch
import torch.nn as nn

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import state_bytes
from minipeft.pretrain import load_base
from minipeft.quant import (
    NF4_CODEBOOK,
    NF4Linear,
    dequantize_nf4,
    nf4_codebook_from_quantiles,
    quantize_model,
    quantize_nf4,
    weight_bytes_report,
)
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")
torch.manual_seed(0)
tok = ByteTokenizer()
base = load_base("default")
report = weight_bytes_report(base)
print(f"default base: {report['params']:,d} parameters, {report['quantized_params']:,d} of them in Linear layers "
      f"that QLoRA quantizes")
for k in ("fp32", "bf16", "nf4", "nf4_dq"):
    print(f"  weights stored as {k:7s}: {report[k] / 1e6:6.3f} MB  ({report[k] / report['fp32']:.3f} of fp32)")

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
print("(the measured 4.1270 also counts the one fp32 mean subtracted before quantizing the absmax values)")

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
# ### Exercise 5.2 — QLoRA training against LoRA on the dense base
#
# Same LoRA (r = 8, α = 16, every Linear of the blocks), same 60 steps of batch 16 on `sentiment`, same rate
# 3e-3, same batches. The only difference: `quantize_model` first turns every Linear of the base into an
# `NF4Linear` (codes + double-quantized absmax, dequantized in each forward). The dense base is fp32 here
# (a CPU); on a GPU QLoRA's dense reference would be bf16.

# %%
task = load_task("sentiment")
lora_cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
get_batch = lambda g: task_batch(task, tok, 16, base.config.block_size, g)  # noqa: E731
models = {"LoRA, dense base": get_peft_model(load_base("default"), lora_cfg),
          "QLoRA, NF4 base": get_peft_model(quantize_model(load_base("default")), lora_cfg)}
print(models["QLoRA, NF4 base"].base_model.transformer.h[0].attn.c_attn)
runs = {}
for name, model in models.items():
    torch.manual_seed(0)
    res = train(model, get_batch, TrainConfig(steps=60, lr=3e-3, batch_size=16, warmup_steps=10),
                loss_fn=task_loss(task, tok), progress=False)
    runs[name] = (res, evaluate(model, task, tok, "validation"))
    print(f"{name:17s}: validation accuracy {runs[name][1]:.2f}, mean loss of the last 20 steps "
          f"{sum(res.losses[-20:]) / 20:.4f} ({res.seconds:.0f} s)")
(r_l, a_l), (r_q, a_q) = runs.values()
gap = sum(r_q.losses[-20:]) / 20 - sum(r_l.losses[-20:]) / 20
print(f"gap QLoRA − LoRA: loss {gap:+.4f} nats, accuracy {a_q - a_l:+.2f} "
      f"(the validation split has {len(task.validation)} reviews: one review = {1 / len(task.validation):.2f})")

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name, (res, acc) in runs.items():
    ax.plot(res.losses, label=f"{name} (val acc {acc:.2f})", alpha=0.8)
ax.set_xlabel("step")
ax.set_ylabel("verbalizer loss (nats)")
ax.set_title("LoRA on a dense vs an NF4 base, sentiment, batch 16")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The measured gap above is what 4-bit rounding of the base costs this small model after 60 steps. The QLoRA
# paper found NF4 with double quantization recovering 16-bit LoRA's results on LLaMA models of 7B–65B
# parameters (Dettmers et al. §4); larger models have more redundancy to absorb the rounding.
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
         "QLoRA (NF4 base)": state_bytes(models["QLoRA, NF4 base"], one_batch_loss)}
columns = ("weights", "gradients", "optimizer_state")
print(f"{'':24s} {'weights':>10s} {'gradients':>10s} {'AdamW':>10s} {'total':>10s}")
for name, t in table.items():
    print(f"{name:24s} " + " ".join(f"{t[c] / 1e6:8.3f}MB" for c in columns)
          + f" {sum(t[c] for c in columns) / 1e6:8.3f}MB")

# %% [markdown]
# Peak memory of a training step can't be read off this notebook's own process: its resident set is a few
# hundred MB of Python and PyTorch, the base is 5 MB, and `ru_maxrss` is a high-water mark over the whole
# process life. So each setup runs in a **fresh subprocess** on a wider model (4 layers, width 384, 7.2M
# parameters, randomly initialised: memory does not depend on the values), which measures the resident
# memory of the built model, then resets the kernel's high-water mark (`/proc/self/clear_refs`) and reads
# the peak over two training steps (batch 4 × 32 tokens).

# %%
PROBE = textwrap.dedent("""
    import json, sys, torch
    from minipeft import GPT, GPTConfig
    from minipeft.quant import quantize_model
    from minipeft.tuners import LoraConfig, get_peft_model
    from minipeft import kernels; kernels.set_backend("reference")
    def status(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024  # MiB
    mode = sys.argv[1]; torch.manual_seed(0)
    warm = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=260, block_size=8))  # load the math libraries
    warm(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))[1].backward()
    del warm
    r0 = status("VmRSS")
    model = GPT(GPTConfig(n_layer=4, n_head=6, n_embd=384, vocab_size=260, block_size=128))
    if mode == "QLoRA":
        quantize_model(model)
    if mode != "full fine-tuning":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    idx = torch.randint(0, 256, (4, 32))
    r1 = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    for _ in range(2):
        model(idx, targets=idx)[1].backward(); opt.step(); opt.zero_grad(set_to_none=True)  # noqa: E702
    print(json.dumps({"model MiB": r1 - r0, "step peak over model MiB": status("VmHWM") - r1,
                      "trainable": sum(p.numel() for p in params),
                      "all": sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())}))
""")
env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors go back to the OS
procs = {mode: subprocess.Popen([sys.executable, "-c", PROBE, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for mode in ("full fine-tuning", "LoRA", "QLoRA")}
print(f"{'fresh process, 7.2M-parameter model':38s} {'trainable':>10s} {'model (MiB)':>12s} "
      f"{'step peak above it (MiB)':>26s}")
rows = {}
for mode, p in procs.items():
    out, err = p.communicate(timeout=300)
    if p.returncode:
        print(f"{mode}: could not measure here ({err.strip().splitlines()[-1]})")
        continue
    r = rows[mode] = json.loads(out.strip().splitlines()[-1])
    print(f"{mode:38s} {r['trainable']:>10,d} {r['model MiB']:12.1f} {r['step peak over model MiB']:26.1f}")
    if mode == "full fine-tuning":
        n_full = r["trainable"]
print(f"arithmetic: fp32 weights {4 * n_full / 2**20:.1f} MiB; gradients + two AdamW moments "
      f"{12 * n_full / 2**20:.1f} MiB for full fine-tuning")
if "LoRA" in rows and "QLoRA" in rows:
    peak = rows["QLoRA"]["step peak over model MiB"] - rows["LoRA"]["step peak over model MiB"]
    print(f"QLoRA against LoRA: model {rows['LoRA']['model MiB'] - rows['QLoRA']['model MiB']:.1f} MiB smaller; "
          f"step peak {abs(peak):.1f} MiB {'above' if peak > 0 else 'below'} LoRA's")

# %% [markdown]
# Reading it: "model" also holds a constant ~70 MiB that building any model adds to a fresh process
# (allocator and runtime growth, the same in all three rows), so compare rows with each other. The NF4 model
# is smaller by about the difference between 4 and ~0.52 bytes per quantized weight;
# full fine-tuning's step adds a gradient and two AdamW moments per weight, LoRA's only for its
# adapter. During QLoRA's step, `NF4Linear` runs one autograd op that saves only the packed 4-bit codes and
# their statistics for the backward pass and dequantizes again there for the input gradient (as bitsandbytes'
# `MatMul4Bit` does), trading a little compute for memory: no layer's dense weight outlives its own forward.
# On the CPU the step peak is mostly activations and temporaries (QLoRA's include one layer's weight,
# dequantized for a moment), so the 4-bit weights show in the model column; the last line compares the two.
# (Also: here the dense model is built first and then quantized; a real QLoRA loader quantizes layer by layer
# while reading the checkpoint.)
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
print(f"validation accuracy: QLoRA {a_q:.2f}, merged into bf16 {evaluate(merged, task, tok, 'validation'):.2f}")

# %% [markdown]
# ### Exercise 5.4 — why the adapters stay in higher precision
#
# Two measurements. First, quantize the trained LoRA matrices themselves to NF4 and see what the model
# loses. Second, the training argument: an optimizer step changes a weight by about the learning rate
# (Adam's steps are ≈ lr per entry). Stored in NF4, a change smaller than half the gap between two levels
# (the gaps are absmax × 0.08 … 0.28) is rounded away, so most updates would simply vanish.

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
for lr in (3e-3, 3e-4):  # the schedule's peak rate and its final rate (min_lr_ratio 0.1)
    step = lr * torch.sign(torch.randn_like(B))  # an Adam step is about ±lr per entry
    took = {name: (((store(store(B) + step) - store(B)) * step.sign()) > lr / 2).float().mean().item()
            for name, store in stored.items()}
    print(f"   step ±{lr:g}: " + ", ".join(f"{k} {100 * v:5.1f}%" for k, v in took.items()))

# %% [markdown]
# Storing a *finished* adapter in NF4 costs the ΔW error printed above (here without hurting accuracy);
# the decisive problem is training: in NF4 a step at the schedule's peak rate mostly survives, but at its
# final rate most steps round to nothing (the last line above), so a 4-bit adapter could not fine-tune.
# QLoRA therefore keeps the adapter (and its gradients and optimizer state) in 16 bits, and only the
# frozen base, which never receives an update, is stored in 4 bits (Dettmers et al. §3).
#
# ### Exercise 5.5 (challenge) — bitsandbytes and peft
#
# minipeft's NF4 is written to be bit-identical with bitsandbytes' CPU path. `bitsandbytes.functional.
# quantize_4bit` on a real weight of the base, field by field:

# %%
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
    print(f"  dequantized (1-D): max |bnb − minipeft| = "
          f"{(bnbF.dequantize_4bit(flat_packed, flat_st) - dequantize_nf4(ours).flatten()).abs().max():.1e}")
    print(f"  dequantized (2-D, 160 columns): max |bnb − minipeft| = "
          f"{(bnbF.dequantize_4bit(packed, st) - dequantize_nf4(ours)).abs().max():.2f}, "
          f"max |bnb − w| = {(bnbF.dequantize_4bit(packed, st) - w).abs().max():.2f}")

# %% [markdown]
# The packed bytes and all statistics agree exactly. The last line is a finding: on the CPU, this
# bitsandbytes version dequantizes a 2-D weight whose row length (160) is not a multiple of the block size
# wrongly (blocks of 64 cross rows, and its CPU path appears to restart them per row), while the same
# bytes dequantize correctly as a 1-D tensor. GPT-2-sized models have rows of 768, a multiple of 64, so
# they don't meet it.
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

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
