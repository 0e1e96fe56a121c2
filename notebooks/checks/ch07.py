"""Checks for chapter 7's exercises (quantization and QLoRA): each compares a learner's function with minipeft's
quantizers, or with an explicit formula, on several inputs, and says what is off when it differs."""

from __future__ import annotations

import torch

from minipeft.quant import NF4_CODEBOOK, NF4_OFFSET, dequantize_nf4, nf4_nbytes, quantize_int8, quantize_nf4


def _normal_float_reference(bits: int, offset: float) -> torch.Tensor:
    """NF-k: 2^(k-1) positive normal quantiles, 2^(k-1) - 1 negative ones and 0, divided by the largest."""
    half = 2 ** (bits - 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])  # (half,)
    neg = -normal.icdf(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])  # (half - 1,)
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.max()).float()


def check_normal_float_levels(fn) -> None:
    """Exercise 1: fn(bits, offset) -> the sorted (2**bits,) NormalFloat levels."""
    if fn(4, NF4_OFFSET) is None:
        print("Exercise 1: not done yet — fill in normal_float_levels.")
        return
    for bits, offset in [(4, NF4_OFFSET), (3, NF4_OFFSET), (2, NF4_OFFSET), (4, 0.99)]:
        got = fn(bits, offset)
        if not isinstance(got, torch.Tensor) or got.shape != (2**bits,):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            print(f"Exercise 1: bits={bits} should give a tensor of {2**bits} levels, got {shape}.")
            return
        want = NF4_CODEBOOK if (bits, offset) == (4, NF4_OFFSET) else _normal_float_reference(bits, offset)
        diff = (got.float() - want).abs().max().item()
        if diff > 1e-5:
            hint = ("is the tensor sorted?" if not torch.equal(got, got.sort().values) else
                    "the positive half has 2^(bits-1) levels, the negative half one fewer, plus an exact 0; "
                    "divide by the largest level")  # fmt: skip
            print(f"Exercise 1: at bits={bits}, offset={offset} the levels differ by up to {diff:.2e} from the "
                  f"reference ({[round(v, 4) for v in want.tolist()]}); {hint}.")
            return
    print("Exercise 1: correct — NF4 is the 4-bit member of a family: at 4 bits it reproduces the stored table, "
          "and the same recipe gives NF3 and NF2.")


def check_blockwise_nf4(quantize, dequantize) -> None:
    """Exercise 2: quantize(w, blocksize) -> (packed codes uint8, absmax fp32); dequantize(codes, absmax, shape,
    blocksize) -> w_hat."""
    g = torch.Generator().manual_seed(7)
    if quantize(torch.randn(4, 64, generator=g), 64) is None:
        print("Exercise 2: not done yet — fill in blockwise_quantize (and blockwise_dequantize).")
        return
    for shape, blocksize in [((4, 64), 64), ((48, 160), 64), ((8, 512), 128), ((3, 1024), 256)]:
        w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)  # rows of different scale
        q = quantize_nf4(w, blocksize, double_quant=False)
        got = quantize(w, blocksize)
        if not (isinstance(got, tuple) and len(got) == 2):
            print(f"Exercise 2: blockwise_quantize should return (codes, absmax), got {type(got).__name__}.")
            return
        codes, absmax = got
        if absmax.shape != q.absmax.shape or not torch.allclose(absmax.float(), q.absmax):
            print(f"Exercise 2: for {shape} with blocks of {blocksize}: absmax should be one value per block, "
                  f"shape {tuple(q.absmax.shape)}, the largest |w| of each run of {blocksize} consecutive weights "
                  f"(flatten first); got shape {tuple(absmax.shape)}.")
            return
        if codes.dtype != torch.uint8 or codes.shape != q.codes.shape:
            print(f"Exercise 2: codes should be uint8 of shape {tuple(q.codes.shape)} (two 4-bit codes per byte), "
                  f"got {codes.dtype} {tuple(codes.shape)}.")
            return
        if not torch.equal(codes, q.codes):
            hi_ok = torch.equal(codes >> 4, q.codes >> 4)
            swapped = torch.equal(codes >> 4, q.codes & 15) and torch.equal(codes & 15, q.codes >> 4)
            share = (codes != q.codes).float().mean().item()
            if swapped:
                print("Exercise 2: the nibbles are swapped: element 2i goes in the HIGH nibble, 2i+1 in the low one.")
                return
            if share > 0.002:  # a handful can differ only where w/absmax sits exactly on a midpoint (rounding)
                print(f"Exercise 2: {share:.1%} of the bytes differ from quantize_nf4's for {shape} (high nibbles "
                      f"{'agree' if hi_ok else 'differ too'}); each value goes to the NEAREST level of "
                      "NF4_CODEBOOK after dividing by its block's absmax.")
                return
        w_hat = dequantize(q.codes, q.absmax, w.shape, blocksize)
        want = dequantize_nf4(q)
        if w_hat is None or tuple(w_hat.shape) != tuple(shape):
            print(f"Exercise 2: blockwise_dequantize should return a tensor of shape {shape}, got "
                  f"{None if w_hat is None else tuple(w_hat.shape)}.")
            return
        if not torch.allclose(w_hat.float(), want, atol=1e-6, rtol=1e-5):
            print(f"Exercise 2: dequantizing the library's codes for {shape} differs from dequantize_nf4 by up to "
                  f"{(w_hat.float() - want).abs().max():.2e}: unpack high then low nibble, look each index up in "
                  "NF4_CODEBOOK and multiply by its block's absmax.")
            return
    print("Exercise 2: correct — codes, absmax and the round trip agree with quantize_nf4 / dequantize_nf4 for four "
          "shapes and three block sizes.")


def check_bits_per_parameter(fn) -> None:
    """Exercise 3: fn(numel, blocksize, double_quant) -> storage bits per weight, every tensor counted."""
    if fn(4096, 64, True) is None:
        print("Exercise 3: not done yet — fill in bits_per_parameter.")
        return
    for numel, blocksize, dq in [(1 << 20, 64, True), (1 << 20, 64, False), (160 * 480, 64, True),
                                 (64 * 300, 64, True), (1 << 16, 256, True), (1 << 16, 32, False)]:
        want = 8 * nf4_nbytes(numel, blocksize, dq) / numel
        measured = quantize_nf4(torch.randn(numel), blocksize, dq).bits_per_parameter()
        assert abs(want - measured) < 1e-9  # the library's byte count and its real tensors agree
        got = fn(numel, blocksize, dq)
        if got is None or abs(got - want) > 1e-6:
            hint = ("count the 8-bit absmax code of every block, one fp32 scale per 256 blocks (round up) and the "
                    "one fp32 mean subtracted before quantizing the absmax values") if dq else \
                   "count one fp32 absmax per block (round the number of blocks up)"
            print(f"Exercise 3: for {numel:,d} weights, blocks of {blocksize}, double_quant={dq}: the tensors hold "
                  f"{want:.5f} bits per weight, you said {got}; {hint}.")
            return
    print(f"Exercise 3: correct — {fn(1 << 20, 64, True):.4f} bits per weight for a 1M-weight matrix with double "
          f"quantization, {fn(1 << 20, 64, False):.4f} without.")


def check_int8_rowwise(fn) -> None:
    """Exercise 4: fn(w) -> (codes int8 (out, in), absmax fp32 (out,)), row-wise absmax int8."""
    g = torch.Generator().manual_seed(3)
    if fn(torch.randn(4, 8, generator=g)) is None:
        print("Exercise 4: not done yet — fill in int8_rowwise.")
        return
    for shape in [(4, 8), (480, 160), (33, 257)]:
        w = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)
        w[0, 0] = 20.0  # an outlier: it sets row 0's scale alone
        q = quantize_int8(w)
        got = fn(w)
        if not (isinstance(got, tuple) and len(got) == 2):
            print(f"Exercise 4: int8_rowwise should return (codes, absmax), got {type(got).__name__}.")
            return
        codes, absmax = got
        if absmax.shape != q.absmax.shape or not torch.allclose(absmax.float(), q.absmax):
            print(f"Exercise 4: absmax should be each ROW's largest |w|, shape {tuple(q.absmax.shape)}; got "
                  f"{tuple(absmax.shape)}.")
            return
        if codes.dtype != torch.int8 or codes.shape != q.codes.shape:
            print(f"Exercise 4: codes should be int8 of shape {tuple(q.codes.shape)}, got {codes.dtype} "
                  f"{tuple(codes.shape)}.")
            return
        off = (codes.int() - q.codes.int()).abs()
        if off.max() > 1 or (off > 0).float().mean() > 0.002:
            print(f"Exercise 4: for {shape}, {(off > 0).float().mean():.1%} of the codes differ from quantize_int8's "
                  f"(by up to {off.max().item()}): code = round(127 · w / absmax_row), in [-127, 127].")
            return
    print("Exercise 4: correct — the same codes and scales as quantize_int8 (LLM.int8()'s weight format) on three "
          "shapes, outlier rows included.")
