# %% [markdown]
# # Chapter 4 — Bottleneck adapters
#
# An adapter is a small network inserted into a frozen transformer: down-project, non-linearity, up-project,
# added back to its input (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751):
#
# $$\mathrm{adapter}(o) = o + W_{\text{up}}\, f(W_{\text{down}}\, o + b_{\text{down}}) + b_{\text{up}},
# \qquad W_{\text{down}} \in \mathbb{R}^{m\times d},\; W_{\text{up}} \in \mathbb{R}^{d\times m},\;
# m = d / \text{reduction factor}.$$
#
# W_up starts at zero, so an adapter starts as the identity. Only adapters are trained; one base serves many
# tasks, each a small set of adapter weights. This chapter answers Exercise 3 of the PEFT exercises (3.1 – 3.5).

# %%
# %matplotlib inline
import hashlib
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import round_robin_ms
from minipeft.pretrain import load_base
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import AdapterConfig, LoraConfig, PeftModel, get_peft_model

NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")
torch.manual_seed(0)
tok = ByteTokenizer()
base = load_base("default")
d, L = base.config.n_embd, base.config.n_layer
print(base.config)

# %% [markdown]
# ### Exercises 3.1 and 3.2 — the bottleneck, Pfeiffer vs Houlsby, and where each sits
#
# **Houlsby** puts one adapter after the attention sublayer and one after the feed-forward sublayer (2 per
# block); **Pfeiffer** (Pfeiffer et al. 2020, AdapterFusion, https://arxiv.org/abs/2005.00247) keeps only the
# one after the feed-forward sublayer (1 per block). The papers used post-LN BERT, where the adapter acts on
# the sublayer's output before the residual add. minipeft's GPT is pre-LN (`x = x + Sublayer(LN(x))`), so
# the adapter wraps the sublayer (`block.attn`, `block.mlp`) and acts on its output before the add:
#
#     x ─► LN₁ ─► Attn ─► [Houlsby only] ─► (+x) ─► LN₂ ─► MLP ─► [both] ─► (+)
#
# Here are block 0's modules with each, as minipeft wraps them:

# %%
pf = get_peft_model(load_base("default"), AdapterConfig.load("pfeiffer", reduction_factor=16))
ho = get_peft_model(load_base("default"), AdapterConfig.load("houlsby", reduction_factor=16))
print("Pfeiffer, block 0:\n", pf.base_model.transformer.h[0], sep="")
print("\nHoulsby, block 0 (attention sublayer):\n", ho.base_model.transformer.h[0].attn, sep="")
pf.print_trainable_parameters()
ho.print_trainable_parameters()

# Identity at init: a fresh adapter leaves the logits exactly unchanged.
idx = torch.tensor([tok.encode("Review: The tea was fresh. Sentiment: ", add_bos=True)])
with torch.no_grad():
    print(f"max |logits(Houlsby at init) − logits(base)| = {(ho(idx)[0] - base(idx)[0]).abs().max():.1e}")

# %% [markdown]
# ### Parameters against the reduction factor
#
# Per adapter: **2·d·m + m + d** (two matrices and both biases), m = d / rf. Pfeiffer has L adapters,
# Houlsby 2L. The closed form is checked against the models' real parameters:

# %%
def adapter_params(d: int, rf: int) -> int:
    m = d // rf
    return 2 * d * m + m + d


rfs = [1, 2, 4, 8, 16, 32]
measured = {"pfeiffer": [], "houlsby": []}
for arch, per_block in (("pfeiffer", 1), ("houlsby", 2)):
    for rf in rfs:
        pm = get_peft_model(load_base("default"), AdapterConfig.load(arch, reduction_factor=rf))
        n, total = pm.get_nb_trainable_parameters()
        assert n == L * per_block * adapter_params(d, rf), (arch, rf, n)
        measured[arch].append(n)
    print(f"{arch:8s}: " + ", ".join(f"rf={rf}: {n:,d}" for rf, n in zip(rfs, measured[arch], strict=True)))
print(f"(base: {base.num_parameters():,d} parameters; LoRA r=8 on c_attn: {L * 8 * (d + 3 * d):,d})")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
rf_fine = [2 ** (k / 4) for k in range(0, 21)]
for arch, per_block in (("pfeiffer", 1), ("houlsby", 2)):
    closed = [L * per_block * (2 * d * (d / rf) + d / rf + d) for rf in rf_fine]
    line, = ax.plot(rf_fine, closed, label=f"{arch}: {per_block}·L·(2·d·d/rf + d/rf + d)")
    ax.plot(rfs, measured[arch], "o", color=line.get_color(), label=f"{arch}: measured")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("reduction factor rf (bottleneck m = d / rf)")
ax.set_ylabel("trainable parameters (count)")
ax.set_title(f"Adapter parameters against the reduction factor (d = {d}, L = {L})")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Halving the bottleneck halves the parameters (the d-sized bias stays), and Houlsby costs twice Pfeiffer
# at the same rf.
#
# ### Exercise 3.3 — one base, two tasks: swapping and stacking adapters
#
# One frozen base, two Pfeiffer adapters (rf = 4): `sentiment` (classification) and `facts` (answer a
# question about a person of the built-in world; test people never appear in training, so the facts must
# come from pretraining). Each is trained with only its own parameters requiring gradients. The base's
# weights are hashed before and after.

# %%
def base_fingerprint(model) -> str:
    """SHA-256 of the base model's own tensors (names without the wrappers' `base_layer`), adapters excluded."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if ".adapters." in name or ".lora_" in name:
            continue
        h.update(name.replace(".base_layer", "").encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def adapter_fingerprint(pm, name: str) -> str:
    h = hashlib.sha256()
    for k, t in sorted(pm.adapter_state_dict(name).items()):
        h.update(k.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


tasks = {"sentiment": load_task("sentiment"), "facts": load_task("facts")}
recipes = {"sentiment": dict(steps=120, lr=1e-2), "facts": dict(steps=40, lr=1e-2)}  # lr from a short trial
model = load_base("default")
before = base_fingerprint(model)
pm = get_peft_model(model, AdapterConfig.load("pfeiffer", reduction_factor=4), adapter_name="sentiment")
pm.add_adapter("facts", AdapterConfig.load("pfeiffer", reduction_factor=4))

fingerprints = {}
for name, task in tasks.items():
    pm.set_adapter(name)  # active and trainable: only this adapter's parameters require grad
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert all(f".adapters.{name}." in n for n in trainable)
    res = train(pm, lambda g, t=task: task_batch(t, tok, 16, base.config.block_size, g),
                TrainConfig(steps=recipes[name]["steps"], lr=recipes[name]["lr"], batch_size=16, warmup_steps=5),
                loss_fn=task_loss(task, tok), progress=False)
    fingerprints[name] = adapter_fingerprint(pm, name)
    n_params = sum(pm.get_parameter(n).numel() for n in trainable)
    print(f"trained adapter {name!r}: {len(trainable)} tensors, {n_params:,d} parameters, {res.seconds:.1f} s")
after = base_fingerprint(pm.base_model)
print(f"base fingerprint before {before}, after both trainings {after}: "
      f"{'unchanged' if before == after else 'CHANGED'}")
same = fingerprints["sentiment"] == adapter_fingerprint(pm, "sentiment")
print(f"'sentiment' adapter unchanged by training 'facts': {same}")

# %% [markdown]
# Now every combination: the base alone (`disable_adapter()`), each adapter, and both stacked
# (`set_adapter(["sentiment", "facts"])` applies sentiment's adapter, then facts', after each MLP). Metrics on
# the validation splits: accuracy (sentiment, chance 0.5) and exact match (facts).

# %%
def scores() -> list[float]:
    return [evaluate(pm, t, tok, "validation") for t in tasks.values()]


rows = {}
with pm.disable_adapter():
    rows["base only"] = scores()
for active in ("sentiment", "facts", ["sentiment", "facts"], ["facts", "sentiment"]):
    pm.set_adapter(active)
    rows[" + ".join(active) if isinstance(active, list) else active] = scores()
print(f"{'active adapter(s)':22s} {'sentiment acc':>14s} {'facts EM':>9s}")
for name, (s, f) in rows.items():
    print(f"{name:22s} {s:14.2f} {f:9.2f}")
print(f"facts chance (right form, guessed fact): {tasks['facts'].chance:.2f}")

# %% [markdown]
# Switching is one call and never touches the base (fingerprints above); each adapter does its own task.
# Stacking two adapters trained *separately* simply composes them: each was trained to see the base's
# output, not the other adapter's, so read the stacked rows above for how much of each task survives. The
# `adapters` library's AdapterFusion learns how to combine adapters instead (Pfeiffer et al. 2020,
# https://arxiv.org/abs/2005.00247); minipeft only stacks.
#
# ### Exercise 3.4 — adapters vs LoRA, and the latency cost
#
# LoRA adds a parallel low-rank term to an existing weight, W₀x + BAx, which folds into W₀ (chapter 3);
# an adapter adds new *sequential* layers with a non-linearity in between, which cannot be folded away.
# The PEFT overview says adapters make inference "slightly increased". Measured here: greedy decoding of 32 tokens
# at batch 1 (ms per token), and one forward pass over a batch of 16 × 64 tokens (ms); the median of 8
# round-robin repeats, for the base, Pfeiffer, Houlsby and the two stacked adapters, against a merged LoRA.

# %%
prompt = torch.tensor([tok.encode(tasks["sentiment"].validation[0].prompt, add_bos=True)])
batch = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
lora_merged = get_peft_model(load_base("default"), LoraConfig(r=8, target_modules="all-linear")).merge_and_unload()
variants = {  # name: (model, adapters to activate on pm, if it is pm)
    "base": (base, None), "Pfeiffer (1 per block)": (pm, "sentiment"), "Houlsby (2 per block)": (ho, None),
    "2 stacked Pfeiffer": (pm, ["sentiment", "facts"]), "LoRA, merged": (lora_merged, None)}


def ready(m, active):
    """The model, with pm's adapters switched to `active` first if they differ (only a variant's decode call,
    which comes first, switches: well under a millisecond against 32 tokens)."""
    if active is not None and pm.active_adapters != ([active] if isinstance(active, str) else active):
        pm.set_adapter(active)
    return m


# Round-robin (`minipeft.measure`): every repeat times each variant once, so a slow moment of the machine hits
# them all alike; the median over repeats is the typical run.
calls = {}
for name, (m, active) in variants.items():
    calls[name, "decode"] = lambda m=m, a=active: ready(m, a).generate(prompt, max_new_tokens=32)
    calls[name, "forward"] = lambda m=m, a=active: ready(m, a)(batch)
with torch.no_grad():
    ms = round_robin_ms(calls, repeats=8)
latency = {name: (ms[name, "decode"] / 32, ms[name, "forward"]) for name in variants}
pm.set_adapter("sentiment")

print(f"{'':24s} {'decode ms/token':>16s} {'ratio':>6s} {'forward ms (16×64)':>19s} {'ratio':>6s}")
for name, (dec, fwd) in latency.items():
    print(f"{name:24s} {dec:16.2f} {dec / latency['base'][0]:6.2f} {fwd:19.1f} {fwd / latency['base'][1]:6.2f}")

# %% [markdown]
# The ratios above are this run's on this CPU (timings of a 1.3M-parameter model at batch 1 are dominated by
# per-layer overhead, so each extra module shows). Every adapter adds two small matmuls per site plus their
# launches, on every token, for as long as the model serves; a merged LoRA adds nothing, since it *is* a plain
# GPT (its ratio is ≈ 1 up to timing noise).
#
# ### Exercise 3.5 (challenge) — sharing adapters (AdapterHub)
#
# AdapterHub (Pfeiffer et al. 2020, https://arxiv.org/abs/2007.07779) made adapters shareable: an adapter is
# saved as its small weight file plus a config naming the architecture and the base model, uploaded to a hub,
# and attached to the same base elsewhere with one `load_adapter` call; adapters can then be stacked or fused.
# minipeft has the local half of that (no hub, nothing downloaded): `save_adapter` writes two files — the
# tensors and the config — and, last, a small manifest of their checksums that makes the directory one unit
# (a crash mid-save can never pair new tensors with an old config). `load_adapter` /
# `PeftModel.from_pretrained` attach them to a base, refusing an adapter made for another base (its config
# stores the base's fingerprint) or files that do not match the manifest.

# %%
share = Path(tempfile.mkdtemp()) / "sentiment-pfeiffer"
pm.save_adapter(share, "sentiment")
for f in sorted(share.iterdir()):
    print(f"{f.name:28s} {f.stat().st_size:>9,d} bytes")
print((share / "adapter_config.json").read_text()[:300], "…")

# Somewhere else: a fresh copy of the same base, and the adapter's directory.
received = PeftModel.from_pretrained(load_base("default"), str(share), adapter_name="sentiment")
with torch.no_grad():
    diff = (received(idx)[0] - pm(idx)[0]).abs().max()
print(f"received adapter: max |logit difference| = {diff:.1e}; sentiment accuracy "
      f"{evaluate(received, tasks['sentiment'], tok, 'validation'):.2f}")

# And into the model that already holds adapters, under a new name (added, not activated):
pm.load_adapter(str(share), adapter_name="sentiment_copy")
print("adapters now:", list(pm.peft_config), "| active:", pm.active_adapters)

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
