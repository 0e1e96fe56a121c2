# %% [markdown]
# # Chapter 10 — Your model, your data
#
# The chapters so far trained adapters on minipeft's own small base and its built-in tasks. This one is the
# hand-over: a GPT-2 checkpoint of your own, a JSONL file of your own, and the same commands you would run on
# real weights. Top to bottom it
#
# 1. makes a GPT-2 checkpoint the way transformers saves one (config.json + model.safetensors) and a
#    tokenizer.json, or points at real GPT-2 weights instead;
# 2. writes a small JSONL file and reads it back, with the three row formats minipeft understands;
# 3. fine-tunes LoRA from the command line and checks that the loss fell;
# 4. fine-tunes prompt tuning from Python, the same way;
# 5. generates with the adapters;
# 6. hands the adapters to Hugging Face peft and checks that peft computes minipeft's logits;
# 7. merges LoRA into a plain GPT-2 checkpoint and checks that nothing changed.
#
# Nothing is downloaded while the chapter runs. To use OpenAI's GPT-2 instead of the small random model
# below, save it once, on a machine with network access, next to this notebook:
#
# ```python
# from transformers import GPT2LMHeadModel, GPT2TokenizerFast
# GPT2LMHeadModel.from_pretrained("gpt2").save_pretrained("gpt2-local")     # config.json + model.safetensors
# GPT2TokenizerFast.from_pretrained("gpt2").save_pretrained("gpt2-local")   # tokenizer.json and friends
# ```
#
# then set `BASE_DIR = "gpt2-local"` in the next cell. Every later cell reads from that directory only
# (`HF_HUB_OFFLINE=1` makes transformers and peft refuse the network).

# %%
# %matplotlib inline
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import course
import matplotlib.pyplot as plt
import torch
from checks.ch10 import check_lora_trainable_parameters, check_merged_conv1d_weight, check_supervised_tokens
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minipeft import GPT, PeftModel, PromptTuningConfig, get_peft_model, kernels, load_tokenizer_json
from minipeft.data import dataset_loss, load_jsonl
from minipeft.evaluate import evaluate_dataset
from minipeft.train import TrainConfig, train

BASE_DIR = None  # or "gpt2-local": a directory saved once with the two lines above (relative to notebooks/)

# Nothing is downloaded: transformers and peft read HF_HUB_OFFLINE once, when they are imported, so it is set first.
os.environ["HF_HUB_OFFLINE"] = "1"
# bitsandbytes, which peft imports, asks the `kernels` package for an optional CPU kernel from the Hub (unused here);
# offline, `kernels` logs that it skips the Hub's publisher check, and bitsandbytes that the kernel is not there
for name in ("bitsandbytes", "kernels"):
    logging.getLogger(name).setLevel(logging.ERROR)
# peft on this transformers version warns about a renamed transformers method it calls; nothing to act on here
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
import peft  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

course.setup(seed=0)  # seeds, and one thread: small models on a 2-core machine, no spin-waiting threads
NOTEBOOK_START = time.perf_counter()
kernels.set_backend("reference")
transformers.utils.logging.disable_progress_bar()
WORK = Path(tempfile.mkdtemp(prefix="minipeft-own-"))  # everything this chapter writes goes here
print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")

# %% [markdown]
# ## 1. A GPT-2 checkpoint of your own
#
# With `BASE_DIR = None` the cell below builds a stand-in: transformers' `GPT2LMHeadModel` with GPT-2's
# architecture at a tiny size (2 layers, width 64) and **random weights**, saved with `save_pretrained`, exactly
# as the real one is. Its tokenizer is a byte-level BPE (GPT-2's kind of tokenizer) trained with the
# `tokenizers` library, offline, on a dozen sentences that use the words of this chapter's data, so that each
# word is one token, as common words are in GPT-2's own vocabulary of 50,257.
#
# One change from transformers' defaults: the weights are drawn with standard deviation σ = 1/√64 instead of
# 0.02. GPT-2's output layer is its token embedding matrix (tied), and the final LayerNorm hands it a vector of
# norm √C (its scale starts at 1 and its shift at 0), so every logit is at most √C times the norm of an embedding
# row (Cauchy–Schwarz). LoRA leaves both frozen, so that bound holds whatever it learns. The cell computes it for
# both choices of σ, with the best probability the right token could then reach. A trained GPT-2 learned its
# embeddings; this only concerns a random stand-in.

# %%
WORDS = {"cat": "chat", "dog": "chien", "bread": "pain", "water": "eau", "house": "maison", "red": "rouge",
         "sun": "soleil", "book": "livre", "tree": "arbre", "milk": "lait", "moon": "lune", "apple": "pomme"}

if BASE_DIR is None:
    BASE = WORK / "gpt2-tiny"
    C, INIT_STD = 64, 64 ** -0.5
    # the tokenizer: a byte-level BPE with GPT-2's one special token, <|endoftext|>, as id 0
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [f"Translate {en}: the French for {en} is {fr}. In French, English {en} -> {fr}."
            for en, fr in WORDS.items()]
    bpe.train_from_iterator(text, trainer)
    BASE.mkdir()
    bpe.save(str(BASE / "tokenizer.json"))
    # the model: GPT-2's architecture, small; transformers' defaults otherwise (dropout 0.1, GELU tanh, ...)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=C, n_positions=64, vocab_size=bpe.get_vocab_size(),
                        bos_token_id=0, eos_token_id=0, initializer_range=INIT_STD)
    GPT2LMHeadModel(config).save_pretrained(BASE)
else:
    BASE = Path(BASE_DIR).expanduser().resolve()
    missing = [f for f in ("config.json", "tokenizer.json") if not (BASE / f).is_file()]
    if missing or not list(BASE.glob("*.safetensors")):
        raise FileNotFoundError(f"{BASE} lacks {missing or '*.safetensors'}: save GPT-2 there once with the two "
                                "lines at the top of this chapter")

print(f"{BASE.name}/:", ", ".join(f"{p.name} ({p.stat().st_size / 1e3:,.1f} kB)" for p in sorted(BASE.iterdir())))
base = GPT.from_pretrained(BASE)  # minipeft reads what transformers wrote
tok = load_tokenizer_json(BASE)  # <|endoftext|> is EOS, BOS and PAD, as in GPT-2
print(f"{base.num_parameters():,} parameters, context {base.config.block_size}, vocabulary {tok.vocab_size}; "
      f"EOS id {tok.eos_token_id}")
if BASE_DIR is None:
    def best_probability(wte):
        """Logits lie in ±b with b = √C · (largest row norm of wte), so a margin of at most 2b over V − 1 others."""
        b = C ** 0.5 * wte.norm(dim=1).max().item()
        return b, math.exp(2 * b) / (math.exp(2 * b) + wte.shape[0] - 1)

    ours_b, ours_p = best_probability(base.transformer.wte.weight.detach())
    default_b, default_p = best_probability(0.02 * torch.randn(tuple(base.transformer.wte.weight.shape),
                                                               generator=torch.Generator().manual_seed(0)))
    print(f"logits bounded by ±{ours_b:.1f} with σ = 1/√{C}: the right token can reach p = {ours_p:.2f}; with "
          f"σ = 0.02 by ±{default_b:.1f}, so p ≤ {default_p:.3f} whatever LoRA learns")
sample = "Translate cat:"
print(f"{sample!r} → tokens {[tok.decode([i]) for i in tok.encode(sample)]}")

# %% [markdown]
# ## 2. Your data: one JSON object a line
#
# `load_jsonl` reads the format off the keys of the rows (every row must have the same keys):
#
# | row | format | what is learned |
# |---|---|---|
# | `{"text": "..."}` | text | language modelling on the whole text |
# | `{"prompt": "...", "completion": "..."}` | completion | the completion and end-of-text, given the prompt |
# | `{"text": "...", "label": "..."}` | classification | the label, read off the logit of its first token |
#
# The toy task here is a word list: an English word in, its French translation out, written in four phrasings
# for training. A fifth phrasing, never trained on, goes to a held-out file. The completion starts with a space,
# because in GPT-2's tokenizer the space belongs to the word that follows it.

# %%
TRAIN_PHRASINGS = ["Translate {en}:", "French for {en}:", "The French for {en} is", "English {en} ->"]
HELD_OUT_PHRASING = "In French, {en} is"


def rows_for(phrasings):
    return [{"prompt": p.format(en=en), "completion": " " + fr} for p in phrasings for en, fr in WORDS.items()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TRAIN = write_jsonl(WORK / "train.jsonl", rows_for(TRAIN_PHRASINGS))
VAL = write_jsonl(WORK / "val.jsonl", rows_for([HELD_OUT_PHRASING]))
print("train.jsonl, first 3 of", len(TRAIN.read_text().splitlines()), "lines:")
print("".join(TRAIN.read_text().splitlines(keepends=True)[:3]), end="")
print("val.jsonl, first line of", len(VAL.read_text().splitlines()), ":", VAL.read_text().splitlines()[0])

# %% [markdown]
# What each format trains on: one row of each, tokenized as the model sees it (BOS first, EOS after the answer),
# with the tokens that count in the loss in [brackets]. `row_targets` is shifted by one: the position before a
# token predicts it. Classification needs at least two labels that start with different tokens (a file with one
# label is an error that says so): the model's score for a label is the logit of its first token.

# %%
examples = {"text": [{"text": "The French for cat is chat."}],
            "completion": [{"prompt": "Translate cat:", "completion": " chat"}],
            "classification": [{"text": "Is chat French or English? Answer:", "label": " French"},
                               {"text": "Is cat French or English? Answer:", "label": " English"}]}
for name, rows in examples.items():
    ds = load_jsonl(write_jsonl(WORK / f"demo-{name}.jsonl", rows), tok)
    for i in range(len(ds)):
        ids, targets = ds.row(i), ds.row_targets(i)
        shown = [tok.decode([t], skip_special_tokens=False) for t in ids]
        marked = [f"[{s}]" if j > 0 and targets[j - 1] != -100 else s for j, s in enumerate(shown)]
        print(f"{ds.format:>14}: {'|'.join(marked)}")
print("classification labels and the token the verbalizer reads for each:",
      dict(zip(ds.labels, [tok.decode([t]) for t in ds.choice_ids], strict=True)))

data = load_jsonl(TRAIN, tok)
print("\n" + data.summary().replace(str(WORK) + "/", ""))

# %% [markdown]
# ## 3. LoRA from the command line
#
# `minipeft finetune --base DIR --data FILE` trains one method on your checkpoint and file, evaluates on
# `--eval-data` at the end, and writes the adapter with `metrics.jsonl`, `loss.png` and `run.json` into `--out`.
# `--format peft` writes the adapter in Hugging Face peft's format straight away (section 6 loads it there).
# LoRA with the defaults: rank 8, α = 16, on every Linear of the transformer blocks. `--epochs 100` is 100 passes
# over the 48 rows, 8 rows a step: 600 steps. A random base needs a large learning rate and many passes, so this
# chapter uses 1e-2 and 600 steps; it trains one seed, and the cells below say whether that run learned the
# training rows. For real GPT-2 the settings below drop to the rate of the LoRA paper's code for GPT-2 Medium,
# 2e-4, and 20 passes.

# %%
LORA_EPOCHS, LORA_LR = (100, 1e-2) if BASE_DIR is None else (20, 2e-4)
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def minipeft(*args):
    """Run the `minipeft` command in WORK (so its paths are short) and print what it printed."""
    args = [str(a) for a in args]
    print("$ minipeft", " ".join(a if " " not in a else repr(a) for a in args).replace(str(WORK) + "/", ""))
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", *args], cwd=WORK, env=ENV, capture_output=True,
                          text=True)
    if proc.returncode:
        print(proc.stderr[-3000:])
        raise RuntimeError(f"minipeft {args[0]} failed with exit code {proc.returncode}")
    info = [line for line in proc.stderr.splitlines() if line.startswith(("lora:", "prompt:")) or "rows of" in line]
    for line in info + proc.stdout.strip().splitlines():
        print("  " + line.replace(str(WORK) + "/", "").replace(str(BASE), BASE.name))
    return proc.stdout


start = time.perf_counter()
minipeft("finetune", "--base", BASE, "--data", "train.jsonl", "--eval-data", "val.jsonl", "--method", "lora",
         "--out", "runs/lora", "--epochs", LORA_EPOCHS, "--lr", LORA_LR, "--batch-size", 8, "--save-every", 0,
         "--format", "peft", "--device", "cpu")
print(f"(the command took {time.perf_counter() - start:.0f} s, starting Python included)")

LORA = WORK / "runs" / "lora"
metrics = [json.loads(line) for line in (LORA / "metrics.jsonl").read_text().splitlines()]
lora_losses = [m["loss"] for m in metrics]
first, last = sum(lora_losses[:10]) / 10, sum(lora_losses[-10:]) / 10
print()
course.claim(last < 0.5 * first, f"LoRA from the command line learned: the loss fell from {first:.2f} (mean of the "
                                 f"first 10 steps) to {last:.2f} (the last 10), {last / first:.0%} of where it started")

base_eval = evaluate_dataset(base, load_jsonl(VAL, tok))["loss"]
lora_eval = metrics[-1]["eval_loss"]
print(f"On the held-out phrasing the loss is {lora_eval:.2f}, against {base_eval:.2f} for the base without an "
      f"adapter ({'lower' if lora_eval < base_eval else 'not lower'}). Part of a drop is the answer's form, which "
      "every row shares (one French word, then end-of-text); whether the words carry over is checked in section 5.")

# %% [markdown]
# ## 4. Prompt tuning from Python
#
# The same file through the Python API: `load_jsonl`, `get_peft_model`, `train`. Prompt tuning learns 8
# virtual-token embeddings in front of the input, started from the embeddings of an instruction (TEXT
# initialisation, as in the prompt-tuning chapter), trained for as many steps as LoRA was. The virtual tokens
# take positions, so the longest row is the context less 8.

# %%
N_VIRTUAL, PROMPT_STEPS, PROMPT_LR = 8, len(lora_losses), 0.1
torch.manual_seed(0)
pt = get_peft_model(GPT.from_pretrained(BASE), PromptTuningConfig(
    num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="TEXT", prompt_tuning_init_text="Translate into French:",
    tokenizer=tok))
pt.print_trainable_parameters()
pt_data = load_jsonl(TRAIN, tok, max_length=base.config.block_size - N_VIRTUAL)
pt_val = load_jsonl(VAL, tok, max_length=base.config.block_size - N_VIRTUAL, format=pt_data.format)
pt_config = TrainConfig(steps=PROMPT_STEPS, lr=PROMPT_LR, batch_size=8, warmup_steps=PROMPT_STEPS // 10)
result = train(pt, pt_data.batches(batch_size=8), pt_config, loss_fn=dataset_loss(pt_data), progress=False)
pt_first, pt_last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
pt_eval = evaluate_dataset(pt, pt_val)["loss"]
course.claim(pt_last < 0.9 * pt_first, f"prompt tuning from Python learned too: in {PROMPT_STEPS} steps the loss fell "
                                       f"from {pt_first:.2f} to {pt_last:.2f} (means of the first and last 10 steps)")
print(f"held-out loss: prompt tuning {pt_eval:.2f}, LoRA {lora_eval:.2f}, the base {base_eval:.2f}")
PROMPT = WORK / "runs" / "prompt"
pt.save_adapter(PROMPT, format="peft", base_model_name_or_path=str(BASE))  # peft's format, for section 6

fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(range(1, len(lora_losses) + 1), lora_losses, label=f"LoRA (command line), lr {LORA_LR:g}")
ax.plot(range(1, len(result.losses) + 1), result.losses, label=f"prompt tuning (Python), lr {PROMPT_LR:g}")
ax.axhline(base_eval, color="0.5", ls=":", label="base, no adapter (held-out rows)")
ax.set_xlabel("optimizer step")
ax.set_ylabel("loss (nats per token)")
ax.set_title(f"Fine-tuning {BASE.name} on train.jsonl")
ax.legend(fontsize=8, loc="center right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Generating with the adapter
#
# `minipeft generate --base DIR --adapter OUT "prompt"` decodes greedily until end-of-text. Then the same through
# the API for every word, in the held-out phrasing: the base alone, with the LoRA adapter, with the soft prompt.
# An empty answer '' is end-of-text straight away; the random base's answers are random tokens, some of them single
# bytes of a longer UTF-8 character (shown as �).

# %%
minipeft("generate", "--base", BASE, "--adapter", "runs/lora", "Translate cat:", "--max-new-tokens", 5,
         "--device", "cpu")

lora_model = PeftModel.from_pretrained(GPT.from_pretrained(BASE), LORA).eval()  # peft's files load in minipeft
pt.eval()
base.eval()


def answer(model, prompt):
    ids = torch.tensor([tok.encode(prompt, add_bos=True)])
    out = model.generate(ids, max_new_tokens=4, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:].tolist())


variants = {"base": base, "LoRA": lora_model, "prompt": pt}
correct = dict.fromkeys(variants, 0)
print(f"\n{'prompt':24s}" + "".join(f"{name:>12s}" for name in variants))
for en, fr in WORDS.items():
    prompt = HELD_OUT_PHRASING.format(en=en)
    answers = {name: answer(m, prompt) for name, m in variants.items()}
    for name, a in answers.items():
        correct[name] += a == " " + fr
    print(f"{prompt:24s}" + "".join(f"{a!r:>12s}" for a in answers.values()))
print(", ".join(f"{name}: {n}/{len(WORDS)} right" for name, n in correct.items()))
train_rows = rows_for(TRAIN_PHRASINGS)
on_train = {name: sum(answer(m, r["prompt"]) == r["completion"] for r in train_rows) for name, m in variants.items()}
print("on the training prompts:", ", ".join(f"{name}: {n}/{len(train_rows)} right" for name, n in on_train.items()))
seen, new = on_train["LoRA"] / len(train_rows), correct["LoRA"] / len(WORDS)
if seen < 0.5:
    lora_verdict = "it has not learned the training rows yet: train longer, or at a higher rate"
elif new >= 0.5:
    lora_verdict = "in this run it carried most words over to a phrasing it was never shown"
else:
    lora_verdict = ("in this run it answers the phrasings it was shown more often than the new one; one seed does "
                    "not say how much of that gap another seed would keep")
pt_seen, pt_new = on_train["prompt"] / len(train_rows), correct["prompt"] / len(WORDS)
if pt_seen < seen:
    prompt_verdict = ("below LoRA on the prompts both were trained on. The likely reason, not measured here: a soft "
                      "prompt only steers what the frozen network already does"
                      + (", and a random network does not translate." if BASE_DIR is None else "."))
else:
    prompt_verdict = "as many as LoRA or more on the prompts both were trained on."
print(f"LoRA answers {seen:.0%} of the training prompts and {new:.0%} in the new phrasing: {lora_verdict}. The soft "
      f"prompt answers {pt_seen:.0%} and {pt_new:.0%}: {prompt_verdict}")

# %% [markdown]
# ## 6. Hand-off to Hugging Face: peft loads the adapters
#
# Both adapters are in peft's format: LoRA because the command had `--format peft`, the soft prompt because
# `save_adapter(..., format="peft")` wrote it. transformers loads the base and peft attaches each adapter:
#
# ```python
# model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(DIR), OUT)
# ```
#
# The check: on every training and held-out prompt, peft's logits and minipeft's agree to 1e-4 times the largest
# logit's magnitude (and at least to 1e-4): float32 rounding grows with the size of the numbers rounded. peft's
# prompt-tuning model also returns logits for the 8 virtual tokens, so those are cut off first.

# %%
for name in ("lora", "prompt"):
    cfg = json.loads((WORK / "runs" / name / "adapter_config.json").read_text())
    keys = {k: cfg[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "num_virtual_tokens") if k in cfg}
    print(f"runs/{name}/: {sorted(p.name for p in (WORK / 'runs' / name).iterdir() if 'adapter' in p.name)}; {keys}")

prompts = [r["prompt"] + r["completion"] for r in rows_for(TRAIN_PHRASINGS + [HELD_OUT_PHRASING])]
for name, ours_model in (("LoRA", lora_model), ("prompt tuning", pt)):
    theirs_model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), WORK / "runs" /
                                                  ("lora" if name == "LoRA" else "prompt")).eval()
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for text in prompts:
            ids = torch.tensor([tok.encode(text, add_bos=True)])
            ours = ours_model(ids)[0]
            theirs = theirs_model(input_ids=ids).logits[:, -ids.shape[1]:]  # drop the virtual tokens' logits
            worst, scale = max(worst, (ours - theirs).abs().max().item()), max(scale, ours.abs().max().item())
    tol = 1e-4 * max(1.0, scale)
    course.claim(worst <= tol, f"{name}: Hugging Face peft and minipeft agree on {len(prompts)} prompts: max "
                               f"|difference| {worst:.1e} (tolerance {tol:.0e}, largest logit {scale:.1f})")

# %% [markdown]
# ## 7. Merging: a plain GPT-2 checkpoint
#
# LoRA's update has the shape of the weight it adapts, so `minipeft merge` adds W₀ + (α/r)·B·A once and writes
# an ordinary GPT-2 (config.json + model.safetensors, and the base's tokenizer files): transformers loads it
# with no peft and no adapter code, and it computes no more per token than the base. The soft prompt cannot be
# merged; it is input, not a weight. The check: the merged model's logits equal the adapter model's.

# %%
minipeft("merge", "--base", BASE, "--adapter", "runs/lora", "--out", "runs/lora-merged")
MERGED = WORK / "runs" / "lora-merged"
merged_hf = GPT2LMHeadModel.from_pretrained(MERGED).eval()
merged_ours = GPT.from_pretrained(MERGED).eval()
worst = {"transformers": 0.0, "minipeft": 0.0}
scale = 0.0
with torch.no_grad():
    for text in prompts:
        ids = torch.tensor([tok.encode(text, add_bos=True)])
        adapter_logits = lora_model(ids)[0]
        scale = max(scale, adapter_logits.abs().max().item())
        worst["transformers"] = max(worst["transformers"], (merged_hf(input_ids=ids).logits - adapter_logits)
                                    .abs().max().item())
        worst["minipeft"] = max(worst["minipeft"], (merged_ours(ids)[0] - adapter_logits).abs().max().item())
tol = 1e-4 * max(1.0, scale)
course.claim(max(worst.values()) <= tol, "the merged GPT-2 computes the adapter model's logits: max |difference| "
             + " and ".join(f"{w:.1e} loaded by {loader}" for loader, w in worst.items()) + f" (tolerance {tol:.0e})")
adapter_kb = (LORA / "adapter_model.safetensors").stat().st_size / 1e3
merged_kb = (MERGED / "model.safetensors").stat().st_size / 1e3
print(f"the adapter file is {adapter_kb:,.0f} kB, the merged model {merged_kb:,.0f} kB "
      f"({adapter_kb / merged_kb:.0%}): keep adapters to switch tasks on one base, merge to serve one task")

# %% [markdown]
# ## Summary
#
# - minipeft reads a GPT-2 checkpoint as transformers saves it (config.json + model.safetensors, tokenizer.json)
#   and never downloads anything: save real weights once with `save_pretrained`, then work offline.
# - A JSONL file of `{"text"}`, `{"prompt", "completion"}` or `{"text", "label"}` rows is the whole data
#   interface; the keys decide what is supervised.
# - `minipeft finetune --base DIR --data FILE` and the Python API (`load_jsonl`, `get_peft_model`, `train`)
#   are the same training loop; a run directory keeps the loss per step, so "the loss fell" is checked, not
#   eyeballed.
# - `--format peft` or `save_adapter(..., format="peft")` writes files that Hugging Face peft loads onto
#   transformers' GPT-2 with minipeft's logits, to float32 rounding.
# - `minipeft merge` turns a LoRA adapter into a plain GPT-2 with the same outputs; soft prompts stay adapters.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks.
#
# ### Exercise 1 — how many parameters LoRA trains on GPT-2
#
# The LoRA command of section 3 printed its trainable parameters. Write `lora_trainable_parameters(n_layer,
# n_embd, r)`: the parameters LoRA of rank r adds on every Linear of GPT-2's blocks (c_attn, attn.c_proj,
# mlp.c_fc, mlp.c_proj; not the output head). The check compares with `get_peft_model` on models of four sizes.

# %%
def lora_trainable_parameters(n_layer, n_embd, r):
    """LoRA parameters on the four Linears of each of GPT-2's n_layer blocks of width n_embd, rank r."""
    return None  # your code here


# %%
passed = check_lora_trainable_parameters(lora_trainable_parameters)  # True when right

# %% [markdown]
# ### Exercise 2 — which tokens a completion row trains on
#
# Section 2 marked in [brackets] the tokens that count in the loss. Write `supervised_tokens(tokenizer, prompt,
# completion)`: the token ids a `{"prompt", "completion"}` row supervises, in order. The check reads them off
# `load_jsonl`'s targets for several rows, with a byte tokenizer and with this chapter's BPE.

# %%
def supervised_tokens(tokenizer, prompt, completion):
    """The ids the loss of a {"prompt": prompt, "completion": completion} row is computed on."""
    return None  # your code here


# %%
passed = check_supervised_tokens(supervised_tokens, tok)  # True when right

# %% [markdown]
# ### Exercise 3 — the merged weight, as GPT-2's files store it
#
# `minipeft merge` (section 7) writes W' = W + s·B·A for every adapted Linear. minipeft's GPT keeps W as an
# `nn.Linear` weight, (out, in); GPT-2's checkpoints store these projections as Conv1D weights. Write
# `merged_conv1d_weight(W, A, B, scaling)`: the tensor the merged checkpoint holds for one layer. The check
# merges small LoRA models, saves them and compares with the stored tensors.

# %%
def merged_conv1d_weight(W, A, B, scaling):
    """W (out, in), A (r, in), B (out, r), scaling s → the merged weight as GPT-2's model.safetensors holds it."""
    return None  # your code here


# %%
passed = check_merged_conv1d_weight(merged_conv1d_weight)  # True when right

# %% [markdown]
# ### Questions
#
# 1. **Rank.** Re-run the LoRA command with `--r 1`, `--r 2` and `--r 32`. How do the final training loss, the
#    held-out loss and the size of `adapter_model.safetensors` change? Is there a rank below which this word list
#    cannot be learned, and why would that rank depend on the number of words?
# 2. **Formats.** Try `--method pfeiffer --format peft`: what does minipeft answer, and why can there be no peft
#    file for that method?
# 3. **Real weights.** Save GPT-2 as at the top and set `BASE_DIR`. Which steps get slower, and by how much? Does
#    GPT-2 already translate some of the words before any training, and does prompt tuning now do better against
#    LoRA than on the random base?

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")

# %%
course.claims_report()
