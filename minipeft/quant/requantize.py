"""Merging LoRA into a quantized base: merge_and_requantize, and the price it pays, measured.

`merge_and_unload` on a QLoRA model returns dense layers W = dequantize(W₀) + ΔW: exact, but no longer 4-bit.
Quantizing W again gives a 4-bit model, at a price: NF4 has 16 levels per block, so

    requantize(W₀ + ΔW) = round_NF4(dequantize(W₀) + ΔW) ≠ dequantize(W₀) + ΔW

and a ΔW smaller than half a quantization step can be rounded away entirely (peft's most reported QLoRA pain
point; QLoRA: Dettmers et al. 2023, https://arxiv.org/abs/2305.14314). An 8-bit base (LLM.int8(),
https://arxiv.org/abs/2208.07339) pays the same price with 255 levels per row instead of 16 per block: a
step of absmax_row/127. This function does it explicitly and returns the measured error next to the model,
so that nobody pays the price without seeing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn

from minipeft.quant.int8_linear import Int8Linear
from minipeft.quant.linear import NF4Linear
from minipeft.targets import named_layers, set_submodule

__all__ = ["merge_and_requantize"]


@torch.no_grad()
def merge_and_requantize(
    peft_model: nn.Module, sample_idx: torch.Tensor, adapter_names: Sequence[str] | None = None
) -> tuple[nn.Module, dict[str, float]]:
    """Merge a QLoRA (or 8-bit LoRA) PeftModel's LoRA adapters, quantize the merged weights back to the
    base's format (NF4 with each layer's own blocksize and double quantization; int8 with its threshold), and
    measure what that costs.

    Args:
        peft_model: a PeftModel whose LoRA layers wrap NF4Linear or Int8Linear bases (it is unloaded: see
            merge_and_unload).
        sample_idx: token ids (B, T) to measure the error on.
        adapter_names: the adapters to merge (default: the active ones).

    Returns:
        (the requantized plain model, {"dense_max_abs", "requantized_max_abs", "requantized_rel"}): the
        largest |Δlogits| of the dense merge and of the requantized model against the adapted model before
        merging, and the requantized one's relative error ‖Δ‖/‖logits‖. On an 8-bit base both include the
        8-bit rounding of the activations that the adapted model's LLM.int8() matmul does and a dense
        model does not, so ``dense_max_abs`` is not ~0 there.

    Raises:
        TypeError: peft_model is not a PeftModel (a plain GPT has no adapters to merge).
        ValueError: no LoRA layer of the model has a quantized base (use merge_and_unload).
    """
    if not (hasattr(peft_model, "base_model") and hasattr(peft_model, "merge_and_unload")):  # a PeftModel's
        raise TypeError(f"peft_model must be a PeftModel (get_peft_model(quantize_model(base), LoraConfig(...))), "
                        f"got {type(peft_model).__name__}")
    requantize = {}  # name -> how to quantize its merged nn.Linear again, as its base was
    for name, _raw, layer in named_layers(peft_model.base_model):
        base = layer._modules.get("base_layer")
        if isinstance(base, NF4Linear):
            requantize[name] = partial(NF4Linear.from_linear, blocksize=base.blocksize, double_quant=base.double_quant)
        elif isinstance(base, Int8Linear):
            requantize[name] = partial(Int8Linear.from_linear, threshold=base.threshold)
    if not requantize:
        raise ValueError("merge_and_requantize needs LoRA on a quantized base (NF4 as in QLoRA, or int8); use "
                         "merge_and_unload")
    was_training = peft_model.training
    peft_model.eval()  # measured without dropout, so the three logits differ by the merge alone
    try:
        with torch.no_grad():
            adapted, _ = peft_model(sample_idx)
        model = peft_model.merge_and_unload(adapter_names)
        with torch.no_grad():
            dense, _ = model(sample_idx)
            for name, from_linear in requantize.items():
                set_submodule(model, name, from_linear(model.get_submodule(name)))
            requantized, _ = model(sample_idx)
    finally:
        peft_model.train(was_training)  # the model returned shares its modules: it is put back too
    report = {"dense_max_abs": (dense - adapted).abs().max().item(),
              "requantized_max_abs": (requantized - adapted).abs().max().item(),
              "requantized_rel": ((requantized - adapted).norm() / adapted.norm()).item()}
    return model, report
