"""Bottleneck adapters: placement (Pfeiffer / Houlsby), zero-init identity, counts, stacking, learning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from learning import halfway, learn_task
from tolerances import assert_close

from minipeft.model import GPT, GPTConfig
from minipeft.tuners import AdapterConfig, BottleneckAdapter, LoraConfig, get_peft_model
from minipeft.tuners.bottleneck import BottleneckLayer

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=64)


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def idx_batch() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))


@given(st.integers(1, 64), st.sampled_from(["relu", "gelu", "gelu_new", "swish", "tanh"]))
def test_adapter_is_identity_at_init_and_count_is_closed_form(rf, act):
    d = 64
    adapter = BottleneckAdapter(d, rf, act)
    h = torch.randn(3, 5, d)
    assert torch.equal(adapter(h), h)
    m = d // rf
    assert sum(p.numel() for p in adapter.parameters()) == 2 * d * m + m + d
    assert dict(adapter.named_parameters()).keys() == {"adapter_down.weight", "adapter_down.bias",
                                                        "adapter_up.weight", "adapter_up.bias"}


def test_adapter_math():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(8, 2, "tanh").double()
    for p in adapter.parameters():
        torch.nn.init.normal_(p)
    h = torch.randn(4, 8, dtype=torch.float64)
    down, up = adapter.adapter_down, adapter.adapter_up
    assert_close(adapter(h), h + (torch.tanh(h @ down.weight.T + down.bias) @ up.weight.T + up.bias))


@pytest.mark.parametrize("architecture, sites", [("pfeiffer", ("mlp",)), ("houlsby", ("attn", "mlp"))])
def test_placement_counts_and_identity(architecture, sites):
    m = small_gpt()
    idx = idx_batch()
    ref, _ = m(idx)
    pm = get_peft_model(m, AdapterConfig.load(architecture, reduction_factor=8))
    for block in m.transformer.h:
        for site in ("attn", "mlp"):
            assert isinstance(getattr(block, site), BottleneckLayer) == (site in sites)
        assert not isinstance(block.ln_1, BottleneckLayer) and not isinstance(block.ln_2, BottleneckLayer)
    d, mid = CFG.n_embd, CFG.n_embd // 8
    per_adapter = 2 * d * mid + mid + d
    assert pm.get_nb_trainable_parameters()[0] == CFG.n_layer * len(sites) * per_adapter
    assert torch.equal(pm(idx)[0], ref)  # zero-init up-projection: exactly the base


def test_adapter_acts_on_the_sublayer_output_before_the_residual_add():
    """Block: x + adapter(mlp(ln_2(x))); checked against a hand-written block forward."""
    m = small_gpt()
    pm = get_peft_model(m, AdapterConfig.load("pfeiffer", reduction_factor=4, non_linearity="gelu"))
    for p in pm.adapter_state_dict("default").values():
        p.normal_(std=0.1)
    block = m.transformer.h[0]
    x = torch.randn(2, 5, CFG.n_embd)
    h = x + block.attn(block.ln_1(x), None)  # attn is not wrapped under Pfeiffer
    o = block.mlp.base_layer(block.ln_2(h))
    expected = h + block.mlp.adapters["default"](o)
    assert_close(block(x, None, None, 0), expected)


def test_stacking_applies_adapters_in_order():
    m = small_gpt()
    pm = get_peft_model(m, AdapterConfig.load("pfeiffer", reduction_factor=4), adapter_name="a")
    pm.add_adapter("b", AdapterConfig.load("pfeiffer", reduction_factor=8, non_linearity="tanh"))
    for name in ("a", "b"):
        for p in pm.adapter_state_dict(name).values():
            p.normal_(std=0.2)
    pm.set_adapter(["a", "b"])
    layer = m.transformer.h[1].mlp
    assert layer.active_adapters == ["a", "b"]
    x = torch.randn(2, 4, CFG.n_embd)
    o = layer.base_layer(x)
    assert_close(layer(x), layer.adapters["b"](layer.adapters["a"](o)))
    pm.set_adapter(["b", "a"])
    assert_close(layer(x), layer.adapters["a"](layer.adapters["b"](o)))
    assert not torch.allclose(layer.adapters["a"](layer.adapters["b"](o)), layer.adapters["b"](layer.adapters["a"](o)))


def test_bottleneck_with_lora_and_disable():
    m = small_gpt()
    idx = idx_batch()
    ref, _ = m(idx)
    pm = get_peft_model(m, AdapterConfig.load("houlsby"))
    pm.add_adapter("lora", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    for p in pm.adapter_state_dict("default").values():
        p.normal_(std=0.1)
    pm.set_adapter(["default", "lora"])
    out, _ = pm(idx)
    assert not torch.allclose(out, ref)
    with pm.disable_adapter():
        assert torch.equal(pm(idx)[0], ref)
    pm.delete_adapter("default")
    assert not any(isinstance(mod, BottleneckLayer) for mod in m.modules())
    pm.delete_adapter("lora")
    assert torch.equal(pm(idx)[0], ref)


def test_generate_runs_through_wrapped_attention():
    m = small_gpt()
    idx = idx_batch()
    expected = m.generate(idx, max_new_tokens=4)
    pm = get_peft_model(m, AdapterConfig.load("houlsby"))
    assert torch.equal(pm.generate(idx, max_new_tokens=4), expected)


def test_bad_reduction_factor():
    with pytest.raises(ValueError, match="reduction_factor"):
        AdapterConfig.load("pfeiffer", reduction_factor=0)
    with pytest.raises(ValueError, match="reduction_factor"):
        BottleneckAdapter(16, 32)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["pfeiffer", "houlsby"])
def test_bottleneck_learns_sentiment(pretrained_model, tokenizer, architecture):
    pm = get_peft_model(pretrained_model, AdapterConfig.load(architecture, reduction_factor=4))
    chance, acc = learn_task(pm, tokenizer, "sentiment", steps=150, lr=1e-2)
    assert acc >= halfway(chance), acc
