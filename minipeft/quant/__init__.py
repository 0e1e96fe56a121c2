"""4-bit NormalFloat (NF4) quantization with double quantization, and NF4Linear, the frozen base of QLoRA.

QLoRA (https://arxiv.org/abs/2305.14314): store the frozen base weights as NF4 codes (~4.13 bits per
parameter) and train LoRA adapters in 16 bits on top. ``nf4.py`` has the codebook and the math,
``linear.py`` the layer, ``requantize.py`` merging LoRA into a 4-bit base and what that costs.
"""

from .linear import NF4Linear, quantize_model, weight_bytes_report
from .nf4 import (
    DQ_BLOCKSIZE,
    NF4_CODEBOOK,
    NF4_OFFSET,
    NF4_VALUES,
    SIGNED_DYNAMIC_MAP,
    NF4Weight,
    dequantize_nf4,
    nf4_codebook_from_quantiles,
    nf4_nbytes,
    quantize_nf4,
    signed_dynamic_map,
)
from .requantize import merge_and_requantize

__all__ = [
    "quantize_nf4",
    "dequantize_nf4",
    "NF4Weight",
    "NF4Linear",
    "quantize_model",
    "merge_and_requantize",
    "weight_bytes_report",
    "NF4_CODEBOOK",
    "NF4_VALUES",
    "NF4_OFFSET",
    "SIGNED_DYNAMIC_MAP",
    "DQ_BLOCKSIZE",
    "nf4_codebook_from_quantiles",
    "signed_dynamic_map",
    "nf4_nbytes",
]
