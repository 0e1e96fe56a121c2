"""Checks for the exercises of chapter 1 (meet the world; why PEFT). Each prints one line: not done yet, what is
off, or correct.

The references are the library's own: `GPT.num_parameters()` of real (meta-device) models, the trainable count of
`get_peft_model`, `minipeft.measure.state_bytes` after a real AdamW step, and `minipeft.evaluate.predict`.
"""

from __future__ import annotations

import torch

from minipeft import GPT, GPTConfig
from minipeft.data import Example, load_task
from minipeft.evaluate import predict
from minipeft.measure import state_bytes
from minipeft.tokenizer import ByteTokenizer
from minipeft.tuners import LoraConfig, get_peft_model

# More than one shape, so that a hard-coded answer fails; small enough to build in a moment.
CONFIGS = [GPTConfig(n_layer=4, n_head=4, n_embd=160, vocab_size=260, block_size=128),
           GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=260, block_size=64),
           GPTConfig(n_layer=3, n_head=6, n_embd=96, vocab_size=1000, block_size=256, bias=False),
           GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)]


def _meta_gpt(config: GPTConfig) -> GPT:
    with torch.device("meta"):  # shapes without storage: even GPT-2 small is built at once
        return GPT(config)


def check_gpt_parameters(fn) -> None:
    """Exercise 1: fn(config) → the parameter count of GPT(config)."""
    if fn(CONFIGS[0]) is None:
        print("Exercise 1: not done yet — fill in gpt_parameters.")
        return
    for config in CONFIGS:
        want = _meta_gpt(config).num_parameters()
        got = fn(config)
        if got == want:
            continue
        L, d, V, P = config.n_layer, config.n_embd, config.vocab_size, config.block_size
        case = f"(n_layer={L}, n_embd={d}, vocab={V}, block_size={P}, bias={config.bias})"
        biased = L * (12 * d * d + 13 * d) + V * d + P * d + 2 * d
        if got == want + V * d:
            hint = "the output layer is tied to the token embedding: count V·d once"
        elif not config.bias and got == biased:
            hint = ("with bias=False there are no bias vectors: 12·d² per block, and each LayerNorm has d weights "
                    "only (2d per block, d for the final one)")
        elif got == want - P * d:
            hint = "the position embedding (block_size × n_embd) is missing"
        elif isinstance(got, int) and (want - got) % L == 0 and got < want:
            hint = f"{(want - got) // L:,d} parameters per block are missing: 4 Linears and 2 LayerNorms per block"
        else:
            hint = "per block: c_attn d·3d, attn.c_proj d·d, c_fc d·4d, mlp.c_proj 4d·d, plus biases and 2 LayerNorms"
        print(f"Exercise 1: {case} GPT has {want:,d} parameters, you said {got!r}. Hint: {hint}.")
        return
    print("Exercise 1: correct — N = L(12d² + 13d) + Vd + Pd + 2d with biases, L·12d² + L·2d + Vd + Pd + d without; "
          "GPT-2 small has 124,439,808.")


def _linears(config: GPTConfig) -> dict[str, tuple[int, int]]:
    d = config.n_embd
    return {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}


def check_lora_parameters(fn) -> None:
    """Exercise 2: fn(config, r, targets) → LoRA's trainable parameters on GPT(config)."""
    if fn(CONFIGS[1], 8, ["c_attn"]) is None:
        print("Exercise 2: not done yet — fill in lora_parameters.")
        return
    cases = [(CONFIGS[1], 8, ["c_attn"]), (CONFIGS[1], 4, ["c_proj"]), (CONFIGS[0], 2, ["c_attn", "c_fc"]),
             (CONFIGS[0], 16, ["c_attn", "c_proj", "c_fc"])]
    for config, r, targets in cases:
        small = GPTConfig(**{**config.to_dict(), "block_size": min(config.block_size, 64)})
        want = get_peft_model(GPT(small), LoraConfig(r=r, lora_alpha=r, target_modules=targets)) \
            .get_nb_trainable_parameters()[0]
        got = fn(config, r, targets)
        if got == want:
            continue
        case = f"(n_layer={config.n_layer}, n_embd={config.n_embd}, r={r}, targets={targets})"
        only_attn_proj = sum(r * (i + o) for name, (i, o) in _linears(config).items()
                             if any(name.endswith(t) for t in targets) and name != "mlp.c_proj") * config.n_layer
        if "c_proj" in targets and got == only_attn_proj:
            hint = "'c_proj' matches two Linears per block: attn.c_proj (d → d) and mlp.c_proj (4d → d)"
        elif isinstance(got, int) and got * config.n_layer == want:
            hint = "that is one block's count: multiply by n_layer"
        else:
            hint = "each targeted Linear (in → out) adds A (r, in) and B (out, r): r·(in + out), no biases"
        print(f"Exercise 2: {case} LoRA trains {want:,d} parameters, you said {got!r}. Hint: {hint}.")
        return
    print("Exercise 2: correct — r·(in + out) per targeted Linear, times n_layer; 'c_proj' counts twice per block.")


def check_adamw_state_bytes(fn) -> None:
    """Exercise 3: fn(model) → weights + gradients + AdamW state in bytes (fp32, everything trainable)."""
    torch.manual_seed(1)
    models = [GPT(CONFIGS[1]), GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=100, block_size=16)),
              torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3, bias=False))]
    if fn(models[0]) is None:
        print("Exercise 3: not done yet — fill in adamw_state_bytes.")
        return
    for model in models:
        b = state_bytes(model)
        want = b["weights"] + b["gradients"] + b["optimizer_state"]
        got = fn(model)
        if got == want:
            continue
        n = sum(p.numel() for p in model.parameters())
        tensors = len(list(model.parameters()))
        if got == 16 * n:
            hint = (f"16 bytes per parameter is right, but AdamW also keeps a 4-byte step count per parameter "
                    f"tensor ({tensors} tensors here)")
        elif got == 12 * n + 4 * tensors or got == 12 * n:
            hint = "AdamW keeps two moments per parameter, m and v: 8 bytes, besides weight (4) and gradient (4)"
        else:
            hint = "4 (weight) + 4 (gradient) + 8 (m and v) bytes per parameter, + 4 bytes per tensor (step)"
        print(f"Exercise 3: for a model of {n:,d} parameters in {tensors} tensors, state_bytes measures {want:,d} "
              f"bytes, you said {got!r}. Hint: {hint}.")
        return
    print("Exercise 3: correct — 16 bytes per parameter plus a step count per tensor: full fine-tuning of GPT-2 small "
          "holds about 2 GB before activations.")


def check_verbalize(fn) -> None:
    """Exercise 4: fn(model, prompts) → 'good' or 'bad' per prompt, as minipeft.evaluate.predict reads it."""
    tok = ByteTokenizer()
    task = load_task("sentiment")
    prompts = [ex.prompt for ex in task.validation[:24]]
    torch.manual_seed(2)
    models = [GPT(CONFIGS[0]).eval(), GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=260,
                                                    block_size=128)).eval()]
    if fn(models[0], prompts[:2]) is None:
        print("Exercise 4: not done yet — fill in verbalize.")
        return
    for i, model in enumerate(models):
        want = predict(model, task, tok, [Example(p, "") for p in prompts])
        got = fn(model, prompts)
        if list(got) == want:
            continue
        if not isinstance(got, (list, tuple)) or len(got) != len(prompts):
            print(f"Exercise 4: return one answer per prompt ({len(prompts)}), got {got!r:.80}.")
            return
        if set(got) - {"good", "bad"}:
            print(f"Exercise 4: answers must be 'good' or 'bad', got {sorted(set(got) - {'good', 'bad'})}.")
            return
        wrong = sum(g != w for g, w in zip(got, want, strict=True))
        print(f"Exercise 4: model {i + 1}: {wrong} of {len(prompts)} answers differ from predict's. Hint: encode each "
              f"prompt with add_bos=True, take the logits at the last position, compare the columns of "
              f"tok.encode('good')[0] and tok.encode('bad')[0].")
        return
    print("Exercise 4: correct — one forward pass, one position, two logits: the whole classifier.")
