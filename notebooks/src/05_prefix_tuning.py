# %% [markdown]
# # Chapter 5 — Prefix tuning: learned keys and values in front of every layer
#
# Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) changes no weight of the model. It gives
# each of the L attention layers n extra key/value pairs that every real token can attend to, as if n
# invisible tokens of context stood in front of the input:
#
# $$\mathrm{head}_t = \mathrm{softmax}\!\left(\frac{q_t\,[P_K^{(l)};\,K_{\le t}]^\top}{\sqrt{h_s}}\right)
# [P_V^{(l)};\,V_{\le t}],
# \qquad P_K^{(l)}, P_V^{(l)} \in \mathbb{R}^{n_h\times n\times h_s}\ \text{learned}.$$
#
# Only the prefixes are trained. Unlike LoRA or adapters, a fresh prefix *does* change the output (there
# is no zero-init identity: the attention has n more entries to share its mass with); the tests and the
# cells below check what it does instead. This chapter answers Exercise 4 of the PEFT exercises (4.1 – 4.6).

# %%
# %matplotlib inline
import copy
import time

import course
import matplotlib.pyplot as plt
import torch
from checks.ch05 import check_prefix_attention_mask, check_prefix_param_count, check_prefix_to_past
from diagrams import draw_block

from minipeft import kernels
from minipeft.data import load_task, task_batch
from minipeft.evaluate import evaluate
from minipeft.measure import round_robin_ms
from minipeft.model import KVCache
from minipeft.pretrain import load_base
from minipeft.stats import compare_verdict, fmt_interval, interval
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    get_peft_model,
)
from minipeft.tuners.prefix import PrefixEncoder

course.setup(seed=0)
NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")  # plain PyTorch on the CPU
tok = ByteTokenizer()
base = load_base("default")
cfg = base.config
L, nh, C = cfg.n_layer, cfg.n_head, cfg.n_embd
hs = C // nh
task = load_task("facts")
print(cfg)
print(f"task {task.name!r}: {task.description} metric {task.metric}, chance {task.chance:.3f}; "
      f"{len(task.train)} train / {len(task.validation)} validation / {len(task.test)} test questions")

# %% [markdown]
# Where the prefix attaches in a block (the same in every one of the L blocks): inside the attention, beside the
# keys and values the layer computes from the real tokens.

# %%
draw_block("prefix")
plt.show()

# %% [markdown]
# ### Exercises 4.1 and 4.3 — the prefix: one flat parameter, L key/value pairs per virtual token
#
# Where are prefixes inserted (Exercise 4.3)? In every layer, as extra keys and values of the attention (the diagram
# above), not only at the input as a soft prompt is.
# minipeft stores the prefix the way HF peft's `PrefixEncoder` does: one matrix P of shape (n, L·2·C). Row i
# is virtual token i; its columns are layer 0's key, layer 0's value, layer 1's key, … each C = n_h·h_s wide.
# Reshaped, it is (L, 2, n_h, n, h_s): per layer a key and a value for every head and virtual token.

# %%
n = 10
pm = get_peft_model(load_base("default"), PrefixTuningConfig(num_virtual_tokens=n))
pm.print_trainable_parameters()
enc = pm.prompt_encoders["default"]
P = enc.flat_prefix()  # (n, L·2·C)
per_layer = P.view(n, L, 2, nh, hs).permute(1, 2, 3, 0, 4)  # (L, 2, nh, n, hs)
keys, values = enc.keys_values()  # what the model uses: L tensors (nh, n, hs) each
print(f"flat parameter P: {tuple(P.shape)}  = (n, L·2·C) = ({n}, {L}·2·{C})")
print(f"reshaped:         {tuple(per_layer.shape)}  = (L, 2, n_h, n, h_s)")
print(f"layer 0 keys {tuple(keys[0].shape)}, values {tuple(values[0].shape)}")
course.claim(all(torch.equal(per_layer[l, 0], keys[l]) and torch.equal(per_layer[l, 1], values[l]) for l in range(L)),
             "the keys and values the model uses are exactly the reshape (n, L·2·C) → (L, 2, n_h, n, h_s) of P")
course.claim(pm.get_nb_trainable_parameters()[0] == L * 2 * n * C,
             f"the prefix trains L·2·n·C = {L}·2·{n}·{C} = {L * 2 * n * C:,d} numbers, nothing else")

# %% [markdown]
# minipeft starts the plain prefix from the frozen model's own keys and values for n random tokens (Li &
# Liang found, in their study of how to initialise the prefix, that real words' activations beat random init;
# it also puts the prefix at the scale the attention was trained on). The prefix lives in the KV cache: before any real
# token is seen the cache already holds n entries per layer, and the real tokens take positions n … n+T−1.

# %%
cache = enc.prepare(pm.base_model, 1)["kv_cache"]
print(f"cache before any real token: length {cache.length}, next position {int(cache.seen)}; "
      f"layer 0 keys {tuple(cache.keys[0].shape)} = (B, n_h, n, h_s)")

# %% [markdown]
# ### Exercise 4.2 — how the tokens use the prefix: one attention row
#
# The five-line version of attention with a prefix: the real tokens' queries score the prefix keys and their
# own (causal) keys together, and one softmax shares the mass among both. Hooks catch q, k, v of every
# layer as the model runs; the hand computation of layer 0 is checked against what the model fed into its
# output projection.

# %%
def attention_with_prefix(q, k, v, pk, pv):
    """q, k, v: (nh, T, hs) real tokens; pk, pv: (nh, n, hs) prefix → output (nh, T, hs), weights (nh, T, n+T)."""
    T, n_ = q.shape[1], pk.shape[1]
    scores = q @ torch.cat([pk, k], 1).transpose(1, 2) / q.shape[-1] ** 0.5  # (nh, T, n+T)
    visible = torch.cat([torch.ones(T, n_, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], 1)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return weights @ torch.cat([pv, v], 1), weights


def attention_maps(model, idx):
    """Every layer's attention weights (nh, T, n+T) for one sequence, and layer 0's check against the model."""
    caught, hooks = {}, []
    for l, block in enumerate(model.base_model.transformer.h):
        hooks.append(block.attn.c_attn.register_forward_hook(lambda m, i, o, l=l: caught.__setitem__(("qkv", l), o)))
        hooks.append(block.attn.c_proj.register_forward_hook(lambda m, i, o, l=l: caught.__setitem__(("y", l), i[0])))
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    pks, pvs = model.prompt_encoders[model.active_adapter].keys_values()
    maps = []
    for l in range(L):
        q, k, v = (t[0].view(-1, nh, hs).transpose(0, 1) for t in caught[("qkv", l)].split(C, dim=2))
        y, w = attention_with_prefix(q, k, v, pks[l].detach(), pvs[l].detach())
        maps.append(w)
        if l == 0:
            diff = (y.transpose(0, 1).reshape(-1, C) - caught[("y", 0)][0]).abs().max()
    return maps, diff


example = task.validation[0]
idx = torch.tensor([tok.encode(example.prompt, add_bos=True)])
maps_init, diff = attention_maps(pm, idx)
course.claim(diff < 1e-5, f"the five-line attention with a prefix reproduces layer 0 of the model "
                          f"(max |difference| {diff:.1e} < 1e-5)")
row = maps_init[0][:, -1]  # (nh, n+T): the last real token's attention, layer 0
print(f"the last token ({example.prompt[-1]!r}) in layer 0 puts {row[:, :n].sum(-1).mean():.2f} of its attention "
      f"mass on the {n} prefix entries (mean over heads); each row sums to {row.sum(-1).mean():.3f}")

# %% [markdown]
# ### The reparametrisation — training the prefix, with and without an MLP
#
# Li & Liang (§4.3) found that optimising P directly was unstable and produced it with an MLP instead,
# P = W₂·tanh(W₁·E + b₁) + b₂ from n smaller embeddings E; after training only P is kept. Parameter counts,
# closed forms against the real modules (H = the MLP width, C by default):

# %%
proj_cfg = PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=True)
pm_proj = get_peft_model(load_base("default"), proj_cfg)
H = C
closed_plain = L * 2 * n * C
closed_proj = n * C + (C * H + H) + (H * L * 2 * C + L * 2 * C)
n_plain, n_proj = pm.get_nb_trainable_parameters()[0], pm_proj.get_nb_trainable_parameters()[0]
print(f"plain prefix:    {n_plain:>8,d} trainable  (closed form L·2·n·C = {closed_plain:,d})")
print(f"with projection: {n_proj:>8,d} trainable  (closed form n·C + (C·H + H) + (H·L·2·C + L·2·C) = {closed_proj:,d})")
print({name: tuple(p.shape) for name, p in pm_proj.prompt_encoders["default"].named_parameters()})
course.claim(n_plain == closed_plain and n_proj == closed_proj,
             f"both counts are their closed forms; the MLP trains {n_proj / n_plain:.0f}× as many numbers as P itself")

# %% [markdown]
# Both are trained on `facts` (a question about a person of the built-in world; the test and validation
# people never appear in training, so the prefix can only teach the *format*, the fact must come from
# pretraining). The same short budget for both (the cell prints it); each at its own learning rate, set for
# this budget: 0.3 for the plain prefix, 0.01 with the MLP, whose output moves with every weight of it (prefixes
# want high rates; of soft prompts, the prompt- and prefix-tuning notes say "Higher learning rates often work
# well"). One run is one draw of the prefix's initial value and of the batches, so each is trained with three
# seeds, and scored on the test split (people never seen in fine-tuning).

# %%
STEPS, BATCH, WARMUP, SEEDS = 40, 8, 10, (0, 1, 2)
RATES = {"plain prefix": 3e-1, "prefix + MLP": 1e-2}
get_batch = lambda g: task_batch(task, tok, BATCH, cfg.block_size, g)  # noqa: E731
gen_before = pm.generate(idx, max_new_tokens=12, eos_token_id=tok.eos_token_id)
em_base = evaluate(base, task, tok, "test")
em_init = evaluate(pm, task, tok, "test")


def fit_prefix(config, lr, seed, model=None):
    """Train a prefix for STEPS steps; seed sets the batches. Without `model`, a new prefix is built after seeding,
    so seed also sets its initial value; a `model` passed in keeps the initial value it was built with (seed 0
    trains `pm` and `pm_proj` from above, whose prefixes were drawn when those cells ran)."""
    torch.manual_seed(seed)
    model = model if model is not None else get_peft_model(copy.deepcopy(base), config)
    res = train(model, get_batch, TrainConfig(steps=STEPS, lr=lr, batch_size=BATCH, warmup_steps=WARMUP, seed=seed),
                progress=False)
    return model, res, evaluate(model, task, tok, "test")


runs = {name: [] for name in RATES}  # name → [(model, result, test exact match)] per seed
for name, config in (("plain prefix", PrefixTuningConfig(num_virtual_tokens=n)), ("prefix + MLP", proj_cfg)):
    for seed in SEEDS:
        keep = (pm if name == "plain prefix" else pm_proj) if seed == 0 else None  # seed 0 trains the models above
        runs[name].append(fit_prefix(config, RATES[name], seed, keep))
        model, res, em = runs[name][-1]
        print(f"{name:13s} lr {RATES[name]:g}, seed {seed}: final loss {sum(res.losses[-10:]) / 10:.3f}, "
              f"test exact match {em:.3f} ({res.seconds:.1f} s)")
ems = {name: [em for _, _, em in r] for name, r in runs.items()}
print(f"before training: zero-shot base {em_base:.3f}, prefix at init {em_init:.3f} (chance {task.chance:.3f}); "
      f"{STEPS} steps of batch {BATCH}, {len(task.test)} test questions (one question = {1 / len(task.test):.3f})")
for name in RATES:
    print(f"{name:13s}: test exact match {fmt_interval(ems[name])} (mean ± 95% interval over {len(SEEDS)} seeds)")
course.claim(all(interval(ems[name])[0] - interval(ems[name])[1] > max(em_base, em_init) for name in RATES),
             f"within {STEPS} steps both prefixes learn to answer: over {len(SEEDS)} seeds each one's exact-match "
             f"interval lies above the zero-shot base ({em_base:.3f}) and the untrained prefix ({em_init:.3f})")
print(compare_verdict(ems["plain prefix"], ems["prefix + MLP"], "the plain prefix", "the prefix + MLP",
                      "test exact match")["text"])

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for color, (name, r) in zip(("C0", "C1"), runs.items(), strict=True):
    for i, (_, res, _) in enumerate(r):
        ax.plot(res.losses, color=color, lw=1, alpha=0.8,
                label=f"{name}, lr {RATES[name]:g} (test EM {fmt_interval(ems[name], '.2f')})" if i == 0 else None)
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats per answer token)")
ax.set_title(f"Prefix tuning on facts, n = {n}, batch {BATCH}: one line per seed")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The printout above says what the seeds show: whether each prefix learned the answer format (the claim), and
# whether one of the two is ahead at this budget (the verdict, which names its interval; where it holds 0 the
# data do not rank them).
#
# After training the MLP is not needed: `fold()` evaluates it once and keeps only P, a plain encoder with
# L·2·n·C numbers. Its outputs are the same (up to float rounding of the one evaluation).

# %%
folded = pm_proj.prompt_encoders["default"].fold()
print(f"folded: {sum(p.numel() for p in folded.parameters()):,d} parameters instead of "
      f"{sum(p.numel() for p in pm_proj.prompt_encoders['default'].parameters()):,d}")
probe = torch.tensor([tok.encode(ex.prompt, add_bos=True) for ex in task.validation[:1]])
em_mlp = evaluate(pm_proj, task, tok, "test")
with torch.no_grad():
    logits_mlp = pm_proj(probe)[0]
    pm_proj.prompt_encoders["default"] = folded
    logits_folded = pm_proj(probe)[0]
fold_diff = (logits_folded - logits_mlp).abs().max()
em_folded = evaluate(pm_proj, task, tok, "test")
course.claim(fold_diff < 1e-4 and em_folded == em_mlp,
             f"folding the MLP changes no answer: max |logits folded − with MLP| = {fold_diff:.1e}, test exact match "
             f"{em_folded:.3f} both ways")

# %% [markdown]
# Where the trained prefix draws attention: the share of the last token's attention that goes to the prefix,
# per layer (mean over heads), before and after training the plain prefix (seed 0).

# %%
maps_trained, _ = attention_maps(pm, idx)
share = lambda maps: [m[:, -1, :n].sum(-1).mean().item() for m in maps]  # noqa: E731
print("prefix share per layer, at init:      ", [f"{s:.2f}" for s in share(maps_init)])
print("prefix share per layer, after training:", [f"{s:.2f}" for s in share(maps_trained)])
fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True)
top = max(float(m[L - 1][:, -1].max()) for m in (maps_init, maps_trained))  # one colour scale for both panels
for ax, maps, title in ((axes[0], maps_init, "at init"), (axes[1], maps_trained, f"after {STEPS} steps")):
    im = ax.imshow(maps[L - 1][:, -1].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=top)
    ax.axvline(n - 0.5, color="w", lw=1.5, label="end of the prefix")
    ax.set_title(f"last token's attention, layer {L - 1}, {title}", fontsize=10)
    ax.set_xlabel(f"key position (0 … {n - 1}: prefix, then the real tokens)")
    ax.set_xticks(range(0, n + idx.shape[1], 8))
    ax.legend(loc="upper right", fontsize=8)
axes[0].set_ylabel("head")
axes[0].set_yticks(range(nh))
fig.colorbar(im, ax=axes, label="attention weight")
plt.show()

# %% [markdown]
# ### What changes in generation
#
# With a KV cache, each new token costs one query against the cached keys. The prefix enters the cache once,
# before the prompt, so per token the model attends to n more keys and nothing else changes. Measured:
# greedy generation of 48 tokens, batch 1, timed round-robin as in the LoRA and adapter chapters: each round
# times both models once (so a slow moment of the machine hits both alike), the ratio is taken within each round,
# and its mean over the rounds comes with a 95% interval.

# %%
ROUNDS, NEW = 8, 48
calls = {k: (lambda m=m: m.generate(idx, max_new_tokens=NEW)) for k, m in {"base": base, "prefix": pm}.items()}
with torch.no_grad():
    rounds = [round_robin_ms(calls, repeats=1, warmup=1 if i == 0 else 0) for i in range(ROUNDS)]
ms_tok = {k: [r[k] / NEW for r in rounds] for k in calls}
prefix_ratio = [p / b for p, b in zip(ms_tok["prefix"], ms_tok["base"], strict=True)]
mean_ratio, half_ratio = interval(prefix_ratio)
latency_word = ("no different from the base within the noise (the interval holds 1)"
                if mean_ratio - half_ratio <= 1 <= mean_ratio + half_ratio
                else f"{'slower' if mean_ratio > 1 else 'faster'} than the base (the interval excludes 1)")
print(f"ms/token: base {fmt_interval(ms_tok['base'], '.2f')}, prefix-tuned {fmt_interval(ms_tok['prefix'], '.2f')}")
print(f"prefix / base = {fmt_interval(prefix_ratio, '.2f')}× over {ROUNDS} rounds: the prefix-tuned model is "
      f"{latency_word}; it adds {n} keys to the {idx.shape[1]}–{idx.shape[1] + NEW - 1} real ones a step attends to "
      f"(the last new token is never fed back in), and no layer")

print(f"\nquestion: {example.prompt!r}  (answer: {example.answer!r})")
base_text = tok.decode(base.generate(idx, 12, eos_token_id=tok.eos_token_id)[0, idx.shape[1]:].tolist())
init_text = tok.decode(gen_before[0, idx.shape[1]:].tolist())
print("  base model:         ", repr(base_text))
print("  prefix at init:     ", repr(init_text), "(the base's own continuation)" if init_text == base_text
      else "(the untrained prefix already changed the base's continuation)")
shown = task.validation[:4]
answers = []
for ex in shown:
    ids = torch.tensor([tok.encode(ex.prompt, add_bos=True)])
    answers.append(tok.decode(pm.generate(ids, 12, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()))
    print(f"  trained, {ex.prompt[10:40]!r:34s} → {answers[-1]!r:14s} (answer {ex.answer!r})")
print(f"after {STEPS} steps (seed 0), {sum(a == ex.answer for a, ex in zip(answers, shown, strict=True))} of these "
      f"{len(shown)} generations are exactly the answer and nothing more (the task's exact match)")

# %% [markdown]
# One generation step of the prefix-tuned model runs the same layers as the base's; the only extra work is
# n more entries in each attention row, and the ratio line above says whether that cost shows above this
# machine's timing noise. The generations show what training changed. Before it, the untrained prefix may already
# change the base's greedy continuation (there is no zero-init identity; the remark on the "prefix at init" line
# says whether it did on this question). After training the model is asked to answer with the bare fact and stop,
# and the count above says how often it does on these four.
#
# ### Exercise 4.4 — prefix tuning against LoRA and adapters: where, and what is trained
#
# Counts from the real modules on this base (its C and L are printed at the top), each method at a common setting:

# %%
methods = {
    "LoRA r=8, c_attn": (LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]),
                         "beside the q/k/v projection of every block", "low-rank ΔW = B·A of a weight; mergeable"),
    "LoRA r=8, all-linear": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                             "beside every Linear of every block", "low-rank ΔW of each weight; mergeable"),
    "Pfeiffer adapter rf=16": (AdapterConfig.load("pfeiffer", reduction_factor=16),
                               "after every block's MLP", "a new bottleneck layer (sequential)"),
    "Houlsby adapter rf=16": (AdapterConfig.load("houlsby", reduction_factor=16),
                              "after attention and MLP of every block", "two new bottleneck layers per block"),
    "prefix n=10": (PrefixTuningConfig(num_virtual_tokens=10),
                    "the K/V cache of every layer", "activations (keys and values), no weight"),
    "prefix n=10 + MLP (training)": (PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True),
                                     "the K/V cache of every layer", "an MLP producing the keys/values"),
    "prompt tuning n=10": (PromptTuningConfig(num_virtual_tokens=10),
                           "the input embeddings only", "n input vectors"),
    "P-tuning n=10 (MLP, H=128)": (PTuningConfig(num_virtual_tokens=10, encoder_hidden_size=128),
                                   "the input embeddings only", "an encoder producing n input vectors"),
}
total = sum(p.numel() for p in base.parameters())
print(f"{'method':30s} {'trainable':>9s} {'% of base':>9s}  {'where':44s} what")
for name, (config, where, what) in methods.items():
    model = get_peft_model(load_base("default"), config)
    trainable = model.get_nb_trainable_parameters()[0]
    print(f"{name:30s} {trainable:>9,d} {100 * trainable / total:8.2f}%  {where:44s} {what}")
print(f"(base: {total:,d} parameters, all frozen in every row)")

# %% [markdown]
# LoRA and adapters change what the layers *compute* (a weight update, or a new layer); prefix and prompt
# tuning change only what the layers *see* (extra keys/values, or extra input vectors), so the base's
# computation is untouched and one batch can mix prefixes of different tasks. The price: the prefix costs
# attention context (n of block_size positions: n + T ≤ 128 here) and, unlike LoRA, cannot be merged away.
#
# ### Exercise 4.5 — why prefixes suit controlling generation
#
# Li & Liang designed prefix tuning for generation (table-to-text on E2E/WebNLG/DART with GPT-2,
# summarisation on XSUM with BART) and motivate it by prompting: a context steers what an LM generates, and a
# prefix is a context optimised in continuous space at every layer rather than searched among words
# (§3–4). Because the LM itself is untouched, its fluency is kept, and they report that prefix tuning matched
# fine-tuning in full-data table-to-text, beat it in low-data settings and extrapolated better to unseen
# topics (§6–7). Here the measured version, at small scale: the training cells above turned the base's
# continuation into the task's one-word answer format by training only the prefix (the counts and scores are in
# their printouts), while every base weight stayed frozen.
#
# ### Exercise 4.6 (challenge) — prompt tuning / P-tuning against prefix tuning
#
# Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691) and P-tuning (Liu et al. 2021,
# https://arxiv.org/abs/2103.10385) learn n vectors at the **input layer only** (n·C numbers); the frozen
# layers then compute those virtual tokens' keys and values. Prefix tuning sets **every layer's** keys and
# values directly (L·2·n·C numbers). So every soft prompt is a special prefix: run the frozen model over
# the prompt once, keep its KV cache, and that cache *is* a prefix giving the same outputs. The reverse does
# not hold: a prefix need not be any input's activations. Checked:

# %%
pt = get_peft_model(load_base("default"), PromptTuningConfig(num_virtual_tokens=n))
prompt = pt.prompt_encoders["default"].virtual_tokens().detach()  # (n, C)
kv = KVCache(L, 1)
with torch.no_grad():
    pt.base_model(inputs_embeds=prompt[None], kv_cache=kv)  # the frozen model's keys/values of the prompt
flat = torch.cat([t[0].permute(1, 0, 2).reshape(n, C) for l in range(L) for t in (kv.keys[l], kv.values[l])], 1)
as_prefix = get_peft_model(load_base("default"), PrefixTuningConfig(num_virtual_tokens=n))
as_prefix.prompt_encoders["default"] = PrefixEncoder(n, L, nh, C, init=flat)
with torch.no_grad():
    d = (as_prefix(probe)[0] - pt(probe)[0]).abs().max()
print(f"soft prompt (n, C) = {tuple(prompt.shape)} → its KV cache as a prefix (n, L·2·C) = {tuple(flat.shape)}")
course.claim(d < 1e-4, f"a soft prompt's KV cache, loaded as a prefix, gives the soft prompt's logits "
                       f"(max |difference| {d:.1e} < 1e-4): every soft prompt is a prefix")
n_ptuning = get_peft_model(load_base("default"), PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=128))
print(f"trainable: prompt tuning n·C = {pt.get_nb_trainable_parameters()[0]:,d}; prefix L·2·n·C = "
      f"{as_prefix.get_nb_trainable_parameters()[0]:,d} ({L * 2}× more); P-tuning adds an encoder "
      f"({n_ptuning.get_nb_trainable_parameters()[0]:,d} with H = 128) that is folded away after training "
      f"like the prefix MLP")

# %% [markdown]
# So yes, they are the same idea at different depths: both prepend n learned "virtual tokens"; prompt tuning
# (and P-tuning, which adds an encoder to produce them) reaches the layers only through the frozen model,
# prefix tuning controls each layer. Lester et al. found that the input-only version catches up with
# fine-tuning only for models of billions of parameters (their Figure 1); chapter 6 measures it on this small base.

#
# ## Summary
#
# - A prefix is one matrix P of shape (n, L·2·C): reshaped, it gives every layer n extra keys and values per head,
#   and it is the only thing trained (L·2·n·C numbers; the base stays frozen).
# - The real tokens' queries score the prefix keys and their own causal keys in one softmax, so the prefix takes a
#   share of every attention row; in generation it sits in the KV cache before the first real token, which takes
#   position n.
# - There is no zero-init identity: minipeft starts the plain prefix from the frozen model's own keys and values of
#   n random tokens, and a short training run teaches the answer format on `facts` — measured over three seeds,
#   with intervals, not from one run.
# - Li & Liang's reparameterisation trains a prefix through an MLP with many times more numbers; `fold()`
#   evaluates it once after training and keeps only P, with the same outputs.
# - Per generated token a prefix adds n attention entries and no layer, and it cannot be merged into the weights.
#   A soft prompt is a special prefix (its own KV cache); prefix tuning sets every layer's keys and values directly.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub is
# untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks on them.
#
# ### Exercise 1 — the prefix reshape
#
# HF peft hands a batch of prefixes to the model as one tensor of shape (B, n, 2·n_layer·n_embd), in the layout of
# section 4.1 (per virtual token: layer 0's key, layer 0's value, layer 1's key, …, each C = n_head·head_dim wide,
# head-major). Write `prefix_to_past(P, n_layer, n_head)`: the per-layer keys and values the attention wants, a list
# of n_layer pairs `(keys, values)`, each of shape (B, n_head, n, head_dim). The check compares them with the
# library's `PrefixEncoder.keys_values()`, row by row, on three shapes.

# %%
def prefix_to_past(P, n_layer, n_head):
    """P (B, n, L·2·C) → [(keys, values)] * L, each (B, n_head, n, head_dim)."""
    return None  # your code here


# %%
check_prefix_to_past(prefix_to_past)

# %% [markdown]
# ### Exercise 2 — the parameter count, with and without the reparameterisation MLP
#
# Write `prefix_param_count(n, n_layer, n_embd, projection, hidden)`: the trainable numbers of a prefix of n
# virtual tokens, plain (`projection=False`) or produced by Li & Liang's MLP (`projection=True`: n embeddings of
# width C, then Linear(C, H), tanh, Linear(H, L·2·C); `hidden=None` means H = C). Derive it from the shapes, not
# from a module. The check builds real `PrefixEncoder`s and counts their parameters.

# %%
def prefix_param_count(n, n_layer, n_embd, projection=False, hidden=None):
    """Trainable parameters of a prefix of n virtual tokens on a model of n_layer layers of width n_embd."""
    return None  # your code here


# %%
check_prefix_param_count(prefix_param_count)

# %% [markdown]
# ### Exercise 3 — the attention mask with a prefix
#
# A batch is padded: `attention_mask` (B, T) holds 1 for a real token and 0 for padding. With a prefix of n
# entries in front, write `prefix_attention_mask(attention_mask, n)`: a boolean (B, 1, T, n+T) tensor, True where
# query t may attend to key s. Every query sees the whole prefix; among the real tokens attention is causal and
# skips padded keys; and every query sees itself, as in the mask GPT builds (`GPT._attention_mask`). That diagonal is
# needed without a prefix (n = 0), where a padded query with no real token before it (left padding) would otherwise
# see no key, and its softmax row would be all −∞, a NaN. With a prefix every query already sees n keys, and the
# diagonal only changes what a padded query computes, an output the loss and generation ignore. The check compares
# your mask with GPT's when the KV cache starts with a prefix, for left and right padding.

# %%
def prefix_attention_mask(attention_mask, n):
    """attention_mask (B, T) of 1/0 → bool (B, 1, T, n+T), True where a query may attend to a key."""
    return None  # your code here


# %%
check_prefix_attention_mask(prefix_attention_mask)

# %% [markdown]
# ### Open questions
#
# 1. The untrained prefix starts from the model's own keys and values for random tokens. Change `fit_prefix` to
#    start from N(0, 1) instead (`PrefixEncoder(..., init=torch.randn(n, L * 2 * C))`): what happens to the share
#    of attention the prefix takes at init (section 4.2), and to training? Measure over three seeds before you
#    answer.
# 2. A prefix costs n of the block_size positions. For which tasks would you rather spend them on a longer prefix
#    than on a longer input, and how would you find out on `facts`?

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")

# %%
course.claims_report()
