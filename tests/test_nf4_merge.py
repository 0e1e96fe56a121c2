"""The merged QLoRA weight W' = Ŵ + scaling·B·A made from the 4-bit codes (kernels/nf4_merge_triton.py, and
kernels/nf4_merge_gluon.py, which it launches for 16-bit adapters on a GPU).

Checked against its reference (kernels/nf4_reference.nf4_merge_reference, same signature) and against the
formula in float64, rounded once to the dtype; on the CPU in Triton's interpreter (fp32, fp16), on the GPU in
bf16 too and at GPT-2's widths; the Gluon kernel on the GPU against the reference and the Triton kernel, on
hypothesis shapes, ranks, blocksizes and tiles. "auto" sends a QLoRA forward of many rows without gradients through it
(tests/test_nf4_lora.py checks that route).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import assert_close

from minipeft.kernels import nf4_merge_gluon, nf4_merge_triton
from minipeft.kernels.limits import NF4_BLOCKSIZES
from minipeft.kernels.nf4_reference import nf4_merge_reference
from minipeft.quant import dequantize_nf4
from minipeft.quant.nf4 import kernel_arguments, quantize_nf4

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # the interpreter's bf16 dot is wrong


def _layer(out_f, in_f, r, blocksize, double_quant, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = quantize_nf4(torch.randn(out_f, in_f, generator=g).to(device), blocksize, double_quant)
    a = (torch.randn(r, in_f, generator=g) / max(r, 1) ** 0.5).to(device, dtype)
    b = torch.randn(out_f, r, generator=g).to(device, dtype)
    return q, a, b


def _merge(fn, q, a, b, scaling):
    return fn(*kernel_arguments(q), q.shape[0], q.shape[1], q.blocksize, q.dq_blocksize, a, b, scaling)


@settings(deadline=None, max_examples=12)
@given(out_f=st.integers(1, 70), blocks=st.integers(1, 4), blocksize=st.sampled_from([32, 64, 128, 256]),
       r=st.integers(0, 20), double_quant=st.booleans(), dtype=st.sampled_from(DTYPES),
       scaling=st.sampled_from([0.5, 2.0, -1.25]))
@example(out_f=33, blocks=3, blocksize=32, r=5, double_quant=True, dtype=torch.float16, scaling=2.0)  # 96 columns
@example(out_f=17, blocks=2, blocksize=256, r=70, double_quant=False, dtype=torch.float32, scaling=0.5)  # 2 chunks
def test_merge_matches_its_reference_and_the_formula(out_f, blocks, blocksize, r, double_quant, dtype, scaling):
    """W' against the reference (to the dtype's tolerance; in 16 bits nearly every element bit for bit, since
    both sum in fp32 and round once) and against float64's Ŵ + scaling·B·A."""
    q, a, b = _layer(out_f, blocks * blocksize, r, blocksize, double_quant, dtype, seed=out_f * 7 + r)
    got = _merge(nf4_merge_triton.nf4_merge_op, q, a, b, scaling)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    want = _merge(nf4_merge_reference, q, a, b, scaling)
    assert_close(got, want)
    if dtype != torch.float32:
        assert (got == want).double().mean() >= 0.99
    exact = dequantize_nf4(q, torch.float64) + scaling * (b.double() @ a.double())
    assert_close(got, exact.to(dtype), scale=4.0)  # the reference's fp32 Ŵ and sum against float64's: 4 roundings


def test_a_fresh_adapter_leaves_the_dequantized_weight_and_bad_inputs_are_named():
    q, a, _ = _layer(40, 256, 4, 64, True, torch.float16, seed=3)
    fresh = _merge(nf4_merge_triton.nf4_merge_triton, q, a, torch.zeros(40, 4, dtype=torch.float16, device=DEVICE), 3.0)
    assert torch.equal(fresh, dequantize_nf4(q, torch.float16))                     # B = 0: Ŵ bit for bit
    state = kernel_arguments(q)
    with pytest.raises(ValueError, match="blocksize of .* dividing in_features"):
        nf4_merge_triton.nf4_merge_triton(*state, 40, 256, 96, q.dq_blocksize, a, a.new_zeros(40, 4), 1.0)
    with pytest.raises(ValueError, match="of one dtype"):
        nf4_merge_triton.nf4_merge_triton(*state, 40, 256, 64, q.dq_blocksize, a.float(), a.new_zeros(40, 4), 1.0)


def test_merge_op_is_one_node_under_torch_compile():
    """The custom op's fake gives torch.compile the output without running the kernel."""
    q, a, b = _layer(24, 128, 3, 64, True, torch.float32, seed=5)
    state = kernel_arguments(q)

    def f(a, b):
        return nf4_merge_triton.nf4_merge_op(*state, 24, 128, 64, q.dq_blocksize, a, b, 2.0)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    assert_close(got, _merge(nf4_merge_reference, q, a, b, 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,blocksize,double_quant", [((2304, 768), 64, True), ((768, 3072), 32, False),
                                                          ((4096, 4096), 4096, True), ((70, 160), 32, True)])
def test_merge_on_gpu(dtype, shape, blocksize, double_quant):
    """At GPT-2's widths, a 4096-column block, and 160 columns (a last tile of 32: the masked columns and rows)."""
    q, a, b = _layer(*shape, 16, blocksize, double_quant, dtype, seed=shape[1])
    got = _merge(nf4_merge_triton.nf4_merge_op, q, a, b, 2.0)
    want = _merge(nf4_merge_reference, q, a, b, 2.0)
    assert_close(got, want)
    if dtype != torch.float32:
        assert (got == want).double().mean() >= 0.99


def test_a_program_takes_two_tiles_of_a_large_weight():
    """``tiles_for``: 2 tiles a program from 16 tiles an SM on (a 4096² weight on 132 SMs), 1 below (GPT-2)."""
    assert nf4_merge_gluon.tiles_for(4096, 4096, 64, 4, 132) == 2
    assert nf4_merge_gluon.tiles_for(2304, 768, 64, 4, 132) == 1
    assert nf4_merge_gluon.tiles_for(768, 3072, 64, 4, 132) == 1


def test_the_mma_layout_kernel_takes_16_bit_adapters_on_a_gpu_only():
    """``merge_fits``: bf16/fp16 A of rank 1-64 on an NVIDIA GPU; never under the interpreter, which has no Gluon."""
    q, a, _ = _layer(40, 256, 4, 64, True, torch.float16, seed=3)
    codes = kernel_arguments(q)[0]
    assert nf4_merge_gluon.merge_fits(codes, a, 40) == (CUDA and not nf4_merge_gluon.INTERPRETING)
    assert not nf4_merge_gluon.merge_fits(codes, a.float(), 40)
    assert not nf4_merge_gluon.merge_fits(codes, a.new_zeros(nf4_merge_gluon.MAX_RANK + 1, 256), 40)
    assert not nf4_merge_gluon.merge_fits(codes, a, 65536 * 16 * nf4_merge_gluon.WARPS)  # past the grid's rows


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@settings(deadline=None, max_examples=30)
@given(out_f=st.integers(1, 300), blocks=st.integers(1, 3), blocksize=st.sampled_from(NF4_BLOCKSIZES),
       r=st.integers(1, nf4_merge_gluon.MAX_RANK), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), scaling=st.sampled_from([0.5, 2.0, -1.25]),
       tile=st.sampled_from([(64, 4, 2), (64, 4, 1), (64, 4, 4), (128, 4, 2), (256, 2, 1), (128, 1, 3),
                                  (64, 8, 8)]))
@example(out_f=4096, blocks=64, blocksize=64, r=16, double_quant=True, dtype=torch.bfloat16, scaling=2.0,
         tile=(64, 4, 4))                                                                   # 4096², as timed
@example(out_f=70, blocks=5, blocksize=32, r=1, double_quant=False, dtype=torch.float16, scaling=0.5,
         tile=(64, 4, 4))                                                                   # 160 columns: a part tile
def test_the_mma_layout_kernel_on_gpu(out_f, blocks, blocksize, r, double_quant, dtype, scaling, tile):
    """kernels/nf4_merge_gluon.py against the reference (to bf16/fp16's tolerance, and ≥ 99% of elements bit for
    bit: both sum in fp32 and round once) and against the Triton kernel; rows and columns past the tiles' edges,
    blocks of 32-4096 columns, ranks 1-64 (padded to the MMA's 16, 32 or 64), tiles of 64-256 columns by 16-128
    rows, 1-8 of them a program."""
    q, a, b = _layer(out_f, blocks * blocksize, r, blocksize, double_quant, dtype, seed=out_f * 13 + r, device="cuda")
    state = kernel_arguments(q)
    got = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)                   # every element written
    nf4_merge_gluon.launch_merge(state, *q.shape, blocksize, q.dq_blocksize, a, b, scaling, got, *tile)
    want = _merge(nf4_merge_reference, q, a, b, scaling)
    assert_close(got, want)
    assert (got == want).double().mean() >= 0.99
    launched = []
    real = nf4_merge_gluon.launch_merge
    with pytest.MonkeyPatch.context() as mp:  # undone after each example (a fixture's would last all of them)
        mp.setattr(nf4_merge_triton, "launch_merge", lambda *args: launched.append(1) or real(*args))
        routed = _merge(nf4_merge_triton.nf4_merge_triton, q, a, b, scaling)             # its default tile
        assert launched == [1] and (routed == want).double().mean() >= 0.99
        mp.setattr(nf4_merge_triton, "merge_fits", lambda *args: False)                   # the Triton kernel
        triton_kernel = _merge(nf4_merge_triton.nf4_merge_triton, q, a, b, scaling)
    assert launched == [1] and (got == triton_kernel).double().mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dq_blocksize", [100, 128])
def test_the_mma_layout_kernel_with_any_double_quant_group(dq_blocksize):
    """Second-level groups of any size (a shift where it is a power of two, a division otherwise): the state's
    absmax_scale replaced by one of that grouping, the same for the kernel and the reference."""
    q, a, b = _layer(96, 1024, 8, 32, True, torch.bfloat16, seed=9, device="cuda")
    codes, absmax, _, offset, nf4_values, dq_values = kernel_arguments(q)
    scale = torch.rand(-(-absmax.numel() // dq_blocksize), device="cuda") + 0.5
    state = (codes, absmax, scale, offset, nf4_values, dq_values)
    got = torch.empty(q.shape, device="cuda", dtype=torch.bfloat16)
    nf4_merge_gluon.launch_merge(state, *q.shape, 32, dq_blocksize, a, b, 2.0, got)
    want = nf4_merge_reference(*state, *q.shape, 32, dq_blocksize, a, b, 2.0)
    assert_close(got, want)
    assert (got == want).double().mean() >= 0.99
