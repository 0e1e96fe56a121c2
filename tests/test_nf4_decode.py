"""The NF4 decode kernel (kernels/nf4_decode_triton.py): a few rows of x against an NF4 weight, on CUDA cores.

Checked against S = x·Aᵀ and y = x·Ŵᵀ + scaling·S·Bᵀ + bias in float64, with Ŵ the reference dequantization
(the kernel keeps Ŵ in fp32). On the CPU it runs in Triton's interpreter (fp32 and fp16); the GPU tests add
bf16, GPT-2-sized layers and a CUDA graph. The kernel's own bookkeeping is checked too: the partial sums over K
are added in a fixed order (the same bits on every call) and the counters it finishes with are zero again.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minipeft import kernels
from minipeft.kernels import nf4_decode_triton, nf4_lora_triton
from minipeft.quant import dequantize_nf4
from minipeft.quant.nf4 import kernel_arguments, quantize_nf4

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _tensors(rows, out_f, in_f, r, dtype, seed, device=DEVICE):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, in_f, device=device, generator=g).to(dtype)
    a = (torch.randn(r, in_f, device=device, generator=g) / in_f ** 0.5).to(dtype)
    b = (torch.randn(out_f, r, device=device, generator=g) / r ** 0.5).to(dtype)
    bias = torch.randn(out_f, device=device, generator=g).to(dtype)
    return x, a, b, bias


def _expected(q, x, a, b, bias, scaling=2.0):
    """(y, S) in float64; S rounded to x's dtype before its second product, as the kernel (and shrink) do."""
    y = x.double() @ dequantize_nf4(q, torch.float64).t()
    s = None
    if a is not None:
        s = x.double() @ a.double().t()
        y = y + scaling * s.to(x.dtype).double() @ b.double().t()
    return (y if bias is None else y + bias.double()), s


def _check(actual, expected, dtype):
    """Relative to the expected tensor's largest |element|; a sum over K of up to 4096 terms (scale 2)."""
    norm = expected.abs().max().clamp_min(1.0)
    assert_close(actual.double() / norm, expected / norm, dtype=dtype, scale=2.0)


def _forward_checked(args: tuple, q, dtype, calls: list, kernel: str) -> torch.Tensor:
    """``nf4_lora_triton.nf4_forward(*args)`` (args as it takes them, x first), checked: the kernel it was to take
    ran (``calls``), y and S against float64, the same bits on two more calls. Returns y. Also
    tests/test_nf4_rows.py's and test_nf4_rs.py's."""
    x, _, _, _, _, _, a, b, _, _, bias = args
    y, s = nf4_lora_triton.nf4_forward(*args)
    assert calls, f"the forward did not take {kernel}"
    y_expected, s_expected = _expected(q, x, a, b, bias)
    _check(y, y_expected, dtype)
    if a is not None:
        _check(s, s_expected, dtype)
    for _ in range(2):
        assert torch.equal(nf4_lora_triton.nf4_forward(*args)[0], y)
    return y


def captured(step, warmups: int = 1):
    """(graph, its output): ``step`` run ``warmups`` times on a side stream, then captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = step()
    return graph, out


def _counters_are_zero() -> bool:
    return all(not c.any() for c in nf4_decode_triton._COUNTERS.values())


@settings(max_examples=12)
@given(rows=st.integers(1, nf4_decode_triton.MAX_ROWS), out_f=st.integers(1, 40), blocks_per_row=st.integers(1, 4),
       blocksize=st.sampled_from([32, 64, 128, 256]), double_quant=st.booleans(), r=st.sampled_from([0, 1, 4, 16, 64]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       words=st.sampled_from([8, 16]), split=st.integers(1, 4), s_first=st.booleans())
@example(rows=2, out_f=33, blocks_per_row=2, blocksize=64, double_quant=True, r=64, bias=True, dtype=torch.float32,
         words=8, split=3, s_first=True)
@example(rows=2, out_f=33, blocks_per_row=2, blocksize=64, double_quant=True, r=4, bias=True, dtype=torch.float32,
         words=8, split=2, s_first=False)
def test_decode_against_the_dequantized_weight(rows, out_f, blocks_per_row, blocksize, double_quant, r, bias, dtype,
                                               words, split, s_first):
    """Every tiling the interpreter can afford: 16 rows of Ŵ per program, 8 or 16 words per chunk (so a
    chunk may hold several quantization blocks or part of one), K split 1-4 ways (the last slice may end
    inside a chunk), with and without an adapter (r = 0; r = 64 narrows the steps that make S) and a bias.
    The interpreter runs programs in the order of their index, so with S's programs last (``S_FIRST`` off)
    every tile is finished by a part of S: the path a GPU takes when a part of S arrives after a tile's slices."""
    in_f = blocksize * blocks_per_row
    q = quantize_nf4(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(in_f + out_f)).to(DEVICE),
                     blocksize, double_quant)
    x, a, b, bias_t = _tensors(rows, out_f, in_f, max(r, 1), dtype, seed=rows * in_f + r)
    a, b = (a, b) if r else (None, None)
    bias_t = bias_t if bias else None
    config = dict(BN=16, BW=words, SPLIT_K=split, S_FIRST=s_first, num_warps=1, num_stages=1)
    y, s = nf4_decode_triton.nf4_decode(x, kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize, a, b, 2.0,
                                        bias_t, config=config)
    y_expected, s_expected = _expected(q, x, a, b, bias_t)
    assert y.dtype == dtype and y.shape == (rows, out_f)
    _check(y, y_expected, dtype)
    if r:
        assert s.dtype == dtype and s.shape == (rows, r)
        _check(s, s_expected, dtype)
    else:
        assert s is None
    assert _counters_are_zero()  # so the next call finds its counters at zero


@pytest.mark.parametrize("rows,mask,split,decode", [(1, False, None, True), (nf4_decode_triton.MAX_ROWS, False, None,
                                                    True), (nf4_decode_triton.MAX_ROWS + 1, False, None, False),
                                                   (1, True, None, False), (1, False, 2, False)])
def test_nf4_forward_sends_a_few_rows_to_the_decode_kernel(rows, mask, split, decode, monkeypatch):
    """At most MAX_ROWS rows, no dropout mask and no split asked for: the decode kernel; otherwise the
    tensor-core GEMM. Either way the result is the layer's."""
    calls = []
    real = nf4_lora_triton.nf4_decode
    monkeypatch.setattr(nf4_lora_triton, "nf4_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = quantize_nf4(torch.randn(20, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE), 64, True)
    x, a, b, bias = _tensors(rows, 20, 128, 4, torch.float32, seed=rows)
    drop = (torch.rand(rows, 128, generator=torch.Generator().manual_seed(1)) > 0.5).float().to(DEVICE) if mask \
        else None
    y, _ = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), 20, 128, 64, q.dq_blocksize, a, b, 2.0, drop, bias,
                                       split_k=split)
    assert bool(calls) == decode
    if drop is None:  # (a masked call is checked in tests/test_nf4_lora.py)
        _check(y, _expected(q, x, a, b, bias)[0], torch.float32)


def test_more_rows_than_the_kernel_takes_is_an_error():
    q = quantize_nf4(torch.randn(8, 64).to(DEVICE), 64, False)
    x = torch.randn(nf4_decode_triton.MAX_ROWS + 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match=f"at most {nf4_decode_triton.MAX_ROWS} rows"):
        nf4_decode_triton.nf4_decode(x, kernel_arguments(q), 8, 64, 64, q.dq_blocksize, None, None, 1.0, None)


# --------------------------------------------------------------------------------------------------------
# On the GPU
# --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", range(1, nf4_decode_triton.MAX_ROWS + 1))
@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant", [(4096, 4096, 64, True), (2304, 768, 32, False),
                                                                (1000, 8192, 4096, True), (50, 256, 128, False),
                                                                (300, 1088, 64, True)])
@pytest.mark.parametrize("lora,bias,s_first", [(True, True, True), (False, False, True), (True, False, False)])
def test_decode_on_gpu(dtype, rows, out_f, in_f, blocksize, double_quant, lora, bias, s_first):
    """The default tiling at GPT-2 widths, at a 4096-wide layer (K split across programs), with 4096-column
    blocks that span many chunks, a small odd layer, and 1088 columns: not a whole number of 256-column
    chunks, so the last slice ends inside one (the masked path). The same bits on every call: the slices'
    partial sums are added in a fixed order although programs finish in any order on a GPU. With S's programs
    after the tiles' (``S_FIRST`` off), parts of S come last and finish tiles."""
    q = quantize_nf4(torch.randn(out_f, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(in_f)),
                     blocksize, double_quant)
    x, a, b, bias_t = _tensors(rows, out_f, in_f, 16, dtype, seed=rows, device="cuda")
    a, b = (a, b) if lora else (None, None)
    bias_t = bias_t if bias else None
    config = None if s_first else {**nf4_decode_triton._config(rows, out_f, in_f, x.device), "S_FIRST": False}
    y, s = nf4_decode_triton.nf4_decode(x, kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize, a, b, 2.0,
                                        bias_t, config=config)
    y_expected, s_expected = _expected(q, x, a, b, bias_t)
    _check(y, y_expected, dtype)
    if lora:
        _check(s, s_expected, dtype)
    torch.cuda.synchronize()
    assert _counters_are_zero()
    for _ in range(3):
        again, _ = nf4_decode_triton.nf4_decode(x, kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize, a,
                                                b, 2.0, bias_t, config=config)
        assert torch.equal(again, y)


def captured_auto_step(rows: int, dtype: torch.dtype = torch.bfloat16):
    """(graph, its output, the step, (q, x, a, b, bias)): a forward of ``rows`` rows of x through a 4096 × 4096
    NF4 layer with a rank-16 adapter under "auto", run twice on a side stream and then captured in a CUDA graph.
    Also tests/test_nf4_rows.py's."""
    q = quantize_nf4(torch.randn(4096, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(0)), 64,
                     True)
    x, a, b, bias = _tensors(rows, 4096, 4096, 16, dtype, seed=1, device="cuda")
    args = kernel_arguments(q)

    def step():
        return kernels.nf4_lora_linear(x, *args, bias, 4096, 4096, 64, q.dq_blocksize, a, b, 2.0, backend="auto")

    graph, out = captured(step, warmups=2)
    return graph, out, step, (q, x, a, b, bias)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_decode_step_replays_from_a_cuda_graph(monkeypatch):
    """A decode step on an NF4 base under "auto", captured once and replayed on new tokens (fp32 x: 16-bit x
    takes kernels/nf4_rows_gluon.py, whose replay tests/test_nf4_rows.py checks). The counters of the capture
    stream exist before the capture (made by eager calls on that stream), so no zeroing is recorded: every replay
    finds them at zero only because the previous launch left them so."""
    calls = []
    real = nf4_lora_triton.nf4_decode
    monkeypatch.setattr(nf4_lora_triton, "nf4_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    graph, out, step, (q, x, a, b, bias) = captured_auto_step(1, torch.float32)
    assert calls
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))
        graph.replay()
        y = out.clone()
        torch.cuda.synchronize()
        assert torch.equal(y, step())
        _check(y, _expected(q, x, a, b, bias)[0], torch.float32)
    assert _counters_are_zero()
