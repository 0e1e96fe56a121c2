"""Configs validate themselves: every field's type, range and finiteness is checked on creation, in one place.

A wrong type is a TypeError, a wrong value of the right type a ValueError, and each message names
`Class.field`. Valid configs survive `to_dict()` → JSON → `PeftConfig.from_dict` unchanged.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minipeft.model import GPTConfig
from minipeft.tuners import bottleneck
from minipeft.tuners.config import (
    ADAPTER_ARCHITECTURES,
    CONFIGS,
    ENCODER_TYPES,
    PROMPT_INITS,
    AdapterConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)

NAN, INF = float("nan"), float("inf")


def round_trip(config: PeftConfig) -> PeftConfig:
    """Through the same path as adapter_config.json: to_dict, a JSON string, from_dict."""
    return PeftConfig.from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False)))


# ---------------------------------------------------------------------------------------------- bad values
BAD = [
    # LoraConfig.r: a positive int, and a bool or a float is not one
    (LoraConfig, {"r": 0}, ValueError, "r"),
    (LoraConfig, {"r": -2}, ValueError, "r"),
    (LoraConfig, {"r": True}, TypeError, "r"),
    (LoraConfig, {"r": 2.0}, TypeError, "r"),
    (LoraConfig, {"r": "8"}, TypeError, "r"),
    (LoraConfig, {"r": None}, TypeError, "r"),
    # LoraConfig.lora_alpha: a finite, non-zero real number
    (LoraConfig, {"lora_alpha": "16"}, TypeError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": True}, TypeError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": None}, TypeError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": torch.tensor(16.0)}, TypeError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": NAN}, ValueError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": INF}, ValueError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": -INF}, ValueError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": 10**400}, ValueError, "lora_alpha"),    # an int no float can hold
    (LoraConfig, {"lora_alpha": 0}, ValueError, "lora_alpha"),
    (LoraConfig, {"lora_alpha": 0.0}, ValueError, "lora_alpha"),
    # LoraConfig.lora_dropout: a finite probability in [0, 1)
    (LoraConfig, {"lora_dropout": "0.1"}, TypeError, "lora_dropout"),
    (LoraConfig, {"lora_dropout": False}, TypeError, "lora_dropout"),
    (LoraConfig, {"lora_dropout": 1.0}, ValueError, "lora_dropout"),
    (LoraConfig, {"lora_dropout": 1}, ValueError, "lora_dropout"),
    (LoraConfig, {"lora_dropout": -0.1}, ValueError, "lora_dropout"),
    (LoraConfig, {"lora_dropout": NAN}, ValueError, "lora_dropout"),
    (LoraConfig, {"lora_dropout": INF}, ValueError, "lora_dropout"),
    # LoraConfig.target_modules: "all-linear", a valid regex, or a non-empty list of non-empty names
    (LoraConfig, {"target_modules": 5}, TypeError, "target_modules"),
    (LoraConfig, {"target_modules": None}, TypeError, "target_modules"),
    (LoraConfig, {"target_modules": {"c_attn"}}, TypeError, "target_modules"),
    (LoraConfig, {"target_modules": {"c_attn": 1}}, TypeError, "target_modules"),
    (LoraConfig, {"target_modules": [1, "x"]}, TypeError, "target_modules"),
    (LoraConfig, {"target_modules": [None]}, TypeError, "target_modules"),
    (LoraConfig, {"target_modules": []}, ValueError, "target_modules"),
    (LoraConfig, {"target_modules": ()}, ValueError, "target_modules"),
    (LoraConfig, {"target_modules": ""}, ValueError, "target_modules"),
    (LoraConfig, {"target_modules": ["", "x"]}, ValueError, "target_modules"),
    (LoraConfig, {"target_modules": "c_(attn"}, ValueError, "regular expression"),
    (LoraConfig, {"target_modules": "*attn"}, ValueError, "target_modules"),
    # LoraConfig: the bools, the init scheme, the bias, the fingerprint
    (LoraConfig, {"use_rslora": "no"}, TypeError, "use_rslora"),
    (LoraConfig, {"use_rslora": 1}, TypeError, "use_rslora"),
    (LoraConfig, {"use_rslora": None}, TypeError, "use_rslora"),
    (LoraConfig, {"init_lora_weights": "pissa"}, ValueError, "init_lora_weights"),
    (LoraConfig, {"init_lora_weights": 1}, TypeError, "init_lora_weights"),
    (LoraConfig, {"init_lora_weights": None}, TypeError, "init_lora_weights"),
    (LoraConfig, {"bias": "all"}, ValueError, "bias"),
    (LoraConfig, {"bias": None}, TypeError, "bias"),
    (LoraConfig, {"base_model": "gpt2"}, TypeError, "base_model"),
    (LoraConfig, {"base_model": [("n_layer", 2)]}, TypeError, "base_model"),
    (LoraConfig, {"base_model": {1: 2}}, TypeError, "base_model"),
    (LoraConfig, {"base_model": {"dtype": torch.float32}}, TypeError, "base_model"),
    (LoraConfig, {"base_model": {"dropout": NAN}}, ValueError, "base_model"),
    # AdapterConfig
    (AdapterConfig, {"architecture": "compacter"}, ValueError, "architecture"),
    (AdapterConfig, {"architecture": None}, TypeError, "architecture"),
    (AdapterConfig, {"reduction_factor": 0}, ValueError, "reduction_factor"),
    (AdapterConfig, {"reduction_factor": -4}, ValueError, "reduction_factor"),
    (AdapterConfig, {"reduction_factor": 16.0}, TypeError, "reduction_factor"),
    (AdapterConfig, {"reduction_factor": True}, TypeError, "reduction_factor"),
    (AdapterConfig, {"non_linearity": "sigmoid"}, ValueError, "non_linearity"),
    (AdapterConfig, {"non_linearity": "ReLU"}, ValueError, "non_linearity"),
    (AdapterConfig, {"non_linearity": torch.relu}, TypeError, "non_linearity"),
    (AdapterConfig, {"base_model": 3}, TypeError, "base_model"),
    # PrefixTuningConfig
    (PrefixTuningConfig, {"num_virtual_tokens": -1}, ValueError, "num_virtual_tokens"),
    (PrefixTuningConfig, {"num_virtual_tokens": 0}, ValueError, "num_virtual_tokens"),
    (PrefixTuningConfig, {"num_virtual_tokens": 20.0}, TypeError, "num_virtual_tokens"),
    (PrefixTuningConfig, {"prefix_projection": "yes"}, TypeError, "prefix_projection"),
    (PrefixTuningConfig, {"prefix_projection": 0}, TypeError, "prefix_projection"),
    (PrefixTuningConfig, {"encoder_hidden_size": 0}, ValueError, "encoder_hidden_size"),
    (PrefixTuningConfig, {"encoder_hidden_size": "64"}, TypeError, "encoder_hidden_size"),
    (PrefixTuningConfig, {"encoder_hidden_size": False}, TypeError, "encoder_hidden_size"),
    # PromptTuningConfig
    (PromptTuningConfig, {"num_virtual_tokens": -1}, ValueError, "num_virtual_tokens"),
    (PromptTuningConfig, {"num_virtual_tokens": True}, TypeError, "num_virtual_tokens"),
    (PromptTuningConfig, {"prompt_tuning_init": "ZEROS"}, ValueError, "prompt_tuning_init"),
    (PromptTuningConfig, {"prompt_tuning_init": "random"}, ValueError, "prompt_tuning_init"),
    (PromptTuningConfig, {"prompt_tuning_init": None}, TypeError, "prompt_tuning_init"),
    (PromptTuningConfig, {"prompt_tuning_init": "TEXT"}, ValueError, "prompt_tuning_init_text"),
    (PromptTuningConfig, {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": ""}, ValueError,
     "prompt_tuning_init_text"),
    (PromptTuningConfig, {"prompt_tuning_init_text": ""}, ValueError, "prompt_tuning_init_text"),
    (PromptTuningConfig, {"prompt_tuning_init_text": ["hi"]}, TypeError, "prompt_tuning_init_text"),
    (PromptTuningConfig, {"tokenizer": 5}, TypeError, "tokenizer"),
    # PTuningConfig
    (PTuningConfig, {"num_virtual_tokens": -1}, ValueError, "num_virtual_tokens"),
    (PTuningConfig, {"num_virtual_tokens": "20"}, TypeError, "num_virtual_tokens"),
    (PTuningConfig, {"encoder_reparameterization_type": "GRU"}, ValueError, "encoder_reparameterization_type"),
    (PTuningConfig, {"encoder_reparameterization_type": 1}, TypeError, "encoder_reparameterization_type"),
    (PTuningConfig, {"encoder_hidden_size": 0}, ValueError, "encoder_hidden_size"),
    (PTuningConfig, {"encoder_hidden_size": None}, TypeError, "encoder_hidden_size"),
    (PTuningConfig, {"encoder_num_layers": 0}, ValueError, "encoder_num_layers"),
    (PTuningConfig, {"encoder_num_layers": 2.5}, TypeError, "encoder_num_layers"),
    (PTuningConfig, {"encoder_dropout": NAN}, ValueError, "encoder_dropout"),
    (PTuningConfig, {"encoder_dropout": -INF}, ValueError, "encoder_dropout"),
    (PTuningConfig, {"encoder_dropout": 1.0}, ValueError, "encoder_dropout"),
    (PTuningConfig, {"encoder_dropout": "0"}, TypeError, "encoder_dropout"),
]


@pytest.mark.parametrize("cls, kwargs, error, word", BAD,
                         ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD])
def test_bad_values_raise_naming_the_class_and_field(cls, kwargs, error, word):
    with pytest.raises(error) as info:
        cls(**kwargs)
    assert type(info.value) is error  # a TypeError is not accepted for a ValueError, nor the reverse
    message = str(info.value)
    assert word in message
    assert cls.__name__ in message


def test_an_int_past_repr_still_gets_a_message_naming_the_field():
    """10**5000 has more digits than repr() will print (4300): the message gives its size in bits, or its type."""
    with pytest.raises(ValueError, match=r"LoraConfig.lora_alpha must be a finite, non-zero real number .* got an int "
                                         r"of 16610 bits"):
        LoraConfig(lora_alpha=10**5000)
    with pytest.raises(ValueError, match=r"LoraConfig.r must be a positive int, got an int of 16610 bits"):
        LoraConfig(r=-10**5000)
    with pytest.raises(ValueError, match=r"LoraConfig.lora_alpha must be .* got a Fraction too long to print"):
        LoraConfig(lora_alpha=Fraction(10**5000))  # past the float range: not finite


@pytest.mark.parametrize("cls, kwargs, error, word", [c for c in BAD if c[2] is TypeError],
                         ids=[f"{c.__name__}-{k}" for c, k, e, _ in BAD if e is TypeError])
def test_type_errors_show_what_was_given(cls, kwargs, error, word):
    with pytest.raises(TypeError) as info:
        cls(**kwargs)
    (given,) = kwargs.values()
    assert repr(given) in str(info.value)


def test_the_bad_value_is_repeated_in_the_message():
    with pytest.raises(ValueError, match=re.escape("got nan")):
        LoraConfig(lora_alpha=NAN)
    with pytest.raises(TypeError, match=re.escape("LoraConfig.lora_alpha must be a finite, non-zero real number "
                                                  "(int or float), got '16' (str)")):
        LoraConfig(lora_alpha="16")
    with pytest.raises(ValueError, match=re.escape("AdapterConfig.non_linearity must be one of ")):
        AdapterConfig(non_linearity="sigmoid")


def test_from_dict_rejects_what_is_not_a_config():
    with pytest.raises(TypeError, match="dict"):
        PeftConfig.from_dict([("method", "lora")])
    with pytest.raises(TypeError, match="dict"):
        PeftConfig.from_dict('{"method": "lora"}')
    for method in (None, "LORA", "ia3", ["lora"], 3):
        d = {"r": 4} if method is None else {"method": method, "r": 4}
        with pytest.raises(ValueError, match="unknown PEFT method"):
            PeftConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown fields"):
        PeftConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(TypeError, match="LoraConfig.lora_alpha"):  # the fields are checked as in the constructor
        PeftConfig.from_dict({"method": "lora", "lora_alpha": "16"})


def test_adapter_config_load_checks_through_the_constructor():
    assert AdapterConfig.load("houlsby", reduction_factor=4) == AdapterConfig("houlsby", 4)
    with pytest.raises(ValueError, match="AdapterConfig.architecture"):
        AdapterConfig.load("compacter")


# ---------------------------------------------------------------------------------------------- the one list
def test_non_linearities_are_exactly_the_bottleneck_activations(monkeypatch):
    for name in bottleneck.ACTIVATIONS:
        assert AdapterConfig(non_linearity=name).non_linearity == name
    for name in ("sigmoid", "softplus", "silu", "RELU", "gelu_fast", ""):
        assert name not in bottleneck.ACTIVATIONS
        with pytest.raises(ValueError, match="non_linearity"):
            AdapterConfig(non_linearity=name)
    # the config reads bottleneck's dict, not a copy: a new activation there is accepted here at once
    monkeypatch.setitem(bottleneck.ACTIVATIONS, "sigmoid", torch.sigmoid)
    assert AdapterConfig(non_linearity="sigmoid").non_linearity == "sigmoid"
    monkeypatch.delitem(bottleneck.ACTIVATIONS, "relu")
    with pytest.raises(ValueError, match="non_linearity"):
        AdapterConfig(non_linearity="relu")


# ---------------------------------------------------------------------------------------------- good values
GOOD = [
    LoraConfig(),
    LoraConfig(r=1, lora_alpha=16),
    LoraConfig(r=4, lora_alpha=0.5, lora_dropout=0.1, use_rslora=True),
    LoraConfig(lora_alpha=-8),  # allowed, as in peft: the sign of B·A
    LoraConfig(lora_dropout=0),
    LoraConfig(lora_dropout=0.999),
    LoraConfig(target_modules="all-linear"),
    LoraConfig(target_modules=r".*(c_fc|lm_head)"),
    LoraConfig(target_modules=["c_attn", "mlp.c_proj"]),
    LoraConfig(target_modules=["(from the tensors)"]),  # list entries are names, never compiled as regexes
    LoraConfig(init_lora_weights=False),
    LoraConfig(init_lora_weights="gaussian"),
    LoraConfig(base_model=GPTConfig(n_layer=2, n_head=2, n_embd=32).to_dict()),
    AdapterConfig(),
    AdapterConfig("houlsby", reduction_factor=1, non_linearity="gelu_new"),
    AdapterConfig(base_model={}),
    PrefixTuningConfig(),
    PrefixTuningConfig(num_virtual_tokens=1, prefix_projection=True, encoder_hidden_size=64),
    PromptTuningConfig(),
    PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
    PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="Classify the review:"),
    PromptTuningConfig(prompt_tuning_init="RANDOM", prompt_tuning_init_text="kept, unused"),
    PTuningConfig(),
    PTuningConfig(encoder_reparameterization_type="LSTM", encoder_hidden_size=8, encoder_num_layers=1,
                  encoder_dropout=0.25),
]


@pytest.mark.parametrize("config", GOOD, ids=[repr(c) for c in GOOD])
def test_good_configs_round_trip(config):
    d = config.to_dict()
    assert d["method"] == config.method
    again = round_trip(config)
    assert type(again) is type(config)
    assert again == config
    assert again.to_dict() == d


def test_values_are_stored_in_plain_python_form():
    c = LoraConfig(r=np.int64(4), lora_alpha=np.float32(0.5), lora_dropout=np.float64(0.25),
                   target_modules=("c_attn", "c_fc"))
    assert type(c.r) is int and c.r == 4
    assert type(c.lora_alpha) is float and c.lora_alpha == 0.5
    assert type(c.target_modules) is list and c.target_modules == ["c_attn", "c_fc"]  # a tuple becomes a list
    assert round_trip(c) == c
    assert type(LoraConfig(lora_alpha=16).lora_alpha) is int  # an int where a float is expected stays as given
    assert LoraConfig(r=4, lora_alpha=16).scaling == 4.0


def test_a_tokenizer_is_checked_but_never_saved(tokenizer):
    config = PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer=tokenizer)
    assert "tokenizer" not in config.to_dict()
    assert round_trip(config).tokenizer is None
    assert round_trip(config) == config  # the tokenizer is a tool for init, not part of what the config is


# ---------------------------------------------------------------------------------------------- hypothesis
finite = st.floats(allow_nan=False, allow_infinity=False)
probability = st.floats(min_value=0.0, max_value=1.0, exclude_max=True) | st.just(0)
positive = st.integers(min_value=1, max_value=2**31)
names = st.text(min_size=1, max_size=12)
base_models = st.none() | st.dictionaries(st.text(max_size=8), st.integers() | finite | st.booleans() | st.text(),
                                          max_size=5)

STRATEGIES: dict[type[PeftConfig], st.SearchStrategy[dict]] = {
    LoraConfig: st.fixed_dictionaries({
        "r": positive,
        "lora_alpha": st.integers().filter(bool) | finite.filter(bool),
        "lora_dropout": probability,
        "target_modules": st.just("all-linear") | st.sampled_from([r"c_attn", r".*\.c_(fc|proj)", r"h\.[01]\..*"])
        | st.lists(names, min_size=1, max_size=4) | st.tuples(names, names),
        "use_rslora": st.booleans(),
        "init_lora_weights": st.sampled_from([True, False, "gaussian"]),
        "base_model": base_models,
    }),
    AdapterConfig: st.fixed_dictionaries({
        "architecture": st.sampled_from(ADAPTER_ARCHITECTURES),
        "reduction_factor": positive,
        "non_linearity": st.sampled_from(sorted(bottleneck.ACTIVATIONS)),
        "base_model": base_models,
    }),
    PrefixTuningConfig: st.fixed_dictionaries({
        "num_virtual_tokens": positive,
        "prefix_projection": st.booleans(),
        "encoder_hidden_size": st.none() | positive,
        "base_model": base_models,
    }),
    PromptTuningConfig: st.fixed_dictionaries({
        "num_virtual_tokens": positive,
        "prompt_tuning_init": st.sampled_from(PROMPT_INITS),
        "prompt_tuning_init_text": names,
        "base_model": base_models,
    }),
    PTuningConfig: st.fixed_dictionaries({
        "num_virtual_tokens": positive,
        "encoder_reparameterization_type": st.sampled_from(ENCODER_TYPES),
        "encoder_hidden_size": positive,
        "encoder_num_layers": positive,
        "encoder_dropout": probability,
        "base_model": base_models,
    }),
}


def test_every_config_has_a_strategy():
    assert set(STRATEGIES) == set(CONFIGS.values())


@given(st.sampled_from(list(STRATEGIES)).flatmap(lambda cls: st.tuples(st.just(cls), STRATEGIES[cls])))
def test_valid_drawn_configs_round_trip(drawn):
    cls, kwargs = drawn
    config = cls(**kwargs)
    for name, value in kwargs.items():  # stored as given (a tuple of names as a list)
        assert getattr(config, name) == (list(value) if isinstance(value, tuple) else value)
    assert round_trip(config) == config
    assert PeftConfig.from_dict(config.to_dict()) == config
