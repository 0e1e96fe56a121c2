# %% [markdown]
# # Chapter 11 — Many adapters at once
#
# The PEFT overview sells adapters for their modularity: "different tasks can have their own adapter modules",
# "multiple adapters can be stacked or combined for multi-task learning", a chatbot "where different adapters
# handle intent recognition, entity extraction, and response generation". Chapter 4 swapped and stacked two
# adapters one request at a time. This chapter serves and combines several adapters on **one** frozen base:
#
# 1. one batch in which every row names its own adapter — LoRA, bottleneck, soft prompt or none — computed in
#    one pass, each row exactly as its adapter alone would compute it;
# 2. how the batched LoRA kernel groups the rows of such a batch by adapter (segments), and what it measured on
#    a GPU;
# 3. the composition blocks of AdapterHub's `adapters` library: `Parallel` (one output per adapter),
#    `Average` (the adapters' updates averaged) and `Fuse` — AdapterFusion, a small attention trained on top of
#    frozen adapters — and saving and loading a composition;
# 4. what a careful measurement over several seeds says about fusion against each adapter and against one
#    adapter trained on both tasks.
#
# Sources: punica's SGMV (https://arxiv.org/abs/2310.18547) and S-LoRA (https://arxiv.org/abs/2311.03285) for
# mixed-adapter batches; AdapterFusion (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247); the composition
# blocks of the `adapters` library (https://docs.adapterhub.ml/adapter_composition.html).

# %%
# %matplotlib inline
import re
import tempfile
import textwrap
import time
from pathlib import Path

import course
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from checks.ch11 import (
    check_average_of_adapters,
    check_fusion_parameters,
    check_group_rows,
    check_mixed_batch_by_loop,
)

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.kernels import multi_lora_routes, multi_lora_triton
from minipeft.methods import method_config
from minipeft.pretrain import load_base
from minipeft.stats import compare_verdict, interval, wilson
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, pad_batch, train
from minipeft.tuners import (
    AdapterConfig,
    Average,
    Fuse,
    LoraConfig,
    Parallel,
    PeftModel,
    PromptTuningConfig,
    get_peft_model,
)

course.setup(seed=0)


def fp32_tolerance(*tensors):
    """1e-5 of the largest magnitude involved (at least 1e-5): float32 rounding grows with the size of the numbers,
    and a different batch shape sums in a different order."""
    return 1e-5 * max([1.0] + [t.abs().max().item() for t in tensors])


NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")  # the CPU's backend; section 3 shows what the GPU kernel does differently
REPO = Path(kernels.__file__).resolve().parents[1]
tok = ByteTokenizer()
tasks = {"sentiment": load_task("sentiment"), "facts": load_task("facts")}
base = load_base("default")
T_MAX = base.config.block_size
print(base.config)
print({name: f"{len(t.train)} train / {len(t.test)} test, {t.metric}" for name, t in tasks.items()})

# %% [markdown]
# ## 1. Five adapters on one base
#
# One frozen base holds five adapters, each trained (or, for the soft prompt, initialised) for one task:
#
# | name | method | task | training here |
# |---|---|---|---|
# | `sentiment` | Pfeiffer bottleneck, rf = 4 | sentiment (is a review good or bad?) | a few dozen steps |
# | `facts` | Pfeiffer bottleneck, rf = 4 | facts (a question about a person of the world) | a few dozen steps |
# | `sentiment_lora` | LoRA r = 8, every Linear | sentiment | a few dozen steps |
# | `facts_lora` | LoRA r = 8, every Linear | facts | a few dozen steps |
# | `facts_prompt` | prompt tuning, 8 virtual tokens | facts | none: started from the embeddings of an instruction |
#
# The step counts are small so that the chapter runs quickly on a CPU (the cell before the summary prints how long
# it took); the adapters learn part of their task, which is all the mechanics below need. Section 6 reads a careful
# measurement with full training.

# %%
PFEIFFER = AdapterConfig.load("pfeiffer", reduction_factor=4)  # rf 4, as in chapter 4: sentiment needs the width
RECIPES = {  # name: (method config, task, steps, learning rate)
    "sentiment": (PFEIFFER, "sentiment", 60, 1e-2),
    "facts": (PFEIFFER, "facts", 30, 1e-2),
    "sentiment_lora": (method_config("lora"), "sentiment", 30, 5e-3),
    "facts_lora": (method_config("lora"), "facts", 20, 1e-2),
}
BATCH = 16

pm = None
for name, (config, task_name, steps, lr) in RECIPES.items():
    if pm is None:
        pm = get_peft_model(base, config, adapter_name=name)  # wraps `base` in place
    else:
        pm.add_adapter(name, config)
        pm.set_adapter(name)  # active and the only trainable adapter
    task = tasks[task_name]
    result = train(pm, lambda g, t=task: task_batch(t, tok, BATCH, T_MAX, g),
                   TrainConfig(steps=steps, lr=lr, batch_size=BATCH, warmup_steps=3),
                   loss_fn=task_loss(task, tok), progress=False)
    print(f"{name:15s} {steps:3d} steps on {task_name:9s}: loss {result.losses[0]:.2f} → {result.losses[-1]:.2f}")

pm.add_adapter("facts_prompt", PromptTuningConfig(
    num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text=tasks["facts"].discrete_prompt,
    tokenizer=tok))
pm.eval()
ADAPTER_TASK = {name: recipe[1] for name, recipe in RECIPES.items()} | {"facts_prompt": "facts"}
print("adapters:", list(pm.peft_config))

# %% [markdown]
# Each adapter's score on its own task (the test splits), against the base with no adapter. One training run
# each, so the interval printed is that of the test sample (Wilson, 95%), not of training noise:

# %%
def score(model, task_name, n=None):
    """The task metric on the first n test examples (all by default)."""
    return evaluate(model, tasks[task_name], tok, "test", max_examples=n)


def with_interval(p, task_name):
    low, high = wilson(p, len(tasks[task_name].test))
    return f"{p:.3f} [{low:.2f}, {high:.2f}]"


with pm.disable_adapter():
    base_scores = {t: score(pm, t) for t in tasks}
alone_scores = {}
for name, task_name in ADAPTER_TASK.items():
    pm.set_adapter(name)
    alone_scores[name] = score(pm, task_name)
    print(f"{name:15s} on {task_name:9s}: {with_interval(alone_scores[name], task_name)}   "
          f"(base {base_scores[task_name]:.3f}, chance {tasks[task_name].chance:.3f})")

# %% [markdown]
# ## 2. One batch, one adapter per row
#
# A server holding these adapters gets requests for all of them at once. `pm(idx, adapter_names=[...])` takes
# one adapter name per row (`"__base__"` for the frozen model) and runs the whole batch in one pass: every
# layer computes the base for every row, then adds what each row's adapter adds — a LoRA layer through
# `kernels.multi_lora_linear`, a bottleneck sublayer each adapter's update on its own rows, and a soft prompt's
# virtual tokens in front of its rows only (the other rows get masked padding there). `pm.generate(...,
# adapter_names=[...])` decodes the same way.
#
# The batch below mixes all five adapters and the base over test prompts of both tasks. The check: each
# row's logits against the same rows run as a batch of their own with only that adapter active (or adapters
# disabled), and each row's answer both ways. A difference of 0 would prove nothing if the adapters did
# nothing, so the cell also measures how far each adapter moves the logits away from the base.

# %%
def left_padded(prompts):
    """(idx, mask), both (B, T): the prompts' tokens right-aligned, as minipeft.evaluate pads for generation."""
    rows = [tok.encode(p, add_bos=True) for p in prompts]
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return idx, mask


ROWS = [  # (adapter, task, index of a test example)
    ("sentiment", "sentiment", 0), ("facts", "facts", 0), ("__base__", "facts", 1), ("sentiment_lora", "sentiment", 1),
    ("facts_lora", "facts", 2), ("facts_prompt", "facts", 3), ("sentiment_lora", "sentiment", 2), ("facts", "facts", 4),
    ("__base__", "sentiment", 3), ("facts_lora", "facts", 5), ("sentiment_lora", "sentiment", 4),
    ("facts_prompt", "facts", 6)]
names = [adapter for adapter, _, _ in ROWS]
examples = [tasks[t].test[i] for _, t, i in ROWS]
idx, mask = left_padded([ex.prompt for ex in examples])  # (12, T)
choice_ids = [tok.encode(c)[0] for c in tasks["sentiment"].choices]


def answers(logits, generated, prompt_len):
    """Row by row: the sentiment verbalizer's pick from the last logits, or the facts generation up to eos."""
    out = []
    for row, (_, task_name, _) in enumerate(ROWS):
        if task_name == "sentiment":
            out.append(tasks["sentiment"].choices[logits[row, -1, choice_ids].argmax().item()])
        else:
            ids = generated[row, prompt_len:].tolist()
            out.append(tok.decode(ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids))
    return out


NEW = tasks["facts"].max_new_tokens
with torch.no_grad():
    mixed_logits, _ = pm(idx, attention_mask=mask, adapter_names=names)  # (12, T, vocab): ONE pass
    mixed_generated = pm.generate(idx, NEW, attention_mask=mask, eos_token_id=tok.eos_token_id, adapter_names=names)
    alone_logits = torch.empty_like(mixed_logits)
    alone_generated = torch.empty_like(mixed_generated)
    for name in dict.fromkeys(names):  # each adapter's rows, as a batch of their own
        sel = torch.tensor([n == name for n in names])
        if name == "__base__":
            with pm.disable_adapter():
                alone_logits[sel] = pm(idx[sel], attention_mask=mask[sel])[0]
                alone_generated[sel] = pm.generate(idx[sel], NEW, attention_mask=mask[sel],
                                                   eos_token_id=tok.eos_token_id)
        else:
            pm.set_adapter(name)
            alone_logits[sel] = pm(idx[sel], attention_mask=mask[sel])[0]
            alone_generated[sel] = pm.generate(idx[sel], NEW, attention_mask=mask[sel], eos_token_id=tok.eos_token_id)
    with pm.disable_adapter():
        base_logits = pm(idx, attention_mask=mask)[0]

real = mask.bool()  # (12, T) the positions that hold tokens (left padding excluded)
row_diff = [(mixed_logits[r] - alone_logits[r]).abs()[real[r]].max().item() for r in range(len(ROWS))]
row_effect = [(alone_logits[r] - base_logits[r]).abs()[real[r]].max().item() for r in range(len(ROWS))]
mixed_answers = answers(mixed_logits, mixed_generated, idx.shape[1])
alone_answers = answers(alone_logits, alone_generated, idx.shape[1])
print(f"{'row':>3}  {'adapter':14s} {'prompt':48s} {'answer (mixed)':>15s} {'alone':>10s} {'|Δ logit|':>9s} "
      f"{'vs base':>7s}")
for r, ((name, _, _), ex) in enumerate(zip(ROWS, examples, strict=True)):
    print(f"{r:3d}  {name:14s} {ex.prompt[:48]:48s} {mixed_answers[r]!r:>15s} {alone_answers[r]!r:>10s} "
          f"{row_diff[r]:9.1e} {row_effect[r]:7.2f}")

adapter_rows = [r for r, n in enumerate(names) if n != "__base__"]
tol = fp32_tolerance(alone_logits[real])
course.claim(max(row_diff) <= tol and min(row_effect[r] for r in adapter_rows) > 0.1,
             f"in one mixed batch of {len(ROWS)} rows and {len(set(names))} adapters (the base included), every "
             f"row's logits equal its adapter's alone to {max(row_diff):.1e} (float32 rounding; tolerance "
             f"{tol:.0e}), while each adapter moves its rows' "
             f"logits by {min(row_effect[r] for r in adapter_rows):.2f} to {max(row_effect):.2f} from the base's")
course.claim(mixed_answers == alone_answers,
             f"all {len(ROWS)} answers of the mixed batch (verbalizer picks and greedy generations of up to {NEW} "
             f"tokens) equal the answers of each adapter alone")

# %% [markdown]
# The difference is float32 rounding at most: the mixed batch computes the same sums, only in a batch of another
# shape, which can change the order of the additions; rows of other adapters contribute nothing. So a server can
# batch requests for any number of adapters without changing any answer, and without running the base once per
# adapter. (The same holds for training: each adapter's gradient comes from its own rows only, which
# tests/test_mixed_batch.py checks.)
#
# ## 3. How the batched LoRA kernel groups rows
#
# At one LoRA layer, a mixed batch is one base GEMM for every row plus, for every adapter i, the low-rank term
# s_i·(x·A_iᵀ)·B_iᵀ on its own rows. Looping over adapters launches two small matmuls per adapter per layer —
# the reference's loop. The GPU kernel (`kernels/multi_lora_triton.py`, after punica's SGMV) launches **one**
# shrink and **one** expand kernel for all adapters: it sorts the rows by adapter on the GPU (a stable sort, no
# copy of x: rows are read through the sorted order) and cuts the sorted positions into **segments**, one per
# adapter; each program of the kernel takes a tile of BM rows inside one segment, so one adapter's A_i and B_i
# serve the whole tile. Rows whose adapter this layer does not hold — a bottleneck adapter's, a soft prompt's,
# the base's — get index −1 and no low-rank term.
# (Inference of up to `FUSED_MAX_ROWS` = 4096 rows — a decode step, or a prefill of that size — runs the two as one
# launch, `segment_shrink_expand`: for a decode step, starting a kernel costs the host more than the GPU spends on
# the whole layer.)

# Here is the index the LoRA layers see for the batch of section 2, and its segments
# (`multi_lora_triton.segments`, the function the kernel calls):

# %%
lora_names = [n for n in dict.fromkeys(names) if isinstance(pm.peft_config.get(n), LoraConfig)]
adapter_index = torch.tensor([lora_names.index(n) if n in lora_names else -1 for n in names])  # (12,) int64
order, seg_start = multi_lora_triton.segments(adapter_index, len(lora_names))  # (12,), (n + 1,)
BM_PICTURE = 2  # a tile of 2 rows, so that the picture has several; the GPU kernel uses BM = 64
print("LoRA adapters at this layer:", dict(enumerate(lora_names)))
print("adapter_index by row:       ", adapter_index.tolist())
print("order (row at each position):", order.tolist())
print("segment starts:             ", seg_start.tolist())

fig, axes = plt.subplots(2, 1, figsize=(10, 3.4))
colors = {-1: "0.85", 0: "tab:blue", 1: "tab:orange"}
labels = {-1: "no LoRA term (−1)", **{i: n for i, n in enumerate(lora_names)}}
for ax, rows_shown, title in [(axes[0], list(range(len(names))), "the batch as it arrives (row order)"),
                              (axes[1], order.tolist(), "sorted by adapter: positions, segments and tiles")]:
    for pos, row in enumerate(rows_shown):
        i = adapter_index[row].item()
        ax.add_patch(plt.Rectangle((pos, 0), 0.95, 1, color=colors[i], label=labels[i]))
        ax.text(pos + 0.475, 0.5, f"row {row}", ha="center", va="center", fontsize=8)
    ax.set_xlim(0, len(names))
    ax.set_ylim(0, 1.25)
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, loc="left")
axes[0].set_xticks([])
tile_label = f"tile of BM = {BM_PICTURE} rows (one kernel program)"
for i in range(len(lora_names)):  # the tiles of each segment
    start, end = seg_start[i].item(), seg_start[i + 1].item()
    for first in range(start, end, BM_PICTURE):
        axes[1].add_patch(plt.Rectangle((first, 0), min(BM_PICTURE, end - first) - 0.05, 1.02, fill=False, lw=2,
                                        ec="black", label=tile_label))
        tile_label = None
axes[1].set_xticks(range(len(names) + 1))
axes[1].set_xlabel("sorted position p; segment i holds positions seg_start[i] … seg_start[i+1] − 1")
handles, texts = axes[1].get_legend_handles_labels()
unique = dict(zip(texts, handles, strict=True))
fig.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8, ncol=4)
fig.tight_layout(rect=(0, 0, 1, 0.9))
plt.show()

# %% [markdown]
# The kernel's grid is sized without reading the segments back to the host: adapter i needs ⌈M_i / BM⌉ tiles,
# and Σᵢ⌈M_i / BM⌉ ≤ ⌈M / BM⌉ + n − 1, so ⌈M / BM⌉ + n programs always suffice (the extra ones return at once).
# Whatever the grouping, the result must be the loop's: `kernels.multi_lora_linear` on the trained LoRA weights
# of one layer, against `kernels.lora_linear` row by row with each row's own adapter (and the base alone for −1).

# %%
layer = pm.base_model.transformer.h[0].attn.c_attn  # a LoraLinear holding both LoRA adapters
W, bias = layer.base_layer.weight, layer.base_layer.bias  # (3C, C), (3C,)
As = [layer.lora_A[n].weight for n in lora_names]  # each (r, C)
Bs = [layer.lora_B[n].weight for n in lora_names]  # each (3C, r)
scalings = [layer.scaling[n] for n in lora_names]
x = torch.randn(len(names), layer.in_features)  # (12, C) one token per row
with torch.no_grad():
    batched = kernels.multi_lora_linear(x, W, bias, As, Bs, scalings, adapter_index)  # (12, 3C)
    one_by_one = torch.stack([F.linear(x[m], W, bias) if i < 0 else
                              kernels.lora_linear(x[m:m + 1], W, bias, As[i], Bs[i], scalings[i])[0]
                              for m, i in enumerate(adapter_index.tolist())])
tiles = sum(-(-(seg_start[i + 1] - seg_start[i]).item() // BM_PICTURE) for i in range(len(lora_names)))
bound = -(-len(names) // BM_PICTURE) + len(lora_names) - 1
course.claim((batched - one_by_one).abs().max().item() <= fp32_tolerance(one_by_one) and tiles <= bound,
             f"multi_lora_linear over {len(lora_names)} adapters and base rows equals lora_linear row by row "
             f"(max |Δ| {(batched - one_by_one).abs().max().item():.1e}); the batch needs {tiles} tiles of "
             f"{BM_PICTURE}, within the bound ⌈M/BM⌉ + n − 1 = {bound}")

# %% [markdown]
# For inference there is a second way, which backend "auto" takes on a GPU when every sequence of the batch uses
# one adapter (as `adapter_names=` gives it): copy each **sequence's** adapter out of a stack of all of them,
# padded to one rank R with zero rows (`kernels/multi_lora_routes.py`), and run the whole batch's low-rank terms
# as two batched matrix products, S = bmm(x, A_bᵀ) (B, L, R) and y += bmm(S, B_b) (B, L, out). Three launches a
# layer, as many as one adapter's, however many adapters; the price is one copy of the adapter per sequence
# (B·R·(in + out) values a layer), gathered once per call and reused by every new token of a generate. The zero
# rows add nothing, so it must equal the loop (here 12 sequences of 3 tokens, the index one per sequence):

# %%
x_seq = torch.randn(len(names), 3, layer.in_features)  # (12, 3, C)
packed = kernels.pack_adapters(As, Bs, scalings)
gathered = kernels.gather_adapters(packed, adapter_index)  # A_b (12, R, C), B_b (12, R, 3C)
with torch.no_grad():
    by_gather = multi_lora_routes.multi_lora_linear_gathered(x_seq, W, bias, packed, adapter_index, gathered)
    by_loop = kernels.multi_lora_linear(x_seq, W, bias, As, Bs, scalings, adapter_index)  # (12, 3, 3C)
print("ranks", packed.ranks, "→ gathered A_b", tuple(gathered.a.shape), "and B_b", tuple(gathered.b.shape))
gap = (by_gather - by_loop).abs().max().item()
course.claim(gap <= fp32_tolerance(by_loop),
             f"the gathered route (two batched GEMMs over {len(names)} sequences) equals the loop over adapters: "
             f"max |Δ| {gap:.1e}")

# %% [markdown]
# ### What it measured on a GPU
#
# On the CPU the reference runs (its loop over adapters is the oracle, not the fast path). The mixed batch was
# timed on a GPU by `benchmarks/multi_adapter.py` (GPT-2-small shape, bf16, 64 rows, row b on adapter b mod N),
# on backend "auto" (the gathered route for this inference) and on "triton" (the segmented kernels), against
# HF peft's mixed batch and against the same batch on one adapter, unmerged. The cell reads the committed
# numbers from `benchmarks/RESULTS.md`, with the device, date and the caveats written there:

# %%
RESULTS_MD = (REPO / "benchmarks" / "RESULTS.md").read_text()


def results_sections(heading):
    """Every '## ' section of RESULTS.md whose heading starts with `heading`, heading line included."""
    return [s for s in RESULTS_MD.split("\n## ") if s.lstrip("# ").startswith(heading)]


def results_table(section, first_column):
    """The markdown table of a section whose first column is `first_column`, as a list of dicts {column header:
    cell text}."""
    for block in re.findall(r"(?:^\|.*\n)+", section, flags=re.MULTILINE):
        head, _rule, *body = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()]
        if head[0] == first_column:
            return [dict(zip(head, cells, strict=True)) for cells in body]
    raise ValueError(f"no table with a first column {first_column!r} in RESULTS.md's section")


gpu = results_sections("Many adapters in one batch")
if gpu:
    section = gpu[0]
    print("benchmarks/RESULTS.md —", section.splitlines()[0].lstrip("# "))
    table = results_table(section, "row")  # one row per measurement, a column of ms (and its spread) per N
    by_name = {row["row"].split(" (")[0].replace(",", ""): row for row in table}
    print(f"\n{'N adapters':>10} {'prefill ms: mixed':>18} {'one adapter':>12} {'HF peft mixed':>14} "
          f"{'decode ms/token: mixed':>23} {'one adapter':>12} {'HF peft mixed':>14}")
    per_n = {}
    for column in (c for c in table[0] if c.startswith("N=") and c.endswith(" ms")):
        n = column.removesuffix(" ms")
        v = per_n[n] = {name: float(row[column]) for name, row in by_name.items()}
        print(f"{n:>10} {v['mp mixed prefill']:18.1f} {v['mp one adapter prefill']:12.1f} "
              f"{v['hf mixed prefill']:14.1f} {v['mp mixed decode ms/token']:23.1f} "
              f"{v['mp one adapter decode']:12.2f} {v['hf mixed decode']:14.1f}")
    for n, v in per_n.items():
        print(f"{n}: the mixed batch runs {v['hf mixed prefill'] / v['mp mixed prefill']:.1f}× faster than "
              f"HF peft's in prefill and {v['hf mixed decode'] / v['mp mixed decode ms/token']:.1f}× in decode, and "
              f"costs {v['mp mixed prefill'] / v['mp one adapter prefill']:.1f}× (prefill) and "
              f"{v['mp mixed decode ms/token'] / v['mp one adapter decode']:.1f}× (decode) the same batch on one "
              f"adapter; with both prefills captured in a CUDA graph (the host's time gone) "
              f"{v['mp mixed prefill CUDA graph'] / v['mp one adapter prefill CUDA graph']:.2f}×.")
    print("\nThe targets the run was measured against (medians of its rounds; in parentheses the least and "
          "greatest of the rounds' own ratios):")
    for target in results_table(section, "target"):
        measured, verdict = list(target.values())[1:3]
        print(f"  {target['target']}: {measured} — {verdict}")
    print("\nWhat RESULTS.md lists about the runs on the way, and what profiling found before them:")
    print("\n".join(line for line in section.splitlines() if line.startswith(("- ", "  "))))
else:
    print("benchmarks/RESULTS.md has no section on many adapters in one batch: run benchmarks/multi_adapter.py "
          "on a GPU to measure it.")

# %% [markdown]
# ## 4. Composition: Parallel and Average
#
# `set_adapter` takes, besides a name or a list (a `Stack`: one adapter after the other, chapter 4), the
# composition blocks of the `adapters` library:
#
# - `Parallel("a", "b")`: the batch is copied once per adapter and run as one mixed batch; B rows in, 2·B rows
#   out, adapter a's first. One call answers a request with every adapter.
# - `Average("a", "b", weights=[w, 1 − w])`: at each adapted sublayer with output o, o + Σᵢ wᵢ·δᵢ(o), where
#   δᵢ(o) is adapter i's update (its output minus o).
#
# `Parallel` on two facts questions, both adapters' answers from one `generate` call:

# %%
pm.set_adapter(Parallel("sentiment", "facts"))
questions = [tasks["facts"].test[i].prompt for i in (7, 8)]
q_idx, q_mask = left_padded(questions)  # (2, T)
with torch.no_grad():
    par_logits, _ = pm(q_idx, attention_mask=q_mask)  # (4, T, vocab): rows 0-1 "sentiment", 2-3 "facts"
    par_out = pm.generate(q_idx, NEW, attention_mask=q_mask, eos_token_id=tok.eos_token_id)  # (4, T + NEW)
print(f"{len(questions)} rows in, logits for {par_logits.shape[0]} rows out")
for r in range(par_out.shape[0]):
    ids = par_out[r, q_idx.shape[1]:].tolist()
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    print(f"  {['sentiment', 'facts'][r // 2]:9s} | {questions[r % 2]!r} → {tok.decode(ids)!r}")
par_diff = 0.0
for i, name in enumerate(("sentiment", "facts")):
    pm.set_adapter(name)
    with torch.no_grad():
        alone = pm(q_idx, attention_mask=q_mask)[0]
    par_diff = max(par_diff, (par_logits[2 * i:2 * i + 2] - alone).abs()[q_mask.bool()].max().item())
course.claim(par_diff <= fp32_tolerance(par_logits),
             f"Parallel returns one output per adapter: rows 0–1 are the 'sentiment' adapter's and rows 2–3 the "
             f"'facts' adapter's logits alone, to {par_diff:.1e}")

# %% [markdown]
# `Average`, written out at one sublayer from the adapters' own modules, then its end points: weights [1, 0]
# must give the `sentiment` adapter alone and [0, 1] the `facts` adapter.

# %%
mlp = pm.base_model.transformer.h[-1].mlp  # the last block's MLP sublayer, where both Pfeiffer adapters sit
h = torch.randn(2, 5, base.config.n_embd)  # (B, T, C) an input to the sublayer
pm.set_adapter(Average("sentiment", "facts", weights=[0.3, 0.7]))
with torch.no_grad():
    o = mlp.base_layer(h)  # (B, T, C) the sublayer's own output
    by_hand = o + 0.3 * mlp.adapters["sentiment"].delta(o) + 0.7 * mlp.adapters["facts"].delta(o)
    formula_diff = (mlp(h) - by_hand).abs().max().item()


def logits_of(setup, rows=idx, rows_mask=mask):
    pm.set_adapter(setup)
    with torch.no_grad():
        return pm(rows, attention_mask=rows_mask)[0]


end_diff = max((logits_of(Average("sentiment", "facts", weights=[1.0, 0.0])) - logits_of("sentiment")).abs().max(),
               (logits_of(Average("sentiment", "facts", weights=[0.0, 1.0])) - logits_of("facts")).abs().max()).item()
course.claim(formula_diff <= fp32_tolerance(by_hand) and end_diff <= fp32_tolerance(mixed_logits),
             f"Average computes o + Σᵢ wᵢ·δᵢ(o) (max |Δ| against the formula {formula_diff:.1e}), and its end "
             f"points are the two adapters alone (max |Δ logit| {end_diff:.1e})")

# %% [markdown]
# Between the end points, the weight trades one task for the other. The cell sweeps the `sentiment` weight w
# (the `facts` adapter gets 1 − w) and scores both tasks at each w, on the whole test splits:

# %%
WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]
sweep = {t: [] for t in tasks}
for w in WEIGHTS:
    pm.set_adapter(Average("sentiment", "facts", weights=[w, 1 - w]))
    for t in tasks:
        sweep[t].append(score(pm, t))
for t in tasks:
    print(f"{t:9s}: " + ", ".join(f"w={w:.2f}: {s:.3f}" for w, s in zip(WEIGHTS, sweep[t], strict=True)))

fig, ax = plt.subplots(figsize=(7, 3.6))
for t, color in (("sentiment", "tab:blue"), ("facts", "tab:orange")):
    ax.plot(WEIGHTS, sweep[t], "o-", color=color, label=f"{t} ({tasks[t].metric})")
    ax.axhline(base_scores[t], color=color, ls=":", lw=1, label=f"{t}: base, no adapter")
ax.set_xlabel("w, the weight of the 'sentiment' adapter (the 'facts' adapter gets 1 − w)")
ax.set_ylabel("test score")
ax.set_title("Average('sentiment', 'facts', weights=[w, 1 − w]): one run", fontsize=10)
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
fig.tight_layout()
plt.show()
print(f"At w = 0.5 (the uniform average): sentiment {sweep['sentiment'][2]:.3f} (its adapter alone "
      f"{sweep['sentiment'][-1]:.3f}), facts {sweep['facts'][2]:.3f} (its adapter alone {sweep['facts'][0]:.3f}).")

# %% [markdown]
# Averaging scales each adapter's update by its weight and adds the other adapter's, at every token and for
# every input alike: one weight is chosen for all inputs, whichever task they belong to. AdapterFusion learns
# the weights instead, per sublayer and per token, from the sublayer's output.
#
# ## 5. AdapterFusion
#
# AdapterFusion's second stage keeps the base and the task adapters frozen and trains, at every adapted
# sublayer, a small attention over the adapters' updates (`minipeft/tuners/fusion.py` has the diagram): the
# query is the sublayer's output o, the keys and values are the updates δᵢ(o), and p = softmax(q·kᵢ) decides, per
# token, how much of each adapter to use. Its parameters do not depend on how many adapters it fuses:
# W_Q and W_K with biases and W_V without, **3·d² + 2·d** per sublayer.

# %%
fuse = Fuse("sentiment", "facts")
pm.add_adapter_fusion(fuse)  # added, frozen, not active
pm.train_adapter_fusion(fuse)  # active, and the only trainable part
trainable, _ = pm.get_nb_trainable_parameters()
d, n_sites = base.config.n_embd, base.config.n_layer  # Pfeiffer: one adapter per block, after the MLP
course.claim(trainable == n_sites * (3 * d * d + 2 * d),
             f"only the fusion trains: {trainable:,} parameters = {n_sites} sublayers × (3·{d}² + 2·{d}), "
             f"{trainable / sum(p.numel() for p in pm._adapter_parameters('sentiment').values()):.0f}× the "
             f"'sentiment' adapter it combines")

with torch.no_grad():
    pm(idx, attention_mask=mask)
start_p = {layer: p[mask.bool()].mean(0) for layer, p in pm.fusion_attention().items()}  # (2,) per sublayer
print("at the start, the mean attention of the 12-row batch per sublayer (sentiment, facts): "
      + "; ".join(f"{k.split('.')[2]}: {v[0]:.3f}, {v[1]:.3f}" for k, v in start_p.items()))

# %% [markdown]
# W_V starts as the identity and W_Q, W_K as small random matrices (N(0, 0.02²), the library's init), so p starts
# between the two adapters, at ½ only where the scores q·kᵢ are small — how far from ½ depends on how large the
# sublayer's output and the updates are, which the printout shows for this base. It trains on batches that hold
# 8 rows of each task, each task with its own loss (the verbalizer cross-entropy for sentiment, the answer's
# tokens for facts), plus the library's regulariser 0.01·Σ‖W_V − I‖², which keeps W_V near the identity.

# %%
FUSION_STEPS, HALF = 40, 8
losses = {t: task_loss(tasks[t], tok) for t in tasks}


def two_task_batch(g):
    """8 rows of each task, right-padded to one length: (idx, targets, mask), each (16, T)."""
    parts = [task_batch(tasks[t], tok, HALF, T_MAX, g) for t in tasks]
    T = max(p[0].shape[1] for p in parts)
    parts = [pad_batch(*p, T) for p in parts]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def two_task_loss(net, idx_, targets, mask_):
    """The mean of the two tasks' own losses on their halves, plus the fusion regulariser."""
    total = 0.0
    for i, t in enumerate(tasks):
        rows = slice(i * HALF, (i + 1) * HALF)
        if losses[t] is None:  # facts: the model's next-token loss on the answer's tokens
            total = total + net(idx_[rows], targets=targets[rows], attention_mask=mask_[rows])[1]
        else:
            total = total + losses[t](net, idx_[rows], targets[rows], mask_[rows])
    return total / len(tasks) + pm.fusion_regularization_loss()


frozen_before = {n: p.detach().clone() for n, p in pm.named_parameters() if "fusion" not in n}
result = train(pm, two_task_batch, TrainConfig(steps=FUSION_STEPS, lr=1e-3, batch_size=2 * HALF, warmup_steps=4),
               loss_fn=two_task_loss, progress=False)
pm.eval()
unchanged = all(torch.equal(p, frozen_before[n]) for n, p in pm.named_parameters() if "fusion" not in n)
course.claim(unchanged, f"training the fusion for {FUSION_STEPS} steps left all {len(frozen_before)} other tensors "
                        f"(the base and all five adapters) bit for bit unchanged; its loss went "
                        f"{result.losses[0]:.2f} → {result.losses[-1]:.2f}")

# %% [markdown]
# Where does the trained fusion look? The cell runs the test prompts of each task through it and averages the
# weight p of the `sentiment` adapter per sublayer, over all real tokens (what the paper plots) and at the last
# prompt token, whose logits give the answer (the `facts` adapter gets 1 − p).

# %%
def attention_on(task_name, n=48):
    """{sublayer: (p over all real tokens, p at the last prompt token)} for the first n test prompts."""
    p_idx, p_mask = left_padded([ex.prompt for ex in tasks[task_name].test[:n]])
    with torch.no_grad():
        pm(p_idx, attention_mask=p_mask)
    return {layer: (p[..., 0][p_mask.bool()].mean().item(), p[:, -1, 0].mean().item())  # left padding: -1 is last
            for layer, p in pm.fusion_attention(fuse).items()}


attention = {t: attention_on(t) for t in tasks}
layers = list(attention["sentiment"])
columns = [(t, j) for t in tasks for j in (0, 1)]
grid = torch.tensor([[attention[t][layer][j] for t, j in columns] for layer in layers])  # (sublayers, 4)

fig, ax = plt.subplots(figsize=(7.5, 3.2))
image = ax.imshow(grid, cmap="coolwarm", vmin=0, vmax=1, aspect="auto")
for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
ax.set_xticks(range(len(columns)), [f"{t} prompts\n{'all tokens' if j == 0 else 'answer token'}"
                                    for t, j in columns], fontsize=8)
ax.set_yticks(range(len(layers)), [f"block {layer.split('.')[2]} MLP" for layer in layers], fontsize=8)
fig.colorbar(image, ax=ax, label="p(sentiment adapter); facts gets 1 − p")
ax.set_title(f"AdapterFusion attention after {FUSION_STEPS} steps (one run)", fontsize=10)
fig.tight_layout()
plt.show()

fusion_scores = {t: score(pm, t) for t in tasks}
for t, own in (("sentiment", "sentiment"), ("facts", "facts")):
    print(f"{t:9s}: fusion {with_interval(fusion_scores[t], t)}, its own adapter alone "
          f"{with_interval(alone_scores[own], t)}, uniform Average {sweep[t][2]:.3f}")

# %% [markdown]
# These are one short run's numbers, so they show what the mechanism does here, not whether fusion is better:
# the intervals printed are those of the test sample only, and a second training seed can move a score by as much
# as some differences between the methods. Section 6 has a measurement that can answer that question.
#
# ### Saving and loading a composition
#
# `save_pretrained` writes every adapter, every fusion and the active composition; `PeftModel.from_pretrained`
# on a fresh copy of the base restores all three:

# %%
saved = Path(tempfile.mkdtemp()) / "many-adapters"
pm.save_pretrained(saved)
for path in sorted(p for p in saved.rglob("*") if p.is_file()):
    print(f"  {str(path.relative_to(saved)):52s} {path.stat().st_size:>9,d} bytes")

restored = PeftModel.from_pretrained(load_base("default"), saved).eval()
with torch.no_grad():
    restored_diff = (restored(idx, attention_mask=mask)[0] - pm(idx, attention_mask=mask)[0]).abs().max().item()
course.claim(restored.active_composition == pm.active_composition and list(restored.peft_config) ==
             list(pm.peft_config) and restored.adapter_fusions == pm.adapter_fusions and restored_diff == 0.0,
             f"a fresh base restored from the directory holds the same {len(pm.peft_config)} adapters, the fusion "
             f"{pm.adapter_fusions} and the active composition {pm.active_composition!r}, and computes the same "
             f"logits (max |Δ| = {restored_diff:.1e})")

# %% [markdown]
# ## 6. Fusion, each adapter, or one adapter for both tasks? Several seeds
#
# One run cannot compare methods whose scores move by several points from one training seed to the next.
# `benchmarks/multi_task.py` trains, on each of several seeds, a Pfeiffer adapter per task, an AdapterFusion of
# the two, and a **joint** Pfeiffer adapter trained on both tasks with the same budget, at the full recipe of
# `minipeft compare` (the printout below gives the steps), and scores all of them on the whole test splits. A
# verdict ("beats") is given only when the 95% interval of the paired differences over the seeds lies above 0.
# The cell reads the committed per-seed scores from `benchmarks/RESULTS.md` and computes the comparisons:

# %%
multi = results_sections("Many tasks on one base")
if not multi:
    raise ValueError("benchmarks/RESULTS.md has no 'Many tasks on one base' section: run benchmarks/multi_task.py")
section = multi[0]
print("benchmarks/RESULTS.md —", section.splitlines()[0].lstrip("# "))
print(textwrap.fill(section.splitlines()[2], 116), "\n")  # the run: date, machine, command, recipe
score_rows = results_table(section, "model")
task_columns = [c for c in score_rows[0] if c != "model"]  # 'sentiment: accuracy (chance 0.500, n=200)', …


def score_row(row_start):
    """The first model row whose label starts with `row_start`."""
    return next(r for r in score_rows if r["model"].replace("`", "").startswith(row_start))


def per_seed(row_start):
    """{task: [score per seed]} of that row, as the table prints them (3 decimals)."""
    row = score_row(row_start)
    return {c.split(":")[0]: [float(v) for v in re.search(r"\[(.*?)\]", row[c]).group(1).split(",")]
            for c in task_columns}


LABELS = {"base": "base", "sentiment adapter": "Pfeiffer sentiment", "facts adapter": "Pfeiffer facts",
          "joint adapter": "Pfeiffer joint", "AdapterFusion": "AdapterFusion"}
runs = {model: per_seed(label) for model, label in LABELS.items()}
n_test = {c.split(":")[0]: int(re.search(r"n=(\d+)", c).group(1)) for c in task_columns}
n_seeds = len(runs["AdapterFusion"]["sentiment"])
table_half, rounded_half = [], []
for model, label in LABELS.items():   # mean ± half-width as the table gives them, from the unrounded scores
    cells = {c.split(":")[0]: score_row(label)[c].split("[")[0].strip() for c in task_columns}
    print(f"{model:18s} " + "   ".join(f"{t}: {cell}" for t, cell in cells.items()))
    table_half += [float(cell.split("±")[1]) for cell in cells.values()]
    rounded_half += [interval(v)[1] for v in runs[model].values()]
rounding = max(abs(a - b) for a, b in zip(table_half, rounded_half, strict=True))
print(f"\nThe comparisons below are recomputed from the per-seed scores as the table rounds them (3 decimals); "
      f"recomputed that way, the half-widths above move by up to {rounding:.4f}"
      + (", so an interval printed below can differ from the table's in the last digit:" if rounding >= 5e-4 else
         ":"))
for t in n_test:
    own = f"{t} adapter"
    for other in (own, "joint adapter"):
        print("-", compare_verdict(runs["AdapterFusion"][t], runs[other][t], "fusion", f"the {other}", t)["text"])

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for ax, t in zip(axes, n_test, strict=True):
    for i, by_task in enumerate(runs.values()):
        mean, half = interval(by_task[t])
        ax.errorbar(i, mean, yerr=0 if half != half else half, fmt="s", color="black", capsize=4,
                    label="mean ± 95% interval over seeds" if i == 0 else None)
        ax.plot([i] * len(by_task[t]), by_task[t], "o", color="tab:blue", alpha=0.6,
                label="one seed" if i == 0 else None)
    ax.axhline(tasks[t].chance, color="0.5", ls=":", label=f"chance ({tasks[t].chance:.3f})")
    ax.set_xticks(range(len(runs)), list(runs), rotation=20, fontsize=8)
    ax.set_ylabel(f"{tasks[t].metric} (n = {n_test[t]})")
    ax.set_title(f"{t}: {n_seeds} seeds, benchmarks/multi_task.py", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
fig.tight_layout()
plt.show()

# %% [markdown]
# Read the verdicts above, not the bars alone: two methods whose intervals overlap can still differ in a
# paired comparison, and a gap between means is no verdict when the paired interval holds 0. Fusion adds
# far more parameters than the adapters it combines (section 5), and it can only route to what its adapters
# already do: an adapter that hardly learned its task gives the fusion nothing to route to. The same section of
# RESULTS.md has the fusion attention per layer over the seeds: the routing measured, not seen once.

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")

# %% [markdown]
# ## Summary
#
# - One frozen base serves many adapters at once: `pm(idx, adapter_names=[...])` and `pm.generate(...,
#   adapter_names=[...])` give every row its own adapter (LoRA, bottleneck, soft prompt or `"__base__"`) in one
#   pass, and every row's logits and answers are those of its adapter alone.
# - The batched LoRA kernel sorts the rows by adapter on the device and cuts them into segments; one shrink and
#   one expand launch serve all adapters, each tile holding one adapter's rows, and the result equals the loop.
#   For inference with one adapter per sequence, "auto" gathers each sequence's adapter and runs two batched
#   GEMMs instead: as many launches as one adapter, which is what a decode step's host time asks for.
# - `Parallel` answers one batch with every adapter (B rows in, n·B out); `Average` adds the weighted updates
#   o + Σᵢ wᵢ·δᵢ(o), and its end points are the adapters alone.
# - AdapterFusion trains an attention over frozen adapters, 3·d² + 2·d parameters per sublayer, far more than the
#   adapters themselves; the base and the adapters stay bit for bit unchanged, and the whole composition saves
#   and loads in one directory.
# - Whether fusion beats each adapter, or one adapter trained on both tasks, is a question for several seeds and
#   paired intervals (section 6), not for one run.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks.
#
# ### Exercise 1 — Average by hand
#
# Write `average_of_adapters(o, deltas, weights)`: the output of an `Average` block at one sublayer, given the
# sublayer's output o (B, T, C), the adapters' updates δᵢ(o) stacked as (N, B, T, C), and the N weights as they
# are used (already normalised, or not). The check compares it with a real sublayer under `Average`, with
# weights that sum to 1 and with task-arithmetic weights [1, −1].

# %%
def average_of_adapters(o, deltas, weights):
    """o (B, T, C), deltas (N, B, T, C), weights N numbers → the Average block's output (B, T, C)."""
    return None  # your code here


# %%
passed = check_average_of_adapters(average_of_adapters)  # True when right

# %% [markdown]
# ### Exercise 2 — group the rows as the kernel does
#
# Write `group_rows(adapter_index, n_adapters)` returning `(order, seg_start)`: `order[p]` is the row at sorted
# position p (rows of one adapter keep their order; rows with −1 come first), and adapter i owns the positions
# `seg_start[i]` … `seg_start[i+1] − 1`, so `seg_start` has n_adapters + 1 entries. Use torch ops only, no Python
# loop over rows (hint: `torch.sort(..., stable=True)`, `torch.searchsorted`).

# %%
def group_rows(adapter_index, n_adapters):
    """adapter_index (M,) int64 in [-1, n) → (order (M,), seg_start (n + 1,))."""
    return None  # your code here


# %%
passed = check_group_rows(group_rows)  # True when right

# %% [markdown]
# ### Exercise 3 — the size of a fusion
#
# Write `fusion_parameters(d, n_sites, fusion_type)`: the trainable parameters of an AdapterFusion over adapters
# that sit at `n_sites` sublayers of width d, for `fusion_type` "dynamic" (query, key, value) or "static" (no
# value matrix). The check adds fusions to small models of two widths, Pfeiffer (one site per block) and
# Houlsby (two), and counts.

# %%
def fusion_parameters(d, n_sites, fusion_type="dynamic"):
    """Trainable parameters of AdapterFusion at n_sites sublayers of width d."""
    return None  # your code here


# %%
passed = check_fusion_parameters(fusion_parameters)  # True when right

# %% [markdown]
# ### Exercise 4 — a mixed batch, the slow way
#
# Write `mixed_batch_by_loop(pm, idx, adapter_names)`: the logits a mixed batch must give, computed one row at a
# time with only that row's adapter active (`pm.set_adapter(name)`), or with adapters disabled for
# `"__base__"` (`with pm.disable_adapter():`). Return a (B, T, vocab) tensor. The check compares it with
# `pm(idx, adapter_names=...)` on a small model holding LoRA, bottleneck and prompt-tuning adapters.

# %%
def mixed_batch_by_loop(pm, idx, adapter_names):
    """idx (B, T), one adapter name per row → logits (B, T, vocab), each row computed alone."""
    return None  # your code here


# %%
passed = check_mixed_batch_by_loop(mixed_batch_by_loop)  # True when right

# %% [markdown]
# ### Questions
#
# 1. In section 6, fusion combines two adapters trained separately, and the joint adapter sees both tasks from
#    the start. When would you still choose adapters plus fusion over one joint adapter? Think of a third task
#    arriving later, of who trains which adapter, and of what each approach must retrain.
# 2. Section 3's GPU printout gives the mixed prefill against one adapter twice: run eagerly, and captured in a
#    CUDA graph (replayed without the host). What does the difference between the two ratios measure? Of the
#    work a mixed batch adds in every layer (finding its adapters, checking their packing, gathering, choosing a
#    route), which depends on the batch's adapters, and which could be done once per batch instead of per layer?

# %%
course.claims_report()
