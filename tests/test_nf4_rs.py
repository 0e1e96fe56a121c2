"""The NF4 forward for many rows on Hopper (kernels/nf4_rs_gluon.py: Ŵ made in the MMA's registers, Gluon).

On the CPU: the pre-expanded absmax (plain Triton, under the interpreter) against the double quantization's
formula; the lookup's inline PTX (its table, and the register it makes from a byte of codes) run through
tests/test_nf4_rows.py's emulator of its instructions against the dequantization's formula; and that the kernel is
not chosen there. On a Hopper GPU: the whole forward (``nf4_lora_triton.
nf4_forward``, which launches it for ``MIN_ROWS`` rows or more) against y = x·Ŵᵀ + scaling·(x·Aᵀ)·Bᵀ + bias in
float64, which calls take it, and a CUDA-graph replay.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_nf4_decode import _check, _expected, _forward_checked, _tensors, captured  # shared helpers
from test_nf4_rows import _OPS, _TABLE_AT, _run_ptx  # the emulator of the lookups' PTX
from tolerances import assert_close

from minipeft import kernels
from minipeft.kernels import nf4_lora_triton, nf4_rs_gluon
from minipeft.quant.nf4 import NF4_CODEBOOK, kernel_arguments, quantize_nf4

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _block_absmax(q) -> torch.Tensor:
    """Every block's fp32 absmax, by the double quantization's formula (or as stored)."""
    if not q.double_quant:
        return q.absmax
    _, _, scale, offset, _, dq_values = kernel_arguments(q)
    blocks = torch.arange(q.absmax_codes.numel(), device=q.codes.device)
    return dq_values[q.absmax_codes.long()] * scale[blocks // q.dq_blocksize] + offset


# --------------------------------------------------------------------------------------------------------
# On the CPU
# --------------------------------------------------------------------------------------------------------
@settings(max_examples=12)
@given(out_f=st.integers(1, 300), blocks_per_row=st.integers(1, 3), blocksize=st.sampled_from([64, 128, 256, 1024]),
       double_quant=st.booleans())
@example(out_f=5, blocks_per_row=1, blocksize=1024, double_quant=True)  # 16 steps a block; rows padded to 8 floats
def test_the_expanded_absmax(out_f, blocks_per_row, blocksize, double_quant):
    """Entry [j, n] is the absmax of the block holding Ŵ[n, 64j .. 64j + 63]; rows padded to 16 bytes for TMA."""
    in_f = blocks_per_row * blocksize
    q = quantize_nf4(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f)), blocksize,
                     double_quant)
    got = nf4_rs_gluon.expand_absmax(kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize)
    assert got.shape == (in_f // 64, out_f) and got.stride(0) % 4 == 0
    per_row = _block_absmax(q).view(out_f, blocks_per_row)                              # (out, blocks)
    expected = per_row.repeat_interleave(blocksize // 64, dim=1).t()                     # (in/64, out)
    assert_close(got, expected, dtype=torch.float32)


def _filled_table() -> dict[int, int]:
    """Shared memory after ``TABLE_ASM`` has run on the 256 threads of a program, with the operands the kernel gives
    it (``_make_table``): thread t the fp32 bits of nf4_values[t >> 4] and nf4_values[t & 15]."""
    bits = NF4_CODEBOOK.view(torch.int32).tolist()
    shared: dict[int, int] = {}
    for t in range(256):
        regs = _run_ptx(nf4_rs_gluon.TABLE_ASM, {"$1": t, "$2": bits[t >> 4] & 0xFFFFFFFF,
                                                 "$3": bits[t & 15] & 0xFFFFFFFF}, shared)
        assert regs["$0"] == _TABLE_AT  # it returns the table's address
    return shared


def test_the_table_holds_each_bytes_two_fp32_values_16_times():
    """Entry e = 16·hi + lo, copy c (a lane of a half-warp), at byte 128·e + 8·c: nf4_values[hi] then
    nf4_values[lo] in fp32, every one of the 8192 words written and nothing else."""
    shared = _filled_table()
    bits = [b & 0xFFFFFFFF for b in NF4_CODEBOOK.view(torch.int32).tolist()]
    assert sorted(shared) == [_TABLE_AT + 4 * i for i in range(256 * 16 * 2)]
    for e in range(256):
        for c in range(16):
            at = _TABLE_AT + 128 * e + 8 * c
            assert (shared[at], shared[at + 4]) == (bits[e >> 4], bits[e & 15])


@settings(max_examples=40)
@given(word=st.integers(0, 2**32 - 1), q=st.integers(0, 3), lane=st.integers(0, 31),
       absmax=st.floats(2.0**-20, 2.0**13, width=32), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_the_lookup_makes_one_register_of_the_mma_operand(word, q, lane, absmax, dtype):
    """Byte q of the word is the two weights of columns 2p, 2p + 1 (its high nibble, then its low one); the PTX
    gives round(nf4_values[code] · absmax) in ``dtype`` for each, the fp32 product rounded once — dequantize-then-
    GEMM's Ŵ bit for bit — the lower column in the low half, reading only its lane's copy of the table."""
    own = {a: v for a, v in _filled_table().items() if (a - _TABLE_AT) % 128 // 8 == lane % 16}
    asm = nf4_rs_gluon.LOOKUP_BF16_ASM if dtype == torch.bfloat16 else nf4_rs_gluon.LOOKUP_F16_ASM
    absmax_bits = torch.tensor([absmax], dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
    regs = _run_ptx(asm, {"$2": word, "$3": 0x4440 + q, "$4": absmax_bits, "$5": _TABLE_AT + 8 * (lane % 16)}, own)
    byte = (word >> (8 * q)) & 0xFF
    w = (NF4_CODEBOOK[[byte >> 4, byte & 15]] * torch.tensor(absmax, dtype=torch.float32)).to(dtype)
    assert [regs["$0"], regs["$1"]] == [v & 0xFFFF for v in w.view(torch.int16).tolist()]


def test_the_ptx_uses_only_what_the_emulator_knows():
    """So that the tests above run all of ``TABLE_ASM`` and the lookups: every opcode in them is one the emulator
    runs (``bar.sync``, a barrier, has nothing to emulate in one thread)."""
    asm = nf4_rs_gluon.TABLE_ASM + nf4_rs_gluon.LOOKUP_BF16_ASM + nf4_rs_gluon.LOOKUP_F16_ASM
    ops = set(re.findall(r"(?:^|[;{\n])\s*([a-z]+\.[a-z0-9.]+)\s", asm))
    assert ops <= set(_OPS) | {"mov.b32", "st.shared.v4.b32", "ld.shared.v2.f32", "bar.sync"}
    assert {"prmt.b32", "ld.shared.v2.f32", "mul.rn.f32", "cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"} <= ops


def test_not_on_the_cpu():
    x = torch.randn(512, 256, dtype=torch.bfloat16)
    q = quantize_nf4(torch.randn(64, 256), 64, True)
    assert not nf4_rs_gluon.rs_fits(x, 64, q.codes, None)


# --------------------------------------------------------------------------------------------------------
# On a Hopper GPU
# --------------------------------------------------------------------------------------------------------
def _counting(monkeypatch) -> list:
    calls = []
    real = nf4_lora_triton.launch_rs
    monkeypatch.setattr(nf4_lora_triton, "launch_rs", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _layer(out_f, in_f, blocksize, double_quant):
    w = torch.randn(out_f, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(in_f))
    return quantize_nf4(w, blocksize, double_quant)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [129, 1000])
@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant", [(4096, 4096, 64, True), (2304, 768, 64, False),
                                                                (768, 3072, 128, True), (1000, 8192, 4096, True),
                                                                (50, 256, 256, False), (301, 1088, 64, True)])
@pytest.mark.parametrize("rank,bias", [(16, True), (5, False), (32, True), (0, True)],
                         ids=["r16-bias", "r5", "r32-bias", "no_adapter-bias"])
def test_many_rows_on_hopper(dtype, rows, out_f, in_f, blocksize, double_quant, rank, bias, monkeypatch):
    """GPT-2's widths and a 4096-wide layer; a block of 4096 columns (64 steps share one absmax); 50 and 301 rows
    of Ŵ (part of a program's 128; y's rows not 16-byte aligned, so no TMA store); 17 steps of 64 columns (an odd
    count: the loop is written out over two); 129 and 1000 rows of x (part of its 256); ranks padded to 16 and 32.
    The same bits on every call. (MIN_ROWS lowered to 129 for it: the kernel at one partial tile of rows.)"""
    monkeypatch.setattr(nf4_rs_gluon, "MIN_ROWS", 129)
    calls = _counting(monkeypatch)
    q = _layer(out_f, in_f, blocksize, double_quant)
    x, a, b, bias_t = _tensors(rows, out_f, in_f, max(rank, 1), dtype, seed=rows, device="cuda")
    a, b = (a, b) if rank else (None, None)
    args = (x, kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize, a, b, 2.0, None, bias_t if bias else None)
    _forward_checked(args, q, dtype, calls, "the register-operand kernel")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("rows,out_f,in_f", [(2000, 4096, 4096), (4096, 2304, 768), (3000, 1500, 1088)])
def test_programs_that_walk_several_tiles(rows, out_f, in_f, monkeypatch):
    """More tiles than SMs (256, 288 and 144): each program takes every num_programs-th tile, its ring filled with
    the next tile's first steps while it finishes one; x's last tile partial; 1500 rows of Ŵ (no TMA store) and
    17 steps."""
    calls = _counting(monkeypatch)
    q = _layer(out_f, in_f, 64, True)
    x, a, b, bias = _tensors(rows, out_f, in_f, 16, torch.bfloat16, seed=rows, device="cuda")
    y, s = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), out_f, in_f, 64, q.dq_blocksize, a, b, 2.0, None,
                                       bias)
    assert calls
    _check(y, _expected(q, x, a, b, bias)[0], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_a_scaling_that_is_not_a_power_of_two_and_a_dropout_mask(monkeypatch):
    """scaling·S is rounded to x's dtype for the MMA: one rounding more than the reference's, within bf16's."""
    monkeypatch.setattr(nf4_rs_gluon, "MIN_ROWS", 129)
    calls = _counting(monkeypatch)
    q = _layer(768, 768, 64, True)
    x, a, b, bias = _tensors(400, 768, 768, 8, torch.bfloat16, seed=3, device="cuda")
    mask = (torch.rand(400, 768, device="cuda", generator=torch.Generator("cuda").manual_seed(4)) > 0.1)
    mask = mask.to(torch.bfloat16) / 0.9
    y, s = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), 768, 768, 64, q.dq_blocksize, a, b, 0.3, mask, bias)
    assert calls
    y_expected, s_expected = _expected(q, x, a, b, bias, scaling=0.3)
    s_masked = (x * mask).double() @ a.double().t()
    y_expected = y_expected - 0.3 * s_expected.to(x.dtype).double() @ b.double().t()
    y_expected = y_expected + 0.3 * s_masked.to(x.dtype).double() @ b.double().t()
    _check(y, y_expected, torch.bfloat16)
    _check(s, s_masked, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("rows,dtype,blocksize,split,rank,takes", [
    (nf4_rs_gluon.MIN_ROWS - 1, torch.bfloat16, 64, None, 16, False),   # the fused Triton GEMM below
    (nf4_rs_gluon.MIN_ROWS, torch.bfloat16, 64, None, 16, True),
    (4096, torch.float16, 128, None, 32, True),
    (2000, torch.float32, 64, None, 16, False),                           # wgmma here takes 16-bit operands
    (2000, torch.bfloat16, 32, None, 16, False),                          # a step of 64 columns spans two blocks
    (2000, torch.bfloat16, 64, 1, 16, False),                             # a split asked for: the Triton GEMM
    (2000, torch.bfloat16, 64, None, nf4_rs_gluon.MAX_RANK + 1, False),   # the low-rank MMA's depth
    (2000, torch.bfloat16, 64, None, 0, True),                            # no adapter
])
def test_which_calls_take_it(rows, dtype, blocksize, split, rank, takes, monkeypatch):
    calls = _counting(monkeypatch)
    q = _layer(256, 512, blocksize, True)
    x, a, b, bias = _tensors(rows, 256, 512, max(rank, 1), dtype, seed=1, device="cuda")
    a, b = (a, b) if rank else (None, None)
    y, s = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), 256, 512, blocksize, q.dq_blocksize, a, b, 2.0, None,
                                       bias, split_k=split)
    assert bool(calls) == takes
    _check(y, _expected(q, x, a, b, bias)[0], dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_fewer_columns_than_the_ring_holds_go_to_the_triton_gemm(monkeypatch):
    """K = 64 is one step of 64 columns, fewer than the STAGES - 1 the kernel copies ahead at its start."""
    calls = _counting(monkeypatch)
    q = _layer(256, 64, 64, True)
    x, a, b, bias = _tensors(2000, 256, 64, 16, torch.bfloat16, seed=5, device="cuda")
    y, _ = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), 256, 64, 64, q.dq_blocksize, a, b, 2.0, None, bias)
    assert not calls and 64 < 64 * (nf4_rs_gluon.STAGES - 1)
    _check(y, _expected(q, x, a, b, bias)[0], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90)")
def test_the_triton_backend_replays_it_from_a_cuda_graph(monkeypatch):
    """A QLoRA forward of MIN_ROWS rows on "triton", captured once and replayed on new rows."""
    calls = _counting(monkeypatch)
    q = _layer(1024, 1024, 64, True)
    rows = nf4_rs_gluon.MIN_ROWS
    x, a, b, bias = _tensors(rows, 1024, 1024, 16, torch.bfloat16, seed=1, device="cuda")
    args = kernel_arguments(q)

    def step():
        return kernels.nf4_lora_linear(x, *args, bias, 1024, 1024, 64, q.dq_blocksize, a, b, 2.0, backend="triton")

    graph, out = captured(step)
    assert calls
    for seed in (2, 3):
        x.copy_(_tensors(rows, 1024, 1024, 16, torch.bfloat16, seed=seed, device="cuda")[0])
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _expected(q, x, a, b, bias)[0], torch.bfloat16)
