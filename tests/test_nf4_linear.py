"""NF4Linear and quantize_model: forward, frozen state, safetensors round trip, strict loading, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minipeft.quant import NF4Linear, dequantize_nf4, nf4_nbytes, quantize_model, quantize_nf4, weight_bytes_report


def tiny_lm(tied: bool = True) -> nn.Module:
    """Embedding, two blocks of Linears in a ModuleDict/Sequential, and an lm_head (tied to the embedding)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.wte = nn.Embedding(50, 32)
    mlp = lambda: nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))  # noqa: E731
    model.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(32, 96), "mlp": mlp()}) for _ in range(2))
    model.lm_head = nn.Linear(32, 50, bias=False)
    if tied:
        model.lm_head.weight = model.wte.weight
    return model


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_equals_linear_with_dequantized_weight(double_quant, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(70, 33)  # 2310 weights: a partial last block
    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    x = torch.randn(4, 5, 70, dtype=dtype)
    w = dequantize_nf4(quantize_nf4(linear.weight, 64, double_quant), dtype)
    expected = F.linear(x, w, linear.bias.to(dtype))
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 5, 33)
    assert torch.equal(y, expected)
    assert torch.equal(layer.dequantize_weight(dtype), w)
    assert layer.in_features == 70 and layer.out_features == 33


def test_frozen_and_gradients_reach_the_input():
    layer = NF4Linear.from_linear(nn.Linear(16, 8))
    assert not any(p.requires_grad for p in layer.parameters())
    assert {n for n, _ in layer.named_buffers()} == {"codes", "absmax_codes", "absmax_scale", "absmax_offset"}
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is None
    assert not hasattr(layer, "weight")  # no dense weight that in-place edits could silently miss


def test_dtype_cast_keeps_quant_state_exact():
    layer = NF4Linear.from_linear(nn.Linear(64, 64))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    for name in ("codes", "absmax_codes", "absmax_scale", "absmax_offset"):
        assert torch.equal(getattr(layer, name), before[name]), name
    assert layer.bias.dtype == torch.float16  # the bias follows the cast like any parameter
    assert layer.to("cpu").codes.device.type == "cpu"


@pytest.mark.parametrize("double_quant", [True, False])
def test_safetensors_round_trip_is_exact(tmp_path, double_quant):
    model = quantize_model(tiny_lm(), double_quant=double_quant)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path))
    fresh = quantize_model(tiny_lm(), double_quant=double_quant)
    for p in fresh.parameters():  # make sure everything below comes from the file
        p.data.zero_()
    for b in fresh.buffers():
        b.zero_()
    loaded = load_file(str(path))
    missing, unexpected = fresh.load_state_dict(loaded, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied: saved once, as wte.weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and fresh.state_dict()[k].dtype == v.dtype, k
    x = torch.randn(2, 32)
    for a, b in zip(model.blocks, fresh.blocks, strict=True):
        assert torch.equal(a["attn"](x), b["attn"](x))


@pytest.mark.parametrize("strict", [True, False])
def test_missing_quant_keys_raise(strict):
    layer = NF4Linear.from_linear(nn.Linear(32, 16))
    state = layer.state_dict()
    del state["absmax_scale"]
    with pytest.raises(RuntimeError, match="absmax_scale: missing"):
        NF4Linear(32, 16).load_state_dict(state, strict=strict)


@pytest.mark.parametrize("strict", [True, False])
def test_extra_or_wrong_quant_keys_raise(strict):
    dq = NF4Linear.from_linear(nn.Linear(32, 16), double_quant=True)
    plain = NF4Linear.from_linear(nn.Linear(32, 16), double_quant=False)
    with pytest.raises(RuntimeError, match="absmax: unexpected key"):  # a plain state plus the DQ one
        NF4Linear(32, 16).load_state_dict({**dq.state_dict(), "absmax": plain.absmax}, strict=strict)
    with pytest.raises(RuntimeError, match="missing"):  # a plain state into a DQ layer
        NF4Linear(32, 16, double_quant=True).load_state_dict(plain.state_dict(), strict=strict)
    with pytest.raises(RuntimeError, match="weight: unexpected key"):  # a dense checkpoint
        NF4Linear(32, 16).load_state_dict({**dq.state_dict(), "weight": torch.randn(16, 32)}, strict=strict)
    bad = {**dq.state_dict(), "codes": dq.codes.float()}  # uint8 codes cast silently otherwise
    with pytest.raises(RuntimeError, match="codes: expected torch.uint8"):
        NF4Linear(32, 16).load_state_dict(bad, strict=strict)
    wrong_blocksize = NF4Linear.from_linear(nn.Linear(32, 16), blocksize=32).state_dict()
    with pytest.raises(RuntimeError, match="absmax_codes: expected"):
        NF4Linear(32, 16, blocksize=64).load_state_dict(wrong_blocksize, strict=strict)


def test_quantize_model_all_linear_skips_lm_head_and_mutates_in_place():
    model = tiny_lm(tied=False)
    ref_out = model.blocks[0]["mlp"](torch.ones(1, 32))
    returned = quantize_model(model)
    assert returned is model
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear))
    assert quantized == ["blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.attn", "blocks.1.mlp.0",
                         "blocks.1.mlp.2"]  # fmt: skip
    assert type(model.lm_head) is nn.Linear
    assert (model.blocks[0]["mlp"](torch.ones(1, 32)) - ref_out).abs().max() < 0.1  # NF4 error, not garbage


def test_quantize_model_named_targets_and_tied_head():
    model = quantize_model(tiny_lm(), target_modules=["attn", "blocks.1.mlp.2"], double_quant=False)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear))
    assert quantized == ["blocks.0.attn", "blocks.1.attn", "blocks.1.mlp.2"]
    assert model.lm_head.weight is model.wte.weight
    with pytest.raises(ValueError, match="tied"):
        quantize_model(tiny_lm(), target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] not found"):
        quantize_model(tiny_lm(), target_modules=["attn", "nope"])
    seq = quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), target_modules="0")
    assert isinstance(seq[0], NF4Linear) and isinstance(seq[2], nn.Linear)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(tiny_lm(), blocksize=48)


def test_quantize_model_keeps_device_and_nothing_trainable_in_the_base():
    model = quantize_model(tiny_lm())
    for m in model.modules():
        if isinstance(m, NF4Linear):
            assert m.codes.device.type == "cpu" and not m.bias.requires_grad


def test_weight_bytes_report_counts_real_sizes():
    dense = tiny_lm()
    report = weight_bytes_report(dense)
    n_all = sum(p.numel() for p in dense.parameters())  # the tied head counted once
    linear_numels = [32 * 96, 32 * 128, 128 * 32] * 2
    assert report["params"] == n_all and report["quantized_params"] == sum(linear_numels)
    assert report["fp32"] == 4 * n_all and report["bf16"] == 2 * n_all
    other = n_all - sum(linear_numels)
    assert report["nf4"] == 2 * other + sum(nf4_nbytes(n, 64, False) for n in linear_numels)
    assert report["nf4_dq"] == 2 * other + sum(nf4_nbytes(n, 64, True) for n in linear_numels)
    assert report["fp32"] > report["bf16"] > report["nf4"] > report["nf4_dq"]

    quantized = quantize_model(tiny_lm())
    assert weight_bytes_report(quantized) == report  # same answer before and after quantization
    real = sum(b.numel() * b.element_size() for n, b in quantized.named_buffers())
    assert real == sum(nf4_nbytes(n, 64, True) for n in linear_numels)  # the formula is the tensors' size


# ---- bad input: refused with the weight's name, and nothing changed -----------------------------------------


def small_gpt() -> nn.Module:
    from minipeft.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))


def _poison(name: str, index: tuple[int, int], value: float):
    def poison(model: nn.Module) -> None:
        with torch.no_grad():
            model.get_submodule(name).weight[index] = value

    return poison


def _fill(name: str, value: float):
    def fill(model: nn.Module) -> None:
        with torch.no_grad():
            model.get_submodule(name).weight.fill_(value)

    return fill


# (model, how to spoil it, quantize_model's arguments) -> the exception -> a word its message must contain.
# The spoiled layer comes last in each model, so a quantize_model that swapped as it went would have
# quantized every other layer before it noticed.
# fmt: off
BAD_MODELS = [
    pytest.param(tiny_lm, _poison("blocks.1.mlp.2", (3, 5), float("nan")), {}, ValueError,
                 "blocks.1.mlp.2.weight contains NaN", id="nan"),
    pytest.param(tiny_lm, _poison("blocks.1.mlp.2", (0, 0), -float("inf")), {"double_quant": False}, ValueError,
                 "blocks.1.mlp.2.weight contains NaN or inf", id="-inf-plain"),
    pytest.param(small_gpt, _poison("transformer.h.1.mlp.c_proj", (1, 2), float("inf")), {}, ValueError,
                 "transformer.h.1.mlp.c_proj.weight contains NaN or inf", id="inf-gpt"),
    pytest.param(small_gpt, _poison("transformer.h.1.attn.c_attn", (0, 0), float("nan")),
                 {"target_modules": ["c_attn"]}, ValueError, "transformer.h.1.attn.c_attn.weight",
                 id="nan-named-target"),
    pytest.param(small_gpt, _fill("transformer.h.1.mlp.c_proj", 3e38), {}, ValueError,
                 "transformer.h.1.mlp.c_proj.weight: double quantization cannot represent",
                 id="dq-3e38-gpt"),
    pytest.param(tiny_lm, _fill("blocks.1.mlp.2", 1e38), {"blocksize": 32}, ValueError, "mean overflows float32",
                 id="dq-1e38"),
]
# fmt: on


def _snapshot(model: nn.Module) -> tuple[list, dict]:
    modules = [(name, type(m), m) for name, m in model.named_modules()]
    tensors = {name: (t, t.detach().clone()) for name, t in model.state_dict(keep_vars=True).items()}
    return modules, tensors


def _assert_unchanged(model: nn.Module, snapshot: tuple[list, dict]) -> None:
    modules, tensors = snapshot
    now = [(name, type(m), m) for name, m in model.named_modules()]
    assert [(n, t) for n, t, _ in now] == [(n, t) for n, t, _ in modules]  # the same module types ...
    assert all(a is b for (_, _, a), (_, _, b) in zip(now, modules, strict=True))  # ... the same objects
    state = model.state_dict(keep_vars=True)
    assert state.keys() == tensors.keys()
    for name, (obj, value) in tensors.items():  # the same tensors, holding the same values (NaN included)
        assert state[name] is obj, name
        torch.testing.assert_close(state[name].detach(), value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("make, spoil, kwargs, error, word", BAD_MODELS)
def test_quantize_model_refuses_a_bad_weight_and_changes_nothing(make, spoil, kwargs, error, word):
    model = make()
    spoil(model)
    snapshot = _snapshot(model)
    with pytest.raises(error) as info:
        quantize_model(model, **kwargs)
    assert word in str(info.value) and "the model is as it was" in str(info.value)
    _assert_unchanged(model, snapshot)
    if "double quantization" in str(info.value):  # the fix the message names works
        assert "double_quant=False" in str(info.value)
        quantize_model(model, **kwargs, double_quant=False)
        assert any(isinstance(m, NF4Linear) for m in model.modules())


def test_from_linear_refuses_nan_and_names_the_weight():
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"linear.weight contains NaN or inf \(1 of 32 values, the first at index "
                                         r"\(1, 2\)\)"):  # fmt: skip
        NF4Linear.from_linear(linear)


# fmt: off
@pytest.mark.parametrize("call, error, word", [
    pytest.param(lambda: NF4Linear(8, 4, weight_dtype=torch.int64), ValueError, "weight_dtype", id="weight-dtype"),
    pytest.param(lambda: NF4Linear(8, 4, blocksize=48), ValueError, "blocksize", id="blocksize"),
    pytest.param(lambda: NF4Linear(8, 4).dequantize_weight(torch.int32), ValueError, "dtype must be float32",
                 id="dequantize-int32"),
    pytest.param(lambda: NF4Linear(8, 4).dequantize_weight("bf16"), TypeError, "dtype must be a torch.dtype",
                 id="dequantize-str"),
    pytest.param(lambda: NF4Linear(8, 4)(torch.ones(2, 8, dtype=torch.long)), TypeError, "expected a floating dtype",
                 id="forward-int64-input"),  # as kernels.lora_linear: an integer x is a TypeError
    # double_quant is a bool: "no" would be truthy and turn double quantization on
    pytest.param(lambda: NF4Linear(8, 4, double_quant="no"), TypeError,
                 "double_quant must be True or False, got str 'no'", id="double-quant-str"),
    pytest.param(lambda: NF4Linear.from_linear(nn.Linear(8, 4), double_quant=1), TypeError,
                 "double_quant must be True or False, got int 1", id="from-linear-double-quant-int"),
    pytest.param(lambda: quantize_nf4(torch.randn(64), double_quant="yes"), TypeError,
                 "double_quant must be True or False, got str 'yes'", id="quantize-nf4-double-quant-str"),
    pytest.param(lambda: nf4_nbytes(64, 64, double_quant=None), TypeError,
                 "double_quant must be True or False, got NoneType None", id="nf4-nbytes-double-quant-none"),
])
# fmt: on
def test_nf4_linear_bad_arguments_raise(call, error, word):
    with pytest.raises(error, match=word):
        call()


def _nan_scale(state):
    return {**state, "absmax_scale": torch.full_like(state["absmax_scale"], float("nan"))}


# fmt: off
@pytest.mark.parametrize("double_quant, spoil, word", [
    pytest.param(True, _nan_scale, "absmax_scale must be finite", id="absmax-scale-nan"),
    pytest.param(True, lambda s: {**s, "absmax_offset": torch.tensor(float("inf"))}, "absmax_offset must be finite",
                 id="absmax-offset-inf"),
    pytest.param(False, lambda s: {**s, "absmax": -s["absmax"]}, "absmax must be finite and ≥ 0",
                 id="absmax-negative"),
    pytest.param(True, lambda s: {**s, "codes": s["codes"].float()}, "codes: expected torch.uint8",
                 id="codes-float32"),
])
# fmt: on
@pytest.mark.parametrize("strict", [True, False])
def test_load_refuses_bad_values_and_leaves_the_layer_as_it_was(double_quant, spoil, word, strict):
    good = NF4Linear.from_linear(nn.Linear(32, 16), double_quant=double_quant)
    layer = NF4Linear.from_linear(nn.Linear(32, 16), double_quant=double_quant)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=word):
        layer.load_state_dict(spoil(good.state_dict()), strict=strict)
    for k, v in layer.state_dict().items():  # not one buffer copied (nor cast) from the refused state
        assert torch.equal(v, before[k]), k
    layer.load_state_dict(good.state_dict(), strict=strict)  # and a good state still loads
    assert torch.equal(layer.dequantize_weight(), good.dequantize_weight())


# ---- the block layout (what FSDP2 shards; tests/test_fsdp_nf4.py shards it) ----------------------------------


@pytest.mark.parametrize("double_quant", [True, False])
def test_block_layout_holds_whole_blocks_and_computes_the_same_bits(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(70, 33)  # 2310 weights: 37 blocks of 64, the last one partial, and an odd count
    flat = NF4Linear.from_linear(linear, double_quant=double_quant)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant).to_block_parameters()
    assert layer.to_block_parameters() is layer and layer.holds_blocks  # a second call does nothing
    held = {n: (p.dtype, tuple(p.shape)) for n, p in layer.named_parameters() if n != "bias"}
    if double_quant:  # one row per block; the fp32 scale as its 4 bytes; the 0-dim offset stays a buffer
        assert held == {"codes": (torch.uint8, (37, 32)), "absmax_codes": (torch.uint8, (37,)),
                        "absmax_scale": (torch.uint8, (1, 4))}  # fmt: skip
        assert {n for n, _ in layer.named_buffers()} == {"absmax_offset"}
    else:
        assert held == {"codes": (torch.uint8, (37, 32)), "absmax": (torch.uint8, (37, 4))}
    assert not any(p.requires_grad for p in layer.parameters())
    for name, t in flat.nf4_weight().tensors().items():  # the same state, bit for bit
        assert torch.equal(getattr(layer.nf4_weight(), name), t), name
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 70, dtype=dtype)
        assert torch.equal(layer(x), flat(x))
    layer.half()  # a dtype cast leaves the packed state alone in this layout too
    assert torch.equal(layer.dequantize_weight(), flat.dequantize_weight())


@pytest.mark.parametrize("double_quant", [True, False])
def test_block_layout_state_dict_loads_both_ways(tmp_path, double_quant):
    """Today's flat checkpoints load into the block layout, and a block-layout state_dict (a sharded model's,
    gathered) loads into a flat layer; a flat layer's state_dict is unchanged."""
    torch.manual_seed(0)
    linear = nn.Linear(70, 33)
    flat = NF4Linear.from_linear(linear, double_quant=double_quant)
    blocks = NF4Linear.from_linear(linear, double_quant=double_quant).to_block_parameters()
    assert flat.state_dict().keys() == blocks.state_dict().keys()
    path = tmp_path / "flat.safetensors"
    save_file(flat.state_dict(), str(path))
    into_blocks = NF4Linear(70, 33, double_quant=double_quant).to_block_parameters()
    into_blocks.load_state_dict(load_file(str(path)))
    into_flat = NF4Linear(70, 33, double_quant=double_quant)
    into_flat.load_state_dict(blocks.state_dict())
    for layer in (into_blocks, into_flat):
        assert torch.equal(layer.dequantize_weight(), flat.dequantize_weight())
    for name, t in into_flat.state_dict().items():  # the flat layout, exactly as a freshly quantized layer's
        assert t.dtype == flat.state_dict()[name].dtype and torch.equal(t, flat.state_dict()[name]), name


def test_block_layout_loading_stays_strict():
    dq = NF4Linear.from_linear(nn.Linear(32, 16))
    layer = NF4Linear(32, 16).to_block_parameters()
    with pytest.raises(RuntimeError, match=r"codes: expected torch.uint8 of shape \(256,\)"):
        layer.load_state_dict({**dq.state_dict(), "codes": dq.codes.float()})
    with pytest.raises(RuntimeError, match="absmax_scale must be finite"):
        layer.load_state_dict(_nan_scale(dq.state_dict()))
    wrong_blocksize = NF4Linear.from_linear(nn.Linear(32, 16), blocksize=32).to_block_parameters()
    with pytest.raises(RuntimeError, match="codes: expected"):
        layer.load_state_dict(wrong_blocksize.state_dict())
    assert torch.equal(layer.codes, torch.zeros_like(layer.codes))  # nothing copied from a refused state


@pytest.mark.parametrize("double_quant", [False, True])
def test_lora_attaches_to_block_layers_and_counts_them_as_weights(double_quant):
    """After to_block_parameters (what shard_fsdp does) an adapter still attaches on the layer's device, and the
    parameter count is the same: a quantized weight counts as out·in entries, not as its packed bytes."""
    from minipeft import GPT, GPTConfig, LoraConfig, get_peft_model

    counts = []
    for blocks in (False, True):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
        quantize_model(gpt, "all-linear", blocksize=64, double_quant=double_quant)
        if blocks:
            for m in gpt.modules():
                if isinstance(m, NF4Linear):
                    m.to_block_parameters()
        pm = get_peft_model(gpt, LoraConfig(r=2, target_modules="all-linear"))
        counts.append(pm.get_nb_trainable_parameters())
    assert counts[0] == counts[1]


# ---- options: each format's own, and none dropped silently -------------------------------------------------


def test_quantize_model_defaults_are_qloras():
    """Not given, blocksize and double_quant are QLoRA's 64 and True; given, they are used."""
    model = quantize_model(tiny_lm())
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 6 and all(m.blocksize == 64 and m.double_quant is True for m in layers)
    model = quantize_model(tiny_lm(), blocksize=32, double_quant=False)
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 6 and all(m.blocksize == 32 and m.double_quant is False for m in layers)


# fmt: off
@pytest.mark.parametrize("kwargs, error, words", [
    pytest.param({"threshold": -1.0}, ValueError, "threshold is an option of bits=8", id="threshold-negative"),
    pytest.param({"threshold": 6.0}, ValueError, "threshold is an option of bits=8", id="threshold-default-value"),
    pytest.param({"threshold": 0.0, "bits": 4}, ValueError, "with bits=4 \\(NF4\\) leave it out, got threshold=0.0",
                 id="threshold-zero"),
    pytest.param({"double_quant": "no"}, TypeError, "double_quant must be True or False, got str 'no'",
                 id="double-quant-str"),
    pytest.param({"double_quant": 0}, TypeError, "double_quant must be True or False, got int 0",
                 id="double-quant-int"),
])
# fmt: on
def test_quantize_model_refuses_options_it_would_ignore_and_changes_nothing(kwargs, error, words):
    model = tiny_lm()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=words):
        quantize_model(model, **kwargs)
    _assert_unchanged(model, snapshot)
