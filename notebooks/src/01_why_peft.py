# %% [markdown]
# # Chapter 1 — Why parameter-efficient fine-tuning?
#
# Full fine-tuning updates every weight of a pretrained model. This chapter works out what that costs, for
# the GPT-2 family and GPT-3 175B, and then shows the idea every later chapter builds on: **freeze the base,
# add a little**. It answers Exercise 1 of the PEFT exercises (1.1 – 1.4).
#
# Everything below is either computed from a model's configuration (the parameter counts), measured in this
# notebook on minipeft's small default base (trainable counts, accuracies), or cited.

# %%
# %matplotlib inline
import time

import matplotlib.pyplot as plt
import torch

from minipeft import GPT, GPTConfig, kernels
from minipeft.data import (
    build_world,
    corpus_tokens,
    load_task,
    pretraining_batch,
    pretraining_corpus,
    task_batch,
    task_loss,
)
from minipeft.evaluate import evaluate
from minipeft.pretrain import load_base
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, get_peft_model

NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")  # plain PyTorch ops on the CPU (chapter 8 is about the Triton kernel)
torch.manual_seed(0)
print("torch", torch.__version__, "| threads", torch.get_num_threads())

# %% [markdown]
# ## How many parameters does a GPT have?
#
# A GPT-2 block holds two LayerNorms (2·d each), the fused q/k/v projection (d·3d + 3d), the attention
# output projection (d·d + d) and the MLP (d·4d + 4d and 4d·d + d): **12·d² + 13·d** per block. Add the token
# embedding (vocab·d, shared with the output layer), the position embedding (positions·d) and the final
# LayerNorm (2·d):
#
# $$N = L\,(12d^2 + 13d) + V d + P d + 2d .$$

# %%
def gpt_parameters(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of a GPT-2-architecture model with tied input/output embeddings."""
    d = n_embd
    return n_layer * (12 * d * d + 13 * d) + vocab_size * d + n_positions * d + 2 * d


# (n_layer, n_head, n_embd, vocab, positions): GPT-2 (Radford et al. 2019) and GPT-3 175B (Brown et al. 2020,
# https://arxiv.org/abs/2005.14165, Table 2.1). GPT-3 uses GPT-2's tokenizer (vocab 50257).
CONFIGS = {
    "GPT-2 small": (12, 12, 768, 50257, 1024),
    "GPT-2 medium": (24, 16, 1024, 50257, 1024),
    "GPT-2 large": (36, 20, 1280, 50257, 1024),
    "GPT-2 XL": (48, 25, 1600, 50257, 1024),
    "GPT-3 175B": (96, 96, 12288, 50257, 2048),
}
N = {name: gpt_parameters(L, d, V, P) for name, (L, _, d, V, P) in CONFIGS.items()}

# Check the formula against minipeft's own GPT. On the "meta" device a model has shapes but no storage, so
# even GPT-3 is built in a moment and uses no memory.
for name, (L, H, d, V, P) in CONFIGS.items():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=d, vocab_size=V, block_size=P))
    counted = model.num_parameters()
    assert counted == N[name], (name, counted, N[name])
    print(f"{name:13s} formula {N[name]:>15,d}   GPT(...).num_parameters() {counted:>15,d}")
del model

# %% [markdown]
# ### Exercise 1.1 — what full fine-tuning costs
#
# **Memory.** Training with AdamW (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101) keeps, for every
# trainable parameter, the weight, its gradient and two moment estimates:
#
# | precision | weight | gradient | Adam m, v | fp32 master copy | bytes / parameter |
# |---|---|---|---|---|---|
# | fp32 | 4 | 4 | 4 + 4 | — | **16** |
# | mixed (fp16/bf16 compute) | 2 | 2 | 4 + 4 | 4 | **16** |
#
# Mixed precision does not shrink the model states: it keeps an fp32 master copy for the update, so both
# rows come to 16 bytes per parameter (ZeRO, Rajbhandari et al. 2019, https://arxiv.org/abs/1910.02054,
# section 3.1). Activations come on top and grow with batch and sequence length; they are left out here.
#
# **Storage.** A fine-tuned copy saved in fp16 takes 2 bytes per parameter, for every task.

# %%
GB = 1e9
BYTES_FP32_ADAMW = 4 + 4 + 8
BYTES_MIXED_ADAMW = 2 + 2 + 8 + 4
GPU_GB = 80  # one A100/H100 80 GB, for scale

print(f"{'model':13s} {'params':>9s} {'fp32 AdamW':>11s} {'mixed AdamW':>12s} {'GPUs of 80 GB':>14s} "
      f"{'1 task (fp16)':>14s} {'100 tasks':>10s}")
for name, n in N.items():
    train_gb = n * BYTES_MIXED_ADAMW / GB
    print(f"{name:13s} {n / 1e9:8.3f}B {n * BYTES_FP32_ADAMW / GB:10.1f} GB {train_gb:10.1f} GB "
          f"{train_gb / GPU_GB:14.2f} {n * 2 / GB:11.2f} GB {100 * n * 2 / GB:7.0f} GB")

# %%
names = list(N)
fig, ax = plt.subplots(figsize=(7, 3.8))
x = range(len(names))
ax.bar([i - 0.2 for i in x], [N[n] * BYTES_MIXED_ADAMW / GB for n in names], width=0.4,
       label="training state, mixed AdamW (16 B/param)")
ax.bar([i + 0.2 for i in x], [N[n] * 2 / GB for n in names], width=0.4, label="one fp16 checkpoint (2 B/param)")
ax.axhline(GPU_GB, color="k", ls="--", lw=1, label="one 80 GB GPU")
ax.set_yscale("log")
ax.set_xticks(list(x), names, rotation=15)
ax.set_ylabel("memory / storage (GB, log scale)")
ax.set_title("Full fine-tuning: weights + gradients + AdamW state (activations excluded)")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Compute.** Training costs about 6·N floating-point operations per token (forward 2N, backward 4N;
# Kaplan et al. 2020, https://arxiv.org/abs/2001.08361, section 2.1), whichever parameters are trained: the
# backward pass must still carry gradients through the frozen layers. So PEFT saves the *weight-gradient*
# third of the backward pass and the optimizer state, not the forward pass.
#
# **Deployment.** 100 tasks fully fine-tuned means 100 copies of the model (last column above: 35 TB for GPT-3)
# and a separate model to load for each task.

# %%
tokens = 1e9  # one billion training tokens
for name in ("GPT-2 small", "GPT-3 175B"):
    flops = 6 * N[name] * tokens
    print(f"{name}: 6·N·tokens = {flops:.2e} FLOP for 1B tokens")

# %% [markdown]
# ### Exercise 1.2 — the core idea: freeze the base, add a little
#
# PEFT methods keep the pretrained weights θ₀ frozen and train a small new set φ, so the model for a task
# is f(x; θ₀, φ) with |φ| ≪ |θ₀|. Gradients are computed for φ only, the optimizer holds state for φ only,
# and a task is stored as φ alone. Here it is on minipeft's default base (a 1.3M-parameter GPT pretrained on
# the built-in corpus, chapter 2): freeze it, attach LoRA (chapter 3), count.

# %%
tok = ByteTokenizer()
base = load_base("default")
print(base.config)
print(f"trainable before freezing: {base.num_parameters(trainable_only=True):,d}")

pm = get_peft_model(load_base("default"), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
pm.print_trainable_parameters()

# The closed form: LoRA adds r·(in + out) per targeted Linear (chapter 3).
c = base.config
per_block = sum(8 * (i + o) for i, o in [(c.n_embd, 3 * c.n_embd), (c.n_embd, c.n_embd),
                                          (c.n_embd, 4 * c.n_embd), (4 * c.n_embd, c.n_embd)])
trainable, total = pm.get_nb_trainable_parameters()
print(f"closed form: {c.n_layer} blocks × {per_block:,d} = {c.n_layer * per_block:,d}; measured {trainable:,d}")
assert trainable == c.n_layer * per_block

# A freshly attached adapter changes nothing (B = 0), so training starts exactly from the pretrained model.
idx = torch.tensor([tok.encode("Review: The soup was warm. Sentiment: ", add_bos=True)])
with torch.no_grad():
    diff = (pm(idx)[0] - base(idx)[0]).abs().max().item()
print(f"max |logits(LoRA at init) − logits(base)| = {diff:.1e}")

# %% [markdown]
# At GPT-3 scale the same recipe (LoRA with r = 4 on the query and value projections, Hu et al. 2021,
# https://arxiv.org/abs/2106.09685, section 4.2) trains this many parameters:

# %%
L, d = CONFIGS["GPT-3 175B"][0], CONFIGS["GPT-3 175B"][2]
lora_gpt3 = L * 2 * 4 * (d + d)  # 96 layers × {W_q, W_v} × r·(in + out)
print(f"GPT-3 LoRA r=4 on W_q, W_v: {lora_gpt3:,d} parameters = {100 * lora_gpt3 / N['GPT-3 175B']:.4f} % "
      f"of {N['GPT-3 175B'] / 1e9:.1f}B; fp16 file {lora_gpt3 * 2 / 1e6:.1f} MB vs {N['GPT-3 175B'] * 2 / GB:.0f} GB")
frozen_bf16 = N["GPT-3 175B"] * 2 / GB
print(f"training state: frozen bf16 weights {frozen_bf16:.0f} GB + LoRA {lora_gpt3 * 16 / GB:.2f} GB "
      f"vs full fine-tuning {N['GPT-3 175B'] * 16 / GB:.0f} GB")

# %% [markdown]
# The LoRA paper reports the same orders of magnitude measured on GPT-3: training memory 1.2 TB → 350 GB and
# a checkpoint of 350 GB → 35 MB (Hu et al. 2021, section 4.2).
#
# ### Exercise 1.3 — the benefits, and where this course measures each
#
# | benefit (the PEFT exercises' resources, the PEFT overview) | measured in |
# |---|---|
# | fewer trainable parameters and less optimizer memory | above (1.2); chapter 3, Exercise 2.4 (bytes measured) |
# | small storage per task | chapter 3, Exercise 2.5 (file sizes); chapter 4, Exercise 3.5 |
# | one base, many tasks (modularity) | chapter 4, Exercise 3.3 (adapters swapped on one base, hashes) |
# | less catastrophic forgetting | below, Exercise 1.4 (pretraining loss after fine-tuning) |
# | faster training | chapter 3, Exercise 2.4 (tokens/s, measured on this CPU) and chapter 9 |
#
# ### Exercise 1.4 (challenge) — why can so few parameters suffice?
#
# Aghajanyan et al. (2020, "Intrinsic Dimensionality Explains the Effectiveness of Language Model
# Fine-Tuning", https://arxiv.org/abs/2012.13255) fine-tuned models inside random low-dimensional subspaces
# of their parameters and found that a few hundred to a few thousand dimensions reach 90 % of full
# fine-tuning on many tasks, and that the needed dimension *falls* as pretraining gets better. Pretraining
# has already built the features; a task only has to re-weight them. LoRA's hypothesis (Hu et al. 2021,
# section 4.1) is the matrix version: the weight update ΔW has a low *intrinsic rank*.
#
# Two measurements on the default base, `sentiment` task, the same budget (80 steps of batch 16) for each:
# 1. validation accuracy of full fine-tuning against LoRA at r = 1 and r = 8 on every Linear;
# 2. the singular values of the update ΔW = W_after − W_before that *full* fine-tuning made: if the
#    update is low-rank, a few directions hold most of it.

# %%
task = load_task("sentiment")
STEPS, BATCH = 80, 16
# Learning rates: the best of {3e-4, 1e-3} (full) and {3e-3, 1e-2} (LoRA) in a 100-step trial on this task.
runs = {  # name: (adapter config or None for full fine-tuning, learning rate)
    "full fine-tuning": (None, 1e-3),
    "LoRA r=8": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), 3e-3),
    "LoRA r=1": (LoraConfig(r=1, lora_alpha=2, target_modules="all-linear"), 1e-2),
}
results = {}
for name, (config, lr) in runs.items():
    model = load_base("default")
    if config is not None:
        model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    res = train(model, lambda g: task_batch(task, tok, BATCH, base.config.block_size, g),
                TrainConfig(steps=STEPS, lr=lr, batch_size=BATCH, warmup_steps=10, eval_every=20),
                loss_fn=task_loss(task, tok), progress=False,
                eval_fn=lambda m: {"acc": evaluate(m, task, tok, "validation")})
    results[name] = (model, trainable, res)
    print(f"{name:17s} trainable {trainable:>9,d}  validation accuracy {res.evals[-1][1]['acc']:.2f}  "
          f"({res.seconds:.1f} s)")
print(f"base model, no fine-tuning: validation accuracy {evaluate(base, task, tok, 'validation'):.2f} (chance 0.5)")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, (_, trainable, res) in results.items():
    steps, accs = zip(*[(s, m["acc"]) for s, m in res.evals], strict=True)
    ax.plot(steps, accs, marker="o", label=f"{name} ({trainable:,d} trained)")
ax.axhline(0.5, color="gray", ls=":", label="chance")
ax.set_xlabel("training step (batch 16)")
ax.set_ylabel("validation accuracy (fraction)")
ax.set_title("sentiment on the default base: full fine-tuning vs LoRA")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Now the update that full fine-tuning made to each attention projection `c_attn` (160 → 480): how much of
# ‖ΔW‖²_F lies in its top k singular directions? For comparison, a random Gaussian matrix of the same shape
# (no low-rank structure).

# %%
full_model = results["full fine-tuning"][0]
energy = []
for layer in range(c.n_layer):
    w0 = base.transformer.h[layer].attn.c_attn.weight.detach()
    w1 = full_model.transformer.h[layer].attn.c_attn.weight.detach()
    s = torch.linalg.svdvals(w1 - w0)
    energy.append((s**2).cumsum(0) / (s**2).sum())
energy = torch.stack(energy)  # (layers, 160)
s_rand = torch.linalg.svdvals(torch.randn(3 * c.n_embd, c.n_embd))
energy_rand = (s_rand**2).cumsum(0) / (s_rand**2).sum()
for k in (1, 8, 32):
    print(f"top {k:2d} of 160 directions hold {100 * energy[:, k - 1].mean():5.1f} % of ‖ΔW‖² "
          f"(mean over layers; random matrix: {100 * energy_rand[k - 1]:5.1f} %)")

fig, ax = plt.subplots(figsize=(6, 3.5))
ks = torch.arange(1, energy.shape[1] + 1)
for layer in range(c.n_layer):
    ax.plot(ks, energy[layer], label=f"ΔW of block {layer} c_attn")
ax.plot(ks, energy_rand, "k--", label="random matrix")
ax.set_xscale("log")
ax.set_xlabel("k, number of top singular directions")
ax.set_ylabel("fraction of ‖ΔW‖²_F")
ax.set_title("The full fine-tuning update is close to low-rank")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Forgetting.** Next-token loss on pretraining text (the built-in corpus, a fixed batch) before and after
# each fine-tuning run. A PEFT model also keeps the untouched base one call away (`disable_adapter()`),
# which full fine-tuning cannot.

# %%
stream = corpus_tokens(pretraining_corpus(build_world(0), 200, seed=1), tok)
idx, targets = pretraining_batch(stream, 32, base.config.block_size, torch.Generator().manual_seed(0))
with torch.no_grad():
    print(f"{'base model':17s} pretraining loss {base(idx, targets)[1].item():.3f}")
    for name, (model, _, _) in results.items():
        print(f"{name:17s} pretraining loss {model(idx, targets)[1].item():.3f}")
    lora = results["LoRA r=8"][0]
    with lora.disable_adapter():
        print(f"{'LoRA r=8 disabled':17s} pretraining loss {lora(idx, targets)[1].item():.3f}  (the base, exactly)")

# %% [markdown]
# ### Summary of this run

# %%
acc = {name: res.evals[-1][1]["acc"] for name, (_, _, res) in results.items()}
n_tr = {name: n for name, (_, n, _) in results.items()}
print(f"After {STEPS} steps: full fine-tuning {acc['full fine-tuning']:.2f} with {n_tr['full fine-tuning']:,d} "
      f"trained parameters; LoRA r=8 {acc['LoRA r=8']:.2f} with {n_tr['LoRA r=8']:,d} "
      f"({100 * n_tr['LoRA r=8'] / n_tr['full fine-tuning']:.1f} %); LoRA r=1 {acc['LoRA r=1']:.2f} with "
      f"{n_tr['LoRA r=1']:,d} ({100 * n_tr['LoRA r=1'] / n_tr['full fine-tuning']:.2f} %).")
print(f"The update of full fine-tuning keeps {100 * energy[:, 7].mean():.0f} % of its energy in 8 of 160 "
      f"directions (a random matrix: {100 * energy_rand[7]:.0f} %).")

# %% [markdown]
# So the update that fine-tuning needs is concentrated in a few directions, which a rank-r LoRA can
# represent with a few percent of the parameters, and it leaves the pretraining loss far less disturbed.
# How small r can go depends on the task and on the budget: with the same short budget the rank-1 adapter
# learns more slowly here. Chapter 3 (Exercise 2.6) sweeps r and the targeted modules.

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
