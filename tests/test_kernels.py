"""kernels: the backend switch, the reference against dense float64 math, the Triton kernels against the reference,
the Triton op as torch.compile sees it, and the "auto" backend's routes.

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1 before `kernels` is imported, so the Triton kernels
run in the interpreter (small shapes, fp32 and fp16: bf16 tl.dot is wrong there). With CUDA the same file runs
the compiled kernels on larger shapes in fp32, fp16 and bf16 (set MINIPEFT_KERNEL_AUTOTUNE=0 to skip tuning).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo
import triton
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import assert_close, assert_rel_error
from torch.utils._python_dispatch import TorchDispatchMode

from minipeft import kernels
from minipeft.kernels import lora_merge_triton, lora_routes, lora_triton, reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
MAX_DIM = 320 if CUDA else 80      # the interpreter is slow: keep CPU shapes small
# R_PAD = max(16, next power of 2): ranks below 16, at 16, padded above it (12 → 16, 33 → 64), and 64; the
# non-powers leave part of a tile's rank columns masked off. Nothing above 64: the interpreter is slow. 25 draws
# need not reach 33, so test_triton_matches_reference names it in an @example.
RANKS = [1, 2, 3, 5, 8, 12, 16, 33, 64]


def _fresh_switch(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    """Every test starts with no set_backend and no MINIPEFT_KERNEL, and leaves none behind."""
    _fresh_switch(monkeypatch)
    yield
    kernels.set_backend(None)


def _make_inputs(M, N, K, r, dtype, *, layout="2d", bias=True, mask=False, seed=0, device=DEVICE):
    """Inputs whose outputs and gradients are O(1), so one tolerance table fits every shape."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    lead = {"2d": (M,), "3d": (2, M), "noncontig": (M,)}[layout]
    if layout == "noncontig":
        x = randn(K, M).t()                                 # (M, K) with strides (1, M)
    else:
        x = randn(*lead, K)
    weight = randn(N, K) / math.sqrt(K)
    lora_A = randn(r, K) / math.sqrt(K)
    lora_B = randn(N, r) / math.sqrt(r)
    b = randn(N) if bias else None
    drop = ((torch.rand(*x.shape, generator=g) > 0.25).double() / 0.75) if mask else None
    dy = randn(*x.shape[:-1], N) / math.sqrt(N)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    x = cast(x)                                             # .to keeps the transposed strides
    return dict(x=x, weight=cast(weight), bias=cast(b), lora_A=cast(lora_A), lora_B=cast(lora_B),
                dropout_mask=cast(drop)), cast(dy)


def _run(inputs, dy, scaling, backend, dtype=None, wants=("x", "lora_A", "lora_B", "bias"), **kw):
    """Forward and the gradients for the ``wants`` among x, A, B, bias (in that order) under one backend,
    optionally upcast."""
    leaves = {}
    args = {}
    for name, t in inputs.items():
        if t is None:
            args[name] = None
            continue
        t = t.detach().to(dtype) if dtype else t.detach()
        if name in wants:
            t = t.requires_grad_()
            leaves[name] = t
        args[name] = t
    if backend == "route":  # one of the "auto" backend's routes, by name (path=...)
        y = lora_routes.lora_linear(**args, scaling=scaling, **kw)
    else:
        y = kernels.lora_linear(**args, scaling=scaling, backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
    return y, dict(zip(leaves, grads, strict=True))


def _check(actual, expected, dtype, scale=1.0):
    """assert_close after dividing both by the expected tensor's largest |element| (at least 1).

    Gradients of A and B are sums over M rows, so their size grows with M; measuring error against the
    tensor's scale keeps one tolerance per dtype valid for every shape.
    """
    norm = expected.abs().max().clamp_min(1.0)
    assert_close(actual.double() / norm, expected.double() / norm, dtype=dtype, scale=scale)


def _compare(inputs, dy, scaling, dtype, **kw):
    """Triton in `dtype` against the reference run in float64 on the same (upcast) inputs."""
    y, grads = _run(inputs, dy, scaling, "triton" if not kw else "route", **kw)
    y_ref, grads_ref = _run(inputs, dy, scaling, "reference", dtype=torch.float64)
    assert y.dtype == dtype and y.shape == y_ref.shape
    # fp16/bf16: S (forward) and G = dY·B (backward) are rounded to the input dtype before their second
    # product, as the reference's own autograd does; that is one rounding more than the output's.
    scale = 1.0 if dtype == torch.float32 else 2.0
    _check(y, y_ref, dtype, scale)
    for name in grads_ref:
        assert grads[name].dtype == dtype, name
        _check(grads[name], grads_ref[name], dtype, scale)


def _ran_triton_op(y: torch.Tensor) -> bool:
    """True when y came out of the Triton kernels (the autograd node of the registered op, or of its eager twin)."""
    name = "" if y.grad_fn is None else type(y.grad_fn).__name__
    return "lora_linear_triton" in name or "EagerLoraTriton" in name  # the op (compiled) or its eager Function


# ----------------------------------------------------------------------------------------------------------
# The reference is the math
# ----------------------------------------------------------------------------------------------------------
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 40), r=st.sampled_from(RANKS),
       bias=st.booleans(), mask=st.booleans(), scaling=st.sampled_from([0.5, 2.0]))
def test_reference_matches_dense_float64(M, N, K, r, bias, mask, scaling):
    inputs, _ = _make_inputs(M, N, K, r, torch.float64, bias=bias, mask=mask, device="cpu")
    x, W, b, A, B, m = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "dropout_mask"))
    y = reference.lora_linear(x, W, b, A, B, scaling, m)
    if m is None:
        dense = x @ (W + scaling * B @ A).t()               # the merged weight W + s·B·A
    else:
        dense = x @ W.t() + (x * m) @ (scaling * B @ A).t()
    if b is not None:
        dense = dense + b
    assert_close(y, dense)


def test_reference_never_grads_the_weight():
    inputs, dy = _make_inputs(5, 6, 7, 2, torch.float32, device="cpu")
    inputs["weight"].requires_grad_()
    inputs["lora_A"].requires_grad_()
    y = reference.lora_linear(**inputs, scaling=2.0)
    y.backward(dy.cpu())
    assert inputs["weight"].grad is None


# ----------------------------------------------------------------------------------------------------------
# Triton against the reference
# ----------------------------------------------------------------------------------------------------------
@given(M=st.one_of(st.just(1), st.integers(1, MAX_DIM)), N=st.integers(1, MAX_DIM), K=st.integers(1, MAX_DIM),
       r=st.sampled_from(RANKS), dtype=st.sampled_from(DTYPES), bias=st.booleans(), mask=st.booleans(),
       layout=st.sampled_from(["2d", "3d", "noncontig"]), scaling=st.sampled_from([0.5, 2.0]))
@example(M=37, N=45, K=29, r=33, dtype=torch.float16, bias=True, mask=True, layout="3d", scaling=2.0)  # see RANKS
def test_triton_matches_reference(M, N, K, r, dtype, bias, mask, layout, scaling):
    inputs, dy = _make_inputs(M, N, K, r, dtype, layout=layout, bias=bias, mask=mask)
    _compare(inputs, dy, scaling, dtype)


@settings(max_examples=12)
@given(wants=st.sets(st.sampled_from(["x", "lora_A", "lora_B", "bias"]), min_size=1),
       dtype=st.sampled_from(DTYPES), mask=st.booleans(), M=st.integers(1, 40), N=st.integers(1, 40))
def test_triton_gradients_for_every_subset(wants, dtype, mask, M, N):
    """Any subset of x, A, B and bias may want a gradient (x frozen: the first layer of a frozen model)."""
    inputs, dy = _make_inputs(M, N, 24, 3, dtype, bias=True, mask=mask, seed=M * N)
    y, grads = _run(inputs, dy, 2.0, "triton", wants=tuple(wants))
    y_ref, grads_ref = _run(inputs, dy, 2.0, "reference", dtype=torch.float64, wants=tuple(wants))
    scale = 1.0 if dtype == torch.float32 else 2.0
    _check(y, y_ref, dtype, scale)
    assert set(grads) == wants
    for name in grads_ref:
        _check(grads[name], grads_ref[name], dtype, scale)


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", [(1, 33, 47, 1), (67, 96, 80, 64), (50, 17, 96, 16)])
def test_path_every_case(M, N, K, r, dtype, path):
    """The routes' pointer kernel ("fused") and cuBLAS route, reached by name: with/without bias and mask, 3-D."""
    for bias in (False, True):
        for mask in (False, True):
            inputs, dy = _make_inputs(M, N, K, r, dtype, layout="3d", bias=bias, mask=mask, seed=M + r)
            _compare(inputs, dy, 2.0, dtype, path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", [(1, 33, 47, 1), (67, 96, 80, 64), (50, 17, 96, 16)])
def test_merged_train_route(M, N, K, r, dtype):
    """Training on W' = W + s·B·A built per call: the reference's output and gradients to one rounding of W'
    more (the inference route's tolerance), with and without bias, 3-D and strided x; a mask is refused."""
    for bias, layout in ((False, "3d"), (True, "3d"), (True, "noncontig")):
        inputs, dy = _make_inputs(M, N, K, r, dtype, layout=layout, bias=bias, seed=M + r)
        _compare(inputs, dy, 2.0, dtype, path="merged_train")
    inputs, _ = _make_inputs(M, N, K, r, dtype, mask=True)
    with pytest.raises(ValueError, match="dropout mask"):
        lora_routes.lora_linear(**inputs, scaling=2.0, path="merged_train")


@pytest.mark.parametrize("wants", [("x",), ("lora_A",), ("lora_B", "bias"), ("x", "lora_B")])
def test_merged_train_route_for_a_subset_of_gradients(wants):
    """Only what is asked for is computed and returned (x frozen: a model's first layer; A frozen, ...)."""
    inputs, dy = _make_inputs(30, 20, 24, 3, torch.float32, bias=True, seed=7)
    _, grads = _run(inputs, dy, 2.0, "route", wants=wants, path="merged_train")
    _, grads_ref = _run(inputs, dy, 2.0, "reference", dtype=torch.float64, wants=wants)
    assert set(grads) == set(wants)
    for name in wants:
        _check(grads[name], grads_ref[name], torch.float32)


def test_merged_train_route_compiles_to_one_op():
    """Under torch.compile the route is one opaque node (its fake and autograd registrations), no graph break,
    and the compiled gradients are the eager ones."""
    inputs, dy = _make_inputs(12, 10, 8, 2, torch.float32, bias=True, seed=5)
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B", "bias")}
    args = {**inputs, **leaves}

    def f(x, lora_A, lora_B, bias):
        return lora_routes.lora_linear(x, args["weight"], bias, lora_A, lora_B, 2.0, path="merged_train")

    explanation = dynamo.explain(f)(*leaves.values())
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    op = torch.ops.minipeft.lora_linear_merged_train
    assert sum(n.target in (op, op.default) for g in explanation.graphs for n in g.graph.nodes) == 1
    dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves.values())
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    want = torch.autograd.grad(f(*leaves.values()), list(leaves.values()), dy)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@given(N=st.integers(1, MAX_DIM), K=st.integers(1, MAX_DIM), r=st.sampled_from(RANKS), dtype=st.sampled_from(DTYPES),
       scaling=st.sampled_from([0.5, 2.0, -1.25]), transposed=st.booleans())
@example(N=33, K=129, r=33, dtype=torch.float16, scaling=2.0, transposed=True)  # past every tile, rank padded to 64
@example(N=20, K=40, r=130, dtype=torch.float16, scaling=0.5, transposed=False)  # the rank in three chunks of 64
def test_merge_kernel_matches_the_formula_and_addmm(N, K, r, dtype, scaling, transposed):
    """merged_train's W' = W + scaling·B·A (kernels/lora_merge_triton.py) against the formula in float64, rounded once
    to the dtype, and against its reference ``torch.addmm``; W of any strides, W' contiguous. In fp16/bf16 the
    kernel's fp32 sum rounds once, so nearly every element is the formula's bit for bit (a second rounding, of
    scaling·B·A before the add, would leave a good share off by a unit in the last place yet within tolerance)."""
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = (torch.randn(K, N, generator=g).t() if transposed else torch.randn(N, K, generator=g)).to(DEVICE, dtype)
    a = (torch.randn(r, K, generator=g) / r ** 0.5).to(DEVICE, dtype)
    b = torch.randn(N, r, generator=g).to(DEVICE, dtype)
    got = lora_merge_triton.merge(w, a, b, scaling)
    assert got.dtype == dtype and got.shape == (N, K) and got.is_contiguous()
    want = (w.double() + scaling * (b.double() @ a.double())).to(dtype)
    assert_close(got, want)
    if dtype != torch.float32:  # fp32 sums of r terms differ from float64's in the last bits: tolerance only
        assert (got == want).double().mean() >= 0.99
    assert_close(got, torch.addmm(w.float(), b.float(), a.float(), alpha=scaling).to(dtype))


def test_merge_kernel_leaves_w_exact_for_a_fresh_adapter_and_checks_its_inputs():
    w = torch.randn(70, 45).to(DEVICE, torch.float16)
    a = torch.randn(4, 45).to(DEVICE, torch.float16)
    assert torch.equal(lora_merge_triton.merge(w, a, torch.zeros(70, 4, dtype=torch.float16, device=DEVICE), 3.0), w)
    no_rank = lora_merge_triton.merge(w, a[:0], torch.zeros(70, 0, dtype=torch.float16, device=DEVICE), 3.0)
    assert torch.equal(no_rank, w) and no_rank.data_ptr() != w.data_ptr()                  # r = 0: a copy of W
    with pytest.raises(ValueError, match=r"merge: W \(70, 45\).*do not fit"):
        lora_merge_triton.merge(w, a, torch.zeros(45, 4, dtype=torch.float16, device=DEVICE), 3.0)
    with pytest.raises(ValueError, match="of one dtype"):
        lora_merge_triton.merge(w, a.float(), torch.zeros(70, 4, dtype=torch.float16, device=DEVICE), 3.0)


def test_merged_train_leaves_a_fresh_adapter_exact():
    """B = 0: W' = W + 0 bit for bit, so the output is the base layer's exactly."""
    inputs, _ = _make_inputs(9, 16, 12, 4, torch.float16, bias=True)
    inputs["lora_B"] = torch.zeros_like(inputs["lora_B"])
    y = lora_routes.lora_linear(**inputs, scaling=2.0, path="merged_train")
    assert torch.equal(y, torch.nn.functional.linear(inputs["x"], inputs["weight"], inputs["bias"]))


def test_route_says_what_a_call_runs(monkeypatch):
    """``lora_routes.route`` names the path ``lora_linear`` then takes (CPU tensors run the cuBLAS, merged and
    unfused paths too): the first inference call with an adapter state runs "cublas", the second is served the
    merged W', a training call "unfused"; asking changes nothing. ``kernels.lora_route`` adds the backends."""
    lora_routes.clear_cache()
    inputs, _ = _make_inputs(5, 8, 6, 2, torch.float32, bias=True, device="cpu")
    taken = []
    for name in ("_cublas_forward", "_merged_weight"):
        real = getattr(lora_routes, name)
        monkeypatch.setattr(lora_routes, name, lambda *a, _real=real, _name=name: taken.append(_name) or _real(*a))
    with torch.no_grad():
        for _ in range(2):  # asking is not a sighting: still "cublas"
            assert lora_routes.route(**inputs, scaling=2.0) == "cublas"
        assert taken == []
        lora_routes.lora_linear(**inputs, scaling=2.0)  # the first call: remembers the state, runs cuBLAS
        assert taken == ["_merged_weight", "_cublas_forward"]
        assert lora_routes.route(**inputs, scaling=2.0) == "merged"
        taken.clear()
        y = lora_routes.lora_linear(**inputs, scaling=2.0)
        assert taken == ["_merged_weight"]
        merged = inputs["weight"] + 2.0 * inputs["lora_B"] @ inputs["lora_A"]
        torch.testing.assert_close(y, torch.nn.functional.linear(inputs["x"], merged, inputs["bias"]))
        inputs["lora_A"].add_(1.0)  # a new adapter state: cuBLAS again until it is seen twice
        assert lora_routes.route(**inputs, scaling=2.0) == "cublas"
        masked = {**inputs, "dropout_mask": torch.ones_like(inputs["x"])}
        assert lora_routes.route(**masked, scaling=2.0) == "cublas"
    x = inputs["x"].clone().requires_grad_()
    assert lora_routes.route(**{**inputs, "x": x}, scaling=2.0) == "unfused"
    assert lora_routes.route(**{**inputs, "x": x[:0]}, scaling=2.0) == "unfused"
    lora_routes.clear_cache()
    # the switch: "auto" on the CPU is the reference; "triton" is the kernels (the interpreter here), or an error
    assert kernels.lora_route(**inputs, scaling=2.0, backend="auto") == "reference"
    assert kernels.lora_route(**inputs, scaling=2.0, backend="reference") == "reference"
    assert kernels.lora_route(**inputs, scaling=2.0, backend="triton") == "triton"
    halves = {k: v if v is None else v.to(torch.bfloat16) for k, v in inputs.items()}
    with pytest.raises(ValueError, match="triton kernel backend cannot run here"):
        kernels.lora_route(**halves, scaling=2.0, backend="triton")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.lora_route(**inputs, scaling=2.0, backend="fast")


def test_choose_path_per_call():
    """The "auto" backend's table (lora_routes' docstring, from benchmarks/RESULTS.md), asked directly."""
    big = lora_routes.FUSED_MIN_ROWS
    x, w = torch.ones(3, 8), torch.ones(8, 8)
    assert lora_routes.choose_path(3, 8, 8, x, w, needs_grad=False) == "merged"
    assert lora_routes.choose_path(3, 8, 8, x, w, needs_grad=False, has_mask=True) == "cublas"
    assert lora_routes.choose_path(big - 1, 8, 8, x, w, needs_grad=True) == "unfused"
    assert lora_routes.choose_path(big, 8, 8, x, w, needs_grad=True) == "cublas"      # fp32 / no TMA (CPU)
    half = torch.ones(3, 8, dtype=torch.float16)
    assert lora_routes.choose_path(big, 8, 8, half, half, needs_grad=True) == "cublas"  # CPU: no TMA
    # while torch.compile traces: shapes only. Training from COMPILED_FUSED_MIN_ROWS rows: the Triton op; from
    # MERGED_TRAIN_MIN_ROWS, 16-bit, no mask, not wider than MERGED_TRAIN_MAX_WIDTH: the merged weight per call
    rows, many = lora_routes.COMPILED_FUSED_MIN_ROWS, lora_routes.MERGED_TRAIN_MIN_ROWS
    assert lora_routes.choose_path(rows, 8, 8, half, half, needs_grad=True, compiling=True) == "triton"
    assert lora_routes.choose_path(many, 8, 8, half, half, needs_grad=True, compiling=True) == "merged_train"
    assert lora_routes.choose_path(many, 8, 8, half, half, needs_grad=True, has_mask=True, compiling=True) == "triton"
    assert lora_routes.choose_path(many, 8, 8, x, w, needs_grad=True, compiling=True) == "triton"        # fp32
    wide = lora_routes.MERGED_TRAIN_MAX_WIDTH + 1                    # Triton's GEMM is at cuBLAS speed there
    assert lora_routes.choose_path(many, wide, 8, half, half, needs_grad=True, compiling=True) == "triton"
    assert lora_routes.choose_path(many, 8, wide, half, half, needs_grad=True, compiling=True) == "triton"
    assert lora_routes.choose_path(rows - 1, 8, 8, half, half, needs_grad=True, compiling=True) == "unfused"
    assert lora_routes.choose_path(many, 8, 8, half, half, needs_grad=False, compiling=True) == "unfused"


def _forward_ref(inputs):
    """The reference forward in float64 on the same inputs."""
    up = {k: None if t is None else t.detach().double() for k, t in inputs.items()}
    return reference.lora_linear(**up, scaling=2.0)


@pytest.mark.parametrize("layout", ["2d", "3d", "noncontig"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_routes_follow_the_adapter(dtype, layout):
    """No gradient wanted: "merged" and "cublas" match the reference, and the merged-weight cache follows
    in-place changes of A, B and W (tensor versions), new adapter tensors and a new scaling."""
    lora_routes.clear_cache()
    inputs, _ = _make_inputs(37, 48, 40, 4, dtype, layout=layout, bias=True, seed=3)
    scale = 1.0 if dtype == torch.float32 else 2.0
    with torch.no_grad():
        for step in range(7):
            if step == 3:
                inputs["lora_A"].mul_(-0.5)                                    # a new version of A
            if step == 4:
                inputs["lora_B"] = inputs["lora_B"].clone().add_(0.25)       # a new B tensor
            if step == 5:
                inputs["weight"].add_(0.1)                                     # W changed in place
            for path in (None, "merged", "cublas"):
                y = lora_routes.lora_linear(**inputs, scaling=2.0, path=path)
                assert y.dtype == dtype and y.shape == (*inputs["x"].shape[:-1], 48)
                _check(y, _forward_ref(inputs), dtype, scale)
        # path=None built W' on the second sighting of an adapter state and reuses it since
        entry = lora_routes._MERGED.get(inputs["weight"])
        assert entry is not None and entry.merged is not None
        merged = entry.merged
        lora_routes.lora_linear(**inputs, scaling=2.0)
        assert lora_routes._MERGED.get(inputs["weight"]).merged is merged
    with pytest.raises(ValueError, match="inference"):
        lora_routes.lora_linear(**{**inputs, "dropout_mask": torch.ones_like(inputs["x"])}, scaling=2.0,
                                path="merged")
    lora_routes.clear_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merged_inference_route_builds_w_prime_without_triton(dtype, monkeypatch):
    """The "merged" inference route runs on CPU tensors too, so its W' comes from one BLAS addmm, cached or (an
    inference tensor, which has no version to check a cache against) built for the call: never from the Triton
    merge of the training route, which a CPU without the interpreter could not launch (and bf16 on the interpreter
    would get wrong)."""
    def no_triton(*args):
        raise AssertionError("the merged inference route launched the Triton merge kernel")
    monkeypatch.setattr(lora_merge_triton, "merge", no_triton)
    lora_routes.clear_cache()
    inputs, _ = _make_inputs(9, 20, 24, 4, dtype, layout="3d", bias=True, seed=6, device="cpu")
    scale = 1.0 if dtype == torch.float32 else 2.0
    with torch.no_grad():
        for _ in range(2):                       # the second call with one state builds and caches W'
            _check(lora_routes.lora_linear(**inputs, scaling=2.0, path="merged"), _forward_ref(inputs), dtype, scale)
    with torch.inference_mode():                 # no version: W' built for this call alone
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        _check(lora_routes.lora_linear(**fresh, scaling=2.0, path="merged"), _forward_ref(inputs), dtype, scale)
    lora_routes.clear_cache()


SHAPES_GPU = [(1, 64, 128, 8), (300, 520, 264, 16), (1030, 768, 1024, 64), (4096, 1024, 512, 16)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["fused", "fused_tma", "cublas", "unfused"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,r", SHAPES_GPU)
def test_every_path_on_gpu(path, dtype, M, N, K, r):
    for mask in (False, True):
        inputs, dy = _make_inputs(M, N, K, r, dtype, layout="3d", bias=True, mask=mask, seed=K)
        if path == "fused_tma" and dtype == torch.float32:
            continue  # TMA path is tuned for 16-bit operands; fp32 goes through "fused"
        _compare(inputs, dy, 2.0, dtype, path=path)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M,N,K,r", [(2052, 2304, 768, 16), (2052, 768, 3072, 64), (150, 520, 264, 16)])
def test_merged_train_on_gpu(M, N, K, r):
    """The merged-weight training route at GPT-2's widths (4104 rows: "auto"'s compiled choice from
    MERGED_TRAIN_MIN_ROWS) in every dtype, against the float64 reference."""
    for dtype in DTYPES:
        inputs, dy = _make_inputs(M, N, K, r, dtype, layout="3d", bias=True, seed=K)
        _compare(inputs, dy, 2.0, dtype, path="merged_train")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,r", [(4096, 128), (768, 256)])
def test_shrink_with_a_large_rank_and_a_mask_on_gpu(dtype, K, r):
    """Ranks and masks whose tiles take the most shared memory: _shrink_tiles steps down to a tiling that fits."""
    g = torch.Generator(device="cuda").manual_seed(r)
    x = torch.randn(8192, K, device="cuda", generator=g).to(dtype)
    mask = (torch.rand(8192, K, device="cuda", generator=g) > 0.3).to(dtype) * 2
    lora_A = (torch.randn(r, K, device="cuda", generator=g) / math.sqrt(K)).to(dtype)
    s = lora_triton.shrink(x, mask, lora_A)
    _check(s, (x.double() * mask.double()) @ lora_A.double().T, dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_long_reduction_bf16_on_gpu():
    """K = 4096, the benchmark's shape: errors stay at bf16's level over a long reduction."""
    inputs, dy = _make_inputs(512, 4096, 4096, 16, torch.bfloat16, bias=True, mask=True, seed=1)
    y, grads = _run(inputs, dy, 2.0, "triton")
    y_ref, grads_ref = _run(inputs, dy, 2.0, "reference", dtype=torch.float64)
    assert_rel_error(y, y_ref)
    for name in grads_ref:
        assert_rel_error(grads[name], grads_ref[name], msg=name)


def test_weight_is_frozen_and_bias_grad_optional():
    inputs, dy = _make_inputs(9, 10, 11, 4, torch.float32, bias=True)
    inputs["weight"].requires_grad_()
    inputs["x"].requires_grad_()
    y = kernels.lora_linear(**inputs, scaling=2.0, backend="triton")
    y.backward(dy)
    assert inputs["weight"].grad is None
    assert inputs["x"].grad is not None
    assert inputs["bias"].grad is None            # the bias did not ask for a gradient


def test_lora_B_zero_leaves_the_base_layer():
    inputs, _ = _make_inputs(13, 12, 14, 4, torch.float32)
    inputs["lora_B"] = torch.zeros_like(inputs["lora_B"])
    y = kernels.lora_linear(**inputs, scaling=2.0, backend="triton")
    base = torch.nn.functional.linear(inputs["x"], inputs["weight"], inputs["bias"])
    assert_close(y, base)


def test_empty_dimensions_match_the_reference():
    """No rows, or no input features: the Triton op gives the reference's shapes and values (zeros, the bias)."""
    for lead, K in (((0,), 6), ((2, 0), 6), ((3,), 0)):
        x = torch.randn(*lead, K, device=DEVICE, requires_grad=True)
        w, A, B = (torch.randn(*shape, device=DEVICE) for shape in ((5, K), (2, K), (5, 2)))
        b = torch.randn(5, device=DEVICE, requires_grad=True)
        A.requires_grad_()
        B.requires_grad_()
        y = kernels.lora_linear(x, w, b, A, B, 2.0, backend="triton")
        y_ref = reference.lora_linear(x, w, b, A, B, 2.0)
        assert y.shape == y_ref.shape and _ran_triton_op(y)
        assert_close(y, y_ref)
        dy = torch.randn_like(y)
        for got, want in zip(torch.autograd.grad(y, [x, b, A, B], dy), torch.autograd.grad(y_ref, [x, b, A, B], dy),
                             strict=True):
            assert got.shape == want.shape
            assert_close(got, want)


# ----------------------------------------------------------------------------------------------------------
# A backend name is a promise: what each one runs, watched from inside
# ----------------------------------------------------------------------------------------------------------
TRITON_KERNELS = ("_shrink_kernel", "_fused_gemm_kernel", "_fused_gemm_tma_kernel", "_dsdb_kernel", "_da_kernel")


class _LaunchRecorder:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` records the kernel's name and launches nothing."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(self.name)


@pytest.fixture
def ran(monkeypatch):
    """What ran, in order: each Triton kernel launch (recorded, not performed: the numbers are the comparison
    tests' job, and so M = FUSED_MIN_ROWS costs nothing in the interpreter), each call of the reference's ops,
    of the "auto" routes, of the cuBLAS route's forward and of the merged-weight cache."""
    calls: list[str] = []
    for name in TRITON_KERNELS:
        monkeypatch.setattr(lora_triton, name, _LaunchRecorder(name, calls))

    def record(module, name, label):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    record(reference, "lora_linear", "reference")
    record(lora_routes, "lora_linear", "routes")
    record(lora_routes, "_cublas_forward", "cublas")
    record(lora_routes, "_merged_weight", "merged")
    return calls


TRITON_FORWARD = ["_shrink_kernel", "_fused_gemm_kernel"]                   # S, then Y (pointer GEMM: fp32)
TRITON_BACKWARD = ["_dsdb_kernel", "_fused_gemm_kernel", "_da_kernel"]       # G/dB/dbias, dX, dA


def _forward_backward(backend: str, mode: str, M: int, dtype=torch.float32):
    inputs, dy = _make_inputs(M, 8, 8, 2, dtype, bias=True, seed=1)
    if mode == "inference":
        with torch.no_grad():
            kernels.lora_linear(**inputs, scaling=2.0, backend=backend)
        return
    for name in ("x", "lora_A", "lora_B", "bias"):
        inputs[name].requires_grad_()
    kernels.lora_linear(**inputs, scaling=2.0, backend=backend).backward(dy)


@pytest.mark.parametrize("M", [5, lora_routes.FUSED_MIN_ROWS], ids=["M=5", "M=FUSED_MIN_ROWS"])
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_backend_runs_what_its_name_promises(backend, mode, M, ran):
    """"reference": its torch ops; "triton": Triton launches only, forward and backward, at every M (no
    reference ops, no cuBLAS route, no merged weight); "auto" on the CPU: the reference only."""
    if backend == "auto" and CUDA:
        pytest.skip("auto on CUDA tensors runs the routes: test_auto_on_cuda_takes_the_measured_route")
    _forward_backward(backend, mode, M)
    if backend == "triton":
        assert ran == TRITON_FORWARD + (TRITON_BACKWARD if mode == "train" else []), ran
    else:
        assert ran == ["reference"], ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)   # bf16: wrong in the interpreter
def test_backward_sums_reach_every_split(dtype):
    """G, dB, dbias and dA against torch at a shape of several column blocks and row splits: the program that
    rounds a block's sum must come after every split's atomics (an early one leaves torch.empty's garbage),
    and the results come in the parameters' dtypes with no cast afterwards."""
    lt = lora_triton
    M, N, K, r = 300, 2 * lt.DSDB_BN + 5, 2 * lt.DA_BK + 3, 3     # 3 column blocks of dY and of x, 5+ splits
    dev = torch.device(DEVICE)
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dev, dtype)  # noqa: E731
    dy, lora_B, s, x = randn(M, N), randn(N, r), randn(M, r), randn(M, K)
    mask = (torch.rand(M, K, generator=g) > 0.3).to(dev, dtype) * 2
    n_blocks, k_blocks = triton.cdiv(N, lt.DSDB_BN), triton.cdiv(K, lt.DA_BK)
    dsdb_bm, da_per_sm = lt._thin_tiles(dev, dy.element_size(), lt._pad_rank(r))   # this GPU's tiles
    dsdb_splits = lt._splits(M, dsdb_bm, n_blocks, dev, lt.DSDB_PER_SM)[0]
    da_splits = lt._splits(M, lt.DA_BM, k_blocks, dev, da_per_sm)[0]
    assert min(dsdb_splits, da_splits) > 1 and min(n_blocks, k_blocks) > 1
    ws = lt.workspace(M, N, K, r, dev)
    G, d_b, d_bias = lt.dsdb(dy, lora_B, s, 0.5, True, ws)
    d_a = lt.da(G, x, mask, r, 0.5, dtype, ws)
    assert (d_b.dtype, d_bias.dtype, d_a.dtype) == (dtype,) * 3
    # every program counted once into its own block's counter: dsdb's first, then da's
    counts = ws.count.tolist()
    assert counts == [dsdb_splits] * n_blocks + [da_splits] * k_blocks, counts
    f = lambda t: t.double()  # noqa: E731
    assert_close(G[:, :r], (f(dy) @ f(lora_B)).float(), torch.float32, scale=math.sqrt(N * r))
    assert (G[:, r:] == 0).all()                                            # the padded rank columns
    assert_close(d_b, (0.5 * f(dy).T @ f(s)).to(dtype), scale=math.sqrt(M))
    assert_close(d_bias, f(dy).sum(0).to(dtype), scale=math.sqrt(M))
    # dA from the kernel's G, rounded to x's dtype as the kernel's tensor-core product takes it: the same products
    # on both sides, summed in fp32 over the splits in another order, then rounded to the dtype once (one unit in
    # the last place at most; scale 2 for margin). A split left out is off by its whole share of the sum.
    assert_close(d_a, (0.5 * f(G[:, :r].to(dtype)).T @ (f(x) * f(mask))).to(dtype), scale=2.0)


@pytest.mark.parametrize("dtype,K,r_pad,mask", [(torch.bfloat16, 768, 16, False), (torch.bfloat16, 3072, 16, False),
                                                (torch.bfloat16, 4096, 128, True), (torch.float32, 768, 16, False),
                                                (torch.float32, 4096, 256, True)])
def test_shrink_tiles_fit_shared_memory(monkeypatch, dtype, K, r_pad, mask):
    """The shrink's tiling on an H200 (as the GPU reports it): the tuned tiles for GPT-2's 16-bit layers, and for
    any rank, mask and dtype a tiling whose operands fit the shared memory with the margin the docstring gives."""
    smem = 232448
    monkeypatch.setattr(lora_triton, "INTERPRETING", False)
    monkeypatch.setattr(lora_triton, "_device_info", lambda index: (132, 9, smem))
    x2d = torch.empty(7936, K, dtype=dtype, device="meta")
    bm, bk, warps, stages = lora_triton._shrink_tiles(x2d, mask, r_pad)
    assert 1.6 * stages * (bm * bk * (2 if mask else 1) + bk * r_pad) * x2d.element_size() <= smem
    if dtype == torch.bfloat16 and r_pad == 16:                 # the measured winners
        assert (bm, bk, stages) == ((64, 128, 4) if K < 2048 else (64, 256, 3))


def test_a_workspace_of_other_sizes_is_refused():
    dev = torch.device(DEVICE)
    dy, lora_B, s = torch.ones(8, 6, device=dev), torch.ones(6, 2, device=dev), torch.ones(8, 2, device=dev)
    with pytest.raises(ValueError, match="workspace"):
        lora_triton.dsdb(dy, lora_B, s, 1.0, False, lora_triton.workspace(8, 5, 0, 2, dev))   # N = 5, not 6
    g = torch.zeros(8, 16, device=dev)
    with pytest.raises(ValueError, match="workspace"):                                      # made without dA
        lora_triton.da(g, torch.ones(8, 4, device=dev), None, 2, 1.0, torch.float32,
                       lora_triton.workspace(8, 6, 0, 2, dev))


def test_triton_backward_fills_once_and_casts_nothing():
    """In a CUDA-graph training step every small op is one more kernel per LoRA layer: the Triton backward
    makes one zero fill (the workspace its atomics add into) and returns its gradients in their dtypes."""
    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    inputs, dy = _make_inputs(20, 8, 8, 2, torch.float16, bias=True, seed=1)
    for name in ("x", "lora_A", "lora_B", "bias"):
        inputs[name].requires_grad_()
    kernels.lora_linear(**inputs, scaling=2.0, backend="triton").backward(dy)  # (an autotuner's runs come first)
    y = kernels.lora_linear(**inputs, scaling=2.0, backend="triton")
    with Ops() as ops:
        y.backward(dy)
    fills = [n for n in ops.names if n.split(".")[0] in ("zeros", "zero_", "fill_", "new_zeros", "zeros_like")]
    casts = [n for n in ops.names if n.split(".")[0] == "_to_copy"]  # (the interpreter's own copy_ calls aside)
    assert len(fills) == 1 and not casts, ops.names


def _hopper() -> bool:
    return CUDA and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode,M,dtype,expected", [
    ("train", 5, torch.float32, ["routes", "reference"]),                              # host-bound: unfused
    ("train", lora_routes.FUSED_MIN_ROWS, torch.float32, ["routes", "cublas"]),        # fp32: no TMA
    ("train", lora_routes.FUSED_MIN_ROWS, torch.bfloat16,                              # fused_tma (Hopper)
     ["routes", "_shrink_kernel", "_fused_gemm_tma_kernel", "_dsdb_kernel", "_fused_gemm_tma_kernel", "_da_kernel"]),
    ("inference", 5, torch.float32, ["routes", "merged", "cublas"]),                   # 1st sighting: cublas
    ("inference", lora_routes.FUSED_MIN_ROWS, torch.bfloat16, ["routes", "merged", "cublas"]),
], ids=["train-small", "train-large-fp32", "train-large-bf16", "infer-small", "infer-large"])
def test_auto_on_cuda_takes_the_measured_route(mode, M, dtype, expected, ran):
    if "_fused_gemm_tma_kernel" in expected and not _hopper():
        expected = ["routes", "cublas"]                                                # no TMA before Hopper
    lora_routes.clear_cache()
    _forward_backward("auto", mode, M, dtype)
    assert ran == expected, ran
    lora_routes.clear_cache()


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a Hopper (or newer) GPU")
def test_triton_backend_takes_tma_where_it_applies(ran):
    """bf16 on Hopper: the "triton" backend runs the TMA GEMM forward and backward, at small M too."""
    _forward_backward("triton", "train", 5, torch.bfloat16)
    tma = ["_shrink_kernel", "_fused_gemm_tma_kernel", "_dsdb_kernel", "_fused_gemm_tma_kernel", "_da_kernel"]
    assert ran == tma, ran


# ----------------------------------------------------------------------------------------------------------
# The Triton op as torch.library and torch.compile see it
# ----------------------------------------------------------------------------------------------------------
OP = torch.ops.minipeft.lora_linear_triton.default
BACKWARD_OP = torch.ops.minipeft.lora_linear_triton_backward.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)   # bf16: wrong in the interpreter
@pytest.mark.parametrize("M,N,K,r,layout,bias,mask", [
    (5, 9, 20, 3, "3d", True, True), (1, 17, 33, 1, "2d", False, False), (6, 10, 12, 2, "noncontig", True, False),
])
def test_forward_op_passes_opcheck(M, N, K, r, layout, bias, mask, dtype):
    """The schema, the fake (shapes and dtypes without a launch), the autograd registration and an AOT
    trace of forward and backward agree with the op itself."""
    inputs, _ = _make_inputs(M, N, K, r, dtype, layout=layout, bias=bias, mask=mask, seed=M)
    for name in ("x", "lora_A", "lora_B", "bias"):
        if inputs[name] is not None:
            inputs[name].requires_grad_()
    args = tuple(inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")) + (2.0, inputs["dropout_mask"], None)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, False), (True, False, True, False)],
                         ids=["all", "A-only", "x-and-B"])
def test_backward_op_passes_opcheck(needs):
    inputs, dy = _make_inputs(7, 9, 11, 3, torch.float32, layout="3d", bias=True, mask=True, seed=2)
    _, s = OP(*(inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")), 2.0, inputs["dropout_mask"], None)
    args = (dy, inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"], s, 2.0, inputs["dropout_mask"],
            None, *needs)
    torch.library.opcheck(BACKWARD_OP, args)
    outs = BACKWARD_OP(*args)
    assert [t.numel() > 0 for t in outs] == list(needs)          # a gradient not asked for comes back empty


MERGED_OP = torch.ops.minipeft.lora_linear_merged_train.default
MERGED_BACKWARD_OP = torch.ops.minipeft.lora_linear_merged_train_backward.default


@pytest.mark.parametrize("layout,bias", [("3d", True), ("noncontig", False), ("2d", True)])
def test_merged_train_op_passes_opcheck(layout, bias):
    """The merged-weight training op: schema, fake, autograd registration and an AOT trace agree with it."""
    inputs, _ = _make_inputs(7, 9, 11, 3, torch.float32, layout=layout, bias=bias, seed=4)
    for name in ("x", "lora_A", "lora_B", "bias"):
        if inputs[name] is not None:
            inputs[name].requires_grad_()
    torch.library.opcheck(MERGED_OP, tuple(inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")) + (2.0,))


@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, False, False), (True, False, True, False),
                                   (False, False, False, True)], ids=["all", "A-only", "x-and-B", "bias-only"])
def test_merged_train_backward_op_passes_opcheck(needs):
    inputs, dy = _make_inputs(7, 9, 11, 3, torch.float32, layout="3d", bias=True, seed=2)
    _, s, merged = MERGED_OP(*(inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")), 2.0)
    assert_close(merged, inputs["weight"] + 2.0 * inputs["lora_B"] @ inputs["lora_A"])      # W', kept for dX
    args = (dy, inputs["x"], merged, inputs["lora_A"], inputs["lora_B"], s, 2.0, *needs)
    torch.library.opcheck(MERGED_BACKWARD_OP, args)
    outs = MERGED_BACKWARD_OP(*args)
    assert [t.numel() > 0 for t in outs] == list(needs)          # a gradient not asked for comes back empty
    if needs[3]:
        assert_close(outs[3], dy.reshape(-1, 9).sum(0))


def _lora_call(x, weight, bias, lora_A, lora_B):
    return kernels.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, backend="triton")


def test_triton_backend_is_one_node_without_graph_breaks():
    """Dynamo sees the Triton backend as one opaque node: no graph break, one call of the registered op."""
    inputs, _ = _make_inputs(6, 10, 12, 2, torch.float32, layout="3d")
    args = [inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    explanation = dynamo.explain(_lora_call)(*args)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    torch.compile(_lora_call, backend=capture, fullgraph=True)(*args)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("lora_linear_triton" in t for t in targets) == 1, targets
    dynamo.reset()


def test_compiled_triton_backend_matches_eager():
    """torch.compile (aot_eager: AOTAutograd traces the backward op through its fake) gives eager's numbers."""
    inputs, dy = _make_inputs(7, 9, 11, 3, torch.float32, layout="3d", bias=True, mask=True, seed=4)

    def loss(x, weight, bias, lora_A, lora_B, mask):
        y = kernels.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, mask, backend="triton")
        return (y * dy).sum()

    def grads(fn):
        leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("x", "bias", "lora_A", "lora_B")}
        value = fn(leaves["x"], inputs["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                   inputs["dropout_mask"])
        return value, torch.autograd.grad(value, list(leaves.values()))

    dynamo.reset()
    eager, compiled = grads(loss), grads(torch.compile(loss, backend="aot_eager", fullgraph=True))
    dynamo.reset()
    assert_close(compiled[0], eager[0])
    for got, want in zip(compiled[1], eager[1], strict=True):
        assert_close(got, want)


def test_lora_model_under_triton_is_one_node_per_layer():
    """A LoRA GPT on the "triton" backend: torch.compile's graph holds one Triton op per LoRA layer, no break."""
    from minipeft.model import GPT, GPTConfig
    from minipeft.tuners import LoraConfig, get_peft_model

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    model = get_peft_model(gpt, LoraConfig(r=2, target_modules="all-linear")).to(DEVICE)
    n_lora = sum(1 for name, _ in model.named_parameters() if "lora_A" in name)
    idx = torch.randint(0, 64, (1, 8), device=DEVICE)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    with kernels.use_backend("triton"):
        explanation = dynamo.explain(lambda i: model(i, targets=i)[1])(idx)
        assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
        torch.compile(lambda i: model(i, targets=i)[1], backend=capture, fullgraph=True)(idx)
    dynamo.reset()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert n_lora > 0 and sum("lora_linear_triton" in t for t in targets) == n_lora, (n_lora, targets)


# ----------------------------------------------------------------------------------------------------------
# The switch
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """Replace the three implementations by recorders that say which one ran (and compute nothing)."""
    calls = []
    monkeypatch.setattr(kernels.reference, "lora_linear", lambda *a, **k: calls.append("reference"))
    monkeypatch.setattr(kernels.lora_triton, "lora_linear", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(kernels.lora_routes, "lora_linear", lambda *a, **k: calls.append("routes"))
    return calls


def _call(**kw):
    inputs, _ = _make_inputs(3, 4, 5, 2, torch.float32)
    kernels.lora_linear(**inputs, scaling=1.0, **kw)


# "auto" on the tensors of this test run: the routes on CUDA, the reference on the CPU (interpreter or not).
AUTO_HERE = "routes" if CUDA else "reference"


def test_precedence_call_over_context_over_set_over_env_over_auto(spy, monkeypatch):
    _call()
    assert spy[-1] == AUTO_HERE                                    # auto
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    _call()
    assert spy[-1] == "triton"                                     # env > auto
    kernels.set_backend("reference")
    _call()
    assert spy[-1] == "reference"                                  # set_backend > env
    with kernels.use_backend("triton"):
        _call()
        assert spy[-1] == "triton"                                 # use_backend > set_backend
        with kernels.use_backend("reference"):
            _call()
            assert spy[-1] == "reference"                          # the innermost wins
            assert kernels.get_backend() == "reference"
            _call(backend="triton")
            assert spy[-1] == "triton"                             # the call's backend= wins over all
        _call()
        assert spy[-1] == "triton"                                 # the outer block again
        with kernels.use_backend("auto"):
            _call()
            assert spy[-1] == AUTO_HERE                            # "auto" by name, innermost
    assert kernels.get_backend() == "reference"
    kernels.set_backend(None)
    assert kernels.get_backend() == "triton"                       # back to the env var
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.get_backend() == "auto"


def test_auto_is_the_reference_off_cuda(spy, monkeypatch):
    """On the CPU "auto" never runs the interpreter (a tiny training step would take ~25 s there)."""
    inputs, _ = _make_inputs(3, 4, 5, 2, torch.float64)
    kernels.lora_linear(**inputs, scaling=1.0)
    assert spy[-1] == "reference"                                  # float64: no Triton kernel, any device
    inputs, _ = _make_inputs(3, 4, 5, 2, torch.float32, device="cpu")
    kernels.lora_linear(**inputs, scaling=1.0)
    assert spy[-1] == "reference"                                  # CPU tensors, with the interpreter on here
    monkeypatch.setattr(kernels, "_INTERPRETING", False)
    kernels.lora_linear(**inputs, scaling=1.0)
    assert spy[-1] == "reference"                                  # CPU tensors without the interpreter
    assert "triton" not in spy and "routes" not in spy


def test_explicit_triton_that_cannot_run_says_why(monkeypatch):
    inputs, _ = _make_inputs(3, 4, 5, 2, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        kernels.lora_linear(**inputs, scaling=1.0, backend="triton")
    monkeypatch.setattr(kernels, "_INTERPRETING", False)
    inputs, _ = _make_inputs(3, 4, 5, 2, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.lora_linear(**inputs, scaling=1.0, backend="triton")


def test_available_backends():
    avail = kernels.available_backends()
    assert set(avail) == {"reference", "triton"}
    assert avail["reference"] == "ok"
    assert avail["triton"] == "ok"                                 # CUDA here, or the interpreter


def test_unknown_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="'cuda'"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="'fast'"):
        with kernels.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="'tritonn'"):
        _call(backend="tritonn")
    monkeypatch.setenv(kernels.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="MINIPEFT_KERNEL"):
        _call()


def _bad(**changes):
    inputs, _ = _make_inputs(3, 4, 5, 2, torch.float32)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize("make,error,match", [
    (lambda: _bad(x=torch.ones(3, 5, dtype=torch.int64, device=DEVICE)), TypeError, "x has dtype torch.int64"),
    (lambda: _bad(lora_A=torch.ones(2, 5, dtype=torch.float16, device=DEVICE)), TypeError, "lora_A has dtype"),
    (lambda: _bad(weight=torch.ones(4, 5, device="meta")), ValueError, "weight is on meta"),
    (lambda: _bad(x=torch.ones(3, 6, device=DEVICE)), ValueError, r"x has shape \(3, 6\); expected \(\.\.\., 5\)"),
    (lambda: _bad(lora_A=torch.ones(2, 6, device=DEVICE)), ValueError, r"lora_A has shape \(2, 6\)"),
    (lambda: _bad(lora_B=torch.ones(4, 3, device=DEVICE)), ValueError,
     r"lora_B has shape \(4, 3\); expected \(out, r\) = \(4, 2\)"),
    (lambda: _bad(bias=torch.ones(5, device=DEVICE)), ValueError, r"bias has shape \(5,\); expected \(4,\)"),
    (lambda: _bad(dropout_mask=torch.ones(3, 4, device=DEVICE)), ValueError, "dropout_mask has shape"),
    (lambda: _bad(weight=torch.ones(4, 5, 1, device=DEVICE)), ValueError, "weight must have shape"),
    (lambda: _bad(lora_A=[[1.0] * 5] * 2), TypeError, "lora_A must be a torch.Tensor"),
])
def test_bad_inputs_are_named(make, error, match):
    with pytest.raises(error, match=match):
        kernels.lora_linear(**make(), scaling=1.0)


# scaling multiplies every LoRA output and gradient, so a NaN or inf would spread through the whole model
# without an error; it is refused at the boundary, before either backend runs. Each message names scaling,
# what is expected ("finite" / "a real number") and what was given ("got ...").
FINITE, REAL = "scaling must be finite .*got ", "scaling must be a real number .*got "
BAD_SCALINGS = [  # (scaling, exception, message pattern)
    pytest.param(float("nan"), ValueError, FINITE + "float nan", id="nan"),
    pytest.param(float("inf"), ValueError, FINITE + "float inf", id="inf"),
    pytest.param(-math.inf, ValueError, FINITE + "float -inf", id="-inf"),
    pytest.param(10**400, ValueError, FINITE + "int 1000", id="10**400"),            # rounds to inf as a float
    pytest.param("2.0", TypeError, REAL + "str '2.0'", id="str"),
    pytest.param(None, TypeError, REAL + "NoneType None", id="None"),
    pytest.param(True, TypeError, REAL + "bool True", id="bool"),                     # an int to Python
    pytest.param(2 + 0j, TypeError, REAL + r"complex \(2\+0j\)", id="complex"),
    pytest.param(torch.tensor([1.0, 2.0]), TypeError, REAL + r"Tensor of shape \(2,\)", id="tensor-2-elements"),
    pytest.param(torch.tensor(1.0), TypeError, REAL + r"Tensor of shape \(\); .*float\(t\)", id="tensor-0d"),
]


@pytest.mark.parametrize("scaling,error,match", BAD_SCALINGS)
def test_bad_scaling_is_refused_before_dispatch(scaling, error, match, spy):
    for backend in (None, "reference", "triton"):
        with pytest.raises(error, match=match):
            kernels.lora_linear(**_bad(), scaling=scaling, backend=backend)
    assert spy == []                                               # neither backend ran


def test_finite_scalings_still_pass(spy):
    """The scaling checks refuse only what they must: zero (adapter off), negative, int and tiny values run."""
    for scaling in (0.0, -2.0, 2, 1e-30, -0.0):
        kernels.lora_linear(**_bad(), scaling=scaling)
    assert spy == [AUTO_HERE] * 5


# ----------------------------------------------------------------------------------------------------------
# Threads: the interpreter keeps each launch's state in globals (kernels/triton_interpreter.py), so every
# interpreted launch takes one lock. These tests run only in the interpreter; on a GPU no lock is taken.
# ----------------------------------------------------------------------------------------------------------
THREADS, CALLS = 4, 2  # ~0.4 s of interpreter per call and thread: 2 calls keep the test to a few seconds
# Shapes that give every kernel a grid of several programs (the fused GEMM 2×2 tiles of 32, the shrink 3 row
# blocks, the NF4 kernel 4 programs): with one program per launch every thread would set the same program
# index, and only the rarer triton.language race could show.
THREAD_SHAPE = dict(M=40, N=40, K=16, r=4)


def _nf4_inputs(seed: int) -> tuple:
    """Synthetic NF4 arguments (no double quantization): 512 weights in 8 blocks of 64."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (256,), generator=g, dtype=torch.uint8)      # 2 weights per byte
    absmax = torch.rand(8, generator=g) + 0.5                                   # one scale per block
    table = torch.linspace(-1.0, 1.0, 16)                                       # any 16 values will do
    return (codes.to(DEVICE), absmax.to(DEVICE), None, None, table.to(DEVICE), None, 512, 64, 256, torch.float32)


def _launch_from_threads(threads: int = THREADS, calls: int = CALLS) -> list[str]:
    """``calls`` LoRA forward+backward passes in each of ``threads`` threads at once; what went wrong, a line each.

    Each thread picks the Triton backend with its own ``use_backend("triton")``, while this (main) thread sits
    in ``use_backend("reference")`` and makes its own call: a choice that leaked from one thread to another
    shows as the wrong autograd node (the Triton op's, see ``_ran_triton_op``). The last thread
    also runs the NF4 dequantization kernel on every call, so both kernel files' launches share the race.
    Outputs and gradients are compared with the float64 reference at the fp32 tolerance. A barrier starts all
    threads together, so their launches overlap.
    """
    dtype = torch.float32
    cases = []
    for i in range(threads):
        inputs, dy = _make_inputs(**THREAD_SHAPE, dtype=dtype, bias=True, mask=i % 2 == 1, seed=i)
        cases.append((inputs, dy, _run(inputs, dy, 2.0, "reference", dtype=torch.float64)))
    nf4_args = _nf4_inputs(seed=threads)
    nf4_expected = kernels.nf4_dequantize_reference(*nf4_args)
    failures: list[str] = []                                     # list.append is atomic under the GIL
    start = threading.Barrier(threads + 1, timeout=120)

    def work(i: int) -> None:
        inputs, dy, (y_ref, grads_ref) = cases[i]
        with kernels.use_backend("triton"):
            start.wait()
            for call in range(calls):
                where = f"thread {i} call {call}"
                try:
                    y, grads = _run(inputs, dy, 2.0, backend=None)   # backend=None: the thread's choice
                    assert kernels.get_backend() == "triton", f"backend {kernels.get_backend()!r}"
                    assert _ran_triton_op(y), type(y.grad_fn).__name__
                    _check(y, y_ref, dtype)
                    for name in grads_ref:
                        _check(grads[name], grads_ref[name], dtype)
                    if i == threads - 1:
                        assert_close(kernels.nf4_dequantize_triton(*nf4_args, blocks_per_program=2), nf4_expected)
                except Exception as e:  # every failure is reported; none may end the thread early
                    first_line = str(e).partition("\n")[0]  # "" for some (BrokenBarrierError)
                    failures.append(f"{where}: {type(e).__name__}: {first_line[:200]}")

    workers = [threading.Thread(target=work, args=(i,), name=f"lora-{i}") for i in range(threads)]
    for t in workers:
        t.start()
    with kernels.use_backend("reference"):
        start.wait()
        inputs, dy, _ = cases[0]
        y, _ = _run(inputs, dy, 2.0, backend=None)
        if kernels.get_backend() != "reference" or _ran_triton_op(y):
            failures.append(f"main thread: the workers' use_backend('triton') leaked in ({kernels.get_backend()!r})")
    for t in workers:
        t.join(timeout=300)
        if t.is_alive():
            failures.append(f"{t.name} still running after 300 s")
    return failures


needs_interpreter = pytest.mark.skipif(not lora_triton.INTERPRETING,
                                       reason="the launch lock guards the CPU interpreter; a GPU takes none")


@needs_interpreter
def test_threads_launch_interpreted_kernels_safely():
    """4 threads × 2 forward+backward passes (and NF4 dequantizations) at once: all succeed and match.

    Without the lock, launches that overlap overwrite each other's program index (errors such as "x >= grid_dim[0]",
    or worse, tiles computed for the wrong rows and no error at all) and unpatch each other's triton.language ("Did
    you forget to add @triton.jit ?"); the next test holds them in such an overlap and watches the second happen.
    (Unlocked and left to the scheduler, every one of 70 rounds on 2 shared CPU cores had such failures.)
    """
    failures = _launch_from_threads()
    assert not failures, "\n".join(failures)


def _step_first_launches_into_a_collision(threads: int = THREADS, timeout: float = 60.0) -> None:
    """Hold the threads' first interpreted launches in the overlap that the launch lock forbids, every time.

    Each thread's first launch, once it has patched triton.language (``interpreter._patch_lang``), waits at a
    barrier until every thread's first launch has: all are inside at once. The thread that patched first then
    runs its programs and restores triton.language to Triton's own functions while the others wait; they run
    theirs after, and their ``tl.*`` calls reach the unpatched builtins ("Did you forget to add @triton.jit ?").
    No thread patches again until all of them are done (the first waits after its restore for the others'), so
    every other thread fails, whatever the scheduler does. Under the lock one launch is inside at a time: the
    barrier never fills and times out instead. For a fresh interpreter only: it leaves triton.language patched.
    """
    from triton.runtime import interpreter

    patch_lang = interpreter._patch_lang
    order: list[str] = []                              # threads, in the order their first launch patched
    order_lock = threading.Lock()
    all_inside, all_out = threading.Barrier(threads, timeout=timeout), threading.Barrier(threads, timeout=timeout)
    first_restored = threading.Event()

    def stepped_patch_lang(fn):
        me = threading.current_thread().name
        with order_lock:
            scope = patch_lang(fn)
            if me in order:                            # a later launch (or a device function's call) runs freely
                return scope
            order.append(me)
        all_inside.wait()
        restore = scope.restore
        if order[0] == me:
            def restore_then_release() -> None:
                restore()
                first_restored.set()
                all_out.wait()
        else:
            if not first_restored.wait(timeout):
                raise TimeoutError(f"{order[0]} did not finish its launch")

            def restore_then_release() -> None:
                all_out.wait()
                restore()
        scope.restore = restore_then_release
        return scope

    interpreter._patch_lang = stepped_patch_lang


@needs_interpreter
def test_without_the_lock_threads_collide():
    """The same threads with the lock swapped for a no-op fail: it is the lock that makes the test above pass.

    The threads' first launches are held inside together (``_step_first_launches_into_a_collision``), so the
    collision does not depend on how the scheduler interleaves them. It runs in a fresh interpreter because a
    collision leaves triton.language patched for good (a thread records the other thread's patches as the
    originals it restores), which must not leak into this session.
    """
    code = ("import contextlib, json\n"
            "import test_kernels\n"
            "from minipeft.kernels import triton_interpreter\n"
            "triton_interpreter._LAUNCH_LOCK = contextlib.nullcontext()\n"
            "test_kernels._step_first_launches_into_a_collision()\n"
            "print(json.dumps(test_kernels._launch_from_threads(calls=1)))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    unpatched = {f.split(":")[0] for f in failures if "Did you forget to add @triton.jit" in f}
    # every thread but the one whose launch went first, on its one call: "thread i call 0"
    assert len(unpatched) >= THREADS - 1, "\n".join(failures)
