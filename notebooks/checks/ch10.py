"""Checks for the exercises of chapter 10 (your model, your data). Each prints one line: not done yet, what is off,
or correct, and returns True when the answer is right.

The references are the library's own, on small models and files made here: the trainable parameters of
`get_peft_model` on GPT-2-shaped models of several sizes, the targets `load_jsonl` builds from a JSONL file, and
the tensors `GPT.save_pretrained` writes for a merged LoRA model (transformers' layout).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from minipeft import GPT, GPTConfig, LoraConfig, get_peft_model
from minipeft.jsonl import load_jsonl
from minipeft.tokenizer import ByteTokenizer

LORA_CASES = [(2, 64, 8), (4, 160, 4), (3, 48, 16), (1, 32, 1)]  # (n_layer, n_embd, r)


def check_lora_trainable_parameters(fn) -> bool:
    """Exercise 1: fn(n_layer, n_embd, r) → LoRA parameters on every Linear of GPT-2's blocks."""
    if fn(2, 64, 8) is None:
        print("Exercise 1: not done yet — fill in lora_trainable_parameters.")
        return False
    for n_layer, n_embd, r in LORA_CASES:
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=50, block_size=16))
        pm = get_peft_model(gpt, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        want, _ = pm.get_nb_trainable_parameters()
        got = fn(n_layer, n_embd, r)
        if got == want:
            continue
        C = n_embd
        if got == want // n_layer:
            hint = "that is one block's count: every block has its own four adapted Linears"
        elif got == want + r * (C + 50):
            hint = "the output head is not adapted ('all-linear' means the Linears of the blocks)"
        else:
            hint = ("a LoRA pair on a Linear (in → out) has r·in + r·out parameters; GPT-2's block has c_attn "
                    "(C → 3C), attn.c_proj (C → C), mlp.c_fc (C → 4C) and mlp.c_proj (4C → C)")
        print(f"Exercise 1: n_layer = {n_layer}, n_embd = {C}, r = {r}: get_peft_model trains {want:,} parameters, "
              f"you said {got}; {hint}.")
        return False
    gpt2_small = 124_439_808  # GPT-2 small's parameters (the output head tied to the embedding)
    print(f"Exercise 1: correct — linear in the width and the rank: at GPT-2 small's 12 blocks of 768 and r = 8, "
          f"{fn(12, 768, 8):,} parameters, {fn(12, 768, 8) / gpt2_small:.2%} of its {gpt2_small / 1e6:.0f}M.")
    return True


def check_supervised_tokens(fn, tokenizer=None) -> bool:
    """Exercise 2: fn(tokenizer, prompt, completion) → the token ids the loss is computed on, in order."""
    tokenizers = [ByteTokenizer()] + ([tokenizer] if tokenizer is not None else [])
    if fn(tokenizers[0], "Translate cat:", " chat") is None:
        print("Exercise 2: not done yet — fill in supervised_tokens.")
        return False
    rows = [{"prompt": "Translate cat:", "completion": " chat"},
            {"prompt": "The French for water is", "completion": " eau"},
            {"prompt": "English red ->", "completion": " rouge, as in the sun"}]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for tok in tokenizers:
            data = load_jsonl(path, tok)
            for i, row in enumerate(rows):
                want = [t for t in data.row_targets(i) if t != -100]  # the targets that count in the loss
                got = list(fn(tok, row["prompt"], row["completion"]))
                if got == want:
                    continue
                completion = tok.encode(row["completion"])
                if got == completion:
                    hint = "the end-of-text token after the completion is learned too: it teaches the model to stop"
                elif got[: len(completion)] != completion and completion == got[-len(completion) - 1:-1]:
                    hint = "only the completion (and end-of-text) is supervised, never the prompt"
                else:
                    hint = "encode the completion on its own and add the end-of-text id (tokenizer.eos_token_id)"
                print(f"Exercise 2: for {row} ({type(tok).__name__}) load_jsonl supervises {want}, you said {got}; "
                      f"{hint}.")
                return False
    print("Exercise 2: correct — a completion row supervises its completion and end-of-text: the loss never asks "
          "the model to predict the prompt.")
    return True


def _lora_model(n_layer: int, n_embd: int, r: int, seed: int):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, vocab_size=50, block_size=16))
    pm = get_peft_model(gpt, LoraConfig(r=r, lora_alpha=3 * r, target_modules="all-linear"))
    with torch.no_grad():  # LoRA's B starts at 0; give it values, so the merge changes something
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return pm


def check_merged_conv1d_weight(fn) -> bool:
    """Exercise 3: fn(W (out, in), A (r, in), B (out, r), scaling) → the merged weight as GPT-2's files store it."""
    g = torch.Generator().manual_seed(3)
    if fn(torch.randn(6, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g), 2.0) is None:
        print("Exercise 3: not done yet — fill in merged_conv1d_weight.")
        return False
    for n_layer, n_embd, r, seed in ((1, 32, 4, 0), (2, 48, 8, 1)):
        pm = _lora_model(n_layer, n_embd, r, seed)
        layers = {f"transformer.h.{i}.{name}": pm.base_model.transformer.h[i].get_submodule(name)
                  for i in range(n_layer) for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")}
        inputs = {key: (layer.base_layer.weight.detach().clone(), layer.lora_A["default"].weight.detach().clone(),
                        layer.lora_B["default"].weight.detach().clone(), layer.scaling["default"])
                  for key, layer in layers.items()}
        with tempfile.TemporaryDirectory() as tmp:
            pm.merge_and_unload().save_pretrained(tmp)
            stored = load_file(str(Path(tmp) / "model.safetensors"))
        for key, (W, A, B, s) in inputs.items():
            want = stored[f"{key}.weight"]  # (in, out): transformers' Conv1D layout
            got = fn(W, A, B, s)
            if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=1e-5):
                continue
            if not isinstance(got, torch.Tensor):
                hint = f"return a tensor, got {type(got).__name__}"
            elif got.shape == want.shape[::-1] and torch.allclose(got.T, want, atol=1e-5):
                hint = ("that is the merged weight in minipeft's (out, in) layout; GPT-2's files store Conv1D "
                        "weights transposed, (in, out)")
            elif got.shape == want.shape and torch.allclose(got, (W + B @ A).T, atol=1e-5):
                hint = "the scaling α/r is missing from the low-rank term"
            elif got.shape != want.shape:
                hint = f"the stored weight has shape {tuple(want.shape)} (in, out), yours {tuple(got.shape)}"
            else:
                hint = f"max |yours − stored| = {(got - want).abs().max():.2e}; the update is s·B·A, (out, r)·(r, in)"
            print(f"Exercise 3: {key} (n_embd {n_embd}, r {r}): {hint}.")
            return False
    print("Exercise 3: correct — W + s·B·A, transposed into transformers' (in, out) Conv1D layout: what `minipeft "
          "merge` writes, so that any GPT-2 loader reads a plain model.")
    return True
