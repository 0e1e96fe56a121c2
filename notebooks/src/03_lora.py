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
# r and target modules at one parameter budget, saving only A and B, and merging.

# %%
# %matplotlib inline
import copy
import tempfile
import time
from pathlib import Path

import course
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from checks.ch03 import check_lora_forward, check_lora_param_count, check_merge_weight
from diagrams import draw_block

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import round_robin_ms, state_bytes
from minipeft.pretrain import load_base
from minipeft.stats import compare_verdict, fmt_interval, interval, wilson
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, LoraLinear, PeftModel, get_peft_model

course.setup(seed=0)
NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")  # plain PyTorch on the CPU; chapter 8 runs the fused Triton kernel
tok = ByteTokenizer()
base = load_base("default")
cfg = base.config
print(cfg)

# %% [markdown]
# Where LoRA sits in a block of the GPT (here on `c_attn`, its usual target; section 2.6 tries others):

# %%
draw_block("lora")
plt.show()

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
    ours = lora_forward(x, linear.weight, linear.bias, A, B, alpha / r)  # (2, 7, 480)
    lib = layer(x)                                                       # (2, 7, 480)
    delta = layer.delta_weight("demo")  # (out, in) = scaling · B·A
rank = torch.linalg.matrix_rank(delta).item()
course.claim((ours - lib).abs().max() < 1e-5 and rank <= r,
             f"the five lines compute what LoraLinear computes (max |difference| {(ours - lib).abs().max():.1e}), "
             f"and its ΔW {tuple(delta.shape)} has rank {rank} ≤ r = {r}")

# %% [markdown]
# ### Exercise 2.2 — why low rank is parameter-efficient
#
# The PEFT exercises write ΔW = B·A with W as d × k, A as d × r and B as r × k. With those shapes B·A is not
# defined (an r × k matrix times a d × r one); the product that is d × k would be A·B. For ΔW = B·A to have
# W's shape d × k, B must be d × r and A r × k — the LoRA paper's B ∈ ℝ^{d×r}, A ∈ ℝ^{r×k} (Hu et al. 2021,
# section 4.1). minipeft (like peft and `nn.Linear`) stores exactly that with d = out and k = in: A as (r, in)
# and B as (out, r), so B·A is (out, in) like W₀, as the cell above printed. Either way the update has
# **r·(d + k)** numbers instead of **d·k**: linear in r instead of quadratic in the width. For GPT-2 small's
# fused q/k/v projection (768 → 2304) at r = 8 that is the fraction the cell prints. The closed form is checked
# against `LoraLinear`'s real tensors:

# %%
def lora_params(r: int, d_in: int, d_out: int) -> int:
    return r * (d_in + d_out)


print(f"GPT-2 small c_attn, r = 8: {lora_params(8, 768, 2304):,d} of {768 * 2304:,d} "
      f"= {lora_params(8, 768, 2304) / (768 * 2304):.1%}")
counted = {}
for rank_ in (1, 4, 16, 64):
    lay = LoraLinear(nn.Linear(cfg.n_embd, 3 * cfg.n_embd))
    lay.add_adapter("x", r=rank_, lora_alpha=rank_)
    counted[rank_] = sum(p.numel() for p in lay.adapter_parameters("x").values())
    print(f"r={rank_:3d}: LoRA {counted[rank_]:>7,d} vs W {cfg.n_embd * 3 * cfg.n_embd:,d} "
          f"({counted[rank_] / (cfg.n_embd * 3 * cfg.n_embd):5.1%})")
course.claim(all(n == lora_params(q, cfg.n_embd, 3 * cfg.n_embd) for q, n in counted.items()),
             f"LoraLinear holds exactly r·(in + out) parameters at every rank tried ({list(counted)})")
breakeven = cfg.n_embd * 3 * cfg.n_embd / (cfg.n_embd + 3 * cfg.n_embd)

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
print(f"LoRA stops paying once r·(d + k) ≥ d·k, i.e. r ≥ d·k/(d + k) = {breakeven:.0f} for the 160 → 480 layer "
      f"(where the solid line crosses its dashed one)")

# %% [markdown]
# ### Exercise 2.3 — attaching LoRA with `LoraConfig`
#
# `get_peft_model` wraps the matching Linear layers in place and freezes everything else. GPT-2 fuses the
# query, key and value projections into one `c_attn`, so the nearest target to "query and value" is `c_attn`
# (peft's GPT-2 default as well), and it adapts the key projection too: one rank-r update B·A of the fused
# (3C, C) weight, whose A is shared by q, k and v (B's rows split into their three parts), where the paper gives
# W_q and W_v a rank-r update each. minipeft models are causal LMs only, so there is no `task_type`:
# classification is read off the next-token logits of verbalizer words ("good"/"bad").

# %%
pm = get_peft_model(load_base("default"), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
pm.print_trainable_parameters()
closed = cfg.n_layer * lora_params(8, cfg.n_embd, 3 * cfg.n_embd)
course.claim(pm.get_nb_trainable_parameters()[0] == closed,
             f"get_peft_model trains exactly the closed form: {cfg.n_layer} layers × 8·(160 + 480) = {closed:,d}")
print(pm.base_model.transformer.h[0].attn)

# %% [markdown]
# ### Exercise 2.4 — LoRA against full fine-tuning: accuracy, time, memory
#
# Task: `facts` (answer a question about a person of the built-in world; the test people never appear in
# fine-tuning, so the fact itself must come from pretraining: fine-tuning teaches the form of the answer). Same
# budget for both, printed by the cell: steps of a small batch, AdamW, each at a learning rate that suits it (full
# fine-tuning moves every weight, so it wants a smaller one). LoRA r = 8 on every Linear of the blocks. What is
# measured: exact match on the test questions; training time and tokens per second on this CPU (`train`
# excludes evaluation time); and the bytes of weights, gradients and AdamW state, summed over the real tensors
# after one optimizer step. Activation memory is not included, and peak RSS of this process is not used: it is
# dominated by the Python runtime and is noisy in-process.

# %%
task = load_task("facts")
STEPS, BATCH, WARMUP = 30, 8, 3


def get_batch(g):
    return task_batch(task, tok, BATCH, cfg.block_size, g)


def one_batch_loss(m):
    idx, targets, mask = get_batch(torch.Generator().manual_seed(1))  # (B, T) each
    return m(idx, targets=targets, attention_mask=mask)[1]  # the answer tokens' next-token loss


setups = {"full fine-tuning": (None, 3e-4),
          "LoRA r=8, all-linear": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), 3e-3)}
table = {}
for name, (config, lr) in setups.items():
    torch.manual_seed(0)
    model = load_base("default")
    if config is not None:
        model = get_peft_model(model, config)
    memory = state_bytes(model, one_batch_loss)  # weights, gradients, AdamW state after one step, on a copy
    res = train(model, get_batch, TrainConfig(steps=STEPS, lr=lr, batch_size=BATCH, warmup_steps=WARMUP, seed=0),
                loss_fn=task_loss(task, tok), progress=False)
    em = evaluate(model, task, tok, "test")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    table[name] = {**memory, "model": model, "n_trainable": trainable, "em": em, "res": res, "lr": lr}

print(f"{STEPS} steps of batch {BATCH}; {len(task.test)} test questions; exact match with its 95% Wilson interval")
print(f"{'':22s} {'lr':>6s} {'trainable':>10s} {'test EM':>17s} {'train s':>8s} {'tokens/s':>9s} {'weights':>9s} "
      f"{'grads':>9s} {'AdamW':>9s}")
for name, t in table.items():
    lo, hi = wilson(t["em"], len(task.test))
    print(f"{name:22s} {t['lr']:6.0e} {t['n_trainable']:>10,d} {t['em']:6.3f} [{lo:.2f}, {hi:.2f}] "
          f"{t['res'].seconds:8.1f} {t['res'].tokens_per_second:9,.0f} {t['weights'] / 1e6:7.2f}MB "
          f"{t['gradients'] / 1e6:7.2f}MB {t['optimizer_state'] / 1e6:7.2f}MB")
full, lora = table["full fine-tuning"], table["LoRA r=8, all-linear"]
state_ratio = (lora["gradients"] + lora["optimizer_state"]) / (full["gradients"] + full["optimizer_state"])
param_ratio = lora["n_trainable"] / full["n_trainable"]
course.claim(abs(state_ratio / param_ratio - 1) < 0.01,
             f"gradients + AdamW state shrink with the trainable parameters: LoRA holds {state_ratio:.4f}× full "
             f"fine-tuning's, and trains {param_ratio:.4f}× its parameters")
speed = lora["res"].tokens_per_second / full["res"].tokens_per_second
print(f"Speed on this run: LoRA trained at {speed:.2f}× full fine-tuning's tokens per second "
      f"({'slower' if speed < 1 else 'faster'} by {abs(1 - speed):.0%}; one timing of each, on a shared CPU).")
r_lora = setups["LoRA r=8, all-linear"][0].r
block_linears = [(m.in_features, m.out_features) for m in base.transformer.h[0].modules() if isinstance(m, nn.Linear)]
skipped = sum(d_in * d_out for d_in, d_out in block_linears)  # the frozen W₀'s weight gradient: in·out per Linear
added = sum(3 * r_lora * (d_in + d_out) for d_in, d_out in block_linears)  # x·Aᵀ and ·Bᵀ, then 4 matmuls backward
print(f"Multiply-adds per token and block: LoRA skips {skipped:,d} (W₀'s weight gradients) and adds {added:,d} "
      f"(3·r·(in + out) per Linear): {skipped / added:.1f}× fewer than it skips")
print("Accuracy: one seed of each, so no ranking from this table; section 2.6 compares settings over three seeds.")

# %% [markdown]
# Reading it: the gradient and optimizer memory shrink in proportion to the trainable parameters (the claim
# above), while the weights stay (they are frozen, not removed). Speed is another matter, and the printout above
# gives this run's ratio: on a model this small the backward pass still runs through every frozen layer to reach
# the adapters. In arithmetic LoRA is cheaper: its two small matmuls, forward and backward, cost a fraction of the
# weight gradients it skips (the multiply-adds line above gives the factor). But at 160 wide the fixed cost of each
# call (Python, autograd's bookkeeping, the kernel launch) dominates LoRA's thin matmuls, and LoRA makes more calls
# than it saves, so the measured ratio can land on either side of 1. At scale the saving is real: Hu et al.
# (2021, section 4.2) report a 25 % training speed-up on GPT-3 175B, since no gradient is computed for the
# frozen weights (chapter 9 measures the methods side by side here; chapter 8 fuses LoRA's extra matmuls into
# one kernel).
#
# ### Exercise 2.6 (challenge) — rank r and `target_modules`, at one parameter budget
#
# Is it better to give one kind of layer a large rank, or many kinds a small one? A fair comparison holds the
# number of trainable parameters fixed. Per block, a Linear of in → out costs r·(in + out): `c_attn` (160 → 480)
# 640·r, attention's `c_proj` (160 → 160) 320·r, and all four Linears together 2560·r. So three settings cost
# the same:
#
# - r = 16 on `c_attn` only,
# - r = 32 on attention's output projection `attn.c_proj` only,
# - r = 4 on every Linear (`"all-linear"`).
#
# (A mix such as r = 8 on `c_attn` + `attn.c_proj` costs 960·8 = 7,680 per block, not 10,240: it is not on this
# budget, and the claim in the cell below would stop the chapter.) α = 2r everywhere, so the scale α/r is the
# same. The cell counts the real parameters first:

# %%
SWEEP = {"r=16, c_attn": (16, ["c_attn"]), "r=32, attn.c_proj": (32, ["attn.c_proj"]),
         "r=4, all-linear": (4, "all-linear")}  # name: (rank, target_modules)
budget = {}
for name, (rank_, targets) in SWEEP.items():
    config = LoraConfig(r=rank_, lora_alpha=2 * rank_, target_modules=targets)
    budget[name] = get_peft_model(load_base("default"), config).get_nb_trainable_parameters()[0]
    print(f"{name:18s}: {budget[name]:,d} trainable parameters ({budget[name] // cfg.n_layer:,d} per block)")
course.claim(len(set(budget.values())) == 1,
             f"the three settings train the same number of parameters, {next(iter(budget.values())):,d}")

# %% [markdown]
# Each setting is trained with three seeds (a seed draws A's initial value and the batches), on the budget of
# section 2.4, and scored on the test questions. One run is one draw; the mean of three with its 95% interval
# says how much of a difference is the setting's, and `compare_verdict` pairs two settings seed by seed and ranks
# them only when the interval of their differences excludes 0.

# %%
SEEDS, SWEEP_LR = (0, 1, 2), 3e-3
sweep = {name: [] for name in SWEEP}
sweep_seconds = time.perf_counter()
for name, (rank_, targets) in SWEEP.items():
    for seed in SEEDS:
        torch.manual_seed(seed)
        config = LoraConfig(r=rank_, lora_alpha=2 * rank_, target_modules=targets)
        model = get_peft_model(load_base("default"), config)
        train(model, get_batch, TrainConfig(steps=STEPS, lr=SWEEP_LR, batch_size=BATCH, warmup_steps=WARMUP,
                                            seed=seed), loss_fn=task_loss(task, tok), progress=False)
        sweep[name].append(evaluate(model, task, tok, "test"))
sweep_seconds = time.perf_counter() - sweep_seconds
em_base = evaluate(base, task, tok, "test")
print(f"{len(SWEEP) * len(SEEDS)} runs of {STEPS} steps (batch {BATCH}, lr {SWEEP_LR:g}) in {sweep_seconds:.0f} s; "
      f"chance {task.chance:.3f}, zero-shot base {em_base:.3f}")
for name, ems in sweep.items():
    print(f"{name:18s}: test exact match {fmt_interval(ems)} (seeds: {', '.join(f'{e:.3f}' for e in ems)})")
floor = max(task.chance, em_base)
course.claim(all(interval(ems)[0] - interval(ems)[1] > floor for ems in sweep.values()),
             f"every setting learns to answer within {STEPS} steps: each one's interval lies above chance "
             f"({task.chance:.3f}) and above the zero-shot base ({em_base:.3f})")
names = list(SWEEP)
for i, a in enumerate(names):
    for b in names[i + 1:]:
        print(compare_verdict(sweep[a], sweep[b], a, b, "test exact match")["text"])

fig, ax = plt.subplots(figsize=(6.5, 3.6))
for i, ems in enumerate(sweep.values()):
    mean, half = interval(ems)
    ax.errorbar([i], [mean], yerr=[half], fmt="o", color="C0", capsize=6,
                label="mean ± 95% interval" if i == 0 else None)
    ax.scatter([i + 0.12] * len(ems), ems, color="C1", s=14, label="one seed" if i == 0 else None)
ax.axhline(task.chance, color="grey", ls="--", label=f"chance ({task.chance:.3f})")
ax.set_xticks(range(len(sweep)), [f"{n}\n{budget[n]:,d} params" for n in sweep])
ax.set_ylim(0, 1)
ax.set_ylabel("test exact match (fraction)")
ax.set_title(f"facts, {STEPS} steps: one parameter budget, three ways to spend it")
ax.legend(fontsize=8, loc="center")  # the empty middle: clear of the points and the chance line
plt.tight_layout()
plt.show()

# %% [markdown]
# The verdicts above are what three seeds can say at this budget; where an interval holds 0 they do not rank the
# two settings. The LoRA paper's own sweep (Hu et al. 2021, section 7.1, Table 5, GPT-3 at a fixed 18M
# parameters) found that adapting more weight types at a small rank beats one type at a large rank; compare its
# direction with the verdicts printed here, which are for a 1.3M-parameter model on one task.
#
# ### Exercise 2.5 — saving and loading only A and B
#
# `save_adapter` writes the adapter's config (JSON) and its A and B tensors (safetensors), nothing of the
# base, plus a small manifest of their checksums. Compare with the full model checkpoint.

# %%
tmp = Path(tempfile.mkdtemp())
lora_model = lora["model"]
lora_model.save_adapter(tmp / "facts-lora")
full["model"].save_pretrained(tmp / "full-checkpoint")  # the fully fine-tuned model: what full FT stores per task


def listing(directory: Path) -> dict[str, int]:
    sizes = {f.name: f.stat().st_size for f in sorted(directory.iterdir())}
    for fname, size in sizes.items():
        print(f"  {fname:28s} {size:>10,d} bytes")
    return sizes


print("adapter:")
adapter_files = listing(tmp / "facts-lora")
print("full checkpoint:")
full_files = listing(tmp / "full-checkpoint")
adapter_size, full_size = sum(adapter_files.values()), sum(full_files.values())
tensor_bytes = 4 * lora["n_trainable"]  # fp32 A and B
print(f"adapter / full = {adapter_size / full_size:.3f} ({lora['n_trainable']:,d} of {full['n_trainable']:,d} "
      f"parameters)")
course.claim(tensor_bytes <= adapter_files["adapter_model.safetensors"] < 1.05 * tensor_bytes,
             f"the adapter's tensor file is A and B and nothing else: "
             f"{adapter_files['adapter_model.safetensors']:,d} bytes for {lora['n_trainable']:,d} fp32 numbers "
             f"({tensor_bytes:,d} bytes) plus a small header")

# Load it onto a fresh copy of the base and check it predicts the same.
reloaded = PeftModel.from_pretrained(load_base("default"), str(tmp / "facts-lora"))
probe, _, probe_mask = get_batch(torch.Generator().manual_seed(2))
with torch.no_grad():
    diff = (reloaded(probe, attention_mask=probe_mask)[0]
            - lora_model(probe, attention_mask=probe_mask)[0]).abs().max()
em_reloaded = evaluate(reloaded, task, tok, "test")
course.claim(diff < 1e-6 and em_reloaded == lora["em"],
             f"the reloaded adapter computes the trained model: max |logit difference| {diff:.1e}, test exact match "
             f"{em_reloaded:.3f} both times")

# %% [markdown]
# ### Merging, and the latency with and without it
#
# `merge_and_unload()` folds (α/r)·B·A into W₀ and returns a plain GPT, of exactly the base's shape. Below: greedy
# generation of 32 tokens (batch 1), unmerged, merged and the plain base, timed round-robin (each round times every
# model once, so a slow moment of the machine hits all alike) over several rounds. A ratio is taken within each
# round; its mean over rounds comes with a 95% interval, so a difference smaller than the interval is noise.

# %%
prompt = torch.tensor([tok.encode(task.test[0].prompt, add_bos=True)])
lora_model.eval()
with torch.no_grad():
    before = lora_model(probe, attention_mask=probe_mask)[0]
out_unmerged = lora_model.generate(prompt, max_new_tokens=20)
# a merged copy, so that the unmerged model can be timed side by side with it
merged = copy.deepcopy(lora_model).merge_and_unload().eval()  # a plain GPT again
with torch.no_grad():
    after = merged(probe, attention_mask=probe_mask)[0]
merge_diff = (after - before).abs().max()
course.claim(merge_diff < 1e-4 and torch.equal(out_unmerged, merged.generate(prompt, max_new_tokens=20)),
             f"merging changes no prediction: max |logits merged − unmerged| = {merge_diff:.1e}, the same greedy "
             f"tokens; {type(merged).__name__} with no LoraLinear left: "
             f"{not any(isinstance(m, LoraLinear) for m in merged.modules())}")

ROUNDS, NEW = 8, 32
models = {"unmerged": lora_model, "merged": merged, "base": base.eval()}
calls = {k: (lambda m=m: m.generate(prompt, max_new_tokens=NEW)) for k, m in models.items()}
with torch.no_grad():
    rounds = [round_robin_ms(calls, repeats=1, warmup=1 if i == 0 else 0) for i in range(ROUNDS)]
ms_tok = {k: [r[k] / NEW for r in rounds] for k in models}
print("ms per token: " + ", ".join(f"{k} {fmt_interval(v, '.2f')}" for k, v in ms_tok.items()))


def ratio_sentence(a: str, b: str) -> str:
    ratios = [x / y for x, y in zip(ms_tok[a], ms_tok[b], strict=True)]
    mean, half = interval(ratios)
    if mean - half <= 1 <= mean + half:
        verdict = "no different within the noise of this measurement (the interval holds 1)"
    else:
        verdict = f"{'slower' if mean > 1 else 'faster'} (the interval excludes 1)"
    return f"{a} / {b} = {fmt_interval(ratios, '.2f')}× over {ROUNDS} rounds: {a} is {verdict}"


print(ratio_sentence("unmerged", "merged"))
print(ratio_sentence("merged", "base"))
print(f"merged model's test exact match: {evaluate(merged, task, tok, 'test'):.3f} (unmerged {lora['em']:.3f})")

# %% [markdown]
# A merged LoRA model *is* a plain GPT with other numbers in its weights, so any gap to the base is timing noise,
# and the second ratio says whether this run's gap is inside it. The unmerged model computes two extra small
# matmuls per adapted Linear on every token; the first ratio is what they cost here, at batch 1.
#
# ## Summary
#
# - LoRA adds (α/r)·B·A beside a frozen W₀: r·(in + out) trainable numbers per layer instead of in·out, and with
#   B = 0 at init the model starts exactly as the base.
# - `get_peft_model(model, LoraConfig(...))` wraps the targeted Linears in place and freezes the rest; its count is
#   the closed form, summed over every targeted Linear of every block.
# - Gradients and AdamW state shrink with the trainable parameters; the frozen weights and, on a small model,
#   the time per step do not shrink with them.
# - A fair comparison of ranks and targets holds the parameter budget fixed and repeats each setting over seeds:
#   a verdict needs an interval that excludes 0.
# - An adapter file is A, B and a config (section 2.5 measures its share of a full checkpoint); merging folds
#   B·A into W₀ and gives a plain GPT with the same predictions.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks on them.
#
# ### Exercise 1 — LoRA's forward pass from scratch
#
# Write `lora_forward(x, W, b, A, B, scaling)` for x of shape (..., in), W (out, in), b (out,) or None, A (r, in)
# and B (out, r), without building the (out, in) matrix B·A. The check compares it with minipeft's `LoraLinear`
# on three shapes, with and without a bias.

# %%
def lora_forward(x, W, b, A, B, scaling):
    """h = x·W₀ᵀ + b + scaling·(x·Aᵀ)·Bᵀ; x (..., in) → (..., out). b may be None."""
    return None  # your code here


# %%
check_lora_forward(lora_forward)

# %% [markdown]
# ### Exercise 2 — the trainable-parameter count for a rank and targets
#
# Write `lora_param_count(n_layer, n_embd, r, targets)`: the trainable parameters of LoRA of rank r on a GPT of
# n_layer blocks of width C = n_embd. A block has four Linears: `c_attn` (C → 3C), `attn.c_proj` (C → C),
# `c_fc` (C → 4C) and `mlp.c_proj` (4C → C); their full names are `transformer.h.0.attn.c_attn` and so on.
# `targets` is a list of names — a name selects every Linear whose full name equals it or ends in "." + name, so
# `"c_proj"` selects both projections and `"attn.c_attn"` the same Linears as `"c_attn"` — or the string
# `"all-linear"` (all four). The check compares with `get_peft_model` on seven configurations.

# %%
def lora_param_count(n_layer, n_embd, r, targets):
    """Trainable parameters of LoRA of rank r on `targets` in a GPT of n_layer blocks of width n_embd."""
    return None  # your code here


# %%
check_lora_param_count(lora_param_count)

# %% [markdown]
# ### Exercise 3 — merging by hand
#
# Write `merge_weight(W, A, B, scaling)`: the weight of the plain Linear that computes what the LoRA layer
# computes, W₀ + s·B·A. The check builds small LoRA models with random B, calls `merge_and_unload()`, and compares
# your weight with the merged model's `c_attn` weight in every block.

# %%
def merge_weight(W, A, B, scaling):
    """W (out, in), A (r, in), B (out, r), scaling s → the merged weight (out, in)."""
    return None  # your code here


# %%
check_merge_weight(merge_weight)

# %% [markdown]
# ### Open questions
#
# 1. Section 2.6 spent one budget three ways. Spend a second, larger budget the same three ways (r = 32 on
#    `c_attn`, r = 64 on `attn.c_proj`, r = 8 on all-linear) with three seeds: does the verdict move with the
#    budget, and does a larger budget help at all within 30 steps?
# 2. Merging makes serving free of LoRA's extra matmuls but ties the weights to one task. When would you keep
#    adapters unmerged anyway (think of many tasks on one base, chapter 11)?

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")

# %%
course.claims_report()
