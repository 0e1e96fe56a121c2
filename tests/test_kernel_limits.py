"""What the Triton kernels can take, checked where the switch routes a call (kernels/limits.py, kernels/__init__.py):
32-bit offsets, the GPU a launch runs on, caches that must see in-place changes, and the TMA GEMM's operands.

Nothing here allocates a large tensor: sizes past 2³¹ elements come from stride-0 views (``expand``) and meta
tensors, which have shapes and strides but no memory. On a CPU-only machine "triton" runs in the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); "auto"'s routing for CUDA tensors is checked on the routing
functions themselves, with a CUDA device object, since "auto" sends CPU tensors to the reference whatever their size.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tolerances import assert_close

from minipeft import kernels
from minipeft.kernels import limits, multi_lora_routes, reference
from minipeft.quant.nf4 import kernel_arguments, quantize_nf4

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = kernels.available_backends()["triton"] == "ok"
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason=f"needs CUDA or the Triton interpreter: "
                                                          f"{kernels.available_backends()['triton']}")
CUDA_DEVICE = torch.device("cuda")  # a device object for the routing functions; nothing is allocated on it
BIG = 2**31                         # the first element count past the kernels' 32-bit offsets


def meta(*shape, stride=None, dtype=torch.float32) -> torch.Tensor:
    """A tensor with a shape and strides but no memory."""
    if stride is None:
        return torch.empty(*shape, device="meta", dtype=dtype)
    return torch.empty_strided(shape, stride, device="meta", dtype=dtype)


def broadcast(*shape, dtype=torch.float32) -> torch.Tensor:
    """A tensor of ``shape`` on DEVICE that holds one element (a stride-0 view)."""
    return torch.zeros((), device=DEVICE, dtype=dtype).expand(*shape)


# ----------------------------------------------------------------------------------------------------------
# 32-bit offsets: what counts, "triton" refuses, "auto" takes the reference
# ----------------------------------------------------------------------------------------------------------
def test_span_is_what_the_strides_reach():
    assert limits.span(meta(3, 4)) == 12
    assert limits.span(meta(4, 3).t()) == 12                               # a permutation spans the same
    assert limits.span(meta(0, 5)) == 0
    assert limits.span(torch.zeros(()).expand(2**20, 2**20)) == 1          # 2⁴⁰ elements, one in memory
    assert limits.span(meta(8, 2**14, stride=(2**29, 1))) == 7 * 2**29 + 2**14  # rows of a larger tensor
    assert limits.too_large([("x", meta(2**16, 2**15)), ("w", None)]) == "x of shape (65536, 32768) spans " \
                                                                         "2147483648 elements"
    assert limits.too_large([("x", meta(2**16, 2**15 - 1))], [("y", BIG - 1)]) is None
    assert limits.too_large([], [("y", BIG)]) == "y has 2147483648 elements"


def test_the_lora_guard_counts_every_tensor_and_buffer():
    """x's span, and rows · in, rows · out, and the rank-padded buffers (G, the sums of dB and dA), each < 2³¹."""
    too_large = kernels._lora_too_large

    def call(x, N=64, r=2):
        K = x.shape[-1]
        return too_large(x, meta(N, K), None, meta(r, K), meta(N, r), None)

    assert call(meta(8, 64)) is None
    assert call(meta(8, 64, stride=(2**29, 1))).startswith("x of shape (8, 64) spans 3758096448")
    assert call(meta(2**16, 16), N=2**15).startswith("y or dY (rows, out)")            # 2³¹ outputs
    assert call(meta(2**27, 1), N=1, r=1).startswith("G (rows, padded rank)")       # 2²⁷ rows · 16
    assert call(meta(2, 2**27), N=1, r=1).startswith("the sum of dA")                 # 16 · 2²⁷
    assert too_large(meta(2, 64), meta(8, 64, stride=(2**29, 1)), None, meta(2, 64), meta(8, 2), None) \
        .startswith("weight")


def test_the_multi_lora_guard_counts_every_tensor_and_buffer():
    """Mixed adapters: a row of x, S (rows, largest rank), the stacked factors (Σr · in, out · Σr) and the packed
    tensors' spans; lists of unpacked adapters count as the packing the call makes of them (their ranks summed).
    The rows themselves are reached in 64-bit offsets: 2²⁶ rows of 2⁶ columns pass."""
    too_large = kernels._multi_too_large
    As, Bs = [meta(2, 64), meta(3, 64)], [meta(32, 2), meta(32, 3)]
    assert too_large(meta(8, 64), [2, 3], As, Bs) is None
    assert too_large(meta(2**26, 64), [2, 3], As, Bs) is None
    assert too_large(meta(8, 64, stride=(1, 2**26)), [2, 3], As, Bs).startswith("a row of x")
    assert too_large(meta(2**27, 64), [16, 3], [meta(16, 64), meta(3, 64)], [meta(32, 16), meta(32, 3)]) \
        .startswith("S or dS (x's 134217728 rows × the largest rank, 16)")             # 2²⁷ rows · 16
    assert too_large(meta(2**27, 64), [15, 1], [meta(15, 64), meta(1, 64)], [meta(32, 15), meta(32, 1)]) is None
    two = [meta(2**14, 2**16)] * 2                                                      # each A 2³⁰, stacked 2³¹
    assert too_large(meta(2, 2**16), [2**14] * 2, two, [meta(8, 2**14)] * 2) \
        .startswith("the stacked A's or dA (Σr = 32768 × in = 65536)")
    assert too_large(meta(2, 2**16), [2**14], two[:1], [meta(8, 2**14)]) is None
    assert too_large(meta(2, 8), [2**14] * 2, [meta(2**14, 8)] * 2, [meta(2**16, 2**14)] * 2) \
        .startswith("the stacked B's or dB (out = 65536 × Σr = 32768)")
    # x that no view flattens: the kernels read a contiguous copy, whose columns are adjacent (no false refusal)
    unviewable = meta(2**29, 3, 2).permute(2, 1, 0)                                     # (2, 3, 2²⁹), strides (1, 2, 6)
    assert too_large(unviewable, [1], [meta(1, 2**29)], [meta(2, 1)]) is None
    assert too_large(meta(2, 64), [5], meta(5, 64, stride=(2**29, 1)), meta(8, 5)).startswith("adapters.a_cat")
    assert too_large(meta(2, 64), [5], meta(5, 64), meta(8, 5, stride=(2**29, 1))).startswith("adapters.b_cat")


def test_auto_takes_the_reference_for_mixed_adapters_past_the_offsets(monkeypatch):
    """"auto" on CUDA sends a mixed-adapter call the kernels cannot reach to the reference (the gathered route, torch
    ops, keeps no such limit); "triton" refuses it. A CPU-tensor stand-in for CUDA: the route reads x.is_cuda."""
    x, index = torch.zeros(4, 8, dtype=torch.float16), torch.zeros(4, dtype=torch.long)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(kernels, "_triton_unavailable", lambda device, dtype: None)
    assert kernels._multi_route("auto", x, index, None, True, None) == "triton"
    assert kernels._multi_route("auto", x, index, None, True, "S or dS has 2147483648 elements") == "reference"
    with pytest.raises(ValueError, match="S or dS has 2147483648 elements, too large for the Triton kernels' 32-bit"):
        kernels._multi_route("triton", x, index, None, True, "S or dS has 2147483648 elements")
    # through the public entry: S of 2²⁷ rows · rank 16, past the gathered route's size, so only the guard stops it
    big, big_index = broadcast(2**27, 16), torch.zeros((), dtype=torch.long).expand(2**27)
    packed = kernels.pack_adapters([torch.zeros(16, 16)], [torch.zeros(8, 16)], [1.0])
    assert multi_lora_routes.choose_route(big, big_index, packed, False) == "triton"
    assert kernels.multi_lora_route(big, big_index, packed, backend="auto") == "reference"


@needs_triton
def test_triton_refuses_a_call_past_the_offsets():
    """Every Triton entry says why, before any memory is touched: the expanded views hold one element each."""
    x, A = broadcast(2**16, 16), torch.zeros(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"y or dY \(rows, out\) has 2147483648 elements, too large for the "
                                         r"Triton kernels' 32-bit offsets"):
        kernels.lora_linear(x, broadcast(2**15, 16), None, A, broadcast(2**15, 2), 1.0, backend="triton")
    # an NF4 weight of 2¹⁶ × 2¹⁵ = 2³¹ elements (no double quantization: absmax fp32, one per 64 weights)
    out_f, in_f = 2**16, 2**15
    state = (broadcast(BIG // 2, dtype=torch.uint8), broadcast(BIG // 64), None, None,
             torch.zeros(16, device=DEVICE), None)
    words = "the NF4 weight \\(out · in\\) has 2147483648 elements, too large for the Triton kernels' 32-bit offsets"
    with pytest.raises(ValueError, match=words):
        kernels.nf4_dequantize(*state, BIG, 64, 256, torch.float32, backend="triton")
    with pytest.raises(ValueError, match=words):
        kernels.nf4_linear(broadcast(2, in_f), *state, None, out_f, in_f, 64, 256, backend="triton")
    with pytest.raises(ValueError, match=words):
        kernels.nf4_lora_linear(broadcast(2, in_f), *state, None, out_f, in_f, 64, 256, broadcast(1, in_f),
                                broadcast(out_f, 1), 1.0, backend="triton")
    # mixed adapters: S of 2²⁷ rows · rank 16, packed or not
    x, w = broadcast(2**27, 16), broadcast(8, 16)
    index = torch.zeros((), dtype=torch.long, device=DEVICE).expand(2**27)
    A16, B16 = torch.zeros(16, 16, device=DEVICE), torch.zeros(8, 16, device=DEVICE)
    words = r"S or dS \(x's 134217728 rows × the largest rank, 16\) has 2147483648 elements, too large for the Triton"
    with pytest.raises(ValueError, match=words):
        kernels.multi_lora_linear(x, w, None, [A16], [B16], [1.0], index, backend="triton", check_index=False)
    packed = kernels.pack_adapters([A16], [B16], [1.0])
    with pytest.raises(ValueError, match=words):
        kernels.multi_lora_linear_packed(x, w, None, packed, index, backend="triton", check_index=False)
    with pytest.raises(ValueError, match=words):
        kernels.multi_lora_route(x, index, packed, backend="triton")


@needs_triton
def test_auto_takes_the_reference_past_the_offsets():
    """On CUDA, "auto" runs Triton only where the offsets fit (the routing functions, given a CUDA device)."""
    reason = "x of shape (8, 64) spans 3758096448 elements"
    assert kernels._lora_route("auto", CUDA_DEVICE, torch.float16, None) == "routes"
    assert kernels._lora_route("auto", CUDA_DEVICE, torch.float16, reason) == "reference"
    assert kernels._nf4_route("auto", "nf4", CUDA_DEVICE, torch.float16, BIG - 1) == "triton"
    assert kernels._nf4_route("auto", "nf4", CUDA_DEVICE, torch.float16, BIG) == "reference"  # nf4_dequantize too
    assert kernels._int8_route("auto", "int8", CUDA_DEVICE, torch.float16, None) == "triton"
    assert kernels._int8_route("auto", "int8", CUDA_DEVICE, torch.float16, reason) == "reference"
    for route in (lambda: kernels._lora_route("triton", CUDA_DEVICE, torch.float16, reason),
                  lambda: kernels._nf4_route("triton", "nf4", CUDA_DEVICE, torch.float16, BIG),
                  lambda: kernels._int8_route("triton", "int8", CUDA_DEVICE, torch.float16, reason)):
        with pytest.raises(ValueError, match="32-bit offsets"):
            route()


def _nf4_lora_args(seed=0, out_f=8, in_f=64):
    g = torch.Generator().manual_seed(seed)
    q = quantize_nf4(torch.randn(out_f, in_f, generator=g).to(DEVICE), 32, True)
    x, A, B = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((3, in_f), (2, in_f), (out_f, 2)))
    return (x, *kernel_arguments(q), None, out_f, in_f, 32, q.dq_blocksize, A, B, 2.0)


@needs_triton
def test_nf4_lora_past_the_offsets_skips_the_fused_kernels_on_auto(monkeypatch):
    """Where "auto" would take the fused kernels but a tensor is too large for them, it computes the call with the
    dequantization and torch ops instead; "triton" refuses it."""
    from minipeft.kernels import nf4_lora_triton

    fused = []
    monkeypatch.setattr(kernels, "_nf4_fused_pays", lambda *a: True)
    monkeypatch.setattr(nf4_lora_triton, "nf4_lora_linear", lambda *a: fused.append(a))
    monkeypatch.setattr(kernels, "_lora_too_large", lambda *a: "x of shape (3, 64) spans 2147483648 elements")
    args = _nf4_lora_args()
    y = kernels.nf4_lora_linear(*args, backend="auto")
    assert not fused
    assert_close(y, kernels.nf4_lora_linear(*args, backend="reference"))
    with pytest.raises(ValueError, match="spans 2147483648 elements, too large for the Triton kernels' 32-bit"):
        kernels.nf4_lora_linear(*args, backend="triton")


@needs_triton
@pytest.mark.parametrize("module", ["lora_triton", "nf4_lora_triton"])
def test_backward_copies_a_dy_that_spans_past_the_offsets(module, monkeypatch):
    """The switch checks rows · out; a dY that is a slice of a larger gradient (torch.cat's backward hands one)
    spans more, and is copied before the kernels read it. The limit is lowered to this test's sizes."""
    from minipeft.kernels import lora_triton, nf4_lora_triton

    mod = {"lora_triton": lora_triton, "nf4_lora_triton": nf4_lora_triton}[module]
    seen = []
    real_dsdb = mod.dsdb
    monkeypatch.setattr(mod, "dsdb", lambda dy2d, *a: seen.append(dy2d.is_contiguous()) or real_dsdb(dy2d, *a))
    monkeypatch.setattr(mod, "OFFSET_LIMIT", 4 * 8 + 1)  # above M·N = 32, below the slice's span 3·13 + 8 = 47
    g = torch.Generator().manual_seed(1)
    x, A, B, w, weights = (torch.randn(*shape, generator=g).to(DEVICE)
                           for shape in ((4, 64), (2, 64), (8, 2), (8, 64), (4, 13)))
    q = quantize_nf4(w, 32, True)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        if module == "lora_triton":
            y = kernels.lora_linear(leaves[0], w, None, leaves[1], leaves[2], 2.0, backend=backend)
        else:
            y = kernels.nf4_lora_linear(leaves[0], *kernel_arguments(q), None, 8, 64, 32, q.dq_blocksize, leaves[1],
                                        leaves[2], 2.0, backend=backend)
        (torch.cat([y, y.new_zeros(4, 5)], dim=1) * weights).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    assert seen == [True]
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------
# Every op that launches Triton kernels runs on its tensors' GPU
# ----------------------------------------------------------------------------------------------------------
def _lora_leaves(M=4, K=16, N=8, r=2, seed=0):
    """x, W, A, B on DEVICE; x, A and B require grad."""
    g = torch.Generator().manual_seed(seed)
    x, w, A, B = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((M, K), (N, K), (r, K), (N, r)))
    return x.requires_grad_(), w, A.requires_grad_(), B.requires_grad_()


LAUNCHING_OPS = ["lora_linear", "merged_train", "nf4_lora_linear", "nf4_dequantize", "int8_linear", "multi_lora_linear"]


def _launches() -> dict:
    """One forward (and backward, where there is one) of each op that launches Triton kernels."""
    from minipeft.kernels import lora_routes

    x, w, A, B = _lora_leaves()
    q = quantize_nf4(w.detach(), 32, True)
    index = torch.tensor([0, -1, 0, 0], device=DEVICE)

    def nf4_lora():
        return kernels.nf4_lora_linear(x, *kernel_arguments(q), None, 8, 16, 32, q.dq_blocksize, A, B, 2.0,
                                       backend="triton")

    def int8():
        return kernels.int8_linear(x.detach(), torch.ones(8, 16, dtype=torch.int8, device=DEVICE),
                                   torch.ones(8, device=DEVICE), None, 6.0, backend="triton")

    return {
        "lora_linear": lambda: kernels.lora_linear(x, w, None, A, B, 2.0, backend="triton"),
        "merged_train": lambda: lora_routes.lora_linear(x, w, None, A, B, 2.0, path="merged_train"),
        "nf4_lora_linear": nf4_lora,
        "nf4_dequantize": lambda: kernels.nf4_dequantize(*kernel_arguments(q), 128, 32, 256, torch.float32,
                                                         backend="triton"),
        "int8_linear": int8,
        "multi_lora_linear": lambda: kernels.multi_lora_linear(x, w, None, [A], [B], [2.0], index, backend="triton"),
    }


@needs_triton
@pytest.mark.parametrize("op", LAUNCHING_OPS)
def test_each_op_enters_its_tensors_device(op, monkeypatch):
    """Triton launches on the current CUDA device, not on the tensors' (a layer on cuda:1 would run its kernels on
    cuda:0's pointers): each op enters ``torch.cuda.device_of`` its input, forward and backward."""
    entered = []

    def device_of(t):
        entered.append(t)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "device_of", device_of)
    launches = _launches()
    assert sorted(launches) == sorted(LAUNCHING_OPS)
    y = launches[op]()
    assert entered and all(isinstance(t, torch.Tensor) for t in entered), op
    if y.requires_grad:
        entered.clear()
        y.sum().backward()
        assert entered, f"{op}: backward"


@needs_triton
def test_the_tma_scratch_memory_is_made_on_the_tensors_device():
    from minipeft.kernels import lora_triton

    scratch = lora_triton._tma_allocator(torch.device("cpu"))(64, 16, None)
    assert scratch.device == torch.device("cpu") and scratch.numel() == 64


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs CUDA: two devices")
def test_kernels_run_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every Triton entry gives the reference's numbers."""
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        g = torch.Generator(device=dev).manual_seed(0)
        x, w = torch.randn(64, 256, device=dev, generator=g), torch.randn(128, 256, device=dev, generator=g)
        A, B = torch.randn(8, 256, device=dev, generator=g) / 16, torch.randn(128, 8, device=dev, generator=g)
        for backend in ("triton", "reference"):
            leaves = [t.clone().requires_grad_() for t in (x, A, B)]
            y = kernels.lora_linear(leaves[0], w, None, leaves[1], leaves[2], 2.0, backend=backend)
            y.sum().backward()
            if backend == "triton":
                got = (y, *[t.grad for t in leaves])
        for a, b in zip(got, (y, *[t.grad for t in leaves]), strict=True):
            assert_close(a, b, scale=4.0)
        q = quantize_nf4(w, 64, True)
        assert_close(kernels.nf4_dequantize(*kernel_arguments(q), w.numel(), 64, 256, torch.float32, backend="triton"),
                     kernels.nf4_dequantize(*kernel_arguments(q), w.numel(), 64, 256, torch.float32,
                                            backend="reference"))
        for rows in (1, 64):
            args = (x[:rows], *kernel_arguments(q), None, 128, 256, 64, 256, A, B, 2.0)
            assert_close(kernels.nf4_lora_linear(*args, backend="triton"),
                         kernels.nf4_lora_linear(*args, backend="reference"), scale=4.0)


# ----------------------------------------------------------------------------------------------------------
# Caches and inference tensors (which keep no version counter)
# ----------------------------------------------------------------------------------------------------------
@needs_triton
def test_merged_route_under_inference_mode_keeps_nothing_and_follows_in_place_changes():
    """Under torch.inference_mode "merged" reads no version counter (there is none): it merges for the call alone,
    so an in-place change is seen; path=None falls back to "cublas". Before, both raised."""
    from minipeft.kernels import lora_routes

    x, w, A, B = (t.detach() for t in _lora_leaves())
    with torch.inference_mode():
        x, w, A, B = (t.clone() for t in (x, w, A, B))
        for path in ("merged", None):
            assert_close(lora_routes.lora_linear(x, w, None, A, B, 2.0, path=path),
                         reference.lora_linear(x, w, None, A, B, 2.0))
        B.mul_(3.0)
        assert_close(lora_routes.lora_linear(x, w, None, A, B, 2.0, path="merged"),
                     reference.lora_linear(x, w, None, A, B, 2.0))
    assert w not in lora_routes._MERGED


def _packed(inference: bool):
    g = torch.Generator().manual_seed(2)
    As, Bs = [torch.randn(r, 6, generator=g) for r in (2, 3)], [torch.randn(5, r, generator=g) for r in (2, 3)]
    with torch.inference_mode(inference):
        return kernels.pack_adapters([a.clone() for a in As], [b.clone() for b in Bs], [1.0, 0.5])


def test_gathered_route_under_inference_mode_follows_in_place_changes():
    """A packing of inference tensors: its stack is made per call and never kept, so a change in place is seen
    (before, both calls read version -1 and the second reused the first call's stack)."""
    g = torch.Generator().manual_seed(3)
    x, w, index = torch.randn(3, 2, 6, generator=g), torch.randn(5, 6, generator=g), torch.tensor([0, -1, 1])
    with torch.inference_mode():
        adapters = _packed(inference=True)
        first = multi_lora_routes.multi_lora_linear_gathered(x, w, None, adapters, index)
        adapters.b_cat.mul_(2.0)
        second = multi_lora_routes.multi_lora_linear_gathered(x, w, None, adapters, index)
        want = reference.multi_lora_linear_packed(x, w, None, adapters, index[:, None].expand(3, 2))
    assert_close(second, want)
    assert not torch.equal(first, second)
    assert adapters.a_cat not in multi_lora_routes._STACKS


def test_a_captured_stack_is_held_once(monkeypatch):
    """Each capture that reads a stack keeps it alive (a graph holds addresses); three captures, one entry. A
    packing of inference tensors has no kept stack, so a capture of it is refused with the reason."""
    monkeypatch.setattr(multi_lora_routes, "_HELD_BY_GRAPHS", {})
    adapters, index = _packed(inference=False), torch.tensor([0, 1])
    multi_lora_routes.gather_adapters(adapters, index)  # the warm-up makes the stack
    monkeypatch.setattr(multi_lora_routes, "_capturing", lambda t: True)
    for _ in range(3):
        multi_lora_routes.gather_adapters(adapters, index)
    assert list(multi_lora_routes._HELD_BY_GRAPHS.values()) == [multi_lora_routes._STACKS[adapters.a_cat].stack]
    with pytest.raises(RuntimeError, match="inference_mode"):
        multi_lora_routes.gather_adapters(_packed(inference=True), index)


# ----------------------------------------------------------------------------------------------------------
# The TMA GEMM: x and the weight are its operands (and dY's rows), 16-bit only; a dY it cannot read is copied
# ----------------------------------------------------------------------------------------------------------
def _aligned(*tensors) -> bool:
    """``_tma_ok`` without its GPU part: unit last stride, 16-byte rows and base."""
    return all(t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


@needs_triton
def test_fused_tma_checks_its_operands_and_dtype(monkeypatch):
    from minipeft.kernels import lora_routes, lora_triton

    monkeypatch.setattr(lora_triton, "_tma_ok", _aligned)
    x, w = torch.zeros(4, 16, dtype=torch.float16), torch.zeros(16, 16, dtype=torch.float16)
    assert lora_triton.tma_ready(x, w)
    assert not lora_triton.tma_ready(x.float(), w.float())                        # TMA_DTYPES: 16-bit only
    assert not lora_triton.tma_ready(x, torch.zeros(12, 16, dtype=torch.float16))  # dY's rows: 24 bytes
    assert not lora_triton.tma_ready(torch.zeros(4, 17, dtype=torch.float16)[:, 1:], w)  # x misaligned
    A, B = torch.zeros(2, 16), torch.zeros(16, 2)
    with pytest.raises(ValueError, match="path 'fused_tma' needs fp16/bf16"):
        lora_routes.lora_linear(x.float(), w.float(), None, A, B, 1.0, path="fused_tma")


@needs_triton
def test_a_dy_that_tma_cannot_read_is_copied(monkeypatch):
    """A unit last stride is not enough: a base or row stride off 16 bytes (a slice of a larger gradient) is
    copied to a fresh buffer before the TMA GEMM."""
    from minipeft.kernels import lora_triton

    monkeypatch.setattr(lora_triton, "_tma_ok", _aligned)
    given = []
    monkeypatch.setattr(lora_triton, "fused_gemm_tma", lambda p2d, *args: given.append(p2d))
    buf = torch.zeros(1 + 8 * 16, dtype=torch.float16)
    dy = buf[1:].view(8, 16)                              # unit strides, base 2 bytes past an aligned address
    assert dy.stride(-1) == 1 and not _aligned(dy)
    lora_triton._gemm(True, dy, None)
    assert _aligned(given[0]) and torch.equal(given[0], dy)


# ----------------------------------------------------------------------------------------------------------
# The int8 GEMM's autotuning key is the capped row bucket
# ----------------------------------------------------------------------------------------------------------
@needs_triton
def test_int8_autotune_key_is_capped(monkeypatch):
    from minipeft.kernels import int8_triton

    launched = {}

    class Launch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.setdefault(self.name, args)

    for name in ("_scan_kernel", "_quantize_kernel", "_matmul_kernel"):
        monkeypatch.setattr(int8_triton, name, Launch(name))
    M = 20000
    int8_triton.int8_linear_triton(torch.zeros(M, 1), torch.ones(1, 1, dtype=torch.int8), torch.ones(1), None, 0.0)
    m_bucket = launched["_matmul_kernel"][9]  # (x codes, codes, x absmax, absmax, bias, y, M, N, K, M_BUCKET)
    assert launched["_matmul_kernel"][6] == M and m_bucket == 16384

