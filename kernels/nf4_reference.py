"""Reference NF4 dequantization in plain PyTorch: the one place the dequantization math is written down.

A 4-bit code indexes a 16-entry table of values in [-1, 1]; multiplying by its block's absmax gives the
weight back. With double quantization the absmax itself is stored as an 8-bit code plus an fp32 scale per
256 blocks and one mean:

    absmax[b] = dq_values[absmax_codes[b]] · absmax_scale[b // 256] + absmax_offset
    w[i]      = nf4_values[code(i)] · absmax[i // blocksize]

where code(2j) is the high nibble of byte j and code(2j+1) the low one. QLoRA: https://arxiv.org/abs/2305.14314.
The switch ``kernels.nf4_dequantize`` (behind ``minipeft.quant.dequantize_nf4`` and ``NF4Linear``) runs this
function on the "reference" backend; ``kernels.nf4_triton.nf4_dequantize_triton`` computes the same thing in
one Triton kernel and takes the same arguments. Only torch is imported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# The Triton kernel's wrapper (nf4_triton.nf4_dequantize_triton) repeats this signature on purpose.
def nf4_dequantize_reference(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    numel: int,
    blocksize: int,
    dq_blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Unpack and rescale NF4 codes; returns a flat ``(numel,)`` tensor of ``dtype``.

    Args:
        codes: ``((numel + 1) // 2,)`` uint8, two codes per byte, element 2j in the high nibble.
        absmax: ``(n_blocks,)`` fp32 absmax per block; or, with double quantization (``absmax_scale`` given),
            ``(n_blocks,)`` uint8 codes into ``dq_values``.
        absmax_scale: ``(ceil(n_blocks / dq_blocksize),)`` fp32, or None without double quantization.
        absmax_offset: 0-dim fp32 mean that was subtracted from the absmax, or None.
        nf4_values: ``(16,)`` fp32 NF4 table.  dq_values: ``(256,)`` fp32 signed dynamic map, or None.
        numel, blocksize, dq_blocksize: sizes; dtype: the output dtype.

    Pure tensor operations, so it runs under ``torch.compile`` without graph breaks (there it takes the
    elementwise form below, which compiles to one kernel). The arithmetic is done in fp32 and rounded once
    to ``dtype`` at the end, as bitsandbytes does.
    """
    if torch.compiler.is_compiling():
        return _dequantize_elementwise(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values,
                                       numel, blocksize, dq_blocksize, dtype)  # fmt: skip
    return _dequantize_blockwise(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values,
                                 numel, blocksize, dq_blocksize, dtype)  # fmt: skip


# The same two equations, written two ways. Eager PyTorch wants few, whole-tensor operations: decode the
# n_blocks absmax values once, then reshape the weights into blocks. torch.compile wants the opposite, each
# element saying where it comes from, which Inductor fuses into one kernel; the blockwise form compiled to two
# kernels and ran 5-10x slower on an H100, and the elementwise form runs ~40x slower in eager on a CPU (it gathers
# per element). tests/test_nf4.py checks that the two agree.


def _dequantize_blockwise(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, numel, blocksize,
                          dq_blocksize, dtype):  # fmt: skip
    n_blocks = absmax.numel()
    if absmax_scale is not None:
        # 1. the absmax of every block, from its 8-bit code
        scale = absmax_scale.repeat_interleave(dq_blocksize)[:n_blocks]  # (n_blocks,)
        absmax = dq_values[absmax.long()] * scale + absmax_offset  # (n_blocks,) fp32
    # 2. the nibbles, in element order: byte j holds elements 2j (high) and 2j+1 (low)
    nibbles = torch.stack((codes >> 4, codes & 0x0F), dim=1).reshape(-1)  # (2 * n_bytes,)
    values = nf4_values[nibbles.long()]  # (2 * n_bytes,) fp32 in [-1, 1]
    # 3. one absmax per block; pad to whole blocks (the padding is sliced off again)
    values = F.pad(values, (0, n_blocks * blocksize - values.numel()))
    w = values.view(n_blocks, blocksize) * absmax[:, None]  # (n_blocks, blocksize)
    return w.reshape(-1)[:numel].to(dtype)


def _dequantize_elementwise(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, numel, blocksize,
                            dq_blocksize, dtype):  # fmt: skip
    i = torch.arange(numel, device=codes.device)  # (numel,) element index
    block = i // blocksize  # (numel,) its quantization block
    if absmax_scale is not None:
        # the absmax of the element's block, decoded from its 8-bit code
        a = dq_values[absmax[block].long()] * absmax_scale[block // dq_blocksize] + absmax_offset
    else:
        a = absmax[block]
    byte = codes[i // 2].long()  # elements 2j and 2j+1 share byte j
    nibble = (byte >> (4 * (1 - i % 2))) & 0x0F  # even element: the high nibble
    return (nf4_values[nibble] * a).to(dtype)  # fp32 product, rounded once to dtype


# The Triton kernel's wrapper (nf4_merge_triton.nf4_merge_triton) repeats this signature on purpose.
def nf4_merge_reference(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_offset: torch.Tensor | None,
    nf4_values: torch.Tensor,
    dq_values: torch.Tensor | None,
    out_features: int,
    in_features: int,
    blocksize: int,
    dq_blocksize: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """A QLoRA layer's merged weight W' = Ŵ + scaling·B·A, (out_features, in_features) in A's dtype.

    Ŵ dequantized in fp32, the rank-r product in fp32, one rounding at the end (QLoRA:
    https://arxiv.org/abs/2305.14314; LoRA's merge: https://arxiv.org/abs/2106.09685). A (r, in_features),
    B (out_features, r)."""
    w = nf4_dequantize_reference(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values,
                                 out_features * in_features, blocksize, dq_blocksize, torch.float32)
    low = lora_B.float() @ lora_A.float()                                          # (out, in)
    return (w.view(out_features, in_features) + scaling * low).to(lora_A.dtype)
