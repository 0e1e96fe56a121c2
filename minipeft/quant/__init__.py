"""Quantized frozen bases: 4-bit NormalFloat (NF4, QLoRA) and 8-bit row-wise int8 (LLM.int8()).

QLoRA (https://arxiv.org/abs/2305.14314): store the frozen base weights as NF4 codes (~4.13 bits per
parameter) and train LoRA adapters in 16 bits on top. LLM.int8() (https://arxiv.org/abs/2208.07339): 8 bits
per weight, with the few outlier input columns multiplied in 16 bits. ``nf4.py`` and ``int8.py`` have the
formats and their math, ``linear.py`` NF4Linear and ``quantize_model``, ``int8_linear.py`` Int8Linear (the
LLM.int8() matmul it calls is in kernels/, on the kernel switch), ``quantized_linear.py`` what both layers
share, ``requantize.py`` merging LoRA into a quantized base and what that costs, ``nf4_blocks.py`` the
layout in which FSDP2 shards an NF4 weight (whole quantization blocks per rank).
"""

from .int8 import Int8Weight, dequantize_int8, int8_nbytes, quantize_int8
from .int8_linear import Int8Linear
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
from .quantized_linear import QuantizedLinear
from .requantize import merge_and_requantize

__all__ = [
    "quantize_nf4",
    "dequantize_nf4",
    "NF4Weight",
    "NF4Linear",
    "quantize_int8",
    "dequantize_int8",
    "Int8Weight",
    "Int8Linear",
    "int8_nbytes",
    "QuantizedLinear",
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
