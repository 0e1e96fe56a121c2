# %% [markdown]
# # Chapter 6 — Prompt tuning and P-tuning: soft prompts at the input
#
# Prompt tuning (Lester, Al-Rfou & Constant 2021, https://arxiv.org/abs/2104.08691) freezes the whole model
# and learns n "virtual token" embeddings P that are put in front of the embedded input:
#
# $$\text{logits} = \mathrm{GPT}\big([\,P\,;\ \mathrm{wte}[x_1] \dots \mathrm{wte}[x_T]\,]\big)_{n:},
# \qquad P \in \mathbb{R}^{n\times C}\ \text{the only trainable tensor.}$$
#
# Seeds 001 and 004 make measurable claims about it: text initialisation "often performs better" than random
# (004), 8–32 virtual tokens are typical (004), learned prompts can be read through their nearest vocabulary
# tokens (001), prompts are swapped per task on one base (001, 004), and soft prompts are "superior to prompt
# engineering" (001). Each is measured below on the `facts` task. P-tuning (Liu et al. 2021,
# https://arxiv.org/abs/2103.10385) produces P with a small encoder instead.

# %%
# %matplotlib inline
import hashlib
import time

import matplotlib.pyplot as plt
import torch

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate, predict
from minipeft.pretrain import load_base
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train
from minipeft.tuners import PromptTuningConfig, PTuningConfig, get_peft_model

NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")
torch.manual_seed(0)
tok = ByteTokenizer()
base = load_base("default")
cfg = base.config
C = cfg.n_embd
task = load_task("facts")
print(f"task {task.name!r}: metric {task.metric}, chance {task.chance:.3f}, {len(task.validation)} validation "
      f"questions (exact match moves in steps of 1/{len(task.validation)} ≈ {1 / len(task.validation):.2f})")

# %% [markdown]
# ### The idea in five lines, then minipeft's `PromptTuningConfig`

# %%
def soft_prompt_logits(gpt, P, idx):
    """Prompt tuning's forward: [P ; wte(idx)] through the frozen GPT, logits of the real tokens only."""
    x = torch.cat([P[None].expand(idx.shape[0], -1, -1), gpt.transformer.wte(idx)], dim=1)  # (B, n+T, C)
    return gpt(inputs_embeds=x)[0][:, P.shape[0]:]  # (B, T, vocab)


pm = get_peft_model(load_base("default"), PromptTuningConfig(num_virtual_tokens=16))
pm.print_trainable_parameters()
P = pm.prompt_encoders["default"].prompt_embeddings  # (n, C)
probe = torch.tensor([tok.encode(task.validation[0].prompt, add_bos=True)])
with torch.no_grad():
    print(f"P {tuple(P.shape)}; max |five-line − PeftModel| = "
          f"{(soft_prompt_logits(pm.base_model, P, probe) - pm(probe)[0]).abs().max():.1e}")

# %% [markdown]
# ### TEXT against RANDOM initialisation (the prompt- and prefix-tuning notes: "text-based initialization often
# performs better")
#
# TEXT copies the embeddings of an instruction's tokens into P; RANDOM draws N(0, σ²) with σ the spread of
# the token embeddings (peft draws N(0, 1), far larger than a small model's embeddings; see `prompt.py`).
# The tokenizer here is byte-level, so 16 virtual tokens are initialised from the first 16 *bytes* of the
# task's instruction, "Answer with one ". Both runs: n = 16, 60 steps of batch 8, learning rate 0.1
# (soft prompts want high rates, the prompt- and prefix-tuning notes), the same batches for both. One seed on 24
# questions is too
# noisy to settle a claim, so each init is trained with three seeds (the seed sets the batches and the
# RANDOM draw; TEXT's start is the same every time). Every prompt run in this chapter uses batch 8.

# %%
STEPS, LR, BATCH = 60, 0.1, 8


def prompt_model(n, init, seed=0):
    config = PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init=init,
                                prompt_tuning_init_text=task.discrete_prompt if init == "TEXT" else None)
    torch.manual_seed(seed)
    return get_peft_model(load_base("default"), config, tokenizer=tok)


def fit(model, steps=STEPS, lr=LR, the_task=task, batch=BATCH, seed=0):
    batches = lambda g: task_batch(the_task, tok, batch, cfg.block_size, g)  # noqa: E731
    res = train(model, batches, TrainConfig(steps=steps, lr=lr, batch_size=batch, warmup_steps=10, seed=seed),
                loss_fn=task_loss(the_task, tok), progress=False)
    return res, evaluate(model, the_task, tok, "validation")


inits, by_seed = {}, {"TEXT": [], "RANDOM": []}
for seed in (0, 1, 2):
    for init in ("TEXT", "RANDOM"):
        model = prompt_model(16, init, seed)
        nearest_before = model.nearest_tokens(k=1, tokenizer=tok)
        res, em = fit(model, seed=seed)
        by_seed[init].append((em, sum(res.losses[-10:]) / 10, sum(res.losses[15:25]) / 10))
        if seed == 0:  # kept for the sections below
            inits[init] = dict(model=model, res=res, em=em, nearest_before=nearest_before)
        print(f"seed {seed} {init:6s}: validation exact match {em:.3f}, final loss (mean of last 10 steps) "
              f"{by_seed[init][-1][1]:.3f}, loss around step 20 {by_seed[init][-1][2]:.3f} ({res.seconds:.0f} s)")
for init, rows_ in by_seed.items():
    mean = [sum(r[i] for r in rows_) / len(rows_) for i in range(3)]
    print(f"mean of 3 seeds, {init:6s}: exact match {mean[0]:.3f}, final loss {mean[1]:.3f}, "
          f"loss around step 20 {mean[2]:.3f}")

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for init, r in inits.items():
    ax.plot(r["res"].losses, label=f"{init} init, seed 0 (val EM {r['em']:.2f})")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats per answer token)")
ax.set_title("Prompt tuning on facts, n = 16: TEXT vs RANDOM init")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the numbers as they are (one question is 0.04): in every seed TEXT's loss is lower around step 20,
# so a text init gives a faster start; by step 60 the two are level, and the mean exact match differs by
# less than one question, with the seeds disagreeing on the sign. So the prompt- and prefix-tuning notes' "text-based
# initialization
# often performs better" holds here only for the early phase, not for the result. A plausible reason is the
# byte-level tokenizer: its "words" are single letters, so a text init is a string of letter embeddings
# rather than an instruction (Lester et al. initialised from whole-word vocabulary; their Figure 3(b) shows
# the init mattering less as models grow).
#
# ### A sweep of 8 to 32 virtual tokens
#
# RANDOM init, the same 60 steps of batch 8 at rate 0.1; n = 16 is the RANDOM run above.

# %%
sweep = {16: (inits["RANDOM"]["em"], sum(inits["RANDOM"]["res"].losses[-10:]) / 10)}
for n in (8, 32):
    res, em = fit(prompt_model(n, "RANDOM"))
    sweep[n] = (em, sum(res.losses[-10:]) / 10)
    print(f"n = {n:2d}: trained in {res.seconds:.0f} s")
ns = sorted(sweep)
for n in ns:
    print(f"n = {n:2d}: {n * C:>5,d} trainable, validation exact match {sweep[n][0]:.3f}, final loss {sweep[n][1]:.3f}")

fig, ax1 = plt.subplots(figsize=(6.5, 3.5))
ax1.plot(ns, [sweep[n][0] for n in ns], marker="o", color="C0", label="validation exact match")
ax1.axhline(task.chance, color="C0", ls=":", label=f"chance ({task.chance:.3f})")
ax1.set_xlabel("virtual tokens n")
ax1.set_ylabel("validation exact match (fraction)")
ax2 = ax1.twinx()
ax2.plot(ns, [sweep[n][1] for n in ns], marker="s", color="C1", label="final training loss")
ax2.set_ylabel("training loss, last 10 steps (nats)")
ax1.set_xticks(ns)
ax1.set_title("Prompt length sweep on facts (60 steps of batch 8, RANDOM init)")
fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.85), fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# More is not better at this budget: the longest prompt has the most numbers to fit in the same 60 steps,
# and ends with the highest loss. The prompt- and prefix-tuning notes' advice, "start with a small number of virtual
# tokens (8-16) and
# increase only if the task complexity demands it", fits what is measured. More virtual tokens also cost
# context (n + T ≤ block_size = 128 here) and compute: every forward pass processes n extra positions.
#
# ### Nearest-token interpretation (the prompt-tuning notes: "limited interpretability")
#
# For each virtual token, the vocabulary token whose embedding has the highest cosine similarity, before and
# after training. The TEXT prompt starts *exactly* on its init bytes (cosine 1); training moves it away.

# %%
for init in ("TEXT", "RANDOM"):
    after = inits[init]["model"].nearest_tokens(k=1, tokenizer=tok)
    before = inits[init]["nearest_before"]
    row = lambda nb: " ".join(f"{v[0].token!r}:{v[0].cosine:.2f}" for v in nb[:8])  # noqa: E731
    print(f"{init} init, first 8 virtual tokens (nearest token : cosine)")
    print("   before:", row(before))
    print("   after: ", row(after))
    kept = sum(b[0].token_id == a[0].token_id for b, a in zip(before, after, strict=True))
    print(f"   nearest token unchanged for {kept}/16 virtual tokens; mean cosine to it after training "
          f"{sum(a[0].cosine for a in after) / 16:.2f}")

# %% [markdown]
# After training, the cosine to the nearest real token says how "word-like" a virtual token still is. Where
# it is far below 1 the prompt has left the vocabulary: it is not a sentence in any language, which is the
# seed's point about interpretability.
#
# ### Switching prompts between two tasks on one base
#
# One frozen base, two soft prompts: the `facts` prompt trained above and a `sentiment` prompt (verbalizer
# loss, 20 steps of batch 16). `add_adapter` + `set_adapter` swap them; the base's weights are hashed before and after.

# %%
def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


sentiment = load_task("sentiment")
multi = inits["RANDOM"]["model"]  # adapter "default" = the facts prompt
hash_before = weights_hash(multi.base_model)
multi.add_adapter("sentiment", PromptTuningConfig(num_virtual_tokens=16))
multi.set_adapter("sentiment")
res_s, acc_s = fit(multi, steps=20, the_task=sentiment, batch=16)
scores = {}
for active in ("default", "sentiment"):
    multi.set_adapter(active)
    scores[active] = (evaluate(multi, task, tok, "validation"), evaluate(multi, sentiment, tok, "validation"))
with multi.disable_adapter():
    scores["none (base)"] = (evaluate(multi, task, tok, "validation"), evaluate(multi, sentiment, tok, "validation"))
print(f"{'active prompt':14s} {'facts EM':>9s} {'sentiment acc':>14s}")
for active, (em, acc) in scores.items():
    print(f"{active:14s} {em:9.3f} {acc:14.3f}")
print(f"base weights sha256 before {hash_before}, after {weights_hash(multi.base_model)}: "
      f"{'unchanged' if hash_before == weights_hash(multi.base_model) else 'CHANGED'}")
print(f"each prompt is {16 * C:,d} numbers = {16 * C * 4 / 1024:.1f} KiB in fp32")

# %% [markdown]
# The switch is a dictionary lookup, the base is bit-for-bit the same. What the table also shows, honestly:
# the sentiment prompt stays near chance (0.5) on this base. The prompt-tuning notes say it: prompt tuning "doesn't
# perform
# as well as full fine-tuning for smaller LLMs"; chapter 9 shows LoRA reaching ~0.98 on the same task.
#
# ### P-tuning: an encoder produces the prompt
#
# P-tuning trains n seeds and an encoder (an MLP, or a bidirectional LSTM with an MLP head) whose output is
# the prompt; the encoder couples the virtual tokens and eases optimisation (Liu et al. §3.2). Closed forms
# against the real modules (C = 160, H = 128):

# %%
n, H = 16, 128
mlp_pt = get_peft_model(load_base("default"), PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=H))
lstm_pt = get_peft_model(load_base("default"), PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=H,
                                                              encoder_reparameterization_type="LSTM"))
closed_mlp = n * C + (C * H + H) + (H * H + H) + (H * C + C)
layers = 2
closed_lstm = (n * C + 2 * (4 * H * (C + H) + 8 * H) + (layers - 1) * 2 * (4 * H * (2 * H + H) + 8 * H)
               + (2 * H * 2 * H + 2 * H) + (2 * H * C + C))
print(f"prompt tuning:  {n * C:>7,d} (n·C)")
print(f"P-tuning MLP:   {mlp_pt.get_nb_trainable_parameters()[0]:>7,d} (closed form {closed_mlp:,d})")
print(f"P-tuning LSTM:  {lstm_pt.get_nb_trainable_parameters()[0]:>7,d} (closed form {closed_lstm:,d})")
print(mlp_pt.prompt_encoders["default"].prompt_encoder)
encoder = mlp_pt.prompt_encoders["default"]
folded = encoder.fold()  # after training only the (n, C) output is needed
with torch.no_grad():
    out_encoder = mlp_pt(probe)[0]
    mlp_pt.prompt_encoders["default"] = folded
    out_folded = mlp_pt(probe)[0]
print(f"folded to a plain prompt of {sum(p.numel() for p in folded.parameters()):,d} numbers; "
      f"max |logits folded − encoder| = {(out_folded - out_encoder).abs().max():.1e}")

# %% [markdown]
# ### Soft prompt against prompt engineering (the prompt-tuning notes: "superior to prompt engineering")
#
# The baseline is a hand-written instruction in front of every question (`task.discrete_prompt`), on the
# frozen base: no training at all. Against it, the soft prompts trained above (16 vectors, 60 steps). Two
# scores: the task's exact match (the answer and nothing else), and a lenient one that only asks whether
# the first word of the generation is the right fact (punctuation ignored), to separate *knowing the fact*
# from *answering in the format*.

# %%
def scores_on_facts(model, prefix=""):
    preds = predict(model, task, tok, task.validation, prefix=prefix)
    exact = sum(p == ex.answer for p, ex in zip(preds, task.validation, strict=True)) / len(preds)
    first_word = sum(p.split(" ")[0].strip(".,") == ex.answer
                     for p, ex in zip(preds, task.validation, strict=True)) / len(preds)
    return exact, first_word, preds[0]


multi.set_adapter("default")
rows = {"base, zero-shot": scores_on_facts(base),
        f"base + hand-written prompt {task.discrete_prompt!r}": scores_on_facts(base, task.discrete_prompt),
        "soft prompt, TEXT init (16 vectors)": scores_on_facts(inits["TEXT"]["model"]),
        "soft prompt, RANDOM init (16 vectors)": scores_on_facts(multi)}
print(f"{'':64s} {'exact':>6s} {'lenient':>8s}  first answer ({task.validation[0].answer!r} expected)")
for name, (exact, lenient, first) in rows.items():
    print(f"{name:64s} {exact:6.3f} {lenient:8.3f}  {first!r}")

# %% [markdown]
# So the seed's claim holds for the task's own metric and fails for the knowledge behind it. The base was
# pretrained on stories: after "Kakara lives in" it writes a city and goes on with the story, so its exact
# match is 0 with or without the instruction, although its first word is often the right fact (the lenient
# column). The soft prompts teach the format, the bare answer and the end-of-text token, which is what exact
# match rewards; at 60 steps they do not add recall: their lenient score is not above the base's.
# "Superior to prompt engineering" is measured here only in that narrow sense, and with a model that follows
# instructions a hand-written prompt is a far stronger baseline (Lester et al. compare against GPT-3 prompt
# design in their Figure 1).

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
