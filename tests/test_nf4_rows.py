"""The NF4 forward for a few rows on mma.sync (kernels/nf4_rows_gluon.py, a Gluon kernel).

Triton's interpreter does not run Gluon, so on the CPU two things are checked: the codebook lookups, by running
the kernel's own PTX (``TABLE_ASM`` for each of a program's 256 threads, then ``LOOKUP_ASM`` and ``DQ_ASM``)
through a small emulator of the instructions it uses, shared memory included, and the choice of splits. On the GPU
the whole forward (``nf4_lora_triton.nf4_forward``, which launches it for 2 to 16 rows) against y = x·Ŵᵀ +
scaling·(x·Aᵀ)·Bᵀ + bias in float64, the routing, and a CUDA-graph replay.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_nf4_decode import (  # shared helpers
    _check,
    _counters_are_zero,
    _expected,
    _forward_checked,
    _tensors,
    captured_auto_step,
)

from minipeft.kernels import constants, launcher, nf4_lora_triton, nf4_rows_gluon
from minipeft.quant.nf4 import NF4_CODEBOOK, SIGNED_DYNAMIC_MAP, kernel_arguments, quantize_nf4

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------
# The lookup, emulated
# --------------------------------------------------------------------------------------------------------
def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32 d, a, b, c`` (default mode): byte i of d is byte c[4i:4i+3] of the 8 bytes {b, a} (a is
    bytes 0-3), or with bit 4i+3 of c set, that byte's sign bit repeated."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def _f32(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)


def _bits16(x: torch.Tensor, dtype: torch.dtype) -> int:
    """x (fp32) rounded to dtype, to nearest even (as ``cvt.rn``), its 16 bits."""
    return x.to(dtype).view(torch.int16).item() & 0xFFFF


_OPS = {"and.b32": lambda a, b: a & b, "shr.u32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b,
        "add.u32": lambda a, b: a + b, "mul.lo.u32": lambda a, b: a * b, "mad.lo.u32": lambda a, b, c: a * b + c,
        "mov.u32": lambda a: a, "prmt.b32": _prmt,
        # fp32 registers hold their bits here; the product is rounded to fp32 once, as mul.rn.f32 rounds it
        "mul.rn.f32": lambda a, b: (_f32(a) * _f32(b)).view(torch.int32).item(),
        # cvt.rn.{bf16,f16}x2.f32 d, a, b: a rounded into d's high half, b into its low half
        "cvt.rn.bf16x2.f32": lambda a, b: _bits16(_f32(a), torch.bfloat16) << 16 | _bits16(_f32(b), torch.bfloat16),
        "cvt.rn.f16x2.f32": lambda a, b: _bits16(_f32(a), torch.float16) << 16 | _bits16(_f32(b), torch.float16)}
_TABLE_AT = 0x2400  # where the emulator puts a table the PTX declares (any address will do)


def _run_ptx(asm: str, inputs: dict[str, int], shared: dict[int, int]) -> dict[str, int]:
    """Runs the few PTX instructions the lookups' inline PTX is made of (``TABLE_ASM``, ``LOOKUP_ASM`` and
    ``DQ_ASM`` here, kernels/nf4_rs_gluon.py's in tests/test_nf4_rs.py) on 32-bit integers, one thread; ``shared``
    maps byte addresses to 32-bit words (shared memory, kept between calls). Returns the registers."""
    regs = dict(inputs)

    def val(x: str) -> int:
        return int(x, 0) if x[0].isdigit() else _TABLE_AT if x.endswith("_pairs") else regs[x]

    def address(x: str) -> int:  # [reg] or [reg+offset]
        reg, _, offset = x.strip("[]").partition("+")
        return val(reg) + int(offset or "0", 0)

    for line in asm.replace("{", " ").replace("}", " ").split(";"):
        line = line.strip()
        if not line or line.startswith((".reg", ".shared", "bar.sync")):  # one thread: the barrier has no work
            continue
        op, rest = line.split(None, 1)
        args = [r.strip() for r in rest.split(",")]
        if op == "mov.b32":  # mov.b32 {lo, hi}, p: the two halves of p
            regs[args[0]], regs[args[1]] = val(args[2]) & 0xFFFF, val(args[2]) >> 16
        elif op == "st.shared.b32":
            shared[address(args[0])] = val(args[1])
        elif op == "st.shared.v4.b32":
            for i in range(4):
                shared[address(args[0]) + 4 * i] = val(args[1 + i])
        elif op == "ld.shared.b32":
            regs[args[0]] = shared[address(args[1])]
        elif op == "ld.shared.v2.f32":  # ld.shared.v2.f32 {lo, hi}, [a]: two neighbouring words
            regs[args[0]], regs[args[1]] = shared[address(args[2])], shared[address(args[2]) + 4]
        else:
            regs[args[0]] = _OPS[op](*(val(x) for x in args[1:])) & 0xFFFFFFFF
    return regs


_DQ_BITS = SIGNED_DYNAMIC_MAP.view(torch.int32).tolist()   # the absmax's codebook (dq_values), fp32 bits


def _filled_table(dtype: torch.dtype) -> dict[int, int]:
    """Shared memory after ``TABLE_ASM`` has run on the 256 threads of a program, with the operands the kernel
    gives it (``_pair_table``; with double quantization)."""
    bits = [v & 0xFFFF for v in NF4_CODEBOOK.to(dtype).view(torch.int16).tolist()]
    pairs = {f"${3 + j}": bits[2 * j] | bits[2 * j + 1] << 16 for j in range(8)}
    shared: dict[int, int] = {}
    for t in range(256):
        regs = _run_ptx(nf4_rows_gluon.TABLE_ASM,
                        {"$1": t, "$2": bits[(t >> 3) & 15], **pairs, "$11": _DQ_BITS[t] & 0xFFFFFFFF}, shared)
        assert regs["$0"] == _TABLE_AT  # it returns the tables' address
    return shared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_table_holds_each_bytes_two_codebook_values_once_a_lane(dtype):
    """Entry e = 16·hi + lo, lane l, at word e·32 + l: nf4_values[hi] in its low half, nf4_values[lo] in its high
    half (in ``dtype``), every one of the 8192 words written; then, ``DQ_AT`` bytes on, the absmax's 256 fp32
    values, and nothing else."""
    shared = _filled_table(dtype)
    bits = [v & 0xFFFF for v in NF4_CODEBOOK.to(dtype).view(torch.int16).tolist()]
    dq_at = _TABLE_AT + nf4_rows_gluon.DQ_AT
    assert nf4_rows_gluon.DQ_AT == 4 * 256 * 32     # right after the pairs
    assert sorted(shared) == [_TABLE_AT + 4 * i for i in range(256 * 32)] + [dq_at + 4 * i for i in range(256)]
    for e in range(256):
        for lane in range(32):
            assert shared[_TABLE_AT + 4 * (32 * e + lane)] == bits[e >> 4] | bits[e & 15] << 16
    assert [shared[dq_at + 4 * i] for i in range(256)] == [b & 0xFFFFFFFF for b in _DQ_BITS]


@pytest.mark.parametrize("code", [0, 1, 127, 128, 254, 255])
def test_the_absmax_lookup_returns_its_codebook_value(code):
    """``DQ_ASM`` at the tables' address + 4·code reads dq_values[code]'s 32 bits."""
    regs = _run_ptx(nf4_rows_gluon.DQ_ASM, {"$1": _TABLE_AT + 4 * code}, _filled_table(torch.bfloat16))
    assert regs["$0"] == _DQ_BITS[code] & 0xFFFFFFFF


@settings(max_examples=40)
@given(word=st.integers(0, 2**32 - 1), lane=st.integers(0, 31), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_the_lookup_returns_each_weights_codebook_value(word, lane, dtype):
    """Weight 2j of a word is byte j's high nibble, 2j+1 its low one (the order the codes are stored in); output
    f of the PTX is the codebook value of weight f in ``dtype``, bit for bit, read from the lane's own copy."""
    shared = _filled_table(dtype)
    own = {a: v for a, v in shared.items() if (a - _TABLE_AT) // 4 % 32 == lane}   # only this lane's copy
    regs = _run_ptx(nf4_rows_gluon.LOOKUP_ASM, {"$8": word, "$9": _TABLE_AT + 4 * lane}, own)
    codes = [(word >> (8 * (f // 2) + (4 if f % 2 == 0 else 0))) & 0xF for f in range(8)]
    expected = NF4_CODEBOOK.to(dtype).view(torch.int16)[codes].tolist()
    assert [regs[f"${f}"] for f in range(8)] == [e & 0xFFFF for e in expected]


def test_the_ptx_uses_only_what_the_emulator_knows():
    """So that the tests above run all of ``TABLE_ASM`` and ``LOOKUP_ASM``: every opcode in them is one
    ``_run_ptx`` emulates (``bar.sync``, a barrier, has nothing to emulate in one thread)."""
    asm = nf4_rows_gluon.TABLE_ASM + nf4_rows_gluon.LOOKUP_ASM + nf4_rows_gluon.DQ_ASM
    ops = set(re.findall(r"(?:^|[;{\n])\s*([a-z]+\.[a-z0-9.]+)\s", asm))
    assert ops <= set(_OPS) | {"mov.b32", "st.shared.b32", "st.shared.v4.b32", "ld.shared.b32", "bar.sync"}
    assert {"st.shared.b32", "st.shared.v4.b32", "ld.shared.b32", "prmt.b32"} <= ops


@pytest.mark.parametrize("N,K,sms,expected", [(4096, 4096, 132, 512), (768, 3072, 132, 256), (2304, 768, 132, 256),
                                              (64, 256, 132, 256), (4096, 4096, 1, 4096)])
def test_the_splits(N, K, sms, expected):
    """About two programs an SM, at least 256 columns a split (a multiple of 128, the GEMM's step too)."""
    assert nf4_rows_gluon.rows_split(N, K, sms) == expected


@pytest.mark.parametrize("capability,rows,codebooks,first", [
    (9, 16, "minipeft's", True), (9, 9, "minipeft's", True), (9, 16, "copies", False), (9, 16, "nf4's only", False),
    (9, 1, "minipeft's", True), (9, 8, "minipeft's", True), (9, 1, "copies", False), (8, 16, "minipeft's", False)])
def test_the_tables_come_first_only_from_codebooks_no_kernel_writes(capability, rows, codebooks, first, monkeypatch):
    """A programmatic launch (Hopper) lets the next launch in and makes its tables before waiting for the kernel
    before it — only from the codebooks minipeft marks as constants (kernels/constants.py): a caller's copy might
    have been written by that very kernel. At 1-8 rows the first step is peeled too. The launch's meta-parameters,
    recorded on the CPU in place of the kernel."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append(meta)

    monkeypatch.setattr(nf4_rows_gluon, "_nf4_rows_kernel", Recorder())
    monkeypatch.setattr(nf4_rows_gluon, "_device_info", lambda device: (132, capability))
    q = quantize_nf4(torch.randn(256, 256), 64, True)
    state = list(kernel_arguments(q))
    if codebooks == "copies":
        state[4], state[5] = state[4].clone(), state[5].clone()
    elif codebooks == "nf4's only":
        state[5] = state[5].clone()
    x, y = torch.randn(rows, 256, dtype=torch.bfloat16), torch.empty(rows, 256, dtype=torch.bfloat16)
    nf4_rows_gluon.launch_rows(x, tuple(state), 256, 256, 64, q.dq_blocksize, None, None, 1.0, None, y, None, 256)
    (meta,) = launches
    hopper = capability >= 9
    assert (meta["PDL"], meta["TRIGGER"], meta["TABLES_FIRST"], meta["PEEL"]) == (hopper, hopper, first, rows <= 8)


def test_not_on_the_cpu():
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    assert not nf4_rows_gluon.rows_fit(x, 64, None, torch.randn(16, 256, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------------------
# On the GPU
# --------------------------------------------------------------------------------------------------------
def _counting(monkeypatch) -> list:
    calls = []
    real = nf4_lora_triton.launch_rows
    monkeypatch.setattr(nf4_lora_triton, "launch_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 9, 16])
@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant", [(4096, 4096, 64, True), (2304, 768, 64, False),
                                                                (768, 3072, 128, True), (1000, 8192, 4096, True),
                                                                (50, 256, 256, False), (300, 1088, 64, True)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [16, 0], ids=["r16", "no_adapter"])
def test_rows_on_gpu(dtype, rows, out_f, in_f, blocksize, double_quant, bias, rank, monkeypatch):
    """GPT-2's widths and a 4096-wide layer; 4096-column blocks that span a split; 50 rows of Ŵ (part of one
    program's 128) and 1088 columns (17 chunks: a last split shorter than the others). The same bits on every
    call: the splits' partial sums are added in a fixed order."""
    calls = _counting(monkeypatch)
    q = quantize_nf4(torch.randn(out_f, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(in_f)),
                     blocksize, double_quant)
    x, a, b, bias_t = _tensors(rows, out_f, in_f, 16, dtype, seed=rows, device="cuda")
    a, b = (a, b) if rank else (None, None)
    args = (x, kernel_arguments(q), out_f, in_f, blocksize, q.dq_blocksize, a, b, 2.0, None, bias_t if bias else None)
    _forward_checked(args, q, dtype, calls, "the Gluon kernel")
    assert _counters_are_zero()  # the split counters, left at zero for the next call


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows,dtype,blocksize,mask,split,rank,takes", [
    (nf4_rows_gluon.MIN_ROWS, torch.bfloat16, 64, False, None, 4, True),          # a decode step
    (1, torch.float32, 64, False, None, 4, False),                                # the decode kernel
    (nf4_rows_gluon.MAX_ROWS, torch.float16, 64, False, None, 16, True),
    (nf4_rows_gluon.MAX_ROWS + 1, torch.bfloat16, 64, False, None, 4, False),    # the tensor-core GEMM from here
    (8, torch.float32, 64, False, None, 4, False),                                # mma.sync takes 16-bit operands
    (8, torch.bfloat16, 32, False, None, 4, False),                               # a chunk spans two blocks
    (8, torch.bfloat16, 64, True, None, 4, False),                                # a dropout mask
    (8, torch.bfloat16, 64, False, 2, 4, False),                                  # a split asked for
    (8, torch.bfloat16, 64, False, None, 17, False),                              # S takes one MMA tile of A
    (8, torch.bfloat16, 64, False, None, 0, True),                                # no adapter
])
def test_which_rows_take_it(rows, dtype, blocksize, mask, split, rank, takes, monkeypatch):
    calls = _counting(monkeypatch)
    q = quantize_nf4(torch.randn(256, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(0)),
                     blocksize, True)
    x, a, b, bias = _tensors(rows, 256, 512, max(rank, 1), dtype, seed=1, device="cuda")
    a, b = (a, b) if rank else (None, None)
    drop = (torch.rand(rows, 512, device="cuda") > 0.5).to(dtype) if mask else None
    y, s = nf4_lora_triton.nf4_forward(x, kernel_arguments(q), 256, 512, blocksize, q.dq_blocksize, a, b, 2.0, drop,
                                       bias, split_k=split)
    assert bool(calls) == takes
    if drop is None:
        y_expected, s_expected = _expected(q, x, a, b, bias)
        _check(y, y_expected, dtype)
        if rank:  # S of a rank below the MMA's 16 rows of A
            _check(s, s_expected, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_the_kept_kernel_runs_only_for_its_own_specialization():
    """The launch keeps what the JIT compiled and launches it again directly (kernels/launcher.py): x 16-byte
    aligned, then 2 bytes past such an address (a kernel compiled for aligned loads would read wrong), then one
    row (an M of 1 is compiled in as a constant) and back: each call matches float64, and a kept kernel gives the
    JIT's bits."""
    launcher.clear()
    q = quantize_nf4(torch.randn(300, 1088, device="cuda", generator=torch.Generator("cuda").manual_seed(3)), 64, True)
    ys = {}
    for rows, offset in ((2, 0), (2, 0), (2, 1), (2, 1), (1, 0), (1, 1), (2, 0)):
        x, a, b, bias = _tensors(rows, 300, 1088, 16, torch.bfloat16, seed=rows, device="cuda")
        buf = torch.zeros(rows * 1088 + 8, device="cuda", dtype=torch.bfloat16)
        x_at = buf[offset:offset + rows * 1088].view(rows, 1088).copy_(x)
        assert (x_at.data_ptr() % 16 == 0) == (offset == 0)
        y, s = nf4_lora_triton.nf4_forward(x_at, kernel_arguments(q), 300, 1088, 64, q.dq_blocksize, a, b, 2.0,
                                           None, bias)
        y_expected, s_expected = _expected(q, x, a, b, bias)
        _check(y, y_expected, torch.bfloat16)
        _check(s, s_expected, torch.bfloat16)
        same = ys.setdefault((rows, offset), y)
        assert torch.equal(same, y)
    assert len(launcher._COMPILED) == 4   # aligned and not, at 1 row and 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("out_f,in_f", [(4096, 4096), (300, 1088)])
def test_s_arriving_last_finishes_the_tiles(rows, out_f, in_f):
    """With the programs that make S after the tiles' (``s_first=False``), a split of S is the last arrival at
    some tiles and finishes them itself: the same y and S as the usual order, bit for bit, and the counters back
    at zero."""
    q = quantize_nf4(torch.randn(out_f, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(in_f)),
                     64, True)
    x, a, b, bias = _tensors(rows, out_f, in_f, 16, torch.bfloat16, seed=rows, device="cuda")
    k_split = nf4_rows_gluon.rows_split(out_f, in_f, torch.cuda.get_device_properties(0).multi_processor_count)
    outs = []
    for s_first in (True, False):
        y = torch.empty(rows, out_f, device="cuda", dtype=x.dtype)
        s = torch.empty(rows, 16, device="cuda", dtype=x.dtype)
        nf4_rows_gluon.launch_rows(x, kernel_arguments(q), out_f, in_f, 64, q.dq_blocksize, a, b, 2.0, bias, y, s,
                                   k_split, s_first=s_first)
        outs.append((y, s))
    y_expected, s_expected = _expected(q, x, a, b, bias)
    _check(outs[1][0], y_expected, torch.bfloat16)
    _check(outs[1][1], s_expected, torch.bfloat16)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.cuda.synchronize()
    assert _counters_are_zero()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 8])
def test_a_few_rows_replay_from_a_cuda_graph(rows, monkeypatch):
    """A decode step (one row) and a step of 8 rows on an NF4 base under "auto", captured once and replayed on new
    rows."""
    calls = _counting(monkeypatch)
    graph, out, _, (q, x, a, b, bias) = captured_auto_step(rows)
    assert calls
    for seed in (2, 3):
        x.copy_(_tensors(rows, 4096, 4096, 16, torch.bfloat16, seed=seed, device="cuda")[0])
        graph.replay()
        torch.cuda.synchronize()
        _check(out, _expected(q, x, a, b, bias)[0], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability()[0] >= 9),
                    reason="needs a Hopper (or newer) GPU")
@pytest.mark.parametrize("rows", [1, 16])
def test_a_programmatic_launch_waits_for_the_kernel_before_it(rows):
    """On Hopper each launch is the previous kernel's programmatic dependent and may start before that kernel
    ends. Six layers chained back to back, each one's y the next one's x (so a launch that read x before the
    launch before it had finished would read stale values), in a CUDA graph with ``pdl`` on: the same bits as
    the chain run eagerly with it off, which matches float64 one layer at a time."""
    n = 4096
    q = quantize_nf4(torch.randn(n, n, device="cuda", generator=torch.Generator("cuda").manual_seed(7)) / n ** 0.5,
                     64, True)
    state, sms = kernel_arguments(q), torch.cuda.get_device_properties(0).multi_processor_count
    x, a, b, _ = _tensors(rows, n, n, 16, torch.bfloat16, seed=rows, device="cuda")

    def chain(x0, pdl):
        ys, x = [], x0
        for _ in range(6):
            y = torch.empty(rows, n, device="cuda", dtype=x.dtype)
            s = torch.empty(rows, 16, device="cuda", dtype=x.dtype)
            nf4_rows_gluon.launch_rows(x, state, n, n, 64, q.dq_blocksize, a, b, 0.5, None, y, s,
                                       nf4_rows_gluon.rows_split(n, n, sms), pdl=pdl)
            ys.append(y)
            x = y
        return ys

    eager = chain(x, False)
    x0 = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = chain(x0, True)
    graph.replay()
    torch.cuda.synchronize()
    for i, (e, r) in enumerate(zip(eager, replayed, strict=True)):
        assert torch.equal(e, r), f"layer {i}: the programmatic launch read its x before the layer before it wrote it"
        _check(e, _expected(q, x if i == 0 else eager[i - 1], a, b, None, 0.5)[0], torch.bfloat16)


def test_constants_are_the_marked_objects_only():
    """kernels/constants.py: minipeft's per-device codebooks are marked; a copy or a view of one is not (a kernel
    may have written it); anything but a tensor is refused."""
    q = quantize_nf4(torch.randn(64, 64), 64, True)
    nf4_values, dq_values = kernel_arguments(q)[4:]
    assert constants.is_constant(nf4_values) and constants.is_constant(dq_values)
    assert not constants.is_constant(nf4_values.clone()) and not constants.is_constant(nf4_values[:])
    assert not constants.is_constant(None)
    t = torch.zeros(3)
    assert constants.constant(t) is t and constants.is_constant(t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        constants.constant([0.0])
