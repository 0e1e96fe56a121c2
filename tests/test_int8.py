"""The 8-bit base: row-wise int8 against bitsandbytes (codes and absmax bit-identical), Int8Linear and LLM.int8()'s
outlier decomposition against bitsandbytes' Linear8bitLt, its backward, and LoRA on an 8-bit base.

bitsandbytes 0.50 on the CPU: ``int8_vectorwise_quant`` takes fp32/fp16/bf16 2-D tensors (its row statistics
are taken along dim 1, so a 3-D tensor fails) and quantizes them as they are. ``Linear8bitLt`` quantizes its
weight through fp16, and in eval mode multiplies with the int8 decomposition (``MatMul8bitLt``), casting the
activations to fp16 for their quantization; in training mode on the CPU it dequantizes and runs a dense matmul
instead (``MatMul8bitFp``). So the comparisons run in eval mode, bit for bit in fp16 and bf16 (bf16 → fp16 is
exact for values in fp16's range), and to int8's rounding in fp32 (there bitsandbytes rounds to fp16 first).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close, assert_rel_error, rel_error

from minipeft import kernels, measure
from minipeft.kernels.int8_reference import int8_matmul
from minipeft.quant import (
    Int8Linear,
    Int8Weight,
    dequantize_int8,
    int8_nbytes,
    quantize_int8,
    quantize_model,
    weight_bytes_report,
)
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

bnb = pytest.importorskip("bitsandbytes")
bnb_F = bnb.functional
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", on every call


def weight(rows, cols, dtype, seed, zero_row=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    if zero_row:
        w[rows // 2] = 0  # absmax 0: codes 0, on both sides
    return w.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The format: bit-identical with int8_vectorwise_quant
# ----------------------------------------------------------------------------------------------------------
@given(rows=st.integers(1, 67), cols=st.integers(1, 67), dtype=st.sampled_from(DTYPES), zero_row=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 300.0]))  # fmt: skip
def test_codes_and_absmax_bit_identical_to_bitsandbytes(rows, cols, dtype, zero_row, scale):
    w = weight(rows, cols, dtype, seed=rows * 100 + cols, zero_row=zero_row, scale=scale)
    q = quantize_int8(w)
    codes, absmax, _ = bnb_F.int8_vectorwise_quant(w.clone())
    assert q.codes.dtype == torch.int8 and q.absmax.dtype == torch.float32 and q.dtype == dtype
    assert torch.equal(q.codes, codes) and torch.equal(q.absmax, absmax)
    assert q.codes.abs().max() <= 127
    expected = torch.ops.bitsandbytes.int8_vectorwise_dequant(codes, absmax)  # fp32, bnb's arithmetic
    assert torch.equal(dequantize_int8(q, torch.float32), expected)
    assert torch.equal(dequantize_int8(q), expected.to(dtype))


def test_error_is_at_most_half_a_step_per_row():
    w = weight(13, 70, torch.float32, seed=0)
    q = quantize_int8(w)
    step = q.absmax[:, None] / 127  # (rows, 1)
    assert ((dequantize_int8(q) - w).abs() <= step / 2 + 1e-7).all()
    assert q.nbytes() == int8_nbytes(13, 70) == 13 * 70 + 4 * 13
    assert abs(q.bits_per_parameter() - (8 + 32 / 70)) < 1e-9


@pytest.mark.parametrize("make, error, words", [
    (lambda: torch.randn(2, 3, 4), ValueError, "must be 2-D"),
    (lambda: torch.randn(5), ValueError, "must be 2-D"),
    (lambda: torch.ones(2, 3, dtype=torch.long), ValueError, "float32, bfloat16 or float16"),
    (lambda: torch.zeros(0, 3), ValueError, "empty"),
    (lambda: torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or inf .* index \\(0, 1\\)"),
    (lambda: torch.tensor([[1.0, 2.0], [float("-inf"), 1.0]]), ValueError, "NaN or inf"),
    (lambda: [[1.0]], TypeError, "must be a torch.Tensor"),
])  # fmt: skip
def test_bad_weights_raise(make, error, words):
    with pytest.raises(error, match=words):
        quantize_int8(make())


def test_bad_int8_weights_raise():
    q = quantize_int8(torch.randn(4, 6))
    with pytest.raises(ValueError, match="q.absmax must be float32 of shape \\(4,\\)"):
        dequantize_int8(Int8Weight(q.codes, q.absmax[:3], torch.float32))
    with pytest.raises(ValueError, match="q.codes must be a 2-D int8"):
        dequantize_int8(Int8Weight(q.codes.float(), q.absmax, torch.float32))
    with pytest.raises(ValueError, match="q.absmax must be finite"):
        dequantize_int8(Int8Weight(q.codes, torch.full((4,), float("nan")), torch.float32))
    with pytest.raises(ValueError, match="dtype must be float32"):
        dequantize_int8(q, torch.int8)


# ----------------------------------------------------------------------------------------------------------
# Int8Linear against Linear8bitLt (eval mode: the int8 decomposition)
# ----------------------------------------------------------------------------------------------------------
def bnb_layer(linear: nn.Linear, threshold: float) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=threshold)  # fmt: skip
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()  # .to() quantizes the weight


def activations(lead, cols, dtype, seed, n_outliers):
    """Activations with a few large values planted: LLM.int8()'s outlier features (|x| ≥ 6)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, cols, generator=g) * 2
    flat = x.view(-1, cols)
    for k in range(n_outliers):
        flat[(7 * k) % flat.shape[0], (5 * k + 3) % cols] = (-1) ** k * (6 + 3 * k)
    return x.to(dtype)


# in_features from 2: bitsandbytes 0.50.2's CPU Linear8bitLt returns garbage for a one-column input (-1.7e5 where the
# dense layer gives -1.46, and differently from run to run); test_a_one_column_layer checks that shape instead.
@given(out_features=st.integers(1, 40), in_features=st.integers(2, 70), lead=st.sampled_from([(1,), (5,), (2, 3)]),
       threshold=st.sampled_from([0.0, 6.0]), n_outliers=st.integers(0, 3), dtype=st.sampled_from(DTYPES),
       bias=st.booleans())  # fmt: skip
def test_int8_linear_matches_bitsandbytes(out_features, in_features, lead, threshold, n_outliers, dtype, bias):
    seed = out_features * 100 + in_features
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    ours = Int8Linear.from_linear(linear, threshold=threshold)
    x = activations(lead, in_features, dtype, seed, n_outliers)
    with torch.no_grad():
        y, y_bnb = ours(x), bnb_layer(linear, threshold)(x)
    assert y.shape == (*lead, out_features) and y.dtype == dtype
    if dtype == torch.float32:  # bitsandbytes rounds the fp32 weight and activations to fp16 before quantizing
        assert_rel_error(y, y_bnb, "int8-vs-bnb")
    else:  # the same arithmetic, step for step: the same bits
        assert torch.equal(y, y_bnb), (y - y_bnb).abs().max()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_a_one_column_layer(threshold):
    """in_features = 1: each row's only value sets its scale, so it is coded exactly as ±127 (or, above the
    threshold, multiplied in 16 bits): the output is the dense layer's up to the weight's rounding."""
    torch.manual_seed(0)
    linear = nn.Linear(1, 5)
    x = torch.tensor([[0.5], [-3.0], [8.0]])
    layer = Int8Linear.from_linear(linear, threshold=threshold)
    expected = x @ layer.dequantize_weight().t() + linear.bias
    with torch.no_grad():
        assert_close(layer(x), expected, scale=4)  # the rescale by a_x·a_w/127² rounds in fp32 in another order


def test_outlier_columns_go_through_16_bits():
    """One activation of 100 in column 3: with threshold 6 that column is multiplied exactly (in x's dtype) and
    the other columns keep a fine 8-bit scale; with threshold 0 the 100 sets every row's scale, and the small
    values of that row are flattened to a few codes."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    x = torch.randn(4, 64)
    x[:, 3] = 100.0
    dense = linear(x).detach()
    with torch.no_grad():
        err_mixed = rel_error(Int8Linear.from_linear(linear, threshold=6.0)(x), dense)
        err_int8 = rel_error(Int8Linear.from_linear(linear, threshold=0.0)(x), dense)
    assert err_mixed < err_int8 / 4, (err_mixed, err_int8)


@pytest.mark.parametrize("n_outliers", [0, 1, 5, 12])
def test_the_capture_safe_outlier_product_equals_the_gathered_one(n_outliers):
    """Under CUDA graph capture the outlier columns sit in fixed slots (nonzero_static); the sum must be the
    one the gathered columns give, for no outliers, some, and exactly as many as there are slots."""
    from minipeft.kernels.int8_reference import _add_outlier_columns_static, int8_dequantize_reference

    torch.manual_seed(n_outliers)
    linear = nn.Linear(40, 24)
    layer = Int8Linear.from_linear(linear, threshold=6.0)
    x2d = torch.randn(9, 40)
    columns = torch.zeros(40, dtype=torch.bool)
    columns[torch.randperm(40)[:n_outliers]] = True
    y = torch.randn(9, 24)
    index = columns.nonzero().squeeze(1)
    expected = y + x2d[:, index] @ int8_dequantize_reference(layer.codes[:, index], layer.absmax, x2d.dtype).t()
    assert_close(_add_outlier_columns_static(y, x2d, columns, layer.codes, layer.absmax, slots=12), expected)


def test_int8_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (5, 1100), generator=g, dtype=torch.int8)  # K·127² > 2²⁴: fp32 would round
    b = torch.randint(-127, 128, (7, 1100), generator=g, dtype=torch.int8)
    exact = (a.long() @ b.long().t()).to(torch.int32)
    assert torch.equal(int8_matmul(a, b), exact)


# ----------------------------------------------------------------------------------------------------------
# The Triton kernels (kernels/int8_triton.py) against the reference, in the interpreter on the CPU
# ----------------------------------------------------------------------------------------------------------
def _int8_case(M, K, N, dtype, seed, n_outliers, zero_row=False, nan_row=False, strided=False):
    """codes/absmax of a random (N, K) weight, x (M, K) with planted outliers (some columns several times), a bias."""
    g = torch.Generator().manual_seed(seed)
    q = quantize_int8(torch.randn(N, K, generator=g).to(dtype))
    x = torch.randn(M, 2 * K if strided else K, generator=g).clamp(-2.5, 2.5) * 2  # |x| < 6 but where planted
    if zero_row:
        x[M // 2] = 0  # a_x = 0: codes 0
    for k in range(n_outliers):
        x[(3 * k) % M, ((7 * k + 1) % K) * (2 if strided else 1)] = (-1) ** k * (6 + k)  # column (7k+1) mod K
    if nan_row:
        x[M - 1, K // 2] = float("nan")
    x = x.to(dtype)
    x = x[:, ::2] if strided else x  # (M, K), stride (2K, 2), in x's dtype
    bias = torch.randn(N, generator=g).to(dtype)
    return x, q.codes, q.absmax, bias


def _close_to_scale(got, want):
    """Equal up to a few roundings of the largest output: the outlier columns' products (up to ±200 here) are
    summed in another order, and where they cancel the 8-bit part the result is small but its error is not."""
    norm = want.abs().nan_to_num(0).max().clamp_min(1.0)
    assert_close(got / norm, want / norm, scale=4)


@given(M=st.integers(1, 40), K=st.integers(1, 300), N=st.integers(1, 70), dtype=st.sampled_from(DTYPES[:2]),
       threshold=st.sampled_from([0.0, 6.0, 2.5]), n_outliers=st.sampled_from([0, 1, 5, 45]), bias=st.booleans(),
       zero_row=st.booleans(), strided=st.booleans())  # fmt: skip
def test_triton_int8_linear_equals_the_reference(M, K, N, dtype, threshold, n_outliers, bias, zero_row, strided):
    """Sizes that are not multiples of any block (the interpreter's 16 × 32 tiles, 32 per outlier step), strided
    x, a zero row, more outlier columns than one step of the outlier loop: the 8-bit part gives the reference's
    bits; the outlier columns' 16-bit products may be summed in another order."""
    x, codes, absmax, b = _int8_case(M, K, N, dtype, M * 1000 + K, n_outliers, zero_row, strided=strided)
    b = b if bias else None
    want = kernels.int8_linear(x, codes, absmax, b, threshold, backend="reference")
    got = kernels.int8_linear(x, codes, absmax, b, threshold, backend="triton")
    assert got.shape == want.shape and got.dtype == dtype
    if threshold == 0 or not (x.abs() >= threshold).any():
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        _close_to_scale(got, want)


def test_triton_int8_takes_empty_batches_3d_x_and_strided_statistics():
    """M = 0; x (2, 3, in) in fp16; absmax and bias handed over as strided views (the switch makes them contiguous)."""
    x, codes, absmax, bias = _int8_case(6, 40, 9, torch.float16, 3, 2)
    empty = kernels.int8_linear(x[:0], codes, absmax, bias, 6.0, backend="triton")
    assert empty.shape == (0, 9) and empty.dtype == torch.float16
    wide_absmax, wide_bias = absmax.repeat_interleave(2), bias.repeat_interleave(2)
    got = kernels.int8_linear(x.view(2, 3, 40), codes, wide_absmax[::2], wide_bias[::2], 6.0, backend="triton")
    want = kernels.int8_linear(x.view(2, 3, 40), codes, absmax, bias, 6.0, backend="reference")
    assert got.shape == (2, 3, 9)
    _close_to_scale(got, want)


def test_the_32_bit_offset_guard_counts_every_tensor_and_the_span_of_x():
    """On meta tensors (no memory): x's rows · in, x's span in memory, rows · out and the codes, each < 2³¹."""
    def fits(x, codes):
        return kernels._int8_too_large(x, codes) is None

    codes = torch.empty(2**16, 2**14, dtype=torch.int8, device="meta")  # 2³⁰ codes
    x = torch.empty(8, 2**14, device="meta")
    assert fits(x, codes) and fits(None, codes)
    assert not fits(x.as_strided((8, 2**14), (2**29, 1)), codes)  # 8 rows 2²⁹ apart: a span of 7·2²⁹ + 2¹⁴
    assert not fits(torch.empty(2**15, 2**14, device="meta"), codes)  # y: 2¹⁵ · 2¹⁶ = 2³¹
    assert not fits(None, torch.empty(2**17, 2**14, dtype=torch.int8, device="meta"))  # the codes: 2³¹


def test_the_scan_flags_no_column_past_the_end():
    """A threshold of 0 with the decomposition on (1e-8 rounds to 0 in fp16): the padding lanes of the last block
    load 0, which passes the comparison; they must not flag a column past in_features."""
    from minipeft.kernels import int8_triton

    x = torch.randn(5, 40).half()
    buf = torch.zeros(64 + 64, dtype=torch.int32)  # flags for 40 columns, then a guard region
    absmax = torch.empty(5)
    int8_triton._scan_kernel[(1,)](x, absmax, buf[:40], 5, 40, 40, 1, 0.0, HAS_THRESHOLD=True, BM=16, BK=32)
    assert buf[:40].eq(1).all() and not buf[40:].any()


def test_triton_int8_compares_with_the_threshold_rounded_to_x_dtype():
    """torch compares |x| ≥ threshold in x's dtype: 6.001 is 6.0 in fp16, so a value of exactly 6 is an outlier.
    With one outlier column and one row the two backends add the same single product: the same bits."""
    x, codes, absmax, bias = _int8_case(1, 40, 9, torch.float16, 4, 0)
    x[0, 5] = 6.0
    want = kernels.int8_linear(x, codes, absmax, bias, 6.001, backend="reference")
    assert torch.equal(kernels.int8_linear(x, codes, absmax, bias, 6.001, backend="triton"), want)


def test_triton_int8_finds_outlier_columns_across_the_compaction_blocks():
    """in = 2100: the outlier columns (one in each 1024-column block of the compaction, and two at its ends) are
    listed in order across blocks, so each is multiplied once, in 16 bits."""
    x, codes, absmax, bias = _int8_case(3, 2100, 5, torch.float32, 2, 0)
    for row, col in ((0, 0), (1, 1023), (2, 1024), (0, 2047), (1, 2099)):
        x[row, col] = 50.0
    want = kernels.int8_linear(x, codes, absmax, bias, 6.0, backend="reference")
    _close_to_scale(kernels.int8_linear(x, codes, absmax, bias, 6.0, backend="triton"), want)


def test_triton_int8_keeps_nan_and_zero_rows():
    """A NaN in a row makes that row's output NaN, as torch's amax makes it in the reference (the hardware's max
    would drop it); a zero row's codes are 0; the other rows are unharmed."""
    x, codes, absmax, bias = _int8_case(6, 40, 9, torch.float32, 0, 2, zero_row=True, nan_row=True)
    for threshold in (0.0, 6.0):
        want = kernels.int8_linear(x, codes, absmax, bias, threshold, backend="reference")
        got = kernels.int8_linear(x, codes, absmax, bias, threshold, backend="triton")
        assert got[-1].isnan().all() and want[-1].isnan().all()
        assert_close(got[:-1], want[:-1], scale=4)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_triton_int8_gradients_equal_the_reference(threshold, monkeypatch):
    """dx and dbias on "triton" (its backward dequantizes Ŵ with the Triton kernel) against the reference."""
    from minipeft.kernels import int8_triton

    launches = []
    real = int8_triton._dequantize_kernel.run
    monkeypatch.setattr(int8_triton._dequantize_kernel, "run", lambda *a, **k: launches.append(1) or real(*a, **k))
    x, codes, absmax, bias = _int8_case(7, 45, 20, torch.float32, 1, 3)
    grads = []
    for backend in ("reference", "triton"):
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = kernels.int8_linear(xi.view(7, 1, 45), codes, absmax, bi, threshold, backend=backend)
        (y * torch.linspace(-1, 1, 20)).sum().backward()
        grads.append((xi.grad, bi.grad))
    assert launches == [1]  # one dequantization, in the "triton" backward
    assert_close(grads[1][0], grads[0][0])
    assert_close(grads[1][1], grads[0][1])
    assert torch.equal(kernels.int8_dequantize(codes, absmax, torch.float16, backend="triton"),
                       kernels.int8_dequantize(codes, absmax, torch.float16, backend="reference"))


def test_the_int8_backend_names_keep_their_promise(monkeypatch):
    """"triton" runs the Triton kernels (the GEMM is launched), "reference" and "auto" on the CPU do not;
    what "triton" cannot run is a ValueError that says why."""
    from minipeft.kernels import int8_triton

    calls = []
    real = int8_triton._matmul_kernel.run  # the GEMM's launch: an autotuner, or the kernel itself in the interpreter
    monkeypatch.setattr(int8_triton._matmul_kernel, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = Int8Linear.from_linear(nn.Linear(24, 8), threshold=6.0)
    x = torch.randn(3, 24)
    for backend, runs_triton in (("reference", False), ("auto", False), ("triton", True)):
        calls.clear()
        with kernels.use_backend(backend), torch.no_grad():
            layer(x)
        assert bool(calls) == runs_triton, backend
    with pytest.raises(ValueError, match="bf16 tl.dot"):
        kernels.int8_linear(x.bfloat16(), layer.codes, layer.absmax, None, 6.0, backend="triton")
    with pytest.raises(ValueError, match="float64 is not supported by the int8 Triton"):
        kernels.int8_linear(x.double(), layer.codes, layer.absmax, None, 6.0, backend="triton")
    huge = x[:1].expand(2**31 // 24 + 1, 24)  # M·in ≥ 2³¹ (a stride-0 view: no memory)
    with pytest.raises(ValueError, match="32-bit offsets"):
        kernels.int8_linear(huge, layer.codes, layer.absmax, None, 6.0, backend="triton")


@pytest.mark.parametrize("call,error,words", [
    (lambda c, a, x: kernels.int8_linear(x, c.float(), a, None, 6.0), ValueError, "codes must be a 2-D int8"),
    (lambda c, a, x: kernels.int8_linear(x, c, a[:-1], None, 6.0), ValueError, "absmax must be float32 of shape"),
    (lambda c, a, x: kernels.int8_linear(x[:, :-1], c, a, None, 6.0), ValueError, "x has shape"),
    (lambda c, a, x: kernels.int8_linear(x.long(), c, a, None, 6.0), TypeError, "floating"),
    (lambda c, a, x: kernels.int8_linear(x, c, a, torch.zeros(8).half(), 6.0), TypeError, "bias has dtype"),
    (lambda c, a, x: kernels.int8_linear(x, c, a, None, -1.0), ValueError, "threshold must be a finite"),
    (lambda c, a, x: kernels.int8_linear(x, c, a, None, float("nan")), ValueError, "threshold must be a finite"),
    (lambda c, a, x: kernels.int8_linear(x, c, a, None, 6.0, backend="fast"), ValueError, "unknown kernel backend"),
    (lambda c, a, x: kernels.int8_dequantize(c, a, torch.int32), ValueError, "dtype must be float32"),
])  # fmt: skip
def test_the_int8_switch_rejects_bad_arguments(call, error, words):
    layer = Int8Linear.from_linear(nn.Linear(24, 8), threshold=6.0)
    with pytest.raises(error, match=words):
        call(layer.codes, layer.absmax, torch.randn(3, 24))


# ----------------------------------------------------------------------------------------------------------
# Backward: the codes are kept, not the dense weight
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_gradients_equal_the_dequantized_weight_and_saved_tensors_are_the_codes(threshold):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(48, 24), threshold=threshold)
    layer.bias.requires_grad_(True)
    x = activations((2, 3), 48, torch.float32, 0, 2).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert {(t.dtype, tuple(t.shape)) for t in saved} == {(torch.int8, (24, 48)), (torch.float32, (24,))}
    assert_close(x.grad, dy @ layer.dequantize_weight())  # dx = dy·Ŵ
    assert_close(layer.bias.grad, dy.sum((0, 1)))
    assert not layer.codes.requires_grad


# ----------------------------------------------------------------------------------------------------------
# The layer as a module: buffers, casts, loading, errors
# ----------------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_and_casts_keep_the_format():
    layer = Int8Linear.from_linear(nn.Linear(20, 12), threshold=0.0)
    fresh = Int8Linear(20, 12, threshold=0.0)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(fresh(x), layer(x))
    half = copy.deepcopy(layer).half()
    assert half.codes.dtype == torch.int8 and half.absmax.dtype == torch.float32 and half.bias.dtype == torch.float16
    with pytest.raises(RuntimeError, match="absmax: missing"):
        Int8Linear(20, 12).load_state_dict({"codes": layer.codes, "bias": layer.bias})
    with pytest.raises(RuntimeError, match="codes: expected torch.int8"):
        Int8Linear(20, 12).load_state_dict({**layer.state_dict(), "codes": layer.codes.float()}, strict=False)
    with pytest.raises(RuntimeError, match="weight: unexpected key"):
        Int8Linear(20, 12).load_state_dict({**layer.state_dict(), "weight": torch.randn(12, 20)})
    with pytest.raises(RuntimeError, match="absmax must be finite"):
        Int8Linear(20, 12).load_state_dict({**layer.state_dict(), "absmax": torch.full((12,), float("inf"))})


@pytest.mark.parametrize("call, error, words", [
    (lambda: Int8Linear(8, 4, threshold=-1.0), ValueError, "threshold must be a finite number"),
    (lambda: Int8Linear(8, 4, threshold=float("nan")), ValueError, "threshold must be a finite number"),
    (lambda: Int8Linear(8, 4, threshold=10**400), ValueError, "threshold must be a finite number"),  # past float
    (lambda: Int8Linear(8, 4, threshold=-10**5000), ValueError, "got an int of 16610 bits"),  # past repr's digits
    (lambda: Int8Linear(8, 4, threshold="6"), ValueError, "threshold must be a finite number.*got '6'"),
    (lambda: Int8Linear(8, 4)(torch.ones(2, 8, dtype=torch.long)), TypeError, "floating dtype"),
    (lambda: Int8Linear(8, 4)(torch.ones(2, 7)), ValueError, "expected \\(..., 8\\)"),
    (lambda: Int8Linear(0, 4), ValueError, "in_features must be a positive int"),
    (lambda: Int8Linear.from_linear(nn.Linear(4, 2).requires_grad_(False).apply(
        lambda m: m.weight.fill_(float("nan")))), ValueError, "linear.weight contains NaN"),
])  # fmt: skip
def test_bad_arguments_raise(call, error, words):
    with pytest.raises(error, match=words):
        call()


# ----------------------------------------------------------------------------------------------------------
# quantize_model(bits=8), LoRA on an 8-bit base: trains, merges, requantizes
# ----------------------------------------------------------------------------------------------------------
def test_quantize_model_bits_is_keyword_only_and_checked(tiny_model):
    with pytest.raises(TypeError):
        quantize_model(tiny_model, "all-linear", 64, True, 8)  # bits is keyword-only
    with pytest.raises(ValueError, match="bits must be 4 \\(NF4\\) or 8 \\(int8\\), got 3"):
        quantize_model(tiny_model, bits=3)
    report = weight_bytes_report(tiny_model)
    model = quantize_model(tiny_model, bits=8)
    n_layers = tiny_model.config.n_layer
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * n_layers
    assert weight_bytes_report(model) == report and report["nf4_dq"] < report["int8"] < report["bf16"]
    assert quantize_model(model, bits=4) is model  # already quantized: left as it is
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * n_layers


def _two_linears() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_quantize_model_bits_8_takes_llm_int8s_threshold_unless_given():
    model = quantize_model(_two_linears(), bits=8)
    assert [m.threshold for m in model.modules() if isinstance(m, Int8Linear)] == [6.0, 6.0]
    model = quantize_model(_two_linears(), bits=8, threshold=0.0)
    assert [m.threshold for m in model.modules() if isinstance(m, Int8Linear)] == [0.0, 0.0]


@pytest.mark.parametrize("kwargs, words", [
    ({"blocksize": 128}, "blocksize and double_quant are options of bits=4 \\(NF4\\).*got blocksize=128"),
    ({"blocksize": 64}, "got blocksize=64"),  # the 4-bit default, given: still not an 8-bit option
    ({"double_quant": False}, "blocksize and double_quant are options of bits=4.*got double_quant=False"),
    ({"blocksize": 32, "double_quant": True}, "got blocksize=32, double_quant=True"),
    ({"threshold": -1.0}, "threshold must be a finite number"),
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"threshold": float("inf")}, "threshold must be a finite number"),
    ({"threshold": 10**400}, "threshold must be a finite number"),
])  # fmt: skip
def test_quantize_model_bits_8_refuses_4_bit_options_and_bad_thresholds(kwargs, words):
    model = _two_linears()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=words):
        quantize_model(model, bits=8, **kwargs)
    assert [type(m) for m in model.modules()] == before  # nothing swapped


def _lora_on_8_bit(model):
    pm = get_peft_model(quantize_model(model, bits=8), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert all(isinstance(m.base_layer, Int8Linear) for m in pm.modules() if isinstance(m, LoraLinear))
    return pm


def test_lora_on_an_8_bit_base_trains_and_merges(tiny_model):
    pm = _lora_on_8_bit(tiny_model)
    idx = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    with kernels.use_backend("reference"):
        for _ in range(8):  # one batch, learned by heart: the loss must fall
            _, loss = pm(idx[:, :-1], targets=idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b.grad is None for b in pm.buffers())
    layers = {name: m for name, m in pm.base_model.named_modules() if isinstance(m, LoraLinear)}
    expected = {name: m.base_layer.dequantize_weight() + m.delta_weight("default") for name, m in layers.items()}
    with torch.no_grad():
        before, _ = pm(idx)
        merged = pm.merge_and_unload()
        after, _ = merged(idx)
    assert not any(isinstance(m, Int8Linear | LoraLinear) for m in merged.modules())
    for name, w in expected.items():  # W = Ŵ₀ + ΔW, in 16 bits, exactly
        assert_close(merged.get_submodule(name).weight, w)
    # the 8-bit model also rounds its activations to 8 bits (LLM.int8()), the merged dense model does not: a
    # relative difference of 0.5-2.2 % in the logits here, which moves with the last bits of the training run
    # (the order of float sums): the bound says "the same model up to activation rounding", not a tight figure
    assert rel_error(after, before) < 5e-2


def test_merge_and_requantize_is_8_bit_again_and_reports_its_error(tiny_model):
    pm = get_peft_model(quantize_model(tiny_model, bits=8, threshold=4.0),
                        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        for m in pm.modules():
            if isinstance(m, LoraLinear):
                m.lora_B["default"].weight.mul_(0.05)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    model, report = pm.merge_and_requantize(idx)
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8_layers) == 4 * tiny_model.config.n_layer and all(m.threshold == 4.0 for m in int8_layers)
    # Against the 8-bit adapted model both merges also differ by its 8-bit activations (LLM.int8()'s matmul)
    assert 0 < report["dense_max_abs"] and 0 < report["requantized_max_abs"]
    assert 0 < report["requantized_rel"] < 1e-2  # 255 levels per row: a small price


def test_8_bit_lora_forward_compiles_without_graph_breaks():
    """The outlier columns are found from the data, inside the op: Dynamo sees one node per layer."""
    from minipeft.model import GPT, GPTConfig

    dynamo.reset()
    torch.manual_seed(0)
    gpt = quantize_model(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)), bits=8)
    pm = get_peft_model(gpt, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).train()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with kernels.use_backend("reference"):
        explanation = dynamo.explain(lambda i, t: pm(i, targets=t)[1])(idx, idx)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# GPU: the int8 GEMM (torch._int_mm) and the layer on CUDA
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M,N,K", [(17, 8, 8), (4096, 4096, 4096), (5, 33, 70), (256, 768, 2304)])
def test_int8_matmul_on_gpu_is_exact(M, N, K):
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    assert torch.equal(int8_matmul(a, b), (a.double() @ b.double().t()).to(torch.int32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int8_lora_step_captures_in_a_cuda_graph():
    """An 8-bit LoRA layer's forward and backward under torch.compile(mode="reduce-overhead") with an outlier
    column: the capture-safe outlier product runs in the graph, and the output equals the eager one."""
    torch.manual_seed(0)
    base = Int8Linear.from_linear(nn.Linear(256, 512).to(torch.bfloat16), threshold=6.0).cuda()
    layer = LoraLinear(base)
    layer.add_adapter("default", 8, 16, init_lora_weights=False)
    layer.active_adapters = ["default"]
    layer = layer.cuda()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    x[:, 7] = 20.0  # an outlier column
    lora = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    eager = layer(x)
    eager_grads = torch.autograd.grad(eager.float().sum(), lora)
    compiled = torch.compile(layer, mode="reduce-overhead")
    for _ in range(3):  # warm-up runs, then the captured graph replays
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may be overwritten
        layer.zero_grad(set_to_none=True)  # as an optimizer step does: a .grad kept from the last replay would be
        out = compiled(x)                  # accumulated into after the graph overwrote it
        out.float().sum().backward()
        out, grads = out.detach().clone(), [p.grad.clone() for p in lora]  # read after the step, so copies
    # One bf16 rounding apart at most: in the graph the outlier columns are added from fixed slots, and Inductor
    # fuses the LoRA term's ops, both in another order than eager (measured on an H200: 8 of 32768 outputs, 1 ulp).
    assert_close(out, eager, scale=2)
    for got, want in zip(grads, eager_grads, strict=True):
        assert_close(got, want, dtype=torch.bfloat16, scale=2)  # bf16 products summed in another order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_on_gpu_equals_cpu(dtype, threshold):
    torch.manual_seed(0)
    linear = nn.Linear(768, 2304).to(dtype)
    layer = Int8Linear.from_linear(linear, threshold=threshold)
    x = activations((8, 64), 768, dtype, 0, 3)
    with torch.no_grad():
        assert_close(copy.deepcopy(layer).cuda()(x.cuda()).cpu(), layer(x), scale=10)  # GEMM order differs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", [(7936, 768, 2304), (7936, 3072, 768), (300, 1000, 77), (1, 768, 768)])
@pytest.mark.parametrize("n_outliers", [0, 3, 200])
def test_triton_int8_linear_on_gpu_equals_the_reference(dtype, M, K, N, n_outliers):
    """GPT-2's c_attn and MLP c_proj at a training step's rows, odd sizes, one row; no outliers, a few, and more
    than the reference's capture slots: the Triton kernels against the reference's torch ops on the same GPU."""
    x, codes, absmax, bias = (t.cuda() for t in _int8_case(M, K, N, dtype, 0, n_outliers))
    want = kernels.int8_linear(x, codes, absmax, bias, 6.0, backend="reference")
    got = kernels.int8_linear(x, codes, absmax, bias, 6.0, backend="triton")
    if n_outliers == 0:  # the 8-bit part alone: the same operations in the same order
        assert torch.equal(got, want), (got - want).abs().max()
    else:  # the outlier columns' 16-bit products, summed in another order than cuBLAS's
        _close_to_scale(got, want)
    want0 = kernels.int8_linear(x, codes, absmax, bias, 0.0, backend="reference")
    assert torch.equal(kernels.int8_linear(x, codes, absmax, bias, 0.0, backend="triton"), want0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_int8_linear_in_a_cuda_graph_follows_the_outliers_of_each_batch():
    """Captured once, replayed on batches with 0, 2 and 300 outlier columns (more than the reference's capture
    slots): the kernels read the number of outlier columns on the GPU, so each replay equals an eager call."""
    x, codes, absmax, bias = (t.cuda() for t in _int8_case(512, 768, 2304, torch.bfloat16, 0, 0))
    static_x = x.clone()
    call = lambda: kernels.int8_linear(static_x, codes, absmax, bias, 6.0, backend="triton")
    replay = measure.cuda_graph(call)
    for n_outliers in (0, 2, 300):
        new_x = _int8_case(512, 768, 2304, torch.bfloat16, n_outliers + 1, n_outliers)[0].cuda()
        static_x.copy_(new_x)
        got = replay().clone()
        assert torch.equal(got, kernels.int8_linear(new_x, codes, absmax, bias, 6.0, backend="triton")), n_outliers
