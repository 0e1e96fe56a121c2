"""minipeft/targets.py: the one target matcher that LoRA, the bottleneck adapters and quantize_model share."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from minipeft.model import GPT, GPTConfig
from minipeft.quant import NF4Linear, quantize_model
from minipeft.targets import (
    clean_name,
    find_target_modules,
    linear_modules,
    named_layers,
    set_submodule,
    tied_parameter_ids,
)
from minipeft.tuners import AdapterConfig, LoraConfig, get_peft_model

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
ALL = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

# target specifications in every form the matcher takes, with the names each one selects
SPECS = [
    (["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    (["mlp.c_proj"], ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    (["transformer.h.0.attn.c_attn"], ["transformer.h.0.attn.c_attn"]),
    (r"transformer\.h\.1\..*c_proj", ["transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]),
    (r".*c_(attn|fc)", [n for n in ALL if n.endswith(("c_attn", "c_fc"))]),
    ("all-linear", ALL),
    (["c_fc", "c_attn"], [n for n in ALL if n.endswith(("c_fc", "c_attn"))]),  # model order, not list order
]


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def names_of(model, target_modules) -> list[str]:
    return [t.name for t in find_target_modules(model, target_modules)]


@pytest.mark.parametrize(("spec", "expected"), SPECS)
def test_names_suffixes_regex_and_all_linear(spec, expected):
    assert names_of(small_gpt(), spec) == expected


def test_a_name_is_matched_by_whole_segments_and_a_string_is_a_whole_name_regex():
    m = small_gpt()
    with pytest.raises(ValueError, match="fully matches no Linear"):
        names_of(m, "c_attn")  # a string is a regex over the whole name
    with pytest.raises(ValueError, match=r"\['attn.c'\] not found.*c_attn"):
        names_of(m, ["attn.c"])  # a partial segment is no suffix
    assert "lm_head" not in names_of(m, "all-linear")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        names_of(m, "c_(attn")
    with pytest.raises(TypeError, match="target_modules"):
        names_of(m, 5)


@pytest.mark.parametrize(("spec", "expected"), SPECS)
def test_wrappers_are_transparent(spec, expected):
    """After LoRA and Houlsby adapters are attached, the same spec finds the same layers by the same names,
    and the adapters' own small Linears (lora_A, adapter_down, …) are never candidates."""
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules="all-linear"))
    pm.add_adapter("h", AdapterConfig(architecture="houlsby", reduction_factor=4))
    assert names_of(pm.base_model, spec) == expected
    assert [t.name for t in linear_modules(pm.base_model)] == [t.name for t in linear_modules(small_gpt())]
    assert all(t.name == clean_name(t.raw_name) for t in named_layers(pm.base_model))
    assert not any("lora_" in t.raw_name or "adapter" in t.raw_name for t in named_layers(pm.base_model))


@given(st.sampled_from(range(len(SPECS))))
def test_lora_and_quantize_model_select_the_same_layers(i):
    spec, expected = SPECS[i]
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=spec))
    lora = sorted(name for name, _, m in named_layers(pm.base_model) if hasattr(m, "lora_A"))
    quantized = quantize_model(small_gpt(), spec, double_quant=False)
    nf4 = sorted(name for name, m in quantized.named_modules() if isinstance(m, NF4Linear))
    assert lora == nf4 == sorted(expected)


def test_quantize_model_refuses_what_lora_refuses_and_layers_with_adapters():
    with pytest.raises(ValueError, match=r"\['q_proj'\] not found"):
        quantize_model(small_gpt(), ["c_attn", "q_proj"])
    pm = get_peft_model(small_gpt(), LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already carry adapters"):
        quantize_model(pm.base_model, ["c_attn"])


def test_tied_weights_and_set_submodule():
    m = small_gpt()
    assert tied_parameter_ids(m) == {id(m.transformer.wte.weight)}  # lm_head ↔ token embedding
    assert tied_parameter_ids(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == set()
    new = nn.Linear(32, 96)
    set_submodule(m, "transformer.h.1.attn.c_attn", new)
    assert m.transformer.h[1].attn.c_attn is new
    set_submodule(m, "lm_head", nn.Identity())
    assert isinstance(m.lm_head, nn.Identity)
