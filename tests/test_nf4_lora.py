"""The fused NF4 + LoRA kernel (kernels/nf4_lora_triton.py) against the reference: the NF4 linear op with
the reference dequantization, plus the reference's low-rank term, in float64.

On the CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32 and fp16
(the interpreter rounds bf16 wrongly; the GPU test checks bf16). Shapes are odd on purpose: in_features odd
makes a code byte straddle two rows of the weight, and every blocksize from 32 to 4096 is drawn, with and
without double quantization.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minipeft import GPT, GPTConfig, LoraConfig, get_peft_model, kernels
from minipeft.kernels import nf4_decode_triton, nf4_lora_triton, nf4_merge_triton
from minipeft.quant import dequantize_nf4, quantize_model
from minipeft.quant.nf4 import kernel_arguments, quantize_nf4

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
LEAVES = ("x", "lora_A", "lora_B", "bias")


def _layer(out_f: int, in_f: int, r: int, blocksize: int, double_quant: bool, dtype, seed: int, lead=(2, 3),
           mask: bool = True):
    """An NF4 weight's kernel arguments and the adapter's tensors (a dict), plus dy."""
    g = torch.Generator().manual_seed(seed)
    q = quantize_nf4(torch.randn(out_f, in_f, generator=g).to(DEVICE), blocksize, double_quant)
    t = dict(x=torch.randn(*lead, in_f, generator=g), lora_A=torch.randn(r, in_f, generator=g) / in_f ** 0.5,
             lora_B=torch.randn(out_f, r, generator=g) / r ** 0.5, bias=torch.randn(out_f, generator=g),
             dropout_mask=(torch.rand(*lead, in_f, generator=g) > 0.25).double() / 0.75 if mask else None)
    t = {k: None if v is None else v.to(DEVICE, dtype) for k, v in t.items()}
    dy = torch.randn(*lead, out_f, generator=g).to(DEVICE, dtype)
    return q, t, dy


def _run(q, t, dy, backend, dtype=None, wants=LEAVES):
    """y and the gradients of the `wants` leaves under one backend (inputs upcast to `dtype` if given)."""
    args = {k: None if v is None else v.detach().to(dtype or v.dtype) for k, v in t.items()}
    for k in wants:
        args[k].requires_grad_()
    out_f, in_f = q.shape
    y = kernels.nf4_lora_linear(args["x"], *kernel_arguments(q), args["bias"], out_f, in_f, q.blocksize,
                                q.dq_blocksize, args["lora_A"], args["lora_B"], 2.0, args["dropout_mask"],
                                backend=backend)
    grads = torch.autograd.grad(y, [args[k] for k in wants], dy.to(y.dtype))
    return y, dict(zip(wants, grads, strict=True))


def _check(actual, expected, dtype):
    """Relative to the expected tensor's largest |element| (gradients of A and B grow with the rows); fp16:
    S and G are rounded to fp16 before their second product, one rounding more than the output's."""
    norm = expected.abs().max().clamp_min(1.0)
    assert_close(actual.double() / norm, expected.double() / norm, dtype=dtype,
                 scale=1.0 if dtype == torch.float32 else 2.0)


def _compare(q, t, dy, dtype, wants=LEAVES):
    y, grads = _run(q, t, dy, "triton", wants=wants)
    y_ref, grads_ref = _run(q, t, dy, "reference", dtype=torch.float64, wants=wants)
    assert y.dtype == dtype and y.shape == y_ref.shape
    _check(y, y_ref, dtype)
    for name in wants:
        assert grads[name].dtype == dtype and grads[name].shape == grads_ref[name].shape, name
        _check(grads[name], grads_ref[name], dtype)


@settings(max_examples=12)
@given(out_f=st.integers(1, 45), in_f=st.integers(1, 45), r=st.sampled_from([1, 3, 8]),
       blocksize=st.sampled_from(BLOCKSIZES), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), mask=st.booleans(),
       wants=st.sets(st.sampled_from(LEAVES), min_size=1))
def test_fused_nf4_lora_matches_the_reference(out_f, in_f, r, blocksize, double_quant, dtype, mask, wants):
    q, t, dy = _layer(out_f, in_f, r, blocksize, double_quant, dtype, seed=out_f * in_f + r, mask=mask)
    _compare(q, t, dy, dtype, wants=tuple(w for w in LEAVES if w in wants))


@settings(max_examples=10)
@given(out_f=st.integers(1, 40), blocks_per_row=st.integers(1, 3), r=st.sampled_from([1, 4]),
       blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]), mask=st.booleans())
def test_packed_rows_match_the_reference(out_f, blocks_per_row, r, blocksize, double_quant, dtype, mask):
    """in_features a multiple of the blocksize: the kernel loads whole rows' bytes and one absmax per row and
    block (with 64-wide tiles here, blocksize 32 puts two blocks in a tile row, 128 one block in two tiles)."""
    in_f = blocksize * blocks_per_row
    q, t, dy = _layer(out_f, in_f, r, blocksize, double_quant, dtype, seed=out_f * in_f + r, mask=mask)
    _compare(q, t, dy, dtype)


@settings(max_examples=12)
@given(out_f=st.integers(1, 40), blocks_per_row=st.integers(1, 4), rows=st.integers(1, 20),
       r=st.sampled_from([1, 4]), blocksize=st.sampled_from([32, 64, 128]), double_quant=st.booleans(),
       split=st.integers(1, 4), lora=st.booleans(), bias=st.booleans(), mask=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_forward_kernel_against_the_dequantized_weight(out_f, blocks_per_row, rows, r, blocksize, double_quant,
                                                       split, lora, bias, mask, dtype):
    """``nf4_forward`` (codes read as words, Ŵ's rows on the MMA's M side, K split across programs, S made by
    the same launch when there is no mask, and the partial sums added by a second kernel) against
    S = (x ⊙ mask)·Aᵀ and x·Ŵᵀ + scaling·S·Bᵀ + bias in float64, for every split."""
    in_f = blocksize * blocks_per_row
    g = torch.Generator().manual_seed(out_f * in_f + rows)
    q = quantize_nf4(torch.randn(out_f, in_f, generator=g).to(DEVICE), blocksize, double_quant)
    x, a, b, bias_t, drop = (torch.randn(*shape, generator=g).to(DEVICE, dtype)
                             for shape in [(rows, in_f), (r, in_f), (out_f, r), (out_f,), (rows, in_f)])
    a, b = (a / in_f ** 0.5, b) if lora else (None, None)
    bias_t = bias_t if bias else None
    drop = (drop > 0).to(dtype) * 2 if mask and lora else None
    y, s = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize, a, b, 2.0,
                                       drop, bias_t, split_k=split)
    w = dequantize_nf4(q, torch.float64)
    expected = x.double() @ w.to(dtype).double().t()                 # Ŵ rounded to x's dtype, as the kernel does
    if lora:
        s_expected = (x.double() if drop is None else x.double() * drop.double()) @ a.double().t()
        assert s.dtype == dtype and s.shape == (rows, r)
        _check(s, s_expected, dtype)
        expected += 2.0 * s_expected @ b.double().t()
    else:
        assert s is None
    if bias:
        expected += bias_t.double()
    assert y.dtype == dtype and y.shape == (rows, out_f)
    _check(y, expected, dtype)


@pytest.mark.parametrize("rows", [nf4_decode_triton.MAX_ROWS, nf4_decode_triton.MAX_ROWS + 1])
def test_s_made_by_the_forward_launch_reaches_backward(rows):
    """No mask and K split: S comes from the forward's own programs (not the shrink kernel) — the decode
    kernel's for a few rows, the GEMM's for more — and the gradients built on it (dA, dB) match the reference."""
    q, t, dy = _layer(12, 512, 4, 64, True, torch.float32, seed=7, lead=(rows,), mask=False)
    if rows <= nf4_decode_triton.MAX_ROWS:
        assert nf4_decode_triton._config(rows, 12, 512, torch.device(DEVICE))["SPLIT_K"] > 1
    else:
        assert nf4_lora_triton._split_k(rows, 12, 512, torch.device(DEVICE)) > 1
    _compare(q, t, dy, torch.float32)


def test_an_empty_batch():
    """No rows: an empty y, zero gradients for the adapter and the bias (nothing to split or divide by)."""
    q, t, dy = _layer(12, 64, 2, 32, True, torch.float32, seed=1, lead=(0,))
    y, grads = _run(q, t, dy, "triton")
    assert y.shape == (0, 12)
    for name in LEAVES:
        assert grads[name].shape == t[name].shape and not grads[name].any(), name


def test_codes_that_are_not_word_aligned_take_the_byte_kernel():
    """Codes whose storage does not start on 4 bytes cannot be read as words: the op falls back to the
    byte-wise GEMM, with the same results."""
    q, t, dy = _layer(12, 64, 2, 32, True, torch.float32, seed=5, lead=(3,))
    buf = torch.empty(q.codes.numel() + 1, dtype=torch.uint8, device=DEVICE)
    buf[1:] = q.codes
    shifted = dataclasses.replace(q, codes=buf[1:])
    assert not nf4_lora_triton.forward_fits(64, 32, shifted.codes)
    assert nf4_lora_triton.forward_fits(64, 32, q.codes)
    y, grads = _run(shifted, t, dy, "triton")
    y_ref, grads_ref = _run(q, t, dy, "reference", dtype=torch.float64)
    _check(y, y_ref, torch.float32)
    for name in LEAVES:
        _check(grads[name], grads_ref[name], torch.float32)


def test_a_byte_straddling_two_rows():
    """in_features odd: the byte after row 0's last weight holds row 1's first, in its low nibble."""
    q, t, dy = _layer(5, 7, 2, 32, False, torch.float32, seed=3, lead=(4,))
    _compare(q, t, dy, torch.float32)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t's values as every other element of a buffer twice its size: a flat view with stride 2."""
    buf = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
    buf[::2] = t.reshape(-1)
    return buf[::2].view(t.shape)


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_strided_state_reads_as_its_values_on_every_entry(double_quant):
    """The kernels index the state as flat arrays; a strided view (codes[::2] of a larger buffer) is made
    contiguous at the boundary, so nf4_lora_linear, nf4_linear and nf4_dequantize agree with the reference on
    "triton" as on "reference" (before: nf4_lora_linear read the buffer's gaps, nf4_linear raised)."""
    q, t, dy = _layer(12, 64, 2, 32, double_quant, torch.float32, seed=6, lead=(3,))
    absmax_field = "absmax_codes" if double_quant else "absmax"
    sq = dataclasses.replace(q, codes=_strided(q.codes), **{absmax_field: _strided(getattr(q, absmax_field))})
    assert not sq.codes.is_contiguous()
    y_ref, grads_ref = _run(q, t, dy, "reference", dtype=torch.float64)
    for backend in ("triton", "reference"):
        y, grads = _run(sq, t, dy, backend)
        _check(y, y_ref, torch.float32)
        for name in LEAVES:
            _check(grads[name], grads_ref[name], torch.float32)
        base = kernels.nf4_linear(t["x"], *kernel_arguments(sq), t["bias"], 12, 64, 32, q.dq_blocksize, backend=backend)
        want = kernels.nf4_linear(t["x"], *kernel_arguments(q), t["bias"], 12, 64, 32, q.dq_blocksize,
                                  backend="reference")
        _check(base, want.double(), torch.float32)
        assert torch.equal(dequantize_nf4(sq, backend=backend), dequantize_nf4(q, backend="reference"))


def test_route_names_what_runs(monkeypatch):
    """``kernels.nf4_lora_route`` says what ``nf4_lora_linear`` runs: the fused kernels for "triton" (the
    interpreter here), the reference for "reference" and, on the CPU, for "auto"."""
    calls = []
    fused = nf4_lora_triton.nf4_lora_linear
    monkeypatch.setattr(nf4_lora_triton, "nf4_lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    q, t, _ = _layer(6, 64, 2, 32, True, torch.float32, seed=0, lead=(3,), mask=False)
    args = (t["x"], *kernel_arguments(q), t["bias"], 6, 64, q.blocksize, q.dq_blocksize, t["lora_A"], t["lora_B"],
            2.0)
    backends = ["reference", "triton"] + ([] if CUDA else ["auto"])
    for backend in backends:
        calls.clear()
        route = kernels.nf4_lora_route(*args, backend=backend)
        kernels.nf4_lora_linear(*args, backend=backend)
        assert route == ("triton" if calls else "reference") == ("triton" if backend == "triton" else "reference")
    with pytest.raises(ValueError, match="expected \\(..., 64\\)"):
        kernels.nf4_lora_route(t["x"][:, :-1], *args[1:], backend="auto")


def test_backward_saves_the_codes_not_the_dense_weight():
    """What the fused op keeps for backward: x, the 4-bit state, A, B, S and the mask; nothing the size of Ŵ."""
    q, t, dy = _layer(64, 96, 4, 64, True, torch.float32, seed=0, lead=(3,), mask=False)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        _run(q, t, dy, "triton")
    assert saved, "nothing saved"
    dense_bytes = 64 * 96 * 4
    assert all(s.numel() * s.element_size() < dense_bytes // 2 for s in saved), [tuple(s.shape) for s in saved]


def test_a_qlora_model_under_triton_runs_the_fused_op_and_matches_the_reference():
    """LoraLinear on an NF4 base calls NF4Linear.lora_forward: on "triton" the fused op, one node per layer."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    quantize_model(gpt, "all-linear", blocksize=64)
    pm = get_peft_model(gpt, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).train()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for backend in ("reference", "triton"):
        pm.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            _, loss = pm(idx, targets=idx)
        loss.backward()
        losses[backend] = loss
        grads[backend] = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
        if backend == "triton":
            seen = set()
            node = loss.grad_fn
            stack = [node]
            while stack:
                node = stack.pop()
                if node is None or node in seen:
                    continue
                seen.add(node)
                stack.extend(n for n, _ in node.next_functions)
            assert sum("EagerNF4LoraTriton" in type(n).__name__ for n in seen) == 4  # c_attn, c_proj, c_fc, proj
    assert_close(losses["triton"], losses["reference"])
    for name, g in grads["reference"].items():
        assert_close(grads["triton"][name], g)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant", [(2304, 768, 64, True), (768, 3072, 128, False),
                                                                (1000, 333, 4096, True)])
def test_fused_nf4_lora_on_gpu(dtype, out_f, in_f, blocksize, double_quant):
    q, t, dy = _layer(out_f, in_f, 16, blocksize, double_quant, dtype, seed=in_f, lead=(4, 300))
    _compare(q, t, dy, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (32, False), (256, True), (4096, False)])
def test_forward_kernel_on_gpu(dtype, rows, split, blocksize, double_quant):
    """The word-wise forward kernel, autotuned, with K split or not, against the dequantized weight."""
    g = torch.Generator(device="cuda").manual_seed(rows)
    q = quantize_nf4(torch.randn(2304, 4096, device="cuda", generator=g), blocksize, double_quant)
    x = torch.randn(rows, 4096, device="cuda", generator=g).to(dtype)
    a = torch.randn(16, 4096, device="cuda", generator=g).to(dtype) / 64
    b = torch.randn(2304, 16, device="cuda", generator=g).to(dtype) / 4
    bias = torch.randn(2304, device="cuda", generator=g).to(dtype)
    y, s = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), 2304, 4096, blocksize, q.dq_blocksize, a, b, 2.0,
                                       None, bias, split_k=split)
    w = dequantize_nf4(q, dtype).double()
    s_expected = x.double() @ a.double().t()
    _check(s, s_expected, dtype)
    _check(y, x.double() @ w.t() + 2.0 * s_expected @ b.double().t() + bias.double(), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows,grad,mask", [(1, False, False), (128, False, False), (129, False, False),
                                            (256, False, False), (130, False, True), (300, False, True),
                                            (1, True, False), (300, True, False)])
def test_auto_routes_a_qlora_forward_by_rows_and_gradients(rows, grad, mask, monkeypatch):
    """"auto": the fused kernels for a few rows without gradients, the merged weight from NF4_MERGED_MIN_ROWS rows
    on without gradients or dropout, and otherwise the dequantization with the low-rank term as torch ops;
    nf4_lora_route names what runs."""
    calls, merges = [], []
    fused, merge = nf4_lora_triton.nf4_lora_linear, nf4_merge_triton.nf4_merge_op
    monkeypatch.setattr(nf4_lora_triton, "nf4_lora_linear", lambda *a, **k: calls.append(1) or fused(*a, **k))
    monkeypatch.setattr(nf4_merge_triton, "nf4_merge_op", lambda *a, **k: merges.append(1) or merge(*a, **k))
    q, t, dy = _layer(2304, 768, 16, 64, True, torch.bfloat16, seed=rows, lead=(rows,), mask=mask)
    if grad:
        t["x"].requires_grad_()
    out_f, in_f = q.shape
    args = (t["x"], *kernel_arguments(q), t["bias"], out_f, in_f, q.blocksize, q.dq_blocksize, t["lora_A"],
            t["lora_B"], 2.0, t["dropout_mask"])
    route = kernels.nf4_lora_route(*args, backend="auto")
    y = kernels.nf4_lora_linear(*args, backend="auto")
    assert bool(calls) == (rows <= kernels.NF4_FUSED_MAX_ROWS and not grad and not mask)
    assert bool(merges) == (rows >= kernels.NF4_MERGED_MIN_ROWS and not grad and not mask)
    assert route == ("triton" if calls else "merged" if merges else "dequantize")
    y_ref, _ = _run(q, t, dy, "reference", dtype=torch.float64, wants=("x",))
    _check(y.detach(), y_ref.detach(), torch.bfloat16)
