"""get_peft_model / PeftModel: target matching, freezing, named adapters, composition, counts, errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from minipeft import kernels
from minipeft.model import GPT, GPTConfig
from minipeft.quant import quantize_model
from minipeft.targets import find_target_modules
from minipeft.tuners import AdapterConfig, Average, LoraConfig, LoraLinear, PeftModel, get_peft_model
from minipeft.tuners.layer import AdapterLayer

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def base_hashes(model: GPT) -> dict[str, str]:
    """sha256 of every base tensor (parameters and buffers), by the plain model's name."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(k in name for k in ("lora_", "adapter_")):
            continue
        clean = ".".join(p for p in name.split(".") if p != "base_layer")
        out[clean] = hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return out


def idx_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- target matching
# (the matcher itself: tests/test_targets.py)
def test_regex_matching_nothing_and_missing_name_raise_with_available_names():
    m = small_gpt()
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] not found.*c_attn.*c_fc"):
        get_peft_model(m, LoraConfig(target_modules=["c_attn", "q_proj"]))
    with pytest.raises(ValueError, match=r"regex 'c_att' fully matches no Linear.*c_attn"):
        get_peft_model(small_gpt(), LoraConfig(target_modules="c_att"))
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(small_gpt(), LoraConfig(target_modules=["attn.c"]))  # partial segment: no match


def test_wraps_in_place_and_freezes_the_base():
    m = small_gpt()
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["c_attn"]))
    assert pm.base_model is m  # no copy
    assert isinstance(m.transformer.h[0].attn.c_attn, LoraLinear)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert pm.config is m.config  # attribute reads fall through to the GPT


# ---------------------------------------------------------------------------------------- counts
@given(st.integers(1, 16), st.sampled_from([["c_attn"], ["c_fc", "c_proj"], "all-linear"]))
def test_lora_trainable_count_is_r_times_in_plus_out(r, targets):
    pm = get_peft_model(small_gpt(), LoraConfig(r=r, target_modules=targets))
    expected = sum(r * (mod.in_features + mod.out_features)
                   for _, _, mod in find_target_modules(pm.base_model, targets))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == expected
    assert total == small_gpt().num_parameters() + expected


def test_print_trainable_parameters_matches_peft_format(capsys):
    pm = get_peft_model(small_gpt(), LoraConfig(r=8, target_modules=["c_attn"]))
    pm.print_trainable_parameters()
    t, a = pm.get_nb_trainable_parameters()
    line = f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}\n"
    assert capsys.readouterr().out == line


# ---------------------------------------------------------------------------------------- adapters
def test_zero_init_identity_and_disable_is_the_base_exactly():
    m = small_gpt()
    idx = idx_batch()
    ref, _ = m(idx)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(pm(idx)[0], ref)
    pm.add_adapter("rand", LoraConfig(r=3, target_modules=["c_fc"], init_lora_weights=False))
    pm.add_adapter("bn", AdapterConfig.load("houlsby", reduction_factor=4))
    for p in pm.adapter_state_dict("bn").values():
        p.normal_()  # make the bottleneck non-trivial too
    pm.set_adapter(["rand", "bn"])
    out, _ = pm(idx)
    assert not torch.allclose(out, ref)
    with pm.disable_adapter():
        assert torch.equal(pm(idx)[0], ref)
    assert torch.equal(pm(idx)[0], out)


def test_base_weights_bit_identical_through_add_train_swap_delete():
    m = small_gpt()
    before = base_hashes(m)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    pm.add_adapter("bn", AdapterConfig.load("pfeiffer", reduction_factor=4))
    pm.add_adapter("l2", LoraConfig(r=2, target_modules=["c_attn"]))
    idx = idx_batch()
    for name in ("default", "bn", "l2", ["default", "bn"]):
        pm.set_adapter(name)
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            _, loss = pm(idx, targets=idx)
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert base_hashes(m) == before
    pm.delete_adapter("default")
    pm.delete_adapter("bn")
    assert base_hashes(m) == before
    pm.delete_adapter("l2")
    assert not any(isinstance(mod, LoraLinear) for mod in m.modules())  # fully unwrapped
    assert base_hashes(m) == before


def test_only_active_adapter_parameters_get_gradients():
    pm = get_peft_model(small_gpt(), LoraConfig(r=4, target_modules=["c_attn"]))
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["c_fc"]))
    pm.add_adapter("bn", AdapterConfig.load("houlsby"))
    pm.set_adapter(["default", "bn"])
    pm.train()
    _, loss = pm(idx_batch(), targets=idx_batch(2))
    loss.backward()
    active = set(pm._adapter_parameters("default").values()) | set(pm._adapter_parameters("bn").values())
    got = {p for p in pm.parameters() if p.grad is not None}
    assert got == {p for p in active if p.requires_grad} == active
    # LoRA B is zero, so A's gradient is zero: but it is *there*; B's is non-zero
    assert all(p.grad.abs().sum() > 0 for k, p in pm._adapter_parameters("default").items() if "lora_B" in k)


def test_names_and_aliases():
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"]))
    assert pm.active_adapters == ["default"]  # add_adapter does not activate
    for setter in (pm.set_adapter, pm.train_adapter, pm.set_active_adapters, pm.set_active_adapter):
        setter("b")
        assert pm.active_adapters == ["b"] and pm.active_adapter == "b"
        assert all(not p.requires_grad for p in pm._adapter_parameters("default").values())
        setter("default")
    pm.set_adapter(["default", "b"])
    assert pm.active_adapters == ["default", "b"]
    assert pm.base_model.transformer.h[0].attn.c_attn.active_adapters == ["default", "b"]
    assert pm.peft_config["b"].base_model == pm.base_model.config.to_dict()


@pytest.mark.parametrize("call, match", [
    (lambda pm: pm.set_adapter("nope"), "adapter 'nope' does not exist"),
    (lambda pm: pm.delete_adapter("nope"), "adapter 'nope' does not exist"),
    (lambda pm: pm.adapter_state_dict("nope"), "does not exist"),
    (lambda pm: pm.add_adapter("default", LoraConfig()), "adapter_name 'default' already exists"),
    (lambda pm: pm.add_adapter("a.b", LoraConfig()), "adapter_name"),
    (lambda pm: pm.add_weighted_adapter(["default"], [1.0], "default"), "already exists"),
    (lambda pm: pm.add_weighted_adapter(["default"], [1.0, 2.0], "x"), "same length"),
    (lambda pm: pm.add_weighted_adapter(["default"], [1.0], "x", combination_type="svd"), "combination_type"),
    (lambda pm: pm.add_weighted_adapter(["default"], [float("nan")], "x"), r"weights\[0\] must be finite"),
    (lambda pm: pm.add_weighted_adapter(["default"], [float("inf")], "x"), r"weights\[0\] must be finite"),
    (lambda pm: pm.add_weighted_adapter(["default"], [1.0], "x.y"), "without '.'"),
    (lambda pm: pm.add_weighted_adapter(["default"], [1.0], "__base__"), "reserved"),
    (lambda pm: pm.add_adapter("__base__", LoraConfig()), "reserved"),
    (lambda pm: pm.add_adapter("bn", AdapterConfig(reduction_factor=64)), "reduction_factor"),
    (lambda pm: get_peft_model(pm, LoraConfig()), "already a PeftModel"),
])
def test_bad_input_gets_a_clear_error(call, match):
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=match):
        call(pm)


def test_bad_config_values():
    for kwargs, arg in [(dict(r=0), "r"), (dict(lora_dropout=1.0), "lora_dropout"),
                        (dict(init_lora_weights="pissa"), "init_lora_weights")]:
        with pytest.raises(ValueError, match=arg):
            LoraConfig(**kwargs)
    with pytest.raises(ValueError, match="architecture"):
        AdapterConfig.load("compacter")
    with pytest.raises(ValueError, match="non_linearity"):
        AdapterConfig(non_linearity="softplus")


# ---------------------------------------------------------------------------------------- combination
def lora_layers(pm: PeftModel) -> list[LoraLinear]:
    return [m for m in pm.base_model.modules() if isinstance(m, LoraLinear)]


@given(st.integers(1, 6), st.integers(1, 6), st.floats(-2, 2), st.floats(-2, 2))
def test_cat_delta_is_exactly_the_weighted_sum(r1, r2, w1, w2):
    pm = get_peft_model(small_gpt(), LoraConfig(r=r1, lora_alpha=4, target_modules=["c_attn"],
                                                init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=r2, lora_alpha=2, use_rslora=True, target_modules=["c_attn", "c_fc"],
                                   init_lora_weights=False))
    pm.add_weighted_adapter(["default", "b"], [w1, w2], "ab", combination_type="cat")
    assert pm.peft_config["ab"].r == r1 + r2
    for layer in lora_layers(pm):
        expected = sum(w * layer.delta_weight(a) for a, w in (("default", w1), ("b", w2)) if a in layer.adapter_names)
        assert_close(layer.delta_weight("ab"), expected)


def test_linear_mixes_a_and_b_and_needs_equal_ranks():
    pm = get_peft_model(small_gpt(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_adapter("c", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    with pytest.raises(ValueError, match="equal rank"):
        pm.add_weighted_adapter(["default", "c"], [0.5, 0.5], "bad", combination_type="linear")
    w = (0.7, 0.3)
    pm.add_weighted_adapter(["default", "b"], list(w), "lin", combination_type="linear")
    for layer in lora_layers(pm):
        c = [(wi * layer.scaling[a]) ** 0.5 for a, wi in zip(("default", "b"), w, strict=True)]
        A = c[0] * layer.lora_A["default"].weight + c[1] * layer.lora_A["b"].weight
        B = c[0] * layer.lora_B["default"].weight + c[1] * layer.lora_B["b"].weight
        assert_close(layer.delta_weight("lin"), B @ A)
        weighted = w[0] * layer.delta_weight("default") + w[1] * layer.delta_weight("b")
        assert not torch.allclose(layer.delta_weight("lin"), weighted, atol=1e-4)  # the cross terms


def test_weighted_adapter_is_usable():
    m = small_gpt()
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=3, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_weighted_adapter(["default", "b"], [1.0, 1.0], "ab")
    assert pm.active_adapters == ["default"]
    idx = idx_batch()
    pm.set_adapter(["default", "b"])
    both, _ = pm(idx)
    pm.set_adapter("ab")
    assert_close(pm(idx)[0], both)


# ---------------------------------------------------------------------------------------- merging
def test_merge_unmerge_and_merge_and_unload():
    m = small_gpt()
    pm = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    idx = idx_batch()
    out, _ = pm(idx)
    before = base_hashes(m)
    pm.merge_adapter()
    assert pm.merged_adapters == ["default"] and base_hashes(m) != before
    assert_close(pm(idx)[0], out)
    with pytest.warns(UserWarning, match="unmerging"), pm.disable_adapter():  # unmerges: the base, exactly
        assert torch.equal(pm(idx)[0], small_gpt()(idx)[0])
    assert pm.merged_adapters == [] and base_hashes(m) == before  # bit for bit, not up to rounding
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert base_hashes(m) == before
    assert_close(pm(idx)[0], out)
    plain = pm.merge_and_unload()
    assert type(plain) is GPT and plain is m
    assert not any(isinstance(mod, LoraLinear) for mod in plain.modules())
    assert set(dict(plain.named_parameters())) == set(dict(small_gpt().named_parameters()))
    assert_close(plain(idx)[0], out)
    assert plain.lm_head.weight is plain.transformer.wte.weight  # tie kept


def test_merge_and_unload_refuses_other_methods_and_unload_restores():
    m = small_gpt()
    idx = idx_batch()
    ref, _ = m(idx)
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_adapter("bn", AdapterConfig.load("pfeiffer"))
    with pytest.raises(ValueError, match="LoRA adapters only.*bn"):
        pm.merge_and_unload()
    plain = pm.unload()
    assert torch.equal(plain(idx)[0], ref)
    assert type(plain.transformer.h[0].mlp) is not PeftModel and isinstance(plain.transformer.h[0].attn.c_attn,
                                                                             nn.Linear)


def test_add_weighted_adapter_weights_must_be_numbers():
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(TypeError, match=r"weights\[1\] must be a real number, got str"):
        pm.add_weighted_adapter(["default", "default"], [1.0, "2"], "x")
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite"):
        pm.add_weighted_adapter(["default"], [10**400], "x")  # beyond a float: not an OverflowError
    assert list(pm.peft_config) == ["default"]
    pm.add_weighted_adapter(["default", "default"], [np.float32(0.5), torch.tensor(0.5)], "x")  # scalars of any kind
    assert "x" in pm.peft_config


def test_unload_of_lora_inside_a_houlsby_wrapped_block():
    """A LoRA layer inside an attention block that a Houlsby adapter wraps: unload unwraps both (inner first)."""
    m = small_gpt()
    idx = idx_batch()
    ref, _ = m(idx)
    pm = get_peft_model(m, AdapterConfig.load("houlsby", reduction_factor=4))
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    pm.set_adapter(["default", "lora"])
    plain = pm.unload()
    assert type(plain) is GPT and not any(isinstance(mod, AdapterLayer) for mod in plain.modules())
    assert set(dict(plain.named_parameters())) == set(dict(small_gpt().named_parameters()))
    assert torch.equal(plain(idx)[0], ref)


def test_merge_and_unload_refuses_an_average():
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    pm.set_adapter(Average("default", "b", weights=[0.5, 0.5]))
    with pytest.raises(ValueError, match="merge_and_unload with Average"):
        pm.merge_and_unload()
    assert isinstance(pm.base_model.transformer.h[0].attn.c_attn, LoraLinear)  # nothing was unloaded


def test_merge_adapter_merges_no_layer_when_one_cannot_merge():
    """An NF4 layer among dense ones: merge_adapter refuses before it changes any weight."""
    m = quantize_model(small_gpt(), ["c_fc"])
    pm = get_peft_model(m, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    before = base_hashes(m)
    with pytest.raises(ValueError, match=r"cannot merge into transformer\.h\.0\.mlp\.c_fc: merge\(\) needs a dense"):
        pm.merge_adapter()
    assert pm.merged_adapters == [] and base_hashes(m) == before
    assert not any(layer.merged_adapters for layer in m.modules() if isinstance(layer, LoraLinear))


def test_merge_and_unload_of_one_adapter_after_merging_two():
    """merge_and_unload(["a"]) returns W₀ + ΔW_a even when b was merged before: the others are dropped."""
    torch.manual_seed(0)
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    idx = idx_batch()
    pm.set_adapter("default")
    only_a, _ = pm(idx)
    pm.set_adapter(["default", "b"])
    pm.merge_adapter()
    plain = pm.merge_and_unload(["default"])
    assert_close(plain(idx)[0], only_a)


def test_lm_head_lora_merge_unties_instead_of_changing_the_embedding():
    m = small_gpt()
    wte = m.transformer.wte.weight.detach().clone()
    pm = get_peft_model(m, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    with pytest.raises(ValueError, match="tied"):
        pm.merge_adapter()
    idx = idx_batch()
    out, _ = pm(idx)
    plain = pm.merge_and_unload()
    assert torch.equal(plain.transformer.wte.weight, wte)
    assert_close(plain(idx)[0], out)


# ---------------------------------------------------------------------------------------- adapter tensors
def test_adapter_state_dict_keys_and_round_trip():
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    pm.add_adapter("bn", AdapterConfig.load("houlsby", reduction_factor=4))
    pm.add_adapter("inner", LoraConfig(r=2, target_modules=["mlp.c_fc"]))  # inside the bottleneck wrapper
    keys = set(pm.adapter_state_dict("default"))
    assert keys == {f"transformer.h.{i}.attn.c_attn.lora_{ab}.weight" for i in (0, 1) for ab in "AB"}
    assert set(pm.adapter_state_dict("inner")) == {f"transformer.h.{i}.mlp.c_fc.lora_{ab}.weight"
                                                   for i in (0, 1) for ab in "AB"}
    bn = pm.adapter_state_dict("bn")
    assert set(bn) == {f"transformer.h.{i}.{site}.adapter_{ud}.{wb}" for i in (0, 1) for site in ("attn", "mlp")
                       for ud in ("down", "up") for wb in ("weight", "bias")}
    assert bn["transformer.h.0.mlp.adapter_down.weight"].shape == (8, 32)
    new = {k: torch.randn_like(v) for k, v in bn.items()}
    pm.load_adapter_state_dict("bn", new)
    assert all(torch.equal(pm.adapter_state_dict("bn")[k], v) for k, v in new.items())
    bad = dict(new)
    bad["transformer.h.1.attn.adapter_up.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.adapter_up\.weight.*\(3, 3\)"):
        pm.load_adapter_state_dict("bn", bad)
    with pytest.raises(ValueError, match="missing"):
        pm.load_adapter_state_dict("bn", {})


def test_input_adapters_dispatch_prompt_embeds(monkeypatch):
    """The input-adapter protocol, with a stand-in module: prompt embeddings go first, logits cover real tokens."""
    from minipeft.tuners import inject

    class FakePrompt(nn.Module):
        num_virtual_tokens = 3

        def __init__(self, config, model, tokenizer):
            super().__init__()
            self.prompt_embeddings = nn.Parameter(torch.randn(3, model.config.n_embd))

        def prepare(self, model, batch_size):
            return {"prompt_embeds": self.prompt_embeddings}

        def fold(self):
            return self

    from minipeft.tuners import PromptTuningConfig

    monkeypatch.setitem(inject._INPUT_ADAPTERS, PromptTuningConfig, FakePrompt)

    m = small_gpt()
    pm = get_peft_model(m, PromptTuningConfig(num_virtual_tokens=3))
    idx = idx_batch()
    logits, loss = pm(idx, targets=idx)
    assert logits.shape == (2, 11, CFG.vocab_size) and loss is not None
    emb = torch.cat([pm.prompt_encoders["default"].prompt_embeddings.expand(2, -1, -1), m.transformer.wte(idx)], 1)
    assert_close(logits, m(inputs_embeds=emb)[0][:, 3:])
    assert pm.print_trainable_parameters() is None and pm.get_nb_trainable_parameters()[0] == 3 * 32
    assert isinstance(pm.prompt_encoders["default"], FakePrompt)
    assert set(pm.adapter_state_dict("default")) == {"prompt_embeddings"}
    out = pm.generate(idx, max_new_tokens=2)
    assert out.shape == (2, 13)
    with pytest.raises(ValueError, match="block_size"):
        pm(torch.zeros(1, 62, dtype=torch.long))
    pm.add_adapter("p2", PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="only one input adapter"):
        pm.set_adapter(["default", "p2"])
    with pm.disable_adapter():
        assert torch.equal(pm(idx)[0], m(idx)[0])
