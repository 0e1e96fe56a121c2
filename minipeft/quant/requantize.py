"""Merging LoRA into a 4-bit base: merge_and_requantize, and the price it pays, measured.

`merge_and_unload` on a QLoRA model returns dense layers W = dequantize(W₀) + ΔW: exact, but no longer 4-bit.
Quantizing W again gives a 4-bit model, at a price: NF4 has 16 levels per block, so

    requantize(W₀ + ΔW) = round_NF4(dequantize(W₀) + ΔW) ≠ dequantize(W₀) + ΔW

and a ΔW smaller than half a quantization step can be rounded away entirely (peft's most reported QLoRA pain
point; QLoRA: Dettmers et al. 2023, https://arxiv.org/abs/2305.14314). This function does it explicitly and
returns the measured error next to the model, so that nobody pays the price without seeing it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from minipeft.quant.linear import NF4Linear
from minipeft.targets import named_layers, set_submodule

__all__ = ["merge_and_requantize"]


@torch.no_grad()
def merge_and_requantize(
    peft_model: nn.Module, sample_idx: torch.Tensor, adapter_names: Sequence[str] | None = None
) -> tuple[nn.Module, dict[str, float]]:
    """Merge a QLoRA PeftModel's LoRA adapters, quantize the merged weights back to NF4 (each layer with its
    own blocksize and double quantization), and measure what that costs.

    Args:
        peft_model: a PeftModel whose LoRA layers wrap NF4Linear bases (it is unloaded: see merge_and_unload).
        sample_idx: token ids (B, T) to measure the error on.
        adapter_names: the adapters to merge (default: the active ones).

    Returns:
        (the requantized plain model, {"dense_max_abs", "requantized_max_abs", "requantized_rel"}): the
        largest |Δlogits| of the dense merge and of the requantized model against the adapted model before
        merging, and the requantized one's relative error ‖Δ‖/‖logits‖.

    Raises:
        ValueError: no LoRA layer of the model has an NF4 base (use merge_and_unload).
    """
    quantized = {}
    for name, _raw, layer in named_layers(peft_model.base_model):
        base = layer._modules.get("base_layer")
        if isinstance(base, NF4Linear):
            quantized[name] = (base.blocksize, base.double_quant)
    if not quantized:
        raise ValueError("merge_and_requantize needs LoRA on an NF4 base (QLoRA); use merge_and_unload")
    adapted, _ = peft_model(sample_idx)
    model = peft_model.merge_and_unload(adapter_names)
    dense, _ = model(sample_idx)
    for name, (blocksize, double_quant) in quantized.items():
        set_submodule(model, name, NF4Linear.from_linear(model.get_submodule(name), blocksize, double_quant))
    requantized, _ = model(sample_idx)
    report = {"dense_max_abs": (dense - adapted).abs().max().item(),
              "requantized_max_abs": (requantized - adapted).abs().max().item(),
              "requantized_rel": ((requantized - adapted).norm() / adapted.norm()).item()}
    return model, report
