"""QLoRA: LoRA on an NF4 base trains like LoRA on the 16-bit base; merging back to 16 or 4 bits."""

from __future__ import annotations

import copy

import pytest
import torch
from learning import halfway, learn_task
from tolerances import TOLERANCES, assert_close, rel_error

from minipeft.quant import NF4Linear, quantize_model
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

LORA = dict(r=8, lora_alpha=16, target_modules="all-linear")


@pytest.mark.slow
def test_qlora_learns_like_lora_on_the_16_bit_base(pretrained_base, tokenizer):
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same A for both, whatever ran before
    lora = get_peft_model(copy.deepcopy(pretrained_base), LoraConfig(**LORA))
    torch.manual_seed(0)
    qlora = get_peft_model(quantize_model(copy.deepcopy(pretrained_base)), LoraConfig(**LORA))
    assert any(isinstance(m.base_layer, NF4Linear) for m in qlora.modules() if isinstance(m, LoraLinear))
    chance, acc_lora = learn_task(lora, tokenizer, "sentiment", steps=120, lr=3e-3)
    _, acc_qlora = learn_task(qlora, tokenizer, "sentiment", steps=120, lr=3e-3)
    assert acc_qlora >= halfway(chance), acc_qlora
    assert abs(acc_qlora - acc_lora) <= 0.1, (acc_lora, acc_qlora)  # the measured gap is in the closing note


def _trained_qlora(model):
    pm = get_peft_model(quantize_model(model), LoraConfig(**LORA, init_lora_weights=False))
    with torch.no_grad():  # a LoRA update of a realistic size (init_lora_weights=False makes B random)
        for m in pm.modules():
            if isinstance(m, LoraLinear):
                m.lora_B["default"].weight.mul_(0.05)
    return pm


def test_merge_and_unload_gives_a_dense_16_bit_model(tiny_model):
    pm = _trained_qlora(tiny_model)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, _ = pm(idx)
        merged = pm.merge_and_unload()
        after, _ = merged(idx)
    assert not any(isinstance(m, NF4Linear | LoraLinear) for m in merged.modules())
    assert_close(after, before, "merge")


def test_merge_and_requantize_is_4_bit_again_and_reports_its_error(tiny_model):
    pm = _trained_qlora(tiny_model).eval()
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the report's three logits, computed here on their own
        adapted, _ = pm(idx)
        dense, _ = copy.deepcopy(pm).merge_and_unload()(idx)
    model, report = pm.merge_and_requantize(idx)
    n_nf4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    assert n_nf4 == 4 * tiny_model.config.n_layer and not any(isinstance(m, LoraLinear) for m in model.modules())
    with torch.no_grad():
        requantized, _ = model(idx)
    expected = {"dense_max_abs": (dense - adapted).abs().max().item(),
                "requantized_max_abs": (requantized - adapted).abs().max().item(),
                "requantized_rel": rel_error(requantized, adapted)}
    assert report.keys() == expected.keys()
    for key, value in expected.items():  # the same fp32 logits, their differences taken in another order
        assert report[key] == pytest.approx(value, rel=TOLERANCES[torch.float32][0]), key
    assert_close(dense, adapted, "merge")  # merging into 16 bits is exact up to rounding
    assert expected["requantized_max_abs"] > 10 * TOLERANCES["merge"][1]  # requantizing is not


def test_merge_and_requantize_measures_without_dropout_and_keeps_the_mode(tiny_model):
    """Called in train mode with LoRA dropout: the report is the eval-mode one, not a draw of
    the dropout masks, and the returned model is in the mode the PeftModel was in."""
    lora = dict(LORA, lora_dropout=0.5)
    reports = []
    for mode in ("train", "eval"):
        torch.manual_seed(0)  # the same adapter both times
        pm = get_peft_model(quantize_model(copy.deepcopy(tiny_model)), LoraConfig(**lora, init_lora_weights=False))
        getattr(pm, mode)()
        idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
        plain, report = pm.merge_and_requantize(idx)
        assert plain.training == (mode == "train")
        reports.append(report)
    assert reports[0] == reports[1]


def test_merge_and_requantize_needs_a_quantized_base(tiny_model):
    pm = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="NF4"):
        pm.merge_and_requantize(torch.zeros(1, 4, dtype=torch.long))
