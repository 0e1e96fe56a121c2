"""NF4 dequantization in one Triton kernel: unpack the nibbles, decode the double-quantized absmax, rescale.

Same math and arguments as ``kernels.nf4_reference.nf4_dequantize_reference`` (QLoRA,
https://arxiv.org/abs/2305.14314):

    absmax[b] = dq_values[absmax_codes[b]] · absmax_scale[b // 256] + absmax_offset
    w[i]      = nf4_values[code(i)] · absmax[i // blocksize]

The blocked algorithm, in plain Python, for one program (a tile of BLOCKS_PER_PROGRAM quantization blocks):

    for b in this program's blocks:                              # rows of the tile
        a = decode_absmax(b)                                     # 3 tiny loads, cached
        for j in range(b * blocksize // 2, (b + 1) * blocksize // 2):   # columns: bytes, all at once
            byte = codes[j]
            pair = (nf4_values[byte >> 4] * a, nf4_values[byte & 15] * a)  # elements 2j, 2j+1
            out_words[j] = pack(pair)                            # one 32-bit word (bf16/fp16 out)

It is memory-bound: per weight it reads half a byte and writes 2 (bf16), so the floor is the copy bandwidth.
The wrapper is registered as the op ``minipeft::nf4_dequantize_triton`` (the end of this file), which the
switch ``kernels.nf4_dequantize`` and the NF4 linear op (kernels/nf4_autograd.py) call on the "triton" backend.
This module imports only torch, triton and the interpreter lock (``triton_interpreter.py``: with
TRITON_INTERPRET=1 a launch changes process-wide state, so launches from several threads take turns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_interpreter import interpreter_lock


@triton.jit
def absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, block, ok,
              DQ_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The fp32 absmax of quantization blocks ``block`` (any shape); 0 where not ``ok``. With double
    quantization: dq_values[8-bit code] · absmax_scale[block // DQ_BLOCKSIZE] + absmax_offset (three small
    loads, which L1 serves to neighbouring blocks). Every NF4 kernel here decodes the absmax with it."""
    # one return statement: Triton compiles a function's every return, the ones a constexpr branch skips too
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(absmax_scale_ptr + block // DQ_BLOCKSIZE, mask=ok, other=0.0)
        absmax = tl.where(ok, tl.load(dq_ptr + code) * scale + tl.load(absmax_offset_ptr), 0.0)
    else:
        absmax = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    return absmax


@triton.jit
def _nf4_dequantize_kernel(
    # pointers (out_words: the output viewed as one 2·element-size word per byte of codes)
    codes_ptr, absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, nf4_ptr, dq_ptr, out_words_ptr,
    # sizes
    n_bytes, n_blocks,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, DQ_BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, OUT_DTYPE: tl.constexpr, HALF_WORD: tl.constexpr, WORD: tl.constexpr,
    HALF_BITS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    blocks = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # (P,) quantization blocks
    block_ok = blocks < n_blocks
    absmax = absmax_at(absmax_ptr, absmax_scale_ptr, absmax_offset_ptr, dq_ptr, blocks, block_ok,
                       DQ_BLOCKSIZE, DOUBLE_QUANT)  # (P,) fp32

    # byte j of block b holds elements 2j (high nibble) and 2j+1 (low nibble)
    j = blocks[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (P, BLOCKSIZE/2)
    ok = j < n_bytes
    byte = tl.load(codes_ptr + j, mask=ok, other=0).to(tl.int32)
    first = (tl.load(nf4_ptr + (byte >> 4)) * absmax[:, None]).to(OUT_DTYPE)  # element 2j
    second = (tl.load(nf4_ptr + (byte & 0x0F)) * absmax[:, None]).to(OUT_DTYPE)  # element 2j+1
    # Store the pair as one word (little-endian: element 2j in the low half), so every byte read becomes
    # one aligned, coalesced word written; no interleaving shuffle is needed.
    lo = first.to(HALF_WORD, bitcast=True).to(WORD)
    hi = second.to(HALF_WORD, bitcast=True).to(WORD)
    tl.store(out_words_ptr + j, lo | (hi << HALF_BITS), mask=ok)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def nf4_dequantize_triton(
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
    blocks_per_program: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """The Triton version of ``nf4_dequantize_reference`` (same arguments); returns ``(numel,)`` of ``dtype``.

    ``blocks_per_program`` (default: enough blocks for 4096 elements per program) and ``num_warps`` only
    change the speed. The last two arguments are for the benchmark's tuning; leave them alone otherwise.
    """
    # 1. check inputs
    double_quant = absmax_scale is not None
    if codes.dtype != torch.uint8 or codes.numel() != (numel + 1) // 2:
        got = f"{codes.dtype} {tuple(codes.shape)}"
        raise ValueError(f"codes must be uint8 of {(numel + 1) // 2} bytes, got {got}")
    if dtype not in _TL_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if numel >= 2**31:
        raise ValueError(f"numel {numel} needs 64-bit indexing, which this kernel does not do")
    if double_quant and (absmax.dtype != torch.uint8 or absmax_offset is None or dq_values is None):
        raise ValueError("double quantization needs uint8 absmax codes, absmax_offset and dq_values")
    if not double_quant and absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
    given = (codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values)
    tensors = [t for t in given if t is not None]
    if any(t.device != codes.device for t in tensors) or any(not t.is_contiguous() for t in tensors):
        raise ValueError("all tensors must be contiguous and on codes' device")
    # 2. allocate the output: an even number of elements, seen as one word per pair
    n_bytes = codes.numel()
    out = torch.empty(2 * n_bytes, dtype=dtype, device=codes.device)
    words = out.view(torch.int32 if out.element_size() == 2 else torch.int64)  # (n_bytes,)
    half_word, word = (tl.uint16, tl.uint32) if out.element_size() == 2 else (tl.uint32, tl.uint64)
    n_blocks = absmax.numel()
    if blocks_per_program is None:
        blocks_per_program = max(1, 4096 // blocksize)
    # 3. launch: one program per tile of blocks (one interpreted launch at a time: triton_interpreter.py)
    grid = lambda META: (triton.cdiv(n_blocks, META["BLOCKS_PER_PROGRAM"]),)
    dummy = absmax  # unused pointers without double quantization (the branch is compiled out)
    with interpreter_lock(), torch.cuda.device_of(codes):  # on the codes' GPU (Triton launches on the current one)
        _nf4_dequantize_kernel[grid](
            codes, absmax,
            absmax_scale if double_quant else dummy, absmax_offset if double_quant else dummy,
            nf4_values, dq_values if double_quant else nf4_values, words,
            n_bytes, n_blocks,
            BLOCKSIZE=blocksize, DQ_BLOCKSIZE=dq_blocksize, BLOCKS_PER_PROGRAM=blocks_per_program,
            DOUBLE_QUANT=double_quant, OUT_DTYPE=_TL_DTYPES[dtype], HALF_WORD=half_word, WORD=word,
            HALF_BITS=8 * out.element_size(),
            num_warps=num_warps,
        )  # fmt: skip
    return out[:numel]


# --------------------------------------------------------------------------------------------------------
# The kernel as a registered custom op. Dynamo (torch.compile) cannot trace into Triton's Python launcher; a
# custom op is one opaque node in the graph, whose output shape and dtype Dynamo reads from the "fake"
# implementation below (no kernel runs while tracing). The switch (kernels.nf4_dequantize) and the NF4 linear
# op (kernels/nf4_autograd.py) call it as torch.ops.minipeft.nf4_dequantize_triton.
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minipeft::nf4_dequantize_triton", mutates_args=())
def nf4_dequantize_op(
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
    """``nf4_dequantize_triton`` with its default launch settings, as the op ``minipeft::nf4_dequantize_triton``."""
    return nf4_dequantize_triton(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values,
                                 numel, blocksize, dq_blocksize, dtype)  # fmt: skip


@nf4_dequantize_op.register_fake
def _(codes, absmax, absmax_scale, absmax_offset, nf4_values, dq_values, numel, blocksize, dq_blocksize, dtype):
    return codes.new_empty((numel,), dtype=dtype)
