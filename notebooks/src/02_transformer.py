# %% [markdown]
# # Chapter 2 — The transformer every chapter fine-tunes
#
# minipeft's `GPT` is GPT-2's architecture (Radford et al. 2019,
# https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf),
# written to be read in `minipeft/model.py`. Each block is pre-LayerNorm:
#
# $$h \leftarrow h + \mathrm{Attn}(\mathrm{LN}_1(h)),\qquad h \leftarrow h + \mathrm{MLP}(\mathrm{LN}_2(h)),$$
#
# and the output layer is tied to the token embedding. This chapter opens one attention step and checks it
# against the module, pretrains a small model on the built-in corpus (chapter 1 showed what the corpus says),
# generates text (greedy, sampled, with and without the KV cache), and loads a GPT-2 checkpoint in transformers'
# file layout. Every later chapter attaches its method somewhere inside this block: chapter 1's map shows where.

# %%
# %matplotlib inline
import math
import os
import tempfile
from pathlib import Path

import course
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import transformers
from checks.ch02 import check_block_parameters, check_causal_attention, check_kv_cache_bytes, check_kv_cache_shape
from transformers import GPT2Config, GPT2LMHeadModel

from minipeft import GPT, GPTConfig, kernels
from minipeft.data import build_world, corpus_tokens, pretraining_batch, pretraining_corpus
from minipeft.measure import median_ms
from minipeft.pretrain import PRESETS, load_base, pretrain_record
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import train

course.setup(seed=0)
kernels.set_backend("reference")  # plain PyTorch ops on the CPU
tok = ByteTokenizer()
model = load_base("default")  # pretrained once, cached on disk (MINIPEFT_CACHE)
print(model.config)
print(f"parameters: {model.num_parameters():,d}")

# %% [markdown]
# ## One attention step, with shapes
#
# The tokenizer is byte-level (256 byte ids + 4 specials), so a sentence of T − 1 bytes (one byte per character of
# ASCII text) is T ids with the begin token. Take block 0, feed it the embedded sentence, and compute causal
# self-attention by hand:
#
# $$\mathrm{Attn}(X) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_h}} + M\right)V\,W_O,\qquad
# M_{ij} = -\infty \text{ for } j > i .$$

# %%
world = build_world(0)
person = world.people[0]
text = f"{person.name} lives in"
idx = torch.tensor([tok.encode(text, add_bos=True)])  # (B=1, T)
B, T = idx.shape
C, nh = model.config.n_embd, model.config.n_head
hs = C // nh
block = model.transformer.h[0]

with torch.no_grad():
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))  # (B, T, C)
    x = block.ln_1(x)
    q, k, v = block.attn.c_attn(x).split(C, dim=2)  # each (B, T, C)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T): query i sees keys j ≤ i
    scores = scores.masked_fill(~causal, float("-inf"))
    att = F.softmax(scores, dim=-1)  # each row sums to 1
    y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads concatenated
    y = block.attn.c_proj(y)
    y_module = block.attn(x, None)  # the library's module (fused scaled_dot_product_attention)

for name, t in [("idx", idx), ("x = LN1(wte + wpe)", x), ("q", q), ("k", k), ("v", v), ("scores", scores),
                ("causal mask", causal), ("attention", att), ("output", y)]:
    print(f"{name:20s} {tuple(t.shape)}")
gap = (y - y_module).abs().max().item()
course.claim(gap < 1e-5, f"attention by hand (scores, causal mask, softmax, heads, c_proj) matches the library's "
             f"CausalSelfAttention to {gap:.1e}, float rounding")

# %%
labels = ["<bos>"] + [tok.token_to_str(i) for i in idx[0, 1:].tolist()]
fig, ax = plt.subplots(figsize=(5.5, 4.5))
im = ax.imshow(att[0, 0], cmap="viridis", vmin=0, vmax=1)
ax.set_xticks(range(T), labels, fontsize=7)
ax.set_yticks(range(T), labels, fontsize=7)
ax.set_xlabel("key position (token)")
ax.set_ylabel("query position (token)")
ax.set_title("Block 0, head 0: attention weights (upper triangle masked)")
fig.colorbar(im, ax=ax, label="attention weight (probability)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Pretraining on the built-in corpus
#
# The corpus (`minipeft/data.py`) is generated from a seed: a small world of invented people, cities, jobs
# and pets, described in many sentence templates. Pretraining is next-token prediction,
# L = −(1/N) Σₜ log p(xₜ₊₁ | x≤ₜ). The cached default base was pretrained once (its record is printed
# below); here the `tiny` preset (2 layers, width 64) runs its full schedule live, so you can watch the loss
# fall. A model that knows nothing guesses uniformly over the 260 tokens: a loss of ln 260.
#
# The cell writes out what `minipeft.pretrain.pretrain` does — the corpus as one stream of token ids, random
# windows of it as batches (`pretraining_batch`: targets are the inputs shifted by one), and the generic training
# loop `minipeft.train.train` (AdamW, warm-up, cosine decay) — but keeps this notebook's one thread, where the
# library pins two so that its cached base is the same on every machine.

# %%
tiny_cfg, tiny_train, n_paragraphs = PRESETS["tiny"]
stream = corpus_tokens(pretraining_corpus(build_world(0), n_paragraphs, seed=0), tok)  # (N,) token ids
print(f"corpus: {n_paragraphs:,d} paragraphs, {stream.numel():,d} tokens")
torch.manual_seed(0)
tiny = GPT(tiny_cfg)  # random weights
result = train(tiny, lambda g: (*pretraining_batch(stream, tiny_train.batch_size, tiny_cfg.block_size, g), None),
               tiny_train, progress=False)  # each batch: idx (B, T), targets (B, T), no attention mask
print(f"tiny: {tiny.num_parameters():,d} parameters, {len(result.losses)} steps of batch {tiny_train.batch_size} × "
      f"{tiny_cfg.block_size} tokens in {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s on this CPU)")
final = sum(result.losses[-10:]) / 10
print(f"loss {result.losses[0]:.2f} → {final:.2f} (mean of the last 10 steps); "
      f"uniform guess over 260 tokens: ln 260 = {math.log(260):.2f}")
course.claim(final < math.log(260) - 2, f"{len(result.losses)} steps of pretraining take the tiny model's loss to "
             f"{final:.2f} nats/token, more than 2 below the uniform guess's {math.log(260):.2f}")

record = pretrain_record("default")
if record is not None:
    print(f"default base (cached): {record['parameters']:,d} parameters, {record['steps']} steps, loss "
          f"{record['first_loss']:.2f} → {record['final_loss']:.2f} in {record['seconds']:.0f} s "
          f"(torch {record['torch']})")
else:
    print("the default base's pretraining record (pretrain.json) is not in this cache")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(result.losses, label="tiny preset, this run")
if record is not None:
    ax.axhline(record["final_loss"], color="C1", ls="--",
               label=f"default base after {record['steps']} steps (recorded)")
ax.axhline(math.log(260), color="gray", ls=":", label="uniform over the vocabulary")
ax.set_xlabel("step (batch 16 × 128 tokens)")
ax.set_ylabel("cross-entropy (nats / token)")
ax.set_title("Pretraining loss on the built-in corpus")
ax.legend(fontsize=8, loc="center right")  # clear of the lines at the top and bottom
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Generation
#
# `generate` feeds the prompt once, then one token per step. Greedy decoding takes the argmax; sampling
# draws from softmax(logits / temperature), optionally only among the top k tokens.

# %%
prompt = torch.tensor([tok.encode(f"{person.name} lives in", add_bos=True)])
greedy = model.generate(prompt, max_new_tokens=60)
print("greedy:", repr(tok.decode(greedy[0])))
print(f"(the world says: {person.name} lives in {person.city}, is a {person.job}, keeps a {person.pet})")
g = torch.Generator().manual_seed(0)
for temperature, top_k in [(0.7, 10), (1.5, None)]:
    out = model.generate(prompt, max_new_tokens=60, do_sample=True, temperature=temperature, top_k=top_k,
                         generator=g)
    print(f"T={temperature}, top_k={top_k}:", repr(tok.decode(out[0])))

# %% [markdown]
# ### The KV cache
#
# Without a cache, step t recomputes keys and values for all t tokens so far; with one, each step computes
# them for the new token only and attends to the stored ones. Below, the same greedy continuation with and
# without it (median of 3 runs after a warm-up, `minipeft.measure`), and a check that both produce the same tokens.

# %%
@torch.no_grad()
def generate_without_cache(m: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    for _ in range(max_new_tokens):
        logits, _ = m(idx)  # the whole sequence, every step
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


NEW = model.config.block_size - prompt.shape[1]  # fill the context window
same = torch.equal(model.generate(prompt, max_new_tokens=NEW), generate_without_cache(model, prompt, NEW))
t_cache = median_ms(lambda: model.generate(prompt, max_new_tokens=NEW), repeats=3)
t_plain = median_ms(lambda: generate_without_cache(model, prompt, NEW), repeats=3)
print(f"{NEW} new tokens: with KV cache {t_cache / NEW:.2f} ms/token, without {t_plain / NEW:.2f} "
      f"ms/token: the cache is {t_plain / t_cache:.1f}× {'faster' if t_plain > t_cache else 'slower'} on this run")
course.claim(same, f"greedy generation with the KV cache gives the same {NEW} tokens as recomputing the whole "
             "sequence at every step")

# %% [markdown]
# ## Loading a GPT-2 checkpoint from a local directory
#
# `GPT.from_pretrained(dir)` reads a directory written by transformers' `GPT2LMHeadModel.save_pretrained`
# (config.json + model.safetensors; never a pickle). GPT-2 stores its projections as `Conv1D` with weight
# (in, out), so those four are transposed into `nn.Linear`'s (out, in). minipeft downloads nothing: set
# `GPT2_DIR` to a local GPT-2 directory to use real weights here.

# %%
transformers.utils.logging.disable_progress_bar()

real_dir = os.environ.get("GPT2_DIR")
if real_dir and (Path(real_dir) / "config.json").is_file():
    ckpt_dir, is_real = Path(real_dir), True
    hf = GPT2LMHeadModel.from_pretrained(ckpt_dir).eval()
    print(f"using the real checkpoint in {ckpt_dir}")
else:
    is_real = False
    torch.manual_seed(0)
    # GPT-2's architecture at a reduced size (GPT-2 small is n_layer=12, n_embd=768, vocab 50257).
    hf_config = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=1000, n_positions=128,
                           bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(hf_config).eval()
    ckpt_dir = Path(tempfile.mkdtemp()) / "gpt2-random"
    hf.save_pretrained(ckpt_dir)
    print("NO real GPT-2 checkpoint is present (GPT2_DIR is not set), and nothing is downloaded: this is a "
          "RANDOMLY INITIALISED transformers GPT-2 (2 layers, width 128, vocab 1000). It checks the loading "
          "path, not the weights of OpenAI's model.")
print("files:", sorted(p.name for p in ckpt_dir.iterdir()))

gpt = GPT.from_pretrained(ckpt_dir).eval()
ids = torch.randint(0, gpt.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    ours = gpt(ids)[0]
    theirs = hf(ids).logits
print(f"{gpt.num_parameters():,d} parameters; logits {tuple(ours.shape)}")
course.claim(torch.allclose(ours, theirs, atol=1e-4), f"minipeft's GPT, loaded from transformers' files, gives "
             f"transformers' logits to {(ours - theirs).abs().max():.1e}")

# %% [markdown]
# The same file layout works in the other direction: `model.save_pretrained(dir)` writes a directory that
# transformers' `GPT2LMHeadModel.from_pretrained` reads, which is how the default base is cached.

# %% [markdown]
# ## Summary
#
# - A GPT-2 block is pre-LayerNorm: h ← h + Attn(LN₁(h)), then h ← h + MLP(LN₂(h)); the residual stream carries
#   everything, and each sublayer only adds to it.
# - Causal self-attention is softmax(QKᵀ/√d_h + M)·V per head, with M = −∞ above the diagonal; written out by
#   hand it gives the library module's numbers to float rounding.
# - Pretraining is next-token prediction on the built-in corpus; the loss starts near ln 260 (a uniform guess)
#   and falls as the model learns the language and the world's facts.
# - Generation feeds the prompt once and then one token per step; the KV cache keeps every layer's keys and
#   values, (B, n_head, T, head_dim) each, so a step computes them for the new token only — same tokens.
# - minipeft reads and writes GPT-2's file layout (Conv1D weights transposed), so its GPT and transformers' agree
#   on the same weights.
#
# ## Exercises
#
# Each exercise has a stub to fill in and a check cell below it. The check says "not done yet" while the stub
# is untouched, and says what is wrong when an answer is off. Worked solutions: this chapter's file in
# `notebooks/solutions/`, a plain Python script that runs the same checks on them.
#
# ### Exercise 1 — causal attention from scratch
#
# Write `causal_attention(q, k, v)` for q, k, v of shape (B, n_head, T, head_dim): the scores scaled by
# 1/√head_dim, the causal mask, the softmax over keys, the weighted sum of values. Use plain tensor ops, not
# `F.scaled_dot_product_attention` — the check compares with it, on several shapes.

# %%
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√hs + causal mask)·v for q, k, v (B, nh, T, hs); returns (B, nh, T, hs)."""
    return None  # your code here


# %%
check_causal_attention(causal_attention)

# %% [markdown]
# ### Exercise 2 — the parameters of one block
#
# Write `block_parameters(n_embd, bias)`: how many parameters one `Block` (two LayerNorms, attention with
# `c_attn` and `c_proj`, the MLP with `c_fc` and `c_proj`) holds, with or without bias vectors. The check counts
# the parameters of real `minipeft.model.Block` modules.

# %%
def block_parameters(n_embd: int, bias: bool = True) -> int:
    """Parameters of one GPT-2 block of width n_embd (MLP hidden width 4·n_embd)."""
    return None  # your code here


# %%
check_block_parameters(block_parameters)

# %% [markdown]
# ### Exercise 3 — the shape of the KV cache
#
# After the model has read T tokens of a batch of B rows with a `KVCache`, what is the shape of `cache.keys[l]`,
# the keys of one layer? Write `kv_cache_shape(config, batch_size, n_tokens)`. The check runs real models with
# a cache and reads the shape.

# %%
def kv_cache_shape(config: GPTConfig, batch_size: int, n_tokens: int) -> tuple[int, ...]:
    """The shape of one layer's cached keys (or values) after batch_size rows of n_tokens tokens."""
    return None  # your code here


# %%
check_kv_cache_shape(kv_cache_shape)

# %% [markdown]
# ### Exercise 4 — how big the KV cache gets
#
# Write `kv_cache_bytes(config, batch_size, n_tokens, bytes_per_element)`: the bytes of all cached keys and
# values, every layer. The check sums the real cache's tensors (fp32, 4 bytes an element) and then asks what the
# cache of GPT-2 small would take for a full 1024-token context.

# %%
def kv_cache_bytes(config: GPTConfig, batch_size: int, n_tokens: int, bytes_per_element: int = 4) -> int:
    """Bytes of the keys and values of every layer after batch_size rows of n_tokens tokens."""
    return None  # your code here


# %%
check_kv_cache_bytes(kv_cache_bytes)

# %% [markdown]
# ### Open questions
#
# 1. The output layer shares its weight with the token embedding. What would untying them cost in parameters
#    for the default base, and for GPT-2 small — and why is the answer so different in proportion?
# 2. With the KV cache, a step still attends to all T cached keys. Which part of generation does the cache make
#    cheaper, and which part still grows with T?
# 3. Prefix tuning (chapter 5) starts the KV cache with learned keys and values. Using your answer to Exercise 3,
#    what shape must a prefix of n virtual tokens have in each layer?
# 4. GPT-2's vocabulary has 50,257 tokens. On a GPU, `minipeft.model.head_logits` multiplies by the embedding
#    padded with zero rows to 50,304 and cuts the extra logits off again (nanoGPT rounds its vocab_size up to
#    50,304 for the same reason). How can a larger matrix product be faster? Think of where each row of 50,257
#    bf16 logits starts in memory, and of a GPU that moves tiles in 16-byte units.

# %%
course.claims_report()
