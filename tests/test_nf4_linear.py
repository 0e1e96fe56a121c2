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
