# %% [markdown]
# # Chapter 3 — LoRA: a low-rank update beside a frozen weight
#
# LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a Linear layer's weight W₀ and learns the
# update as a product of two thin matrices:
#
# $$h = W_0x + b + \frac{\alpha}{r}\,B A x,\qquad A \in \mathbb{R}^{r\times \text{in}},\;
# B \in \mathbb{R}^{\text{out}\times r},\; r \ll \min(\text{in}, \text{out}).$$
#
# B starts at zero, so the model starts exactly as the pretrained one. This chapter answers Exercise 2 of
# the PEFT exercises (2.1 – 2.6): the idea in five lines, the parameter count, attaching and training it, a sweep of
# r and target modules, merging, and saving only A and B.

# %%
# %matplotlib inline
import copy
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn as nn

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import generation_ms_per_token, state_bytes
from minipeft.pretrain import load_base
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, LoraLinear, PeftModel, get_peft_model

NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")  # plain PyTorch on the CPU; chapter 8 runs the fused Triton kernel
torch.manual_seed(0)
tok = ByteTokenizer()
base = load_base("default")
cfg = base.config
print(cfg)

# %% [markdown]
# ### Exercise 2.1 — W + BA, in five lines, then minipeft's `LoraLinear`

# %%
def lora_forward(x, W, b, A, B, scaling):
    """h = x·W₀ᵀ + b + scaling·(x·Aᵀ)·Bᵀ — LoRA's whole forward pass."""
    return x @ W.T + b + scaling * (x @ A.T) @ B.T


linear = copy.deepcopy(base.transformer.h[0].attn.c_attn)  # the real q/k/v projection: 160 → 480
r, alpha = 4, 8
layer = LoraLinear(linear)
layer.add_adapter("demo", r=r, lora_alpha=alpha)
layer.active_adapters = ["demo"]
A, B = layer.lora_A["demo"].weight, layer.lora_B["demo"].weight
with torch.no_grad():
    nn.init.normal_(B, std=0.02)  # pretend it has been trained (at init B = 0 and ΔW = 0)
print(f"W₀ {tuple(linear.weight.shape)}  A {tuple(A.shape)}  B {tuple(B.shape)}  scaling α/r = {alpha / r}")

x = torch.randn(2, 7, cfg.n_embd)  # (batch, tokens, in)
with torch.no_grad():
    ours = lora_forward(x, linear.weight, linear.bias, A, B, alpha / r)
    lib = layer(x)
    delta = layer.delta_weight("demo")  # (out, in) = scaling · B·A
print(f"output {tuple(lib.shape)}; max |5-line − LoraLinear| = {(ours - lib).abs().max():.1e}")
print(f"ΔW {tuple(delta.shape)} has rank {torch.linalg.matrix_rank(delta).item()} (≤ r = {r})")

# %% [markdown]
# ### Exercise 2.2 — why low rank is parameter-efficient
#
# The seed writes W as d × k, A as d × r and B as r × k; minipeft (like peft and `nn.Linear`) stores
# A as (r, in) and B as (out, r). Either way the update has **r·(d + k)** numbers instead of **d·k**: linear
# in r instead of quadratic in the width. The ratio is r·(d + k)/(d·k), e.g. 8·(768 + 2304)/(768·2304) = 1.4 %
# for GPT-2 small's fused q/k/v projection. The closed form is checked against `LoraLinear`'s real tensors:

# %%
def lora_params(r: int, d_in: int, d_out: int) -> int:
    return r * (d_in + d_out)


for rank in (1, 4, 16, 64):
    lay = LoraLinear(nn.Linear(cfg.n_embd, 3 * cfg.n_embd))
    lay.add_adapter("x", r=rank, lora_alpha=rank)
    counted = sum(p.numel() for p in lay.adapter_parameters("x").values())
    assert counted == lora_params(rank, cfg.n_embd, 3 * cfg.n_embd)
    print(f"r={rank:3d}: LoRA {counted:>7,d} vs W {cfg.n_embd * 3 * cfg.n_embd:,d} "
          f"({100 * counted / (cfg.n_embd * 3 * cfg.n_embd):5.1f} %)")

ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for label, (d, k) in {"default base c_attn 160→480": (160, 480), "GPT-2 small c_attn 768→2304": (768, 2304)}.items():
    line, = ax.plot(ranks, [lora_params(q, d, k) for q in ranks], marker="o", label=f"r·(d+k), {label}")
    ax.axhline(d * k, color=line.get_color(), ls="--", label=f"d·k (full ΔW), {label}")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("rank r")
ax.set_ylabel("trainable parameters per layer (count)")
ax.set_title("LoRA parameters r·(d+k) against the full update d·k")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# LoRA stops paying once r·(d + k) ≥ d·k, i.e. r ≥ d·k/(d + k) = 120 for the 160 → 480 layer (the dashed
# line crossing above).
#
# ### Exercise 2.3 — attaching LoRA with `LoraConfig`
#
# `get_peft_model` wraps the matching Linear layers in place and freezes everything else. GPT-2 fuses the
# query, key and value projections into one `c_attn`, so "query and value" means `c_attn` here (peft's GPT-2
# default as well). minipeft models are causal LMs only, so there is no `task_type`: classification is read
# off the next-token logits of verbalizer words ("good"/"bad").

# %%
pm = get_peft_model(load_base("default"), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
pm.print_trainable_parameters()
print(f"closed form: {cfg.n_layer} layers × 8·(160 + 480) = {cfg.n_layer * lora_params(8, 160, 480):,d}")
print(pm.base_model.transformer.h[0].attn)

# %% [markdown]
# ### Exercise 2.4 — LoRA against full fine-tuning: accuracy, time, memory
#
# Task: `sentiment` (is a review good or bad, read off the verbalizer; chance 0.5). Same budget for both:
# 60 steps of batch 16, the verbalizer loss, AdamW. LoRA r = 8 on every Linear of the blocks. What is
# measured: validation accuracy; training time and tokens per second on this CPU (`train` excludes
# evaluation time); and the bytes of weights, gradients and AdamW state, summed over the real tensors after
# one optimizer step. Activation memory is not included, and peak RSS of this process is not used: it is
# dominated by the Python runtime and is noisy in-process.

# %%
task = load_task("sentiment")
STEPS, BATCH = 60, 16


def get_batch(g):
    return task_batch(task, tok, BATCH, cfg.block_size, g)


def one_batch_loss(m):
    return task_loss(task, tok)(m, *get_batch(torch.Generator().manual_seed(1)))


setups = {"full fine-tuning": (None, 1e-3),
          "LoRA r=8, all-linear": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), 3e-3)}
table = {}
for name, (config, lr) in setups.items():
    model = load_base("default")
    if config is not None:
        model = get_peft_model(model, config)
    memory = state_bytes(model, one_batch_loss)  # weights, gradients, AdamW state after one step, on a copy
    res = train(model, get_batch, TrainConfig(steps=STEPS, lr=lr, batch_size=BATCH, warmup_steps=10),
                loss_fn=task_loss(task, tok), progress=False)
    acc = evaluate(model, task, tok, "validation")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table[name] = {**memory, "model": model, "trainable": trainable, "acc": acc, "res": res}  # count, not bytes

print(f"{'':22s} {'trainable':>10s} {'val acc':>8s} {'train s':>8s} {'tokens/s':>9s} {'weights':>9s} "
      f"{'grads':>9s} {'AdamW':>9s}")
for name, t in table.items():
    print(f"{name:22s} {t['trainable']:>10,d} {t['acc']:8.2f} {t['res'].seconds:8.1f} "
          f"{t['res'].tokens_per_second:9,.0f} {t['weights'] / 1e6:7.2f}MB {t['gradients'] / 1e6:7.2f}MB "
          f"{t['optimizer_state'] / 1e6:7.2f}MB")
full, lora = table["full fine-tuning"], table["LoRA r=8, all-linear"]
optimizer_bytes = {name: t["gradients"] + t["optimizer_state"] for name, t in table.items()}
ratio = optimizer_bytes["LoRA r=8, all-linear"] / optimizer_bytes["full fine-tuning"]
print(f"LoRA / full: gradients + AdamW state {ratio:.3f}×, "
      f"tokens/s {lora['res'].tokens_per_second / full['res'].tokens_per_second:.2f}×")

# %% [markdown]
# Reading it: the gradient and optimizer memory shrink in proportion to the trainable parameters, while the
# weights stay (they are frozen, not removed). On a model this small the speed barely changes (the tokens/s
# ratio above): the backward pass still runs through every frozen layer to reach the adapters, and LoRA adds
# two small matmuls per layer, which next to 160-wide layers cost about as much as the weight gradients they
# save. At scale the saving is real: Hu et al. (2021, section 4.2) report a 25 % training speed-up on
# GPT-3 175B, since no gradient is computed for the frozen weights (chapter 9 measures the methods side by
# side here; chapter 8 fuses LoRA's extra matmuls into one kernel).
#
# ### Exercise 2.6 (challenge) — rank r and `target_modules`
#
# Four runs, 40 steps each (the same budget, the same learning rate 3e-3, α = 2r so the scale α/r is the
# same): r ∈ {2, 16} × target_modules ∈ {["c_attn"], "all-linear"}. Short runs keep the notebook fast; the
# validation accuracy is noisy at this budget, so the mean training loss of the last 10 steps is reported
# too.

# %%
sweep = []
for targets in (["c_attn"], "all-linear"):
    for rank in (2, 16):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
        model = get_peft_model(load_base("default"), config)
        n_train, _ = model.get_nb_trainable_parameters()
        res = train(model, get_batch, TrainConfig(steps=40, lr=3e-3, batch_size=BATCH, warmup_steps=5),
                    loss_fn=task_loss(task, tok), progress=False)
        acc = evaluate(model, task, tok, "validation")
        sweep.append((str(targets), rank, n_train, acc, sum(res.losses[-10:]) / 10))
        print(f"target_modules={str(targets):12s} r={rank:2d}: trainable {n_train:>7,d}  val acc {acc:.2f}  "
              f"final loss {sweep[-1][4]:.3f}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
for targets in ("['c_attn']", "all-linear"):
    pts = [s for s in sweep if s[0] == targets]
    for ax, col in zip(axes, (3, 4), strict=True):
        ax.plot([p[2] for p in pts], [p[col] for p in pts], marker="o", label=f"target_modules={targets}")
        for p in pts:
            ax.annotate(f"r={p[1]}", (p[2], p[col]), fontsize=8, textcoords="offset points", xytext=(4, 4))
for ax, ylabel in zip(axes, ("validation accuracy (fraction)", "training loss, last 10 steps (nats)"), strict=True):
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
axes[0].set_title("sentiment after 40 steps")
axes[1].set_title("verbalizer loss after 40 steps")
plt.tight_layout()
plt.show()

# %% [markdown]
# The trainable count is exactly Σ r·(in + out) over the targeted layers: "all-linear" adds `c_proj`,
# `c_fc` and `mlp.c_proj`: 4× the `c_attn`-only count at the same r (2560 vs 640 per rank per block).
# Which setting wins at this budget is in the printout above; the LoRA paper's own sweep (Hu et al. 2021,
# section 7.1, Table 5) found that adapting more weight types at a small rank beats one type at a large rank
# for the same parameter count.
#
# ### Exercise 2.5 — saving and loading only A and B
#
# `save_adapter` writes the adapter's config (JSON) and its A and B tensors (safetensors), nothing of the
# base. Compare with the full model checkpoint.

# %%
tmp = Path(tempfile.mkdtemp())
lora_model = lora["model"]
lora_model.save_adapter(tmp / "sentiment-lora")
full["model"].save_pretrained(tmp / "full-checkpoint")  # the fully fine-tuned model: what full FT stores per task


def listing(directory: Path) -> int:
    total = 0
    for f in sorted(directory.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>10,d} bytes")
        total += f.stat().st_size
    return total


print("adapter:")
adapter_size = listing(tmp / "sentiment-lora")
print("full checkpoint:")
full_size = listing(tmp / "full-checkpoint")
print(f"adapter / full = {adapter_size / full_size:.3f} ({lora['trainable']:,d} of {full['trainable']:,d} parameters)")

# Load it onto a fresh copy of the base and check it predicts the same.
reloaded = PeftModel.from_pretrained(load_base("default"), str(tmp / "sentiment-lora"))
probe, _, probe_mask = get_batch(torch.Generator().manual_seed(2))
with torch.no_grad():
    diff = (reloaded(probe, attention_mask=probe_mask)[0]
            - lora_model(probe, attention_mask=probe_mask)[0]).abs().max()
acc_reloaded = evaluate(reloaded, task, tok, "validation")
print(f"reloaded adapter: max |logit difference| = {diff:.1e}, val acc {acc_reloaded:.2f}")

# %% [markdown]
# ### Merging, and the latency with and without it
#
# `merge_and_unload()` folds (α/r)·B·A into W₀ and returns a plain GPT: the adapted model then costs exactly
# what the base costs. Below: greedy generation of 64 tokens (batch 1), before and after merging, against
# the plain base (medians of 5 round-robin repeats).

# %%
prompt = torch.tensor([tok.encode(task.validation[0].prompt, add_bos=True)])
with torch.no_grad():
    before = lora_model(probe, attention_mask=probe_mask)[0]
out_unmerged = lora_model.generate(prompt, max_new_tokens=20)
# a merged copy, so that the unmerged model can be timed side by side with it
merged = copy.deepcopy(lora_model).merge_and_unload()  # a plain GPT again
with torch.no_grad():
    after = merged(probe, attention_mask=probe_mask)[0]
# round-robin, so a slow moment of the machine hits every model alike
ms = generation_ms_per_token({"unmerged": lora_model, "merged": merged, "base": base}, prompt, new_tokens=64)
t_unmerged, t_merged, t_base = ms["unmerged"], ms["merged"], ms["base"]
print(type(merged).__name__, "| LoraLinear left:", any(isinstance(m, LoraLinear) for m in merged.modules()))
print(f"max |logits merged − unmerged| = {(after - before).abs().max():.1e}; same greedy tokens: "
      f"{torch.equal(out_unmerged, merged.generate(prompt, max_new_tokens=20))}")
print(f"ms/token: LoRA unmerged {t_unmerged:.2f}, merged {t_merged:.2f}, plain base {t_base:.2f} "
      f"→ unmerged/merged = {t_unmerged / t_merged:.2f}×")
print(f"merged model's accuracy: {evaluate(merged, task, tok, 'validation'):.2f}")

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
