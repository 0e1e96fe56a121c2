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
import textwrap
import time
from pathlib import Path

import course
import matplotlib.pyplot as plt
import torch
from checks.ch04 import check_adapter_param_count, check_bottleneck_forward, check_identity_init
from diagrams import draw_block

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import round_robin_ms
from minipeft.model import GPT, GPTConfig
from minipeft.pretrain import load_base
from minipeft.stats import fmt_interval, interval, wilson
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import AdapterConfig, LoraConfig, PeftModel, get_peft_model
from minipeft.tuners.bottleneck import BottleneckLayer

course.setup(seed=0)
NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")
tok = ByteTokenizer()
base = load_base("default")
d, L = base.config.n_embd, base.config.n_layer
print(base.config)

# %% [markdown]
# ### Exercises 3.1 and 3.2 — the bottleneck, Pfeiffer vs Houlsby, and where each sits
#
# **Houlsby** puts one adapter after the attention sublayer and one after the feed-forward sublayer (2 per
# block); **Pfeiffer** (the configuration from the AdapterFusion paper, Pfeiffer et al. 2021, EACL,
# https://arxiv.org/abs/2005.00247) keeps only the one after the feed-forward sublayer (1 per block). The papers
# used post-LN BERT, where the adapter acts on the sublayer's output before the residual add. minipeft's GPT is
# pre-LN (`x = x + Sublayer(LN(x))`), so the adapter wraps the sublayer (`block.attn`, `block.mlp`) and acts on
# its output before the add:

# %%
fig, axes = plt.subplots(1, 2, figsize=(9.2, 9.0))
draw_block("pfeiffer", axes[0])
draw_block("houlsby", axes[1])
plt.tight_layout()
plt.show()

# %% [markdown]
# Here are block 0's modules with each, as minipeft wraps them:

# %%
pf = get_peft_model(load_base("default"), AdapterConfig.load("pfeiffer", reduction_factor=16))
ho = get_peft_model(load_base("default"), AdapterConfig.load("houlsby", reduction_factor=16))
print("Pfeiffer, block 0:\n", pf.base_model.transformer.h[0], sep="")
print("\nHoulsby, block 0 (attention sublayer):\n", ho.base_model.transformer.h[0].attn, sep="")
pf.print_trainable_parameters()
ho.print_trainable_parameters()

# Identity at init: a fresh adapter leaves the logits exactly unchanged.
idx = torch.tensor([tok.encode("Review: The tea was fresh. Sentiment: ", add_bos=True)])  # (1, T)
with torch.no_grad():
    init_diff = max((m(idx)[0] - base(idx)[0]).abs().max().item() for m in (pf, ho))
course.claim(init_diff == 0.0, f"freshly attached Pfeiffer and Houlsby adapters leave the logits exactly unchanged "
                               f"(max |difference| = {init_diff:.1e}): W_up and b_up start at zero")

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
for arch in measured:
    for rf in rfs:
        pm = get_peft_model(load_base("default"), AdapterConfig.load(arch, reduction_factor=rf))
        measured[arch].append(pm.get_nb_trainable_parameters()[0])
    print(f"{arch:8s}: " + ", ".join(f"rf={rf}: {n:,d}" for rf, n in zip(rfs, measured[arch], strict=True)))
course.claim(all(n == L * per_block * adapter_params(d, rf)
                 for arch, per_block in (("pfeiffer", 1), ("houlsby", 2))
                 for rf, n in zip(rfs, measured[arch], strict=True)),
             f"every count is the closed form: per_block·L·(2·d·m + m + d), at each of {len(rfs)} reduction factors")
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
halving = [a / b for a, b in zip(measured["pfeiffer"][:-1], measured["pfeiffer"][1:], strict=True)]
print(f"doubling rf divides Pfeiffer's parameters by {min(halving):.2f}–{max(halving):.2f} (the d-sized bias "
      f"stays); Houlsby / Pfeiffer at the same rf: "
      f"{min(h / p for h, p in zip(measured['houlsby'], measured['pfeiffer'], strict=True)):.2f}×")

# %% [markdown]
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
    print(f"trained adapter {name!r}: {len(trainable)} tensors, {n_params:,d} parameters, "
          f"{recipes[name]['steps']} steps, {res.seconds:.1f} s")
after = base_fingerprint(pm.base_model)
course.claim(before == after and fingerprints["sentiment"] == adapter_fingerprint(pm, "sentiment"),
             f"training two adapters left the base bit-for-bit unchanged (fingerprint {before} before, {after} after), "
             f"and training 'facts' left the 'sentiment' adapter unchanged")

# %% [markdown]
# Now every combination: the base alone (`disable_adapter()`), each adapter, and both stacked
# (`set_adapter(["sentiment", "facts"])` applies sentiment's adapter, then facts', after each MLP). Metrics on
# the test splits: accuracy (sentiment, chance 0.5) and exact match (facts), each with its 95% Wilson interval
# over the test examples. This is one trained model (one seed): the intervals say how precisely the test split
# measures *this* model, not how another seed would do.

# %%
def scores() -> list[float]:
    return [evaluate(pm, t, tok, "test") for t in tasks.values()]


rows = {}
with pm.disable_adapter():
    rows["base only"] = scores()
for active in ("sentiment", "facts", ["sentiment", "facts"], ["facts", "sentiment"]):
    pm.set_adapter(active)
    rows[" + ".join(active) if isinstance(active, list) else active] = scores()
n_test = {name: len(t.test) for name, t in tasks.items()}


def with_interval(p: float, n: int) -> str:
    lo, hi = wilson(p, n)
    return f"{p:.3f} [{lo:.2f}, {hi:.2f}]"


print(f"{'active adapter(s)':22s} {'sentiment accuracy':>22s} {'facts exact match':>22s}")
for name, (s, f) in rows.items():
    print(f"{name:22s} {with_interval(s, n_test['sentiment']):>22s} {with_interval(f, n_test['facts']):>22s}")
print(f"chance: sentiment {tasks['sentiment'].chance:.2f}, facts {tasks['facts'].chance:.3f} (right form, guessed "
      f"fact); test examples: {n_test}")


def above(a: tuple[float, int], b: tuple[float, int]) -> bool:
    """Whether a's Wilson interval lies wholly above b's."""
    return wilson(*a)[0] > wilson(*b)[1]


for i, name in enumerate(tasks):
    own, base_score = rows[name][i], rows["base only"][i]
    word = "above" if above((own, n_test[name]), (base_score, n_test[name])) else "not clearly above"
    print(f"On {name}, its own adapter scores {own:.3f} against the base's {base_score:.3f}: {word} the base (Wilson "
          f"intervals {'disjoint' if word == 'above' else 'overlapping'}).")
for i, name in enumerate(tasks):
    kept = rows["sentiment + facts"][i]
    print(f"Stacked (sentiment, then facts), {name} scores {kept:.3f}, against {rows[name][i]:.3f} with its own "
          f"adapter alone.")

# %% [markdown]
# Switching is one call and never touches the base (the claim above); the printout says how each adapter does on
# its own task against the base. Stacking two adapters trained *separately* simply composes them: each was
# trained to see the base's output, not the other adapter's, so the stacked rows show how much of each task
# survives. The `adapters` library's AdapterFusion learns how to combine adapters instead (Pfeiffer et al. 2021,
# https://arxiv.org/abs/2005.00247), as minipeft's `Fuse` does (chapter 11).
#
# ### Exercise 3.4 — adapters vs LoRA, and the latency cost
#
# LoRA adds a parallel low-rank term to an existing weight, W₀x + BAx, which folds into W₀ (chapter 3);
# an adapter adds new *sequential* layers with a non-linearity in between, which cannot be folded away.
# The PEFT overview says adapters make inference "slightly increased". Measured here: greedy decoding of 32
# tokens at batch 1 (ms per token), and one forward pass over a batch of 16 × 64 tokens (ms), for the base,
# Pfeiffer, Houlsby and the two stacked adapters, against a merged LoRA. Timing is round-robin (each round times
# every variant once, so a slow moment of the machine hits them all alike), repeated over several rounds; each
# variant's time is divided by the base's *within* a round, and the mean of those ratios comes with its 95%
# interval. A ratio whose interval holds 1 is no difference this measurement can see.

# %%
prompt = torch.tensor([tok.encode(tasks["sentiment"].test[0].prompt, add_bos=True)])  # (1, T)
batch = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))  # (16, 64)
lora_merged = get_peft_model(load_base("default"), LoraConfig(r=8, target_modules="all-linear")).merge_and_unload()
variants = {  # name: (model, adapters to activate on pm, if it is pm)
    "base": (base, None), "Pfeiffer (1 per block)": (pm, "sentiment"), "Houlsby (2 per block)": (ho, None),
    "2 stacked Pfeiffer": (pm, ["sentiment", "facts"]), "LoRA, merged": (lora_merged, None)}
for m in (base, pm, ho, lora_merged):
    m.eval()


def ready(m, active):
    """The model, with pm's adapters switched to `active` first if they differ (only a variant's decode call,
    which comes first, switches: well under a millisecond against 32 tokens)."""
    if active is not None and pm.active_adapters != ([active] if isinstance(active, str) else active):
        pm.set_adapter(active)
    return m


calls = {}
for name, (m, active) in variants.items():
    calls[name, "decode"] = lambda m=m, a=active: ready(m, a).generate(prompt, max_new_tokens=32)
    calls[name, "forward"] = lambda m=m, a=active: ready(m, a)(batch)
ROUNDS = 8
with torch.no_grad():
    rounds = [round_robin_ms(calls, repeats=1, warmup=1 if i == 0 else 0) for i in range(ROUNDS)]
pm.set_adapter("sentiment")
ratios = {(name, kind): [r[name, kind] / r["base", kind] for r in rounds] for name, kind in calls}
ms = {(name, kind): [r[name, kind] for r in rounds] for name, kind in calls}

print(f"mean ± 95% interval over {ROUNDS} rounds")
print(f"{'':24s} {'decode ms/token':>16s} {'÷ base':>13s} {'forward ms (16×64)':>19s} {'÷ base':>13s}")
for name in variants:
    print(f"{name:24s} {fmt_interval([t / 32 for t in ms[name, 'decode']], '.2f'):>16s} "
          f"{fmt_interval(ratios[name, 'decode'], '.2f'):>13s} {fmt_interval(ms[name, 'forward'], '.1f'):>19s} "
          f"{fmt_interval(ratios[name, 'forward'], '.2f'):>13s}")


def latency_verdict(name: str, kind: str) -> str:
    mean, half = interval(ratios[name, kind])
    if mean - half <= 1 <= mean + half:
        return f"no different from the base within the noise ({fmt_interval(ratios[name, kind], '.2f')}×, holds 1)"
    return f"{'slower' if mean > 1 else 'faster'} than the base: {fmt_interval(ratios[name, kind], '.2f')}×"


for name in list(variants)[1:]:
    print(f"{name}: decoding {latency_verdict(name, 'decode')}; batched forward {latency_verdict(name, 'forward')}")

# %% [markdown]
# The verdicts above are this run's, on this CPU: timings of a 1.3M-parameter model at batch 1 are dominated by
# per-layer overhead, so each extra module can show. Every adapter adds two small matmuls per site plus their
# launches, on every token, for as long as the model serves. A merged LoRA is a plain GPT with other numbers in
# its weights, so its ratio measures nothing but the noise of the timing itself: read the other ratios against
# its interval.
#
# ### Exercise 3.5 (challenge) — sharing adapters: AdapterHub, and what minipeft writes
#
# **AdapterHub** (Pfeiffer et al. 2020, https://arxiv.org/abs/2007.07779) is the hub of the `adapters` library
# (formerly `adapter-transformers`): trained adapters are published under a name, and
# `model.load_adapter("AdapterHub/roberta-base-pf-imdb")` downloads one and attaches it to the same base model
# (the original hub's index now redirects to the Hugging Face Hub). Each published adapter is a small directory:
# `adapter_config.json` — the adapter's architecture (reduction factor, non-linearity, where it sits) plus the base
# it was trained for (`model_type`, `hidden_size`, the model's name) — and the weights (`pytorch_adapter.bin`, or
# `adapter.safetensors`), optionally with a prediction head (`head_config.json` and its weights). An adapter is
# small next to its base: a Pfeiffer adapter of reduction factor 16 on roberta-base (12 layers of width 768, so a
# bottleneck of 768/16 = 48) has 12·(768·48 + 48 + 48·768 + 768) = 894,528 parameters, 3.6 MB in fp32, against
# the base's 125 M parameters, 0.5 GB. So sharing one costs little, and one base downloaded once serves every
# adapter; adapters from the hub can then be stacked or fused.
#
# minipeft has the local half of that (no hub, nothing downloaded). `save_pretrained` writes every adapter of a
# model, HF peft's layout: for each adapter a config (`adapter_config.json`, which also stores the base's
# fingerprint — its shape — where AdapterHub stores the model's name and hidden size), its tensors
# (`adapter_model.safetensors`, safetensors, so loading can never run code) and a manifest of their checksums
# written last (a crash mid-save can never pair new tensors with an old config); with more than one adapter, each
# sits in its own subdirectory and `adapter_composition.json` records which are active. The cell lists what it
# wrote, against a full checkpoint of the same model:

# %%
share = Path(tempfile.mkdtemp())
pm.set_adapter("sentiment")
pm.save_pretrained(share / "two-tasks")
base.save_pretrained(share / "full-checkpoint")  # what storing a fully fine-tuned copy per task would cost


def listing(directory: Path) -> int:
    total = 0
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        print(f"  {str(f.relative_to(directory)):44s} {f.stat().st_size:>10,d} bytes")
        total += f.stat().st_size
    return total


print("save_pretrained, two Pfeiffer adapters:")
adapters_size = listing(share / "two-tasks")
print("full checkpoint (config + weights):")
full_size = listing(share / "full-checkpoint")
tensor_bytes = {name: (share / "two-tasks" / name / "adapter_model.safetensors").stat().st_size for name in tasks}
n_adapter = {name: sum(t.numel() for t in pm.adapter_state_dict(name).values()) for name in tasks}
print(f"both adapters together: {adapters_size:,d} bytes = {adapters_size / full_size:.3f} of one full checkpoint "
      f"({full_size:,d} bytes)")
course.claim(all(4 * n_adapter[name] <= tensor_bytes[name] < 1.1 * 4 * n_adapter[name] for name in tasks)
             and adapters_size < 0.2 * full_size,
             f"each adapter's tensor file holds its {n_adapter['sentiment']:,d} fp32 numbers and little else, and two "
             f"adapters cost {adapters_size / full_size:.1%} of one full checkpoint")
print("\nsentiment/adapter_config.json (the architecture, and the base it was made for):")
print(textwrap.indent((share / "two-tasks" / "sentiment" / "adapter_config.json").read_text(), "  "))

# %% [markdown]
# Somewhere else, with the same base: `PeftModel.from_pretrained` restores both adapters and the active one, and the
# logits are the trained model's.

# %%
received = PeftModel.from_pretrained(load_base("default"), str(share / "two-tasks"))
with torch.no_grad():
    recv_diff = (received(idx)[0] - pm(idx)[0]).abs().max()
course.claim(recv_diff == 0.0 and list(received.peft_config) == list(pm.peft_config),
             f"the received model holds adapters {list(received.peft_config)} (active {received.active_adapters}) and "
             f"computes the trained model's logits exactly (max |difference| {recv_diff:.1e})")

# %% [markdown]
# An adapter is only meaningful on the base it was trained for. Below, a Pfeiffer adapter is saved from a GPT of
# another shape (2 layers of width 64, the size of the "tiny" preset), and then loaded onto the default base — the
# way a wrong download would arrive. Loading compares the fingerprint stored in the config with the model's and
# refuses, naming every field that differs; the model it was to be loaded into is left as it was.

# %%
other = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64))  # another base: random weights suffice
foreign = share / "pfeiffer-for-another-base"
get_peft_model(other, AdapterConfig.load("pfeiffer", reduction_factor=4)).save_adapter(foreign)

target = load_base("default")
try:
    PeftModel.from_pretrained(target, str(foreign))
    refusal = None
except ValueError as e:
    refusal = str(e)
print("PeftModel.from_pretrained refused it:\n" + textwrap.indent(textwrap.fill(refusal or "(no error)", 116), "  "))
try:
    pm.load_adapter(str(foreign), adapter_name="foreign")
    refusal_into_pm = None
except ValueError as e:
    refusal_into_pm = str(e)
course.claim(refusal is not None and "different base model" in refusal and refusal_into_pm is not None
             and not any(isinstance(m, BottleneckLayer) for m in target.modules()) and "foreign" not in pm.peft_config,
             "an adapter saved for a differently shaped base is refused, by from_pretrained and by load_adapter, and "
             f"neither model keeps anything of it (pm still holds {list(pm.peft_config)})")

# %% [markdown]
# ## Summary
#
# - A bottleneck adapter is h + W_up·f(W_down·h + b_down) + b_up: 2·d·m + m + d parameters, m = d / rf; with
#   W_up and b_up at zero it starts as the identity.
# - Pfeiffer puts one adapter per block (after the MLP), Houlsby two (after attention too): twice the parameters
#   at the same reduction factor, and two sequential modules per block to run.
# - Adapters for several tasks share one frozen base; switching is one `set_adapter` call and never changes the
#   base. Stacking separately trained adapters composes them; fusion learns the combination.
# - An adapter cannot be merged (a non-linearity sits between its projections), so it costs time on every token;
#   how much is a ratio with an interval, read against a merged LoRA's, which can only be noise.
# - Sharing an adapter means sharing a config and a small weight file (AdapterHub by name, minipeft by
#   directory); loading checks that the adapter was made for this base and refuses it otherwise.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks on them.
#
# ### Exercise 1 — a bottleneck adapter's forward pass
#
# Write `bottleneck_forward(h, W_down, b_down, W_up, b_up)` for h of shape (..., d), W_down (m, d) and W_up
# (d, m), with ReLU as the non-linearity (the library's default). The check compares it with minipeft's
# `BottleneckAdapter` (trained-looking random weights) on three widths.

# %%
def bottleneck_forward(h, W_down, b_down, W_up, b_up):
    """h (..., d) → h + W_up·ReLU(W_down·h + b_down) + b_up, (..., d)."""
    return None  # your code here


# %%
check_bottleneck_forward(bottleneck_forward)

# %% [markdown]
# ### Exercise 2 — Pfeiffer against Houlsby: the parameter count
#
# Write `adapter_param_count(architecture, n_layer, d, reduction_factor)` for `architecture` "pfeiffer" or
# "houlsby": the trainable parameters of the adapters on a GPT of n_layer blocks of width d. The bottleneck is
# m = d // reduction_factor (integer division). The check compares with `get_peft_model` on five configurations.

# %%
def adapter_param_count(architecture, n_layer, d, reduction_factor):
    """Trainable parameters of Pfeiffer or Houlsby adapters at this reduction factor."""
    return None  # your code here


# %%
check_adapter_param_count(adapter_param_count)

# %% [markdown]
# ### Exercise 3 — an adapter that starts as the identity, and can learn
#
# Write `identity_init(adapter)`: set the parameters of a `BottleneckAdapter` (its `adapter_down` and `adapter_up`
# are `nn.Linear`s) in place, so that `adapter(h)` returns h exactly, yet the up-projection's weight W_up
# (`adapter_up.weight`) gets a nonzero gradient from the first step. Zeroing everything passes the first test and
# fails the second (b_up would still get a gradient, W_up none): find out why. The check starts from
# random weights, calls your function, compares the output with h, then backpropagates a loss.

# %%
def identity_init(adapter):
    """Initialise adapter.adapter_down and adapter.adapter_up in place: identity at start, still trainable."""
    return None  # your code here


# %%
check_identity_init(identity_init)

# %% [markdown]
# ### Open questions
#
# 1. Section 3.3 trained each adapter alone, then stacked them. Train the `facts` adapter *while* the sentiment
#    adapter is active below it (`set_adapter(["sentiment", "facts"])`, with only facts' parameters trainable):
#    does the stacked row keep more of each task? Measure with three seeds before you answer.
# 2. At what width d would Houlsby's second adapter per block cost less time, relative to the base, than it does
#    here? Think about what grows with d² and what grows with d·m.

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")

# %%
course.claims_report()
