"""Worked solutions to chapter 7's exercises (quantization and QLoRA), checked by the chapter's own checks.

Run from notebooks/:  python solutions/07_qlora.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from checks.ch07 import (  # noqa: E402
    check_bits_per_parameter,
    check_blockwise_nf4,
    check_int8_rowwise,
    check_normal_float_levels,
)

from minipeft.quant import NF4_CODEBOOK  # noqa: E402


# Exercise 1. NF-k: give each level an equal share of a normal's probability, keep an exact 0. The positive half
# gets 2^(k-1) quantiles at p evenly spaced from `offset` down to 0.5 (0.5 itself dropped), the negative half
# one fewer, mirrored; then everything is divided by the largest so the levels span [-1, 1].
def normal_float_levels(bits, offset):
    half = 2 ** (bits - 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])  # (half,)
    neg = -normal.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])  # (half - 1,)
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values  # (2**bits,)
    return (levels / levels.max()).float()


# Exercise 2. Flatten, cut into blocks, divide each block by its absmax, take the nearest level, pack two 4-bit
# indices per byte (element 2i high). Dequantizing undoes it: unpack, look up, multiply by the block's absmax.
def blockwise_quantize(w, blocksize):
    blocks = w.reshape(-1, blocksize).float()  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(1)  # (n_blocks,)
    normed = blocks / absmax[:, None]  # (n_blocks, blocksize) in [-1, 1]
    idx = (normed.reshape(-1, 1) - NF4_CODEBOOK).abs().argmin(1).to(torch.uint8)  # (n,) in 0..15
    return (idx[0::2] << 4) | idx[1::2], absmax  # (n/2,) uint8, (n_blocks,) fp32


def blockwise_dequantize(codes, absmax, shape, blocksize):
    idx = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1).long()  # (n,) high nibble first
    values = NF4_CODEBOOK[idx].reshape(-1, blocksize)  # (n_blocks, blocksize)
    return (values * absmax[:, None]).reshape(shape)


# Exercise 3. Count every tensor: 4 bits per code; per block either a 32-bit absmax or an 8-bit absmax code;
# with double quantization also one fp32 scale per 256 blocks (rounded up) and the one fp32 mean.
def bits_per_parameter(numel, blocksize, double_quant):
    n_blocks = -(-numel // blocksize)
    bits = 8 * ((numel + 1) // 2)
    bits += 8 * n_blocks + 32 * -(-n_blocks // 256) + 32 if double_quant else 32 * n_blocks
    return bits / numel


# Exercise 4. LLM.int8()'s weight format: one fp32 absmax per row; codes = round(127 · w / absmax) as int8.
def int8_rowwise(w):
    absmax = w.abs().amax(1).float()  # (out,)
    codes = torch.round(w * (127.0 / absmax[:, None])).to(torch.int8)  # (out, in) in [-127, 127]
    return codes, absmax


check_normal_float_levels(normal_float_levels)
check_blockwise_nf4(blockwise_quantize, blockwise_dequantize)
check_bits_per_parameter(bits_per_parameter)
check_int8_rowwise(int8_rowwise)
