"""Checks for the exercises of chapter 4 (bottleneck adapters). Each prints one line: not done yet, what is off,
or correct.

The references are the library's own: a real `BottleneckAdapter` for the forward pass and the initialisation,
and the trainable parameters of `get_peft_model` models (small GPTs with random weights) for the counts. Every
check runs on several shapes, so a hard-coded answer fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minipeft.model import GPT, GPTConfig
from minipeft.tuners import AdapterConfig, get_peft_model
from minipeft.tuners.bottleneck import BottleneckAdapter

FORWARD_CASES = [(32, 4), (48, 6), (20, 2)]  # (d, reduction_factor)


def _random_adapter(d: int, rf: int, g: torch.Generator) -> BottleneckAdapter:
    """A BottleneckAdapter (ReLU) with every weight and bias random, as after training (at init W_up = 0)."""
    adapter = BottleneckAdapter(d, rf, "relu")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return adapter


def check_bottleneck_forward(fn) -> None:
    """Exercise 1: fn(h (..., d), W_down (m, d), b_down (m,), W_up (d, m), b_up (d,)) → (..., d)."""
    g = torch.Generator().manual_seed(4)
    probe = _random_adapter(32, 4, g)
    if fn(torch.randn(2, 32, generator=g), probe.adapter_down.weight, probe.adapter_down.bias,
          probe.adapter_up.weight, probe.adapter_up.bias) is None:
        print("Exercise 1: not done yet — fill in bottleneck_forward.")
        return
    for d, rf in FORWARD_CASES:
        adapter = _random_adapter(d, rf, g)
        Wd, bd = adapter.adapter_down.weight, adapter.adapter_down.bias  # (m, d), (m,)
        Wu, bu = adapter.adapter_up.weight, adapter.adapter_up.bias      # (d, m), (d,)
        h = torch.randn(2, 5, d, generator=g)  # (batch, tokens, d)
        case = f"(d={d}, reduction factor {rf}: m={d // rf})"
        with torch.no_grad():
            want = adapter(h)
            got = fn(h, Wd, bd, Wu, bu)
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                print(f"Exercise 1: {case} the output should have h's shape {tuple(want.shape)}, got {shape}.")
                return
            if torch.allclose(got, want, atol=1e-5):
                continue
            delta = want - h
            if torch.allclose(got, delta, atol=1e-5):
                hint = "the residual is missing: the adapter returns h + up(f(down(h)))"
            elif torch.allclose(got, h + F.linear(F.gelu(F.linear(h, Wd, bd)), Wu, bu), atol=1e-5):
                hint = "the non-linearity here is ReLU (the library's default), not GELU"
            elif torch.allclose(got, h + F.linear(F.linear(h, Wd, bd), Wu, bu), atol=1e-5):
                hint = "the non-linearity is missing: f = ReLU between the two projections"
            elif torch.allclose(got, want - bu, atol=1e-5):
                hint = "the up-projection's bias b_up is missing"
            else:
                hint = f"max |yours − BottleneckAdapter| = {(got - want).abs().max():.2e}; down: h·W_downᵀ + b_down"
            print(f"Exercise 1: {case}: {hint}.")
            return
    print("Exercise 1: correct — the same outputs as minipeft's BottleneckAdapter on three widths.")


# (architecture, n_layer, d, reduction_factor): d // rf is not always exact
COUNT_CASES = [("pfeiffer", 4, 160, 16), ("houlsby", 4, 160, 16), ("pfeiffer", 2, 48, 5), ("houlsby", 3, 64, 4),
               ("houlsby", 2, 30, 7)]


def _reference_count(arch: str, n_layer: int, d: int, rf: int) -> int:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=n_layer, n_head=2, n_embd=d))
    config = AdapterConfig.load(arch, reduction_factor=rf)
    return get_peft_model(model, config).get_nb_trainable_parameters()[0]


def check_adapter_param_count(fn) -> None:
    """Exercise 2: fn(architecture, n_layer, d, reduction_factor) → trainable parameters of the adapters."""
    if fn("pfeiffer", 4, 160, 16) is None:
        print("Exercise 2: not done yet — fill in adapter_param_count.")
        return
    for arch, n_layer, d, rf in COUNT_CASES:
        want = _reference_count(arch, n_layer, d, rf)
        got = fn(arch, n_layer, d, rf)
        if got == want:
            continue
        per_block = 2 if arch == "houlsby" else 1
        m = d // rf
        case = f"{arch}, n_layer={n_layer}, d={d}, rf={rf}"
        if got == n_layer * (2 * d * m + m + d) and per_block == 2:
            hint = "Houlsby puts two adapters in each block (after attention and after the MLP)"
        elif got == per_block * n_layer * 2 * d * m:
            hint = "the biases are trainable too: b_down (m numbers) and b_up (d numbers) per adapter"
        elif got == per_block * (2 * d * m + m + d):
            hint = "that is one block's count: every block has its own adapter(s)"
        elif d % rf and isinstance(got, (int, float)) and abs(got - want) < per_block * n_layer * (2 * d + 1):
            hint = f"the bottleneck is m = d // rf = {m} (integer division), not d / rf = {d / rf:.2f}"
        else:
            hint = "per adapter 2·d·m + m + d with m = d // rf; Pfeiffer has one adapter per block, Houlsby two"
        print(f"Exercise 2: {case}: get_peft_model counts {want:,d}, you said {got!r}: {hint}.")
        return
    print("Exercise 2: correct — the same counts as get_peft_model for Pfeiffer and Houlsby on five configurations.")


def check_identity_init(fn) -> None:
    """Exercise 3: fn(adapter) sets a BottleneckAdapter's parameters in place so that it is the identity and can
    still learn (its up-projection's weight W_up gets a nonzero gradient from the first step)."""
    g = torch.Generator().manual_seed(7)
    for d, rf in FORWARD_CASES:
        adapter = _random_adapter(d, rf, g)
        before = {k: p.detach().clone() for k, p in adapter.named_parameters()}
        result = fn(adapter)
        unchanged = all(torch.equal(p, before[k]) for k, p in adapter.named_parameters())
        if result is None and unchanged:
            print("Exercise 3: not done yet — fill in identity_init.")
            return
        h = torch.randn(2, 5, d, generator=g)  # (batch, tokens, d)
        case = f"(d={d}, m={d // rf})"
        out = adapter(h)
        if not torch.equal(out, h):
            up_zero = bool((adapter.adapter_up.weight == 0).all())
            hint = ("W_up is zero but b_up is not: the bias is added to every output" if up_zero else
                    "make the up-projection output zero: W_up = 0 and b_up = 0, so up(·) is 0 whatever f(down(h)) is")
            print(f"Exercise 3: {case} the adapter is not the identity: max |adapter(h) − h| = "
                  f"{(out - h).abs().max():.2e}. {hint}.")
            return
        loss = (out * torch.randn(out.shape, generator=g)).sum()  # any loss that depends on the output
        loss.backward()
        grads = {k: (p.grad.abs().sum().item() if p.grad is not None else 0.0) for k, p in adapter.named_parameters()}
        if grads["adapter_up.weight"] == 0:
            print(f"Exercise 3: {case} the adapter is the identity, but it cannot learn: W_up gets no gradient, "
                  f"because ReLU(down(h)) is 0 everywhere. Keep W_down random (e.g. Kaiming-uniform, as nn.Linear "
                  f"does) and b_down = 0: only the up-projection needs to start at zero.")
            return
    print("Exercise 3: correct — the adapter returns h exactly, and W_up gets a gradient from the first step "
          "(W_down stays random: with it at zero too, ReLU(0) = 0 would leave nothing to learn from).")
