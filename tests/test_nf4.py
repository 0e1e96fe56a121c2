"""NF4 quantization against bitsandbytes' CPU path: codes and statistics bit-identical, values equal.

bitsandbytes 0.50 on CPU: ``quantize_4bit`` works on fp32/bf16/fp16 CPU tensors and returns packed codes of
shape ``((n + 1) // 2, 1)`` and a QuantState whose ``absmax`` is fp32 (plain) or uint8 codes with ``offset``
(0-dim fp32) and ``state2`` (``absmax`` fp32 per 256 blocks, ``code`` = the dynamic map) under double
quantization. Its ``dequantize_4bit`` returns shape ``(1, n)`` for 1-D inputs and transposes tensors of one or
two elements, so values are compared flattened. And it is wrong (bitsandbytes 0.50.2, an AVX-512 CPU) for
some 2-D shapes whose quantization blocks straddle rows, e.g. (3, 16) with blocksize 32 or (2, 96) with 64:
its values disagree with its own codes and absmax. 1-D shapes decode correctly, so the comparison hands bnb
the same state with the flat shape ``(numel,)``.
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from minipeft.quant import (
    NF4_CODEBOOK,
    SIGNED_DYNAMIC_MAP,
    NF4Weight,
    dequantize_nf4,
    nf4,
    nf4_codebook_from_quantiles,
    nf4_nbytes,
    quantize_nf4,
    signed_dynamic_map,
)

try:
    from tolerances import assert_close
except ImportError:  # run from outside the tests directory
    from tests.tolerances import assert_close

bnb_F = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def eager_bnb():
    """bitsandbytes' CPU fallbacks wrap their math in torch.compile; compiling each new shape would take
    seconds here, so run the same functions eagerly (identical math, one rounding per op)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def bnb_quantize(w, blocksize, double_quant):
    return bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def assert_same_as_bnb(w: torch.Tensor, blocksize: int, double_quant: bool) -> None:
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    packed, state = bnb_quantize(w.contiguous(), blocksize, double_quant)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.codes, packed.view(-1)), "packed codes differ from bitsandbytes"
    if double_quant:
        assert torch.equal(q.absmax_codes, state.absmax)
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
        assert state.state2.blocksize == q.dq_blocksize == 256
    else:
        assert q.absmax is not None and torch.equal(q.absmax, state.absmax)
    mine = dequantize_nf4(q)
    assert mine.shape == w.shape and mine.dtype == w.dtype
    state.shape = torch.Size([w.numel()])  # see the module docstring: bnb's 2-D CPU dequant is wrong at times
    # "within fp32 rounding": both compute code·absmax in fp32 ...
    state.dtype = torch.float32
    theirs_fp32 = bnb_F.dequantize_4bit(packed, state).reshape(-1)
    assert_close(dequantize_nf4(q, torch.float32).reshape(-1), theirs_fp32, dtype=torch.float32)
    # ... and round once to w's dtype (round-to-nearest-even, as torch's .to does)
    assert torch.equal(mine.reshape(-1), theirs_fp32.to(w.dtype))
    # bnb's own fp16/bf16 output: its C conversion to fp16 differs by one ulp from round-to-nearest-even on
    # some CPUs (seen on a Xeon host of the H100 machine, not on the CI-like one), so compare at w's precision
    state.dtype = w.dtype
    theirs = bnb_F.dequantize_4bit(packed, state)
    assert theirs.dtype == w.dtype
    assert_close(mine.reshape(-1).float(), theirs.reshape(-1).float(), dtype=w.dtype)


@st.composite
def weights(draw):
    """Odd numels, tiny tensors, blocks of zeros and magnitudes from 1e-6 to 1e4, in 1-3 dimensions."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 70), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = 10.0 ** draw(st.integers(-6, 4))
    if dtype == torch.float16:
        magnitude = min(magnitude, 1e3)  # stay inside fp16's range
    seed = draw(st.integers(0, 2**31 - 1))
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    zeros = draw(st.sampled_from(["none", "prefix", "all"]))
    if zeros == "prefix":
        w.view(-1)[: w.numel() // 2] = 0
    elif zeros == "all":
        w.zero_()
    return w.to(dtype)


@settings(max_examples=50)  # the central claim: twice the profile's 25 examples
@given(w=weights(), blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans())
def test_bit_identical_to_bitsandbytes(w, blocksize, double_quant, eager_bnb):
    assert_same_as_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_and_dtype(dtype, blocksize, eager_bnb):
    w = torch.randn(37, 211, generator=torch.Generator().manual_seed(blocksize)).to(dtype)  # 7807: odd, partial
    assert_same_as_bnb(w, blocksize, double_quant=True)


def test_large_tensor_many_dq_blocks(eager_bnb):
    # 1024 x 520 / 64 = 8320 absmax values: 33 double-quant blocks, the last one partial
    w = torch.randn(1024, 520, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 520)
    assert_same_as_bnb(w, 64, double_quant=True)
    assert_same_as_bnb(w.bfloat16(), 64, double_quant=False)


DEGENERATE = [torch.ones(1000), torch.zeros(1000), torch.zeros(129), torch.tensor([3.0]), torch.tensor([3.0, -1.0]),
              torch.full((64, 64), -2.5)]  # fmt: skip


@pytest.mark.parametrize("w", DEGENERATE)
def test_degenerate_tensors(w, eager_bnb):
    # equal absmax everywhere (DQ block of zeros), all-zero blocks, a partial block of zeros, one element
    for double_quant in (False, True):
        assert_same_as_bnb(w, 64, double_quant)
    if w.unique().numel() == 1:  # a constant tensor is exactly representable (its absmax times ±1 or 0)
        assert torch.equal(dequantize_nf4(quantize_nf4(w)), w)


def test_ties_go_to_the_lower_code():
    # A block with absmax 1 puts each value at exactly value/1; midpoints sit exactly between two levels.
    mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2  # (15,)
    w = torch.cat([torch.ones(1), mids, torch.nextafter(mids, torch.tensor(2.0)), torch.zeros(1)])  # (32,)
    q = quantize_nf4(w, blocksize=32, double_quant=False)
    codes = torch.stack([q.codes >> 4, q.codes & 15], 1).reshape(-1)
    assert torch.equal(codes[1:16], torch.arange(15, dtype=torch.uint8))  # at the midpoint: the lower level
    assert torch.equal(codes[16:31], torch.arange(1, 16, dtype=torch.uint8))  # one ulp above: the upper
    packed, _ = bnb_quantize(w, 32, False)
    assert torch.equal(q.codes, packed.view(-1))


def test_nibble_order_and_padding():
    w = torch.tensor([1.0, -1.0, 0.0])  # codes 15, 0, 7 and a padding 0.0 -> 7
    q = quantize_nf4(w, blocksize=32, double_quant=False)
    assert q.codes.tolist() == [(15 << 4) | 0, (7 << 4) | 7]  # element 2i in the high nibble


def test_codebook_from_quantiles_matches_table():
    table = nf4_codebook_from_quantiles()
    assert torch.equal(table, NF4_CODEBOOK)
    assert table[7] == 0 and table[0] == -1 and table[15] == 1 and (table.diff() > 0).all()
    from bitsandbytes.functional import create_normal_map

    bnb_map = create_normal_map()  # bitsandbytes' own construction (it needs scipy, a test extra)
    assert torch.equal(bnb_map[bnb_map != 0], NF4_CODEBOOK[NF4_CODEBOOK != 0])


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(signed_dynamic_map(), bnb_F.create_dynamic_map())
    assert torch.equal(SIGNED_DYNAMIC_MAP, bnb_F.create_dynamic_map(signed=True))
    assert SIGNED_DYNAMIC_MAP.shape == (256,) and (SIGNED_DYNAMIC_MAP.diff() > 0).all()


@pytest.mark.parametrize("double_quant, expected", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)])
def test_bits_per_parameter_from_tensor_sizes(double_quant, expected):
    q = quantize_nf4(torch.randn(1024, 1024), blocksize=64, double_quant=double_quant)
    assert q.bits_per_parameter() == pytest.approx(expected, abs=1e-4)  # + the 32-bit offset: 2.4e-6 bits
    assert q.nbytes() == nf4_nbytes(1024 * 1024, 64, double_quant)
    assert round(q.bits_per_parameter(), 3) == (4.127 if double_quant else 4.5)


@given(numel=st.integers(1, 5000), blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans())
def test_nbytes_formula_matches_tensors(numel, blocksize, double_quant):
    q = quantize_nf4(torch.randn(numel), blocksize=blocksize, double_quant=double_quant)
    assert q.nbytes() == nf4_nbytes(numel, blocksize, double_quant)
    assert q.bits_per_parameter() == 8 * q.nbytes() / numel


def test_error_is_small_relative_to_block_scale():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    for double_quant in (False, True):
        err = (dequantize_nf4(quantize_nf4(w, double_quant=double_quant)) - w).norm() / w.norm()
        assert err < 0.11  # NF4 on normal weights: ~0.09-0.10 relative error


@pytest.mark.parametrize("make", [lambda w: w[0].t(), lambda w: w[:, ::2], lambda w: w.permute(2, 0, 1)[1:]])
def test_non_contiguous_equals_contiguous_copy(make):
    view = make(torch.randn(30, 22, 9, generator=torch.Generator().manual_seed(1)))
    assert not view.is_contiguous()
    for double_quant in (False, True):
        a, b = quantize_nf4(view, 64, double_quant), quantize_nf4(view.contiguous(), 64, double_quant)
        assert a.tensors().keys() == b.tensors().keys()
        for name, t in b.tensors().items():
            assert torch.equal(a.tensors()[name], t), name
        assert a.shape == view.shape and torch.equal(dequantize_nf4(a), dequantize_nf4(b))


def _alternating(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), value) * torch.tensor([1.0, -1.0]).repeat(n // 2)  # (n,) +v, -v, +v, ...


# Bad input to quantize_nf4 -> the exception -> a word its message must contain. The message must name the
# tensor (``w`` here; quantize_model names the layer's weight) and say what it expected.
# fmt: off
BAD_WEIGHTS = [
    pytest.param(lambda: torch.tensor([1.0, float("nan")]), ValueError, "w contains NaN", id="nan"),
    pytest.param(lambda: torch.tensor([1.0, float("inf")]), ValueError, "w contains NaN or inf", id="inf"),
    pytest.param(lambda: torch.tensor([-float("inf"), 0.0]).bfloat16(), ValueError, "w contains NaN or inf",
                 id="-inf-bf16"),
    pytest.param(lambda: torch.ones(3, 70).index_fill_(1, torch.tensor([65]), float("nan")), ValueError,
                 "index (0, 65)", id="nan-in-second-block-names-its-index"),
    pytest.param(lambda: torch.empty(0, 4), ValueError, "w is empty", id="empty"),
    pytest.param(lambda: torch.ones(4, dtype=torch.int32), ValueError, "w must be float32", id="int32"),
    pytest.param(lambda: torch.ones(4, dtype=torch.uint8), ValueError, "w must be float32", id="uint8"),
    pytest.param(lambda: torch.ones(4, dtype=torch.float64), ValueError, "w must be float32", id="float64"),
    pytest.param(lambda: [1.0, 2.0], TypeError, "w must be a torch.Tensor", id="list"),
    # double quantization: every absmax finite, but their fp32 mean overflows (the sum passes 3.4e38) ...
    pytest.param(lambda: torch.full((4096,), 3e38), ValueError, "mean overflows float32", id="dq-3e38"),
    pytest.param(lambda: _alternating(4096, 3e38), ValueError, "mean overflows float32", id="dq-3e38-mixed-signs"),
    pytest.param(lambda: torch.cat([torch.full((192,), 3e38), torch.randn(4096, generator=torch.Generator())]),
                 ValueError, "mean overflows float32", id="dq-three-huge-blocks"),
    pytest.param(lambda: torch.full((64 * 64,), 1e38), ValueError, "mean overflows float32", id="dq-1e38"),
    pytest.param(lambda: torch.full((64 * 300,), torch.finfo(torch.bfloat16).max, dtype=torch.bfloat16),
                 ValueError, "mean overflows float32", id="dq-bf16-max"),
    # ... or one decodes from its 8-bit code to more than the dtype holds (65538 > fp16's 65504)
    pytest.param(lambda: torch.cat([torch.full((64 * 8,), 65504.0), torch.zeros(64 * 4)]).half(), ValueError,
                 "beyond torch.float16's largest value", id="dq-fp16-max"),
]
# fmt: on


@pytest.mark.parametrize("make, error, word", BAD_WEIGHTS)
def test_bad_weights_raise(make, error, word):
    bad = make()
    before = bad.clone() if isinstance(bad, torch.Tensor) else None
    with pytest.raises(error) as info:
        quantize_nf4(bad)
    assert word in str(info.value)
    if "double quantization" in str(info.value):  # says what works instead, and it does
        assert "double_quant=False" in str(info.value)
        q = quantize_nf4(bad, double_quant=False)
        assert torch.isfinite(dequantize_nf4(q)).all()
        assert torch.equal(dequantize_nf4(q, torch.float32).abs().amax(), bad.float().abs().amax())
    if before is not None:  # nothing was changed (NaN-safe comparison)
        torch.testing.assert_close(bad, before, rtol=0, atol=0, equal_nan=True)


def test_double_quant_overflow_is_where_the_mean_is_taken():
    """The fp32 mean of the absmax values is where 1e38-sized weights overflow today (so in bitsandbytes too):
    64 absmax values of 3e38 sum to inf. Each absmax, and every value scaled by it, is finite."""
    w = torch.full((4096,), 3e38)
    blocks, absmax = nf4._blocks_and_absmax(w, 64)
    assert torch.isfinite(absmax).all() and torch.isfinite(blocks / absmax[:, None]).all()
    codes, scale, offset = nf4._double_quantize(absmax)
    assert torch.isinf(offset) and torch.isinf(scale).all()  # the mean, then everything decoded from it
    assert torch.isfinite(quantize_nf4(w[:64]).absmax_offset)  # one block: the sum is the value, finite


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64, 64.0, True, "64"])
def test_bad_blocksize_raises(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(128), blocksize=blocksize)


def _dq():  # a valid double-quantized NF4Weight: 1200 values, 19 blocks of 64 (the last partial), 1 scale
    return quantize_nf4(torch.randn(30, 40, generator=torch.Generator().manual_seed(0)), 64, double_quant=True)


def _plain():  # the same without double quantization: 19 fp32 absmax values
    return quantize_nf4(torch.randn(30, 40, generator=torch.Generator().manual_seed(0)), 64, double_quant=False)


def _with(make, **fields):
    """A copy of make() with some fields replaced (a function of the original field when callable)."""
    q = make()
    return dataclasses.replace(q, **{k: v(getattr(q, k)) if callable(v) else v for k, v in fields.items()})


def _set(t: torch.Tensor, i: int, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[i] = value
    return t


_U8 = torch.uint8
# Bad input to dequantize_nf4 -> the exception -> a word its message must contain (the field's name).
# fmt: off
BAD_NF4_WEIGHTS = [
    pytest.param(lambda: _with(_dq, codes=lambda c: c[:-100]), ValueError, "q.codes", id="codes-100-short"),
    pytest.param(lambda: _with(_dq, codes=lambda c: torch.cat([c, torch.zeros(50, dtype=_U8)])), ValueError,
                 "q.codes", id="codes-50-extra"),
    pytest.param(lambda: _with(_dq, codes=lambda c: c.long()), ValueError, "torch.uint8", id="codes-int64"),
    pytest.param(lambda: _with(_dq, codes=lambda c: c.float()), ValueError, "q.codes", id="codes-float32"),
    pytest.param(lambda: _with(_dq, codes=lambda c: c[:, None]), ValueError, "q.codes", id="codes-2d-bnb-layout"),
    pytest.param(lambda: _with(_dq, codes=lambda c: c.numpy()), TypeError, "q.codes", id="codes-numpy"),
    pytest.param(lambda: _with(_dq, shape=torch.Size((30, 41))), ValueError, "q.codes", id="shape-disagrees"),
    pytest.param(lambda: _with(_dq, shape=torch.Size((0, 40))), ValueError, "q.shape", id="shape-empty"),
    pytest.param(lambda: _with(_dq, shape=(30.0, 40)), TypeError, "q.shape", id="shape-floats"),
    pytest.param(lambda: _with(_dq, dtype=torch.int64), ValueError, "q.dtype", id="dtype-field-int64"),
    pytest.param(lambda: _with(_dq, blocksize=48), ValueError, "q.blocksize", id="blocksize-48"),
    pytest.param(lambda: _with(_dq, blocksize=128), ValueError, "q.absmax_codes", id="blocksize-disagrees"),
    pytest.param(lambda: _with(_dq, dq_blocksize=0), ValueError, "q.dq_blocksize", id="dq-blocksize-0"),
    pytest.param(lambda: _with(_dq, absmax_codes=lambda a: a[:-1]), ValueError, "q.absmax_codes",
                 id="absmax-codes-short"),
    pytest.param(lambda: _with(_dq, absmax_codes=lambda a: a.long()), ValueError, "q.absmax_codes",
                 id="absmax-codes-int64"),
    pytest.param(lambda: _with(_dq, absmax_scale=lambda a: torch.cat([a, a])), ValueError, "q.absmax_scale",
                 id="absmax-scale-extra"),
    pytest.param(lambda: _with(_dq, absmax_scale=lambda a: a.half()), ValueError, "q.absmax_scale",
                 id="absmax-scale-fp16"),
    pytest.param(lambda: _with(_dq, absmax_scale=lambda a: _set(a, 0, float("nan"))), ValueError, "q.absmax_scale",
                 id="absmax-scale-nan"),
    pytest.param(lambda: _with(_dq, absmax_offset=lambda a: a[None]), ValueError, "q.absmax_offset",
                 id="absmax-offset-shape-1"),
    pytest.param(lambda: _with(_dq, absmax_offset=torch.tensor(float("inf"))), ValueError, "q.absmax_offset",
                 id="absmax-offset-inf"),
    pytest.param(lambda: _with(_dq, absmax_offset=torch.tensor(1.0, device="meta")), ValueError, "device",
                 id="absmax-offset-other-device"),
    pytest.param(lambda: _with(_dq, absmax_scale=None), ValueError, "either absmax", id="dq-field-missing"),
    pytest.param(lambda: _with(_dq, absmax=_plain().absmax), ValueError, "either absmax", id="plain-and-dq"),
    pytest.param(lambda: _with(_plain, absmax=None), ValueError, "no statistics", id="no-statistics"),
    pytest.param(lambda: _with(_plain, absmax=lambda a: a[:-1]), ValueError, "q.absmax", id="absmax-short"),
    pytest.param(lambda: _with(_plain, absmax=lambda a: a.bfloat16()), ValueError, "q.absmax", id="absmax-bf16"),
    pytest.param(lambda: _with(_plain, absmax=lambda a: a.tolist()), TypeError, "q.absmax", id="absmax-list"),
    pytest.param(lambda: _with(_plain, absmax=lambda a: _set(a, 3, float("nan"))), ValueError, "1 NaN",
                 id="absmax-nan"),
    pytest.param(lambda: _with(_plain, absmax=lambda a: _set(a, 0, -float("inf"))), ValueError, "1 inf",
                 id="absmax-inf"),
    pytest.param(lambda: _with(_plain, absmax=lambda a: _set(a, 5, -1.0)), ValueError, "1 negative",
                 id="absmax-negative"),
    pytest.param(lambda: _dq().codes, TypeError, "NF4Weight", id="not-an-nf4weight"),
]
# fmt: on


@pytest.mark.parametrize("make, error, word", BAD_NF4_WEIGHTS)
def test_bad_nf4_weights_raise(make, error, word):
    q = make()
    before = {k: v.clone() for k, v in q.tensors().items()} if isinstance(q, NF4Weight) else {}
    with pytest.raises(error) as info:
        dequantize_nf4(q)
    assert word in str(info.value)
    for k, v in before.items():  # nothing was changed
        torch.testing.assert_close(getattr(q, k), v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("make, error, word", BAD_NF4_WEIGHTS)
def test_bad_nf4_weights_do_not_move(make, error, word):
    """NF4Weight.to checks what it copies (values included: on a GPU, dequantize_nf4 checks only the layout)."""
    q = make()
    if not isinstance(q, NF4Weight):
        return
    with pytest.raises(error) as info:
        q.to("cpu")
    assert word in str(info.value)


@pytest.mark.parametrize(
    "dtype, error, word",
    [(torch.int64, ValueError, "dtype must be float32"), (torch.uint8, ValueError, "dtype must be float32"),
     (torch.bool, ValueError, "dtype must be float32"), ("float32", TypeError, "dtype must be a torch.dtype"),
     (torch.complex64, ValueError, "dtype must be float32")],
)  # fmt: skip
def test_bad_dequantize_dtype_raises(dtype, error, word):
    with pytest.raises(error, match=word):
        dequantize_nf4(_dq(), dtype)
    assert dequantize_nf4(_dq(), torch.float64).dtype == torch.float64  # float64 is fine: fp32 values, exact


@settings(max_examples=50)  # no false alarms: whatever quantize_nf4 makes passes dequantize_nf4's checks
@given(w=weights(), blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans(),
       magnitude=st.sampled_from([1e-30, 1e-12, 1.0, 1e12, 1e30]))  # fmt: skip
def test_valid_nf4_weights_pass_the_checks(w, blocksize, double_quant, magnitude):
    if w.dtype != torch.float16:  # fp16 stays at weights()'s own magnitudes (at most 1e3)
        w = (w.float() * magnitude).to(w.dtype)
    q = quantize_nf4(w, blocksize, double_quant)
    nf4._check_nf4_weight(q)
    nf4._check_nf4_weight(q.to("cpu"))
    nf4._check_quantizable(w, blocksize, double_quant)
    out = dequantize_nf4(q)
    assert out.shape == w.shape and torch.isfinite(out).all()


@st.composite
def extreme_weights(draw):
    """Blocks whose absmax sits at 0, 1 or up to the dtype's largest value, with a partial last block."""
    dtype = draw(st.sampled_from(DTYPES))
    top = torch.finfo(dtype).max
    blocksize = draw(st.sampled_from([32, 64]))
    n_blocks = draw(st.integers(1, 40))
    levels = draw(st.lists(st.sampled_from([0.0, 1.0, top / 1e3, top / 4, top / 2, top]), min_size=n_blocks,
                           max_size=n_blocks))  # fmt: skip
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    blocks = (torch.rand(n_blocks, blocksize, generator=g) * 2 - 1) * torch.tensor(levels)[:, None]
    blocks[:, 0] = torch.tensor(levels) * draw(st.sampled_from([1.0, -1.0]))  # the absmax itself
    n = n_blocks * blocksize - draw(st.integers(0, blocksize - 1))
    return blocks.reshape(-1)[:n].to(dtype), blocksize


@given(case=extreme_weights(), double_quant=st.booleans())
def test_refused_exactly_when_the_result_would_not_be_finite(case, double_quant):
    """Up to the dtype's largest values: quantize_nf4 either returns a state that dequantizes to finite values
    or refuses, and it refuses only what would otherwise have come back with inf or NaN."""
    w, blocksize = case
    try:
        q = quantize_nf4(w, blocksize, double_quant)
    except ValueError as e:
        assert double_quant and "double quantization cannot represent" in str(e)
        event("refused: the mean overflows" if "mean overflows" in str(e) else "refused: a decoded absmax overflows")
        with pytest.raises(ValueError, match="double quantization cannot represent"):
            nf4._check_quantizable(w, blocksize, double_quant)
        with mock.patch.object(nf4, "_check_double_quant", lambda *args: None):  # what it would have returned
            unchecked = nf4._dequantize(quantize_nf4(w, blocksize, double_quant), w.dtype)
        assert not torch.isfinite(unchecked).all()
        assert torch.isfinite(dequantize_nf4(quantize_nf4(w, blocksize, double_quant=False))).all()
    else:
        event("accepted")
        nf4._check_quantizable(w, blocksize, double_quant)
        assert torch.isfinite(dequantize_nf4(q)).all()


def test_dequantize_dtype_and_to():
    w = torch.randn(10, 20, dtype=torch.bfloat16)
    q = quantize_nf4(w)
    assert dequantize_nf4(q).dtype == torch.bfloat16
    full = dequantize_nf4(q, torch.float32)
    assert full.dtype == torch.float32 and torch.equal(full.bfloat16(), dequantize_nf4(q))
    moved = q.to("cpu")
    assert isinstance(moved, NF4Weight) and moved.blocksize == q.blocksize and moved.shape == q.shape
    assert all(t.dtype == q.tensors()[k].dtype for k, t in moved.tensors().items())


def test_dequantize_compiles_without_graph_breaks():
    q = quantize_nf4(torch.randn(48, 70), blocksize=64, double_quant=True)  # partial block, odd rows
    q_plain = quantize_nf4(torch.randn(33, 3), blocksize=32, double_quant=False)  # odd numel
    compiled = torch.compile(dequantize_nf4, fullgraph=True, dynamic=False)
    assert_close(compiled(q), dequantize_nf4(q))  # the compiler may fuse a multiply-add: fp32 rounding
    assert_close(compiled(q_plain, torch.float32), dequantize_nf4(q_plain, torch.float32))


def test_triton_kernel_matches_reference_in_the_interpreter():
    """The Triton dequantizer (run by TRITON_INTERPRET=1 on CPU) against the reference, fp32/fp16 outputs
    (bf16 conversion is not exact in the interpreter; the GPU benchmark checks bf16)."""
    import os

    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it on a CPU
    from minipeft.kernels.nf4_reference import nf4_dequantize_reference
    from minipeft.kernels.nf4_triton import nf4_dequantize_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape, blocksize, double_quant, dtype in [((7, 37), 64, True, torch.float32),
                                                  ((129,), 32, False, torch.float16),
                                                  ((300, 70), 256, True, torch.float16),
                                                  ((5,), 4096, True, torch.float32)]:  # fmt: skip
        q = quantize_nf4(torch.randn(shape, device=device) * 3, blocksize, double_quant)
        if double_quant:
            args = (q.codes, q.absmax_codes, q.absmax_scale, q.absmax_offset)
        else:
            args = (q.codes, q.absmax, None, None)
        tables = (NF4_CODEBOOK.to(device), SIGNED_DYNAMIC_MAP.to(device) if double_quant else None)
        sizes = (q.numel, blocksize, q.dq_blocksize, dtype)
        out = nf4_dequantize_triton(*args, *tables, *sizes)
        ref = nf4_dequantize_reference(*args, *tables, *sizes)
        assert out.shape == (math.prod(shape),) and out.dtype == dtype
        assert_close(out, ref)


@given(numel=st.integers(1, 3000), blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans(),
       dtype=st.sampled_from(DTYPES))  # fmt: skip
def test_blockwise_and_elementwise_forms_agree(numel, blocksize, double_quant, dtype):
    """The eager (blockwise) and the torch.compile (elementwise) forms of the dequantization, run eagerly."""
    from minipeft.kernels.nf4_reference import _dequantize_blockwise, _dequantize_elementwise

    q = quantize_nf4(torch.randn(numel, generator=torch.Generator().manual_seed(numel)), blocksize, double_quant)
    if double_quant:
        args = (q.codes, q.absmax_codes, q.absmax_scale, q.absmax_offset, NF4_CODEBOOK, SIGNED_DYNAMIC_MAP)
    else:
        args = (q.codes, q.absmax, None, None, NF4_CODEBOOK, None)
    sizes = (numel, blocksize, q.dq_blocksize, dtype)
    assert torch.equal(_dequantize_blockwise(*args, *sizes), _dequantize_elementwise(*args, *sizes))
