"""Checks for the exercises of chapter 11 (many adapters at once). Each prints one line: not done yet, what is off,
or correct, and returns True when the answer is right.

The references are the library's own: a real sublayer under an `Average` block, the segments of
`kernels/multi_lora_triton.py` (recomputed here with the same two torch ops, so the check runs without Triton),
the parameters of real AdapterFusion layers, and a real mixed-adapter forward pass — each on small random models
of more than one shape.
"""

from __future__ import annotations

import torch

from minipeft.model import GPT, GPTConfig
from minipeft.tuners import AdapterConfig, Average, Fuse, LoraConfig, PromptTuningConfig, get_peft_model

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=40, block_size=32)


def _perturbed(pm, names) -> None:
    """Give every adapter non-zero weights (LoRA's B and the bottleneck's up-projection start at 0)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name in names:
            for p in pm._adapter_parameters(name).values():
                p.normal_(std=0.3)


def _two_pfeiffer(width: int = 16):
    torch.manual_seed(0)
    pm = get_peft_model(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=width, vocab_size=40, block_size=32)),
                        AdapterConfig.load("pfeiffer", reduction_factor=4), adapter_name="a")
    pm.add_adapter("b", AdapterConfig.load("pfeiffer", reduction_factor=4, non_linearity="tanh"))
    _perturbed(pm, ("a", "b"))
    return pm.eval()


def check_average_of_adapters(fn) -> bool:
    """Exercise 1: fn(o (B, T, C), deltas (N, B, T, C), weights) → o + Σᵢ wᵢ·δᵢ."""
    g = torch.Generator().manual_seed(11)
    if fn(torch.zeros(1, 2, 4), torch.zeros(2, 1, 2, 4), [0.5, 0.5]) is None:
        print("Exercise 1: not done yet — fill in average_of_adapters.")
        return False
    for width in (16, 24):
        pm = _two_pfeiffer(width)
        sub = pm.base_model.transformer.h[1].mlp
        x = torch.randn(2, 5, width, generator=g)
        for weights, normalize in (([0.3, 0.7], True), ([0.5, 0.5], True), ([1.0, -1.0], False)):
            pm.set_adapter(Average("a", "b", weights=weights, normalize_weights=normalize))
            with torch.no_grad():
                want = sub(x)  # (2, 5, width): the library's Average at this sublayer
                o = sub.base_layer(x)
                deltas = torch.stack([sub.adapters[n].delta(o) for n in ("a", "b")])  # (2, B, T, C)
                got = fn(o, deltas, weights)
            if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                print(f"Exercise 1: return a tensor shaped like o, {tuple(want.shape)}; got "
                      f"{getattr(got, 'shape', type(got).__name__)}. Sum the weighted updates over the adapters' "
                      f"dimension (0).")
                return False
            if torch.allclose(got, want, atol=1e-5):
                continue
            w = torch.tensor(weights).view(-1, 1, 1, 1)
            if torch.allclose(got, (w * (o + deltas)).sum(0), atol=1e-5):  # checked first: equal to Σ wᵢ·δᵢ at Σ wᵢ = 0
                hint = ("you averaged the adapters' full outputs o + δᵢ: that equals the block only when the weights "
                        "sum to 1. With [1, −1] (task arithmetic) o must be kept once: o + Σᵢ wᵢ·δᵢ")
            elif torch.allclose(got, (w * deltas).sum(0), atol=1e-5):
                hint = "the sublayer's own output o is missing: the block returns o plus the weighted updates"
            elif torch.allclose(got, o + deltas.mean(0), atol=1e-5):
                hint = "the weights are ignored: multiply δᵢ by wᵢ before summing"
            else:
                hint = f"max |yours − the sublayer's| = {(got - want).abs().max():.2e}"
            print(f"Exercise 1: not right yet at weights {weights} (width {width}): {hint}.")
            return False
    print("Exercise 1: correct — an Average block keeps the sublayer's output once and adds each adapter's update "
          "times its weight, which is why [1, −1] subtracts one adapter from another.")
    return True


def _segments_reference(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/multi_lora_triton.segments: a stable sort, then a binary search for each segment start."""
    index_sorted, order = torch.sort(index, stable=True)
    return order, torch.searchsorted(index_sorted, torch.arange(n + 1, dtype=index_sorted.dtype))


GROUP_CASES = [([1, -1, 0, 1, 1, 0], 3), ([2, 2, 0, -1, -1, 2, 0, 1], 3), ([0, 0, 0, 0], 2), ([-1, -1, 1], 2),
               ([3, 1, 4, 1, 0, 2, 0, -1, 4, 3, 1], 5)]


def check_group_rows(fn) -> bool:
    """Exercise 2: fn(adapter_index (M,), n_adapters) → (order (M,), seg_start (n + 1,))."""
    if fn(torch.tensor([0, -1, 0]), 1) is None:
        print("Exercise 2: not done yet — fill in group_rows.")
        return False
    for values, n in GROUP_CASES:
        index = torch.tensor(values)
        want_order, want_start = _segments_reference(index, n)
        got = fn(index.clone(), n)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            print(f"Exercise 2: return a pair (order, seg_start); got {type(got).__name__}.")
            return False
        order, start = (torch.as_tensor(t) for t in got)
        case = f"adapter_index {values}, {n} adapters"
        if start.numel() != n + 1:
            print(f"Exercise 2: {case}: seg_start needs n_adapters + 1 = {n + 1} entries (the last one is M), got "
                  f"{start.numel()}.")
            return False
        if not torch.equal(start.long(), want_start.long()):
            hint = ("rows with −1 belong to no adapter: they sort first, so seg_start[0] counts them"
                    if start[0].item() == 0 and want_start[0].item() > 0 else
                    "an adapter with no rows still has a segment, an empty one (seg_start[i] == seg_start[i+1])")
            print(f"Exercise 2: {case}: seg_start should be {want_start.tolist()}, got {start.tolist()}; {hint}.")
            return False
        if not torch.equal(order.long(), want_order.long()):
            same_groups = torch.equal(index[order.long()], index[want_order])
            hint = ("the groups are right but the rows inside a group are reordered: sort with stable=True"
                    if same_groups else
                    "order[p] must be the row at sorted position p (the argsort, not the sorted values)")
            print(f"Exercise 2: {case}: order should be {want_order.tolist()}, got {order.tolist()}; {hint}.")
            return False
    print("Exercise 2: correct — a stable sort and one binary search per adapter: no host sync and no copy of x, "
          "which is what lets the kernel run inside a CUDA graph.")
    return True


def check_fusion_parameters(fn) -> bool:
    """Exercise 3: fn(d, n_sites, fusion_type) → the trainable parameters of an AdapterFusion layer set."""
    if fn(16, 2, "dynamic") is None:
        print("Exercise 3: not done yet — fill in fusion_parameters.")
        return False
    for width, n_layer, architecture in ((16, 2, "pfeiffer"), (24, 3, "houlsby"), (32, 1, "pfeiffer")):
        for fusion_type in ("dynamic", "static"):
            torch.manual_seed(0)
            config = GPTConfig(n_layer=n_layer, n_head=2, n_embd=width, vocab_size=40, block_size=16)
            pm = get_peft_model(GPT(config), AdapterConfig.load(architecture, reduction_factor=4), adapter_name="a")
            pm.add_adapter("b", AdapterConfig.load(architecture, reduction_factor=4))
            pm.add_adapter_fusion(Fuse("a", "b"), fusion_type)
            pm.train_adapter_fusion(Fuse("a", "b"))
            want, _ = pm.get_nb_trainable_parameters()
            n_sites = n_layer * (2 if architecture == "houlsby" else 1)
            got = fn(width, n_sites, fusion_type)
            if got == want:
                continue
            per_site = want // n_sites
            hint = (f"per sublayer a {fusion_type} fusion has {per_site:,}: W_Q and W_K are d × d with a bias each"
                    + (", W_V is d × d without a bias" if fusion_type == "dynamic" else ", and there is no W_V"))
            if got == want - 2 * width * n_sites:
                hint = "the biases of W_Q and W_K are missing (2·d per sublayer)"
            print(f"Exercise 3: {architecture}, d = {width}, {n_sites} sites, {fusion_type}: the model has {want:,} "
                  f"trainable parameters, you said {got}; {hint}.")
            return False
    d = 768  # GPT-2 small
    pfeiffer = 2 * d * (d // 16) + d // 16 + d  # one Pfeiffer adapter at rf = 16
    print(f"Exercise 3: correct — 3·d² + 2·d per sublayer (2·d² + 2·d static), whatever the number of adapters "
          f"fused: at GPT-2 small's d = {d} that is {fn(d, 1):,} per sublayer, {fn(d, 1) / pfeiffer:.0f}× a Pfeiffer "
          f"adapter (rf = 16) at the same sublayer.")
    return True


def check_mixed_batch_by_loop(fn) -> bool:
    """Exercise 4: fn(pm, idx (B, T), adapter_names) → logits (B, T, vocab) computed row by row."""
    torch.manual_seed(0)
    pm = get_peft_model(GPT(TINY), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="lora")
    pm.add_adapter("bottleneck", AdapterConfig.load("houlsby", reduction_factor=4))
    pm.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=3))
    _perturbed(pm, ("lora", "bottleneck"))
    pm.eval()
    g = torch.Generator().manual_seed(4)
    cases = [["lora", "__base__", "prompt", "bottleneck"], ["prompt", "prompt", "lora"],
             ["bottleneck", "lora", "__base__", "lora", "prompt"]]
    idx0 = torch.randint(0, TINY.vocab_size, (len(cases[0]), 6), generator=g)
    if fn(pm, idx0, cases[0]) is None:
        print("Exercise 4: not done yet — fill in mixed_batch_by_loop.")
        return False
    for names in cases:
        idx = torch.randint(0, TINY.vocab_size, (len(names), 7), generator=g)
        with torch.no_grad():
            want = pm(idx, adapter_names=names)[0]
            got = fn(pm, idx, names)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            print(f"Exercise 4: return one (B, T, vocab) tensor, {tuple(want.shape)}; got "
                  f"{getattr(got, 'shape', type(got).__name__)}. Stack the rows' logits (each row alone gives "
                  f"(1, T, vocab)).")
            return False
        bad = [r for r in range(len(names)) if not torch.allclose(got[r], want[r], atol=1e-5)]
        if bad:
            name = names[bad[0]]
            hint = ("for '__base__' run the row inside `with pm.disable_adapter():`" if name == "__base__" else
                    f"run row {bad[0]} alone with `pm.set_adapter({name!r})` first")
            print(f"Exercise 4: rows {bad} of {names} differ from the mixed batch (row {bad[0]} uses {name!r}); "
                  f"{hint}.")
            return False
    print("Exercise 4: correct — B passes of one row give what one mixed pass gives: the mixed batch changes the "
          "cost, never the answer.")
    return True
