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
import time

import matplotlib.pyplot as plt
import torch

from minipeft import kernels
from minipeft.data import load_task, task_batch
from minipeft.evaluate import evaluate
from minipeft.measure import generation_ms_per_token
from minipeft.model import KVCache
from minipeft.pretrain import load_base
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

NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")  # plain PyTorch on the CPU
torch.manual_seed(0)
tok = ByteTokenizer()
base = load_base("default")
cfg = base.config
L, nh, C = cfg.n_layer, cfg.n_head, cfg.n_embd
hs = C // nh
task = load_task("facts")
print(cfg)
print(f"task {task.name!r}: {task.description} metric {task.metric}, chance {task.chance:.3f}; "
      f"{len(task.train)} train / {len(task.validation)} validation examples")

# %% [markdown]
# ### Exercise 4.1 — the prefix: one flat parameter, L key/value pairs per virtual token
#
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
print(f"layer 0 keys {tuple(keys[0].shape)}, values {tuple(values[0].shape)}; same numbers as the reshape: "
      f"{all(torch.equal(per_layer[l, 0], keys[l]) and torch.equal(per_layer[l, 1], values[l]) for l in range(L))}")
print(f"closed form L·2·n·C = {L}·2·{n}·{C} = {L * 2 * n * C:,d}")

# %% [markdown]
# minipeft starts the plain prefix from the frozen model's own keys and values for n random tokens (Li &
# Liang §7.2 found that initialising with real words' activations beats random init; it also puts the
# prefix at the scale the attention was trained on). The prefix lives in the KV cache: before any real
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
print(f"layer 0: max |hand-computed attention output − model's| = {diff:.1e}")
row = maps_init[0][:, -1]  # (nh, n+T): the last real token's attention, layer 0
print(f"the last token ({example.prompt[-1]!r}) in layer 0 puts {row[:, :n].sum(-1).mean():.2f} of its attention "
      f"mass on the {n} prefix entries (mean over heads); each row sums to {row.sum(-1).mean():.3f}")

# %% [markdown]
# ### Exercise 4.3 and the reparametrisation — training the prefix, with and without an MLP
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
print(f"plain prefix:    {pm.get_nb_trainable_parameters()[0]:>8,d} trainable  "
      f"(closed form L·2·n·C = {closed_plain:,d})")
print(f"with projection: {pm_proj.get_nb_trainable_parameters()[0]:>8,d} trainable  "
      f"(closed form n·C + (C·H + H) + (H·L·2·C + L·2·C) = {closed_proj:,d})")
print({name: tuple(p.shape) for name, p in pm_proj.prompt_encoders["default"].named_parameters()})

# %% [markdown]
# Both are trained on `facts` (a question about a person of the built-in world; the test and validation
# people never appear in training, so the prefix can only teach the *format*, the fact must come from
# pretraining). The same 60 steps of batch 16; each at the learning rate that a short validation sweep, run
# outside this notebook, picked for it (0.1 plain, 0.01 with the MLP; prefixes want high rates, as the prompt- and
# prefix-tuning notes
# say of soft prompts: "higher learning rates often work better").
# The validation split has 24 questions, so exact match moves in steps of 1/24 ≈ 0.04.

# %%
STEPS = 60
get_batch = lambda g: task_batch(task, tok, 16, cfg.block_size, g)  # noqa: E731
before = {"zero-shot base": evaluate(base, task, tok, "validation"),
          "prefix at init": evaluate(pm, task, tok, "validation")}
gen_before = pm.generate(idx, max_new_tokens=12, eos_token_id=tok.eos_token_id)
runs = {}
for name, model, lr in (("plain prefix", pm, 1e-1), ("prefix + MLP", pm_proj, 1e-2)):
    res = train(model, get_batch, TrainConfig(steps=STEPS, lr=lr, batch_size=16, warmup_steps=10), progress=False)
    runs[name] = (res, evaluate(model, task, tok, "validation"))
    print(f"{name:13s} lr {lr:g}: final loss {sum(res.losses[-10:]) / 10:.3f}, validation exact match "
          f"{runs[name][1]:.3f} ({res.seconds:.1f} s)")
print("before training:", {k: round(v, 3) for k, v in before.items()}, f"(chance {task.chance:.3f})")

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name, (res, em) in runs.items():
    ax.plot(res.losses, label=f"{name} (val EM {em:.2f})")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats per answer token)")
ax.set_title(f"Prefix tuning on facts, n = {n}, batch 16")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Both learn the answer format within 60 steps, from exact match 0 before training. The
# difference between the two final scores is a few questions of 24, one seed: read it as "both work at their
# own rate", not as a ranking.
#
# After training the MLP is not needed: `fold()` evaluates it once and keeps only P, a plain encoder with
# L·2·n·C numbers. Its outputs are the same (up to float rounding of the one evaluation).

# %%
folded = pm_proj.prompt_encoders["default"].fold()
print(f"folded: {sum(p.numel() for p in folded.parameters()):,d} parameters instead of "
      f"{sum(p.numel() for p in pm_proj.prompt_encoders['default'].parameters()):,d}")
probe = torch.tensor([tok.encode(ex.prompt, add_bos=True) for ex in task.validation[:1]])
with torch.no_grad():
    logits_mlp = pm_proj(probe)[0]
    pm_proj.prompt_encoders["default"] = folded
    logits_folded = pm_proj(probe)[0]
print(f"max |logits folded − with MLP| = {(logits_folded - logits_mlp).abs().max():.1e}; "
      f"validation exact match folded {evaluate(pm_proj, task, tok, 'validation'):.3f}")

# %% [markdown]
# Where the trained prefix draws attention: the share of the last token's attention that goes to the prefix,
# per layer (mean over heads), before and after training the plain prefix.

# %%
maps_trained, _ = attention_maps(pm, idx)
share = lambda maps: [m[:, -1, :n].sum(-1).mean().item() for m in maps]  # noqa: E731
print("prefix share per layer, at init:      ", [f"{s:.2f}" for s in share(maps_init)])
print("prefix share per layer, after training:", [f"{s:.2f}" for s in share(maps_trained)])
fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), sharey=True)
for ax, maps, title in ((axes[0], maps_init, "at init"), (axes[1], maps_trained, "after 60 steps")):
    ax.imshow(maps[L - 1][:, -1].numpy(), aspect="auto", cmap="viridis")
    ax.axvline(n - 0.5, color="w", lw=1)
    ax.set_title(f"last token's attention, layer {L - 1}, {title}")
    ax.set_xlabel("key position (p0 … p9 = prefix, then the real tokens)")
    ax.set_xticks(range(0, n + idx.shape[1], 8))
axes[0].set_ylabel("head")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### What changes in generation
#
# With a KV cache, each new token costs one query against the cached keys. The prefix enters the cache once,
# before the prompt, so per token the model attends to n more keys and nothing else changes. Measured:
# greedy generation of 48 tokens, batch 1; the two models run in turn, 7 times each after a warm-up, and the
# median run of each counts (`minipeft.measure`: the typical run, not moved by one disturbed by other work).

# %%
ms = generation_ms_per_token({"base": base, "prefix": pm}, idx, new_tokens=48, repeats=7)
t_base, t_prefix = ms["base"], ms["prefix"]
print(f"ms/token: base {t_base:.2f}, prefix-tuned {t_prefix:.2f} → ratio {t_prefix / t_base:.2f} "
      f"(10 more keys against up to {idx.shape[1] + 48} real ones per step)")

print(f"\nquestion: {example.prompt!r}  (answer: {example.answer!r})")
base_out = base.generate(idx, 12, eos_token_id=tok.eos_token_id)[0, idx.shape[1]:]
print("  base model:         ", repr(tok.decode(base_out.tolist())))
print("  prefix at init:     ", repr(tok.decode(gen_before[0, idx.shape[1]:].tolist())))
for ex in task.validation[:4]:
    ids = torch.tensor([tok.encode(ex.prompt, add_bos=True)])
    out = pm.generate(ids, 12, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    print(f"  trained, {ex.prompt[10:40]!r:34s} → {tok.decode(out)!r:14s} (answer {ex.answer!r})")

# %% [markdown]
# The ratio is close to 1 (what is left is timing noise of a shared 2-core machine): a
# prefix costs no extra layer and no extra token of compute per step, only a few more attention entries.
# The generations show what training changed: at init the prefix leaves the base's continuation as it was;
# after 60 steps the model answers with the bare fact and stops.
#
# ### Exercise 4.4 — prefix tuning against LoRA and adapters: where, and what is trained
#
# Counts from the real modules on this base (C = 160, L = 4), each method at a common setting:

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
print(f"{'method':30s} {'trainable':>9s} {'% of base':>9s}  {'where':40s} what")
for name, (config, where, what) in methods.items():
    model = get_peft_model(load_base("default"), config)
    trainable = model.get_nb_trainable_parameters()[0]
    print(f"{name:30s} {trainable:>9,d} {100 * trainable / total:8.2f}%  {where:40s} {what}")
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
# topics (§6–7). Here the measured version: 60 steps on 12,800 numbers turned the base's answer from the
# continuation in the cell above into the task's one-word answer format, while the base weights stayed
# frozen.
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
print(f"max |logits(prompt tuning) − logits(equivalent prefix)| = {d:.1e}")
n_ptuning = get_peft_model(load_base("default"), PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=128))
print(f"trainable: prompt tuning n·C = {pt.get_nb_trainable_parameters()[0]:,d}; prefix L·2·n·C = "
      f"{as_prefix.get_nb_trainable_parameters()[0]:,d} ({L * 2}× more); P-tuning adds an encoder "
      f"({n_ptuning.get_nb_trainable_parameters()[0]:,d} with H = 128) that is folded away after training "
      f"like the prefix MLP")

# %% [markdown]
# So yes, they are the same idea at different depths: both prepend n learned "virtual tokens"; prompt tuning
# (and P-tuning, which adds an encoder to produce them) reaches the layers only through the frozen model,
# prefix tuning controls each layer. Lester et al. found that the input-only version catches up with
# fine-tuning only at ~10B parameters; chapter 6 measures it on this 1.3M-parameter base.

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
