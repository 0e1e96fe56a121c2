"""Checks for the exercises of chapter 3 (LoRA). Each prints one line: not done yet, what is off, or correct.

The references are the library's own: a real `LoraLinear` for the forward pass, the trainable parameters of a
`get_peft_model` model for the count, and the weight `merge_and_unload()` leaves in a plain GPT for the merge.
Every check runs on several shapes or models (small GPTs with random weights), so a hard-coded answer fails.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from minipeft.model import GPT, GPTConfig
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

# (in, out, r, alpha, bias): more than one shape and scaling, with and without a bias
FORWARD_CASES = [(16, 48, 4, 8.0, True), (24, 24, 2, 2.0, False), (32, 8, 8, 32.0, True)]


def _lora_layer(d_in: int, d_out: int, r: int, alpha: float, bias: bool, g: torch.Generator) -> LoraLinear:
    """A LoraLinear with random W₀, b, A and B (B is zero at init; here it is random so that ΔW ≠ 0)."""
    linear = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5)
        if bias:
            linear.bias.copy_(torch.randn(d_out, generator=g))
    layer = LoraLinear(linear)
    layer.add_adapter("ex", r=r, lora_alpha=alpha)
    layer.active_adapters = ["ex"]
    with torch.no_grad():
        layer.lora_A["ex"].weight.copy_(torch.randn(r, d_in, generator=g) / d_in ** 0.5)
        layer.lora_B["ex"].weight.copy_(torch.randn(d_out, r, generator=g))
    return layer


def check_lora_forward(fn) -> None:
    """Exercise 1: fn(x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r), scaling) → (..., out)."""
    g = torch.Generator().manual_seed(3)
    probe = _lora_layer(16, 48, 4, 8.0, True, g)
    if fn(torch.randn(2, 16, generator=g), probe.weight, probe.bias, probe.lora_A["ex"].weight,
          probe.lora_B["ex"].weight, 2.0) is None:
        print("Exercise 1: not done yet — fill in lora_forward.")
        return
    for d_in, d_out, r, alpha, bias in FORWARD_CASES:
        layer = _lora_layer(d_in, d_out, r, alpha, bias, g)
        W, b, A, B = layer.weight, layer.bias, layer.lora_A["ex"].weight, layer.lora_B["ex"].weight
        s = layer.scaling["ex"]
        x = torch.randn(2, 5, d_in, generator=g)  # (batch, tokens, in)
        case = f"(in={d_in}, out={d_out}, r={r}, α={alpha:g}, bias {'yes' if bias else 'None'})"
        with torch.no_grad():
            want = layer(x)  # (2, 5, out)
            got = fn(x, W, b, A, B, s)
            if not isinstance(got, torch.Tensor):
                print(f"Exercise 1: {case} return a tensor, got {type(got).__name__}.")
                return
            if got.shape != want.shape:
                print(f"Exercise 1: {case} the output should have shape {tuple(want.shape)} (x's leading dims, "
                      f"then out), got {tuple(got.shape)}. W is (out, in): multiply by its transpose.")
                return
            if torch.allclose(got, want, atol=1e-5):
                continue
            base = x @ W.T + (b if b is not None else 0)  # (2, 5, out)
            if torch.allclose(got, base, atol=1e-5):
                hint = "the LoRA term is missing: add scaling·(x·Aᵀ)·Bᵀ"
            elif torch.allclose(got, base + (x @ A.T) @ B.T, atol=1e-5):
                hint = f"the LoRA term is missing its scaling (α/r = {s:g} here)"
            elif b is not None and torch.allclose(got, want - b, atol=1e-5):
                hint = "the bias b is missing"
            else:
                hint = (f"max |yours − LoraLinear| = {(got - want).abs().max():.2e}; first x·Aᵀ (…, r), then ·Bᵀ "
                        f"(…, out)")
            print(f"Exercise 1: {case}: {hint}.")
            return
    print("Exercise 1: correct — the same outputs as minipeft's LoraLinear on three shapes, with and without a bias.")


# (n_layer, n_embd, r, target_modules): the names match a module whose full name equals them or ends in "." + name
# (full names: transformer.h.0.attn.c_attn, …), so short names ("c_fc") and qualified ones ("mlp.c_fc") both count
COUNT_CASES = [(4, 160, 8, ["c_attn"]), (2, 64, 4, "all-linear"), (3, 32, 16, ["attn.c_proj"]),
               (2, 48, 2, ["c_attn", "c_fc"]), (2, 32, 4, ["c_proj"]), (2, 32, 4, ["attn.c_attn"]),
               (3, 48, 2, ["mlp.c_fc", "attn.c_proj"])]


def _reference_count(n_layer: int, n_embd: int, r: int, targets) -> int:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=n_layer, n_head=2, n_embd=n_embd))
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets)).get_nb_trainable_parameters()[0]


def check_lora_param_count(fn) -> None:
    """Exercise 2: fn(n_layer, n_embd, r, targets) → the trainable parameters of LoRA on a GPT of that size."""
    if fn(4, 160, 8, ["c_attn"]) is None:
        print("Exercise 2: not done yet — fill in lora_param_count.")
        return
    for n_layer, n_embd, r, targets in COUNT_CASES:
        want = _reference_count(n_layer, n_embd, r, targets)
        got = fn(n_layer, n_embd, r, targets)
        if got == want:
            continue
        case = f"n_layer={n_layer}, n_embd={n_embd}, r={r}, targets={targets!r}"
        d = n_embd
        per_layer = {"c_attn": r * (d + 3 * d), "attn.c_proj": r * 2 * d, "c_fc": r * (d + 4 * d),
                     "mlp.c_proj": r * (4 * d + d)}
        if targets == ["c_proj"] and got == n_layer * per_layer["attn.c_proj"]:
            hint = ("'c_proj' matches every module whose name ends in '.c_proj': attention's c_proj (C → C) *and* "
                    "the MLP's c_proj (4C → C)")
        elif got == 0 and any("." in t for t in targets):
            hint = ("a qualified name matches too: compare each target with the Linear's full name "
                    "(transformer.h.0.attn.c_attn, …), which must equal it or end in '.' + target")
        elif got * n_layer == want:
            hint = "that is one block's count: every block has its own copy of each targeted Linear"
        elif isinstance(got, (int, float)) and got > want and (got - want) % n_layer == 0:
            hint = "LoRA adds no biases, and W₀ itself is frozen: count only A (r × in) and B (out × r)"
        else:
            hint = ("per targeted Linear r·(in + out); c_attn is C → 3C, attn.c_proj C → C, c_fc C → 4C, "
                    "mlp.c_proj 4C → C; 'all-linear' is all four (the tied lm_head is not a target)")
        print(f"Exercise 2: {case}: get_peft_model counts {want:,d} trainable parameters, you said {got!r}: {hint}.")
        return
    print(f"Exercise 2: correct — the same counts as get_peft_model on {len(COUNT_CASES)} configurations, 'c_proj' "
          "matching both projections and qualified names such as 'attn.c_attn' included.")


def _merged_case(n_layer: int, n_embd: int, r: int, alpha: float, seed: int):
    """(a LoRA model with random B on c_attn, its plain GPT after merge_and_unload)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, n_layer=n_layer, n_head=2, n_embd=n_embd))
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn"], init_lora_weights=False))
    merged = copy.deepcopy(pm).merge_and_unload()  # a plain GPT; pm keeps its LoraLinear layers
    return pm, merged


def _factors(layer: LoraLinear):
    """(W₀, A, B, scaling) of a LoraLinear's "default" adapter."""
    return layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def check_merge_weight(fn) -> None:
    """Exercise 3: fn(W (out, in), A (r, in), B (out, r), scaling) → the merged weight (out, in)."""
    pm, merged = _merged_case(2, 32, 4, 8.0, 0)
    if fn(*_factors(pm.base_model.transformer.h[0].attn.c_attn)) is None:
        print("Exercise 3: not done yet — fill in merge_weight.")
        return
    for n_layer, n_embd, r, alpha, seed in [(2, 32, 4, 8.0, 0), (3, 48, 2, 6.0, 1), (2, 16, 8, 4.0, 2)]:
        pm, merged = _merged_case(n_layer, n_embd, r, alpha, seed)
        for i in range(n_layer):
            W, A, B, s = _factors(pm.base_model.transformer.h[i].attn.c_attn)  # (3C, C), (r, C), (3C, r), α/r
            want = merged.transformer.h[i].attn.c_attn.weight  # (3C, C)
            with torch.no_grad():
                got = fn(W, A, B, s)
            case = f"(n_embd={n_embd}, r={r}, α={alpha:g}, block {i})"
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                print(f"Exercise 3: {case} the merged weight has W's shape {tuple(want.shape)} (out, in), got {shape}. "
                      f"B·A is (out, r)·(r, in).")
                return
            if torch.allclose(got, want, atol=1e-5):
                continue
            if torch.allclose(got, W + B @ A, atol=1e-5):
                hint = f"the update is missing its scaling α/r = {s:g}"
            elif torch.allclose(got, s * B @ A, atol=1e-5):
                hint = "that is ΔW alone: the merged weight is W₀ + ΔW"
            else:
                hint = f"max |yours − merged model| = {(got - want).abs().max():.2e}; merged = W₀ + (α/r)·B·A"
            print(f"Exercise 3: {case}: {hint}.")
            return
    print("Exercise 3: correct — your W₀ + (α/r)·B·A is the weight merge_and_unload() leaves in the plain GPT, "
          "block by block, on three models.")
