"""multi_lora_linear: one batch, one LoRA adapter per row (kernels/reference.py, kernels/multi_lora_triton.py).

The oracle is each adapter run alone, through ``reference.lora_linear``, on a batch of its own rows: the mixed
batch's output rows, and the gradients of adapter i, must be those. The reference loop is checked against it in
float64; the Triton kernels against both, in fp32 and fp16 (the interpreter on a CPU, where conftest.py sets
TRITON_INTERPRET=1; bf16 too on a GPU). Then the switch (precedence, errors), and on a GPU the shapes of a
serving batch, the absence of host syncs and a CUDA-graph capture replayed with new adapter indices.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close, assert_rel_error

from minipeft import kernels
from minipeft.kernels import multi_lora_routes, multi_lora_triton, reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
MAX_ROWS, MAX_DIM = (300, 320) if CUDA else (40, 48)   # the interpreter is slow: tiny shapes on the CPU
KERNELS = ("_segment_shrink_kernel", "_segment_expand_kernel", "_segment_reduce_kernel")


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    """Every test starts with no set_backend and no MINIPEFT_KERNEL, and leaves none behind."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


# ----------------------------------------------------------------------------------------------------------
# Inputs, runs and the oracle
# ----------------------------------------------------------------------------------------------------------
def _make(index, K, N, ranks, *, lead=None, bias=True, scalings=None, dtype=torch.float32, device=DEVICE, seed=0):
    """Inputs whose outputs and gradients are O(1), and an upstream gradient dY; ``index`` lists each row's adapter."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    M = len(index)
    lead = (M,) if lead is None else lead
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    inputs = dict(
        x=cast(randn(M, K).reshape(*lead, K)),
        weight=cast(randn(N, K) / math.sqrt(max(K, 1))),
        bias=cast(randn(N)) if bias else None,
        lora_As=[cast(randn(r, K) / math.sqrt(max(K, 1))) for r in ranks],
        lora_Bs=[cast(randn(N, r) / math.sqrt(r)) for r in ranks],
        scalings=list(scalings) if scalings is not None else [0.5 + i for i in range(len(ranks))],
        adapter_index=torch.tensor(index, dtype=torch.int64).reshape(lead).to(device),
    )
    return inputs, cast(randn(*lead, N) / math.sqrt(max(N, 1)))


def _leaves(inputs, dtype=None, wants=("x", "bias", "lora_As", "lora_Bs")):
    """A detached copy of the inputs (optionally cast) whose ``wants`` require grad, and those leaves by name."""
    cast = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach())
    args, leaves = dict(inputs), {}
    for name in ("x", "weight", "bias"):
        if inputs[name] is not None:
            args[name] = cast(inputs[name])
            if name in wants:
                leaves[name] = args[name].requires_grad_()
    for name in ("lora_As", "lora_Bs"):
        args[name] = [cast(t) for t in inputs[name]]
        if name in wants:
            leaves.update({f"{name}[{i}]": t.requires_grad_() for i, t in enumerate(args[name])})
    return args, leaves


def _run(inputs, dy, backend, dtype=None, wants=("x", "bias", "lora_As", "lora_Bs")):
    """The forward on one backend (or a function of the reference's signature) and the gradients of ``wants``."""
    args, leaves = _leaves(inputs, dtype, wants)
    if callable(backend):
        y = backend(**args)
    else:
        y = kernels.multi_lora_linear(**args, backend=backend)
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype), allow_unused=True)
    return y, dict(zip(leaves, grads, strict=True))


def _each_adapter_alone(inputs, dy):
    """The oracle, in float64: every adapter's rows run as a batch of their own through ``reference.lora_linear``
    (the -1 rows through the base layer alone), outputs and gradients put back in place of those rows."""
    args, _ = _leaves(inputs, torch.float64, wants=())
    x, W, b = args["x"], args["weight"], args["bias"]
    K, N = x.shape[-1], W.shape[0]
    index = args["adapter_index"].reshape(-1)
    x2d, dy2d = x.reshape(len(index), K), dy.double().reshape(len(index), N)
    y, dx = torch.zeros(x2d.shape[0], N, dtype=torch.float64, device=x.device), torch.zeros_like(x2d)
    grads = {"bias": torch.zeros(N, dtype=torch.float64, device=x.device)}
    adapters = zip(args["lora_As"], args["lora_Bs"], args["scalings"], strict=True)
    for i, A, B, s in [(-1, None, None, 0.0)] + [(i, *adapter) for i, adapter in enumerate(adapters)]:
        rows = (index == i).nonzero().squeeze(1)                           # the rows of adapter i (-1: none)
        x_i = x2d[rows].clone().requires_grad_()
        b_i = torch.zeros(N, dtype=torch.float64, device=x.device) if b is None else b.clone()
        b_i.requires_grad_()
        if i == -1:
            y_i = F.linear(x_i, W, b_i)
            leaves = [x_i, b_i]
        else:
            A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
            y_i = reference.lora_linear(x_i, W, b_i, A, B, s)
            leaves = [x_i, b_i, A, B]
        got = torch.autograd.grad(y_i, leaves, dy2d[rows]) if len(rows) else [torch.zeros_like(t) for t in leaves]
        y[rows], dx[rows] = y_i.detach(), got[0]
        grads["bias"] += got[1]
        if i >= 0:
            grads[f"lora_As[{i}]"], grads[f"lora_Bs[{i}]"] = got[2], got[3]
    grads["x"] = dx.reshape(x.shape)
    if b is None:
        del grads["bias"]
    return y.reshape(*x.shape[:-1], N), grads


def _check(actual, expected, dtype, scale=1.0):
    """assert_close after dividing both by the expected tensor's largest |element| (at least 1): the gradients
    of A_i and B_i sum over rows, so one tolerance per dtype fits every shape when measured against their size."""
    norm = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
    assert_close(actual.double() / norm, expected.double() / norm, dtype=dtype, scale=scale)


def _check_all(got, want, dtype, scale=1.0):
    (y, grads), (y_ref, grads_ref) = got, want
    assert y.shape == y_ref.shape
    _check(y, y_ref, dtype, scale)
    assert set(grads) == set(grads_ref), (sorted(grads), sorted(grads_ref))
    for name, g in grads_ref.items():
        assert grads[name] is not None and grads[name].shape == g.shape, name
        _check(grads[name], g, dtype, scale)


# fp16/bf16: S (forward) and dS (backward) are rounded to the input dtype before their second product, as the
# reference's own autograd rounds them: one rounding more than the output's (the same allowance as test_kernels).
SCALE = {torch.float32: 1.0, torch.float16: 2.0, torch.bfloat16: 2.0}


@st.composite
def batches(draw, max_rows=MAX_ROWS, max_dim=MAX_DIM, min_rows=1):
    """A mixed batch: 1-4 adapters of ranks 1..16, rows per adapter (empty segments included), rows without an
    adapter (-1), all shuffled; 2-D or 3-D x, K and N that are not multiples of the block sizes, bias or not."""
    n = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(1, 16), min_size=n, max_size=n))
    per_group = max(1, max_rows // (n + 1))
    counts = draw(st.lists(st.integers(0, per_group), min_size=n + 1, max_size=n + 1))   # counts[0]: the -1 rows
    if sum(counts) < min_rows:
        counts[0] = min_rows
    index = draw(st.permutations([i - 1 for i, c in enumerate(counts) for _ in range(c)]))
    M = len(index)
    lead = (2, M // 2) if M % 2 == 0 and M > 0 and draw(st.booleans()) else (M,)
    return dict(index=list(index), lead=lead, ranks=ranks, K=draw(st.integers(1, max_dim)),
                N=draw(st.integers(1, max_dim)), bias=draw(st.booleans()),
                scalings=draw(st.lists(st.sampled_from([0.5, 2.0, -1.0, 0.25]), min_size=n, max_size=n)))


def _inputs(case, dtype=torch.float32, device=DEVICE, seed=0):
    return _make(case["index"], case["K"], case["N"], case["ranks"], lead=case["lead"], bias=case["bias"],
                 scalings=case["scalings"], dtype=dtype, device=device, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# The reference loop is each adapter alone
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(case=batches(max_rows=40, max_dim=48))
def test_reference_is_each_adapter_alone(case):
    """float64 on the CPU: the loop's outputs and gradients (x, bias, every A_i and B_i) are those of each
    adapter on its own rows; an adapter without rows gets zero gradients."""
    inputs, dy = _inputs(case, torch.float64, "cpu")
    _check_all(_run(inputs, dy, reference.multi_lora_linear), _each_adapter_alone(inputs, dy), torch.float64)


# ----------------------------------------------------------------------------------------------------------
# The Triton kernels against the reference loop and against each adapter alone
# ----------------------------------------------------------------------------------------------------------
@settings(max_examples=25)
@given(case=batches(), dtype=st.sampled_from(DTYPES))
def test_triton_matches_reference_and_each_adapter_alone(case, dtype):
    inputs, dy = _inputs(case, dtype)
    got = _run(inputs, dy, "triton")
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1].values())
    _check_all(got, _run(inputs, dy, "reference", dtype=torch.float64), dtype, SCALE[dtype])
    _check_all(got, _each_adapter_alone(inputs, dy), dtype, SCALE[dtype])


@settings(max_examples=20)
@given(case=batches(), dtype=st.sampled_from(DTYPES), fused=st.booleans())
def test_inference_matches_each_adapter_alone_in_one_launch_or_two(case, dtype, fused, monkeypatch):
    """Without autograd the Triton side runs no autograd node: few rows in one shrink-expand launch (S computed
    per column tile, never stored), more rows in shrink + expand. Both give each row its adapter's output."""
    monkeypatch.setattr(multi_lora_triton, "FUSED_MAX_ROWS", 10**9 if fused else 0)
    inputs, dy = _inputs(case, dtype)
    with torch.no_grad():
        y = kernels.multi_lora_linear(**inputs, backend="triton")
    assert y.dtype == dtype and y.grad_fn is None
    _check(y, _each_adapter_alone(inputs, dy)[0], dtype, SCALE[dtype])


EDGE_CASES = {  # name: (index, ranks)
    "one adapter, every row (a segment of 3 tiles)": ([0] * 40, [5]),
    "no adapter on any row": ([-1] * 7, [3, 2]),
    "first and last adapters without rows": ([1, -1, 1, 2, 1, 2, -1], [4, 8, 2, 16]),
    "rows sorted backwards, ranks 1 and 16": ([1] * 9 + [0] * 9 + [-1] * 3, [1, 16]),
    "one row": ([2], [3, 1, 7]),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=list(EDGE_CASES))
def test_triton_edge_cases(case):
    index, ranks = EDGE_CASES[case]
    inputs, dy = _make(index, 19, 35, ranks, seed=len(index))
    _check_all(_run(inputs, dy, "triton"), _each_adapter_alone(inputs, dy), torch.float32)


@pytest.mark.parametrize("index,lead,K,N", [([], (0,), 6, 5), ([], (2, 0), 6, 5), ([0, -1, 1], None, 0, 5),
                                             ([0, -1, 1], None, 6, 0)], ids=["M=0", "(2, 0, K)", "K=0", "N=0"])
def test_empty_dimensions(index, lead, K, N):
    """No rows, no input features or no outputs: the reference's shapes and values (zeros, the bias)."""
    inputs, dy = _make(index, K, N, [2, 3], lead=lead)
    got, want = _run(inputs, dy, "triton"), _run(inputs, dy, "reference")
    _check_all(got, want, torch.float32)
    if not index:                                                         # no rows: zero gradients
        assert all(float(g.abs().sum()) == 0 for name, g in got[1].items() if name.startswith("lora_"))


def test_strided_x_and_zero_scaling():
    """x and dY with transposed strides (rows gathered through any stride; the backward makes dY's columns
    adjacent), and an adapter switched off by s = 0."""
    inputs, dy = _make([0, 1, -1, 1, 0, 0, 1, 1, -1, 0, 1], 21, 13, [3, 6], scalings=[0.0, 2.0], seed=5)
    inputs["x"] = inputs["x"].t().contiguous().t()                        # same values, strides (1, M)
    dy = dy.t().contiguous().t()
    assert inputs["x"].stride() == (1, 11) and dy.stride() == (1, 11)
    got = _run(inputs, dy, "triton")
    _check_all(got, _each_adapter_alone(inputs, dy), torch.float32)
    assert float(got[1]["lora_Bs[0]"].abs().max()) == 0.0                 # s = 0: no gradient for B_0


@settings(max_examples=8)
@given(wants=st.sets(st.sampled_from(["x", "bias", "lora_As", "lora_Bs"]), min_size=1), dtype=st.sampled_from(DTYPES))
def test_gradients_for_every_subset(wants, dtype):
    """Any subset of x, bias, the As and the Bs may want a gradient (x frozen: the first layer of a model)."""
    inputs, dy = _make([2, 0, -1, 1, 0, 2, 2, 1, 0, 0, 1, -1, 2], 17, 22, [2, 5, 9], dtype=dtype, seed=7)
    got = _run(inputs, dy, "triton", wants=tuple(wants))
    want = _run(inputs, dy, "reference", dtype=torch.float64, wants=tuple(wants))
    _check_all(got, want, dtype, SCALE[dtype])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_weight_never_gets_a_gradient(backend):
    inputs, dy = _make([0, -1, 1, 0], 6, 5, [2, 3])
    inputs["weight"].requires_grad_()
    inputs["x"].requires_grad_()
    kernels.multi_lora_linear(**inputs, backend=backend).backward(dy)
    assert inputs["weight"].grad is None and inputs["x"].grad is not None


def test_segments_and_table_of_the_docstring_example():
    """The worked example of kernels/multi_lora_triton.py's docstring, exactly."""
    segs = multi_lora_triton.segments(torch.tensor([1, -1, 0, 1, 1, 0], device=DEVICE), 3)
    assert segs.order.tolist() == [1, 2, 5, 0, 3, 4]
    assert segs.start.tolist() == [1, 3, 6, 6] and segs.start.dtype == torch.int32
    table = multi_lora_triton.adapter_table((4, 8, 2), (0.5, 1.0, 2.0), torch.device(DEVICE))
    assert table.rank_start.tolist() == [0, 4, 12, 14] and table.scale.tolist() == [0.5, 1.0, 2.0]
    assert multi_lora_triton.adapter_table((4, 8, 2), (0.5, 1.0, 2.0), torch.device(DEVICE)) is table  # kept


def test_tile_map_of_the_docstring_example():
    """The same example in tiles of BM = 2 rows: adapter 0 (2 rows) one tile, adapter 1 (3 rows) two, adapter 2
    none; cdiv(6, 2) + 3 = 6 programs, the last three past the last tile (segment n = 3)."""
    segs = multi_lora_triton.segments(torch.tensor([1, -1, 0, 1, 1, 0], device=DEVICE), 3)
    tiles = multi_lora_triton.tile_map(segs, 6, BM=2)
    assert tiles.segment.tolist() == [0, 1, 1, 3, 3, 3] and tiles.segment.dtype == torch.int32
    assert tiles.first.tolist()[:3] == [1, 3, 5]


@settings(max_examples=40)
@given(case=batches(max_rows=60), BM=st.sampled_from([1, 2, 3, 16]))
def test_tile_map_covers_every_row_once_and_each_tile_holds_one_adapter(case, BM):
    """Against a plain-Python walk over the segments: the programs' tiles are exactly the BM-row pieces of each
    segment, in order, and the rest of the grid is marked past the last tile."""
    n = len(case["ranks"])
    segs = multi_lora_triton.segments(torch.tensor(case["index"], dtype=torch.int64), n)
    tiles = multi_lora_triton.tile_map(segs, len(case["index"]), BM)
    start = segs.start.tolist()
    want = [(i, first) for i in range(n) for first in range(start[i], start[i + 1], BM)]
    got = list(zip(tiles.segment.tolist(), tiles.first.tolist(), strict=True))
    assert len(got) == -(-len(case["index"]) // BM) + n
    assert got[:len(want)] == want and all(segment == n for segment, _ in got[len(want):])


@settings(max_examples=15)
@given(case=batches(), backend=st.sampled_from(["reference", "triton"]), grouped=st.booleans())
def test_packed_adapters_give_what_the_lists_give(case, backend, grouped):
    """pack_adapters + multi_lora_linear_packed (rows grouped beforehand or in the call) against the list form:
    the same output, and gradients that reach every A_i and B_i back through the packing."""
    inputs, dy = _inputs(case)

    def packed(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index):
        adapters = kernels.pack_adapters(lora_As, lora_Bs, scalings)
        groups = kernels.group_rows(adapter_index, len(lora_As)) if grouped else None
        return kernels.multi_lora_linear_packed(x, weight, bias, adapters, adapter_index, backend, groups=groups)

    _check_all(_run(inputs, dy, packed), _run(inputs, dy, backend), torch.float32)


def test_packed_bad_inputs_are_named():
    inputs, _ = _make([0, -1, 1, 1], 5, 4, [2, 3])
    adapters = kernels.pack_adapters(inputs["lora_As"], inputs["lora_Bs"], inputs["scalings"])
    args = dict(x=inputs["x"], weight=inputs["weight"], bias=inputs["bias"], adapter_index=inputs["adapter_index"])
    with pytest.raises(TypeError, match="adapters must be the PackedAdapters"):
        kernels.multi_lora_linear_packed(**args, adapters=(adapters.a_cat, adapters.b_cat))
    with pytest.raises(ValueError, match=r"do not fit weight \(out, in\) = \(4, 6\)"):
        kernels.multi_lora_linear_packed(**dict(args, x=torch.ones(4, 6, device=DEVICE),
                                                weight=torch.ones(4, 6, device=DEVICE)), adapters=adapters)
    other = kernels.group_rows(torch.zeros(3, dtype=torch.int64, device=DEVICE), 2)
    with pytest.raises(ValueError, match="groups must be kernels.group_rows"):
        kernels.multi_lora_linear_packed(**args, adapters=adapters, groups=other)
    with pytest.raises(ValueError, match="values must lie"):
        kernels.multi_lora_linear_packed(**dict(args, adapter_index=torch.tensor([0, 2, 1, 1], device=DEVICE)),
                                         adapters=adapters)
    with pytest.raises(ValueError, match=r"lora_Bs\[1\] has shape \(4, 2\); expected \(out, r\) = \(4, 3\)"):
        kernels.pack_adapters(inputs["lora_As"], [inputs["lora_Bs"][0], inputs["lora_Bs"][0]], inputs["scalings"])
    with pytest.raises(ValueError, match=r"scalings\[0\] must be finite"):
        kernels.pack_adapters(inputs["lora_As"], inputs["lora_Bs"], [float("inf"), 1.0])


class _LaunchRecorder:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` records the kernel's name and launches nothing."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(self.name)


def test_each_kernel_is_one_launch_for_all_adapters(monkeypatch):
    """Four adapters of four ranks: forward = one shrink + one expand; backward = one shrink (dS), one expand
    (dX), one reduce each for dA and dB. The number of launches does not grow with the number of adapters."""
    calls = []
    for name in KERNELS:
        monkeypatch.setattr(multi_lora_triton, name, _LaunchRecorder(name, calls))
    inputs, dy = _make([3, 0, 1, 2, -1, 3, 0], 8, 9, [1, 2, 4, 8])
    y, _ = _run(inputs, dy, "triton")
    shrink, expand, reduce = KERNELS
    assert calls == [shrink, expand, shrink, expand, reduce, reduce], calls
    calls.clear()
    monkeypatch.setattr(multi_lora_triton, "_segment_shrink_expand_kernel", _LaunchRecorder("shrink-expand", calls))
    with torch.no_grad():  # inference of a few rows: one launch
        kernels.multi_lora_linear(**inputs, backend="triton")
    assert calls == ["shrink-expand"], calls


def test_out_of_range_rows_get_the_base_unchecked():
    """Without the switch's check (skipped while tracing or capturing), an index outside [-1, n) matches no
    adapter: its row gets the base layer only, in the kernels and in the reference alike, and nothing is read
    out of bounds."""
    inputs, _ = _make([0, 5, 1, -3, 1, 2], 9, 7, [2, 3])
    args = dict(inputs)
    y = multi_lora_triton.multi_lora_linear(**args)
    base = F.linear(inputs["x"], inputs["weight"], inputs["bias"])
    assert_close(y[[1, 3]], base[[1, 3]])
    clean = dict(args, adapter_index=torch.tensor([0, -1, 1, -1, 1, -1], device=DEVICE))
    assert_close(y, reference.multi_lora_linear(**clean))
    assert_close(reference.multi_lora_linear(**args), reference.multi_lora_linear(**clean))


def test_triton_backend_under_torch_compile_breaks_the_graph_and_matches_eager():
    """torch.compile runs the Triton route in eager after a graph break (it is not a registered op)."""
    import torch._dynamo as dynamo

    inputs, _ = _make([1, 0, -1, 1], 6, 5, [2, 3])

    def fn(x):
        return kernels.multi_lora_linear(**dict(inputs, x=x), backend="triton") * 2

    dynamo.reset()
    try:
        assert_close(torch.compile(fn, backend="eager")(inputs["x"]), fn(inputs["x"]))
    finally:
        dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# The switch: precedence, what "triton" refuses, and the errors of the boundary
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def spy(monkeypatch):
    """The two implementations replaced by recorders that say which one ran (and compute nothing)."""
    calls = []
    monkeypatch.setattr(reference, "multi_lora_linear", lambda *a, **k: calls.append("reference"))
    monkeypatch.setattr(multi_lora_triton, "multi_lora_linear", lambda *a, **k: calls.append("triton"))
    return calls


def _call(dtype=torch.float32, **kw):
    inputs, _ = _make([0, -1, 1], 5, 4, [2, 1], dtype=dtype)
    kernels.multi_lora_linear(**inputs, **kw)


AUTO_HERE = "triton" if CUDA else "reference"


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
            _call(backend="triton")
            assert spy[-1] == "triton"                             # the call's backend= wins over all
        with kernels.use_backend("auto"):
            _call()
            assert spy[-1] == AUTO_HERE                            # "auto" by name
    _call(dtype=torch.float64, backend="auto")
    assert spy[-1] == "reference"                                  # float64: no Triton kernel, any device


def test_auto_is_the_reference_on_the_cpu(spy, monkeypatch):
    inputs, _ = _make([0, -1, 1], 5, 4, [2, 1], device="cpu")
    kernels.multi_lora_linear(**inputs)
    monkeypatch.setattr(kernels, "_INTERPRETING", False)
    kernels.multi_lora_linear(**inputs)
    assert spy == ["reference", "reference"]                       # interpreter or not


def test_explicit_triton_that_cannot_run_says_why(monkeypatch):
    with pytest.raises(ValueError, match="triton kernel backend cannot run here: dtype torch.float64"):
        _call(dtype=torch.float64, backend="triton")
    if multi_lora_triton.INTERPRETING:
        with pytest.raises(ValueError, match="bf16 tl.dot gives wrong results in the Triton interpreter"):
            _call(dtype=torch.bfloat16, backend="triton")
    monkeypatch.setattr(kernels, "_INTERPRETING", False)
    inputs, _ = _make([0, -1, 1], 5, 4, [2, 1], device="cpu")
    with pytest.raises(ValueError, match="Triton needs CUDA tensors|no CUDA device"):
        kernels.multi_lora_linear(**inputs, backend="triton")


def _bad(**changes):
    inputs, _ = _make([0, -1, 1, 1], 5, 4, [2, 3])
    inputs.update(changes)
    return inputs


def _with_item(name, i, value):
    def make():
        inputs = _bad()
        inputs[name] = list(inputs[name])
        inputs[name][i] = value
        return inputs
    return make


ON = dict(device=DEVICE)
BAD_INPUTS = [  # (make the inputs, exception, message pattern)
    pytest.param(lambda: _bad(lora_As=torch.ones(2, 2, 5, **ON)), TypeError, "lora_As must be a list or tuple",
                 id="stacked-tensor"),
    pytest.param(lambda: _bad(scalings=[1.0]), ValueError, "one entry per adapter, got lengths 2, 2 and 1",
                 id="lengths"),
    pytest.param(lambda: _bad(lora_As=[], lora_Bs=[], scalings=[]), ValueError, "at least one adapter", id="empty"),
    pytest.param(_with_item("lora_As", 1, torch.ones(3, 6, **ON)), ValueError,
                 r"lora_As\[1\] has shape \(3, 6\); expected \(r, 5\)", id="A-in"),
    pytest.param(_with_item("lora_Bs", 0, torch.ones(4, 3, **ON)), ValueError,
                 r"lora_Bs\[0\] has shape \(4, 3\); expected \(out, r\) = \(4, 2\)", id="B-rank"),
    pytest.param(_with_item("lora_As", 0, torch.ones(2, 5, dtype=torch.float16, **ON)), TypeError,
                 r"lora_As\[0\] has dtype torch.float16", id="A-dtype"),
    pytest.param(_with_item("lora_Bs", 1, [[1.0] * 3] * 4), TypeError, r"lora_Bs\[1\] must be a torch.Tensor",
                 id="B-list"),
    pytest.param(_with_item("lora_Bs", 1, torch.ones(4, 3, device="meta")), ValueError, r"lora_Bs\[1\] is on meta",
                 id="B-device"),
    pytest.param(_with_item("scalings", 1, float("nan")), ValueError, r"scalings\[1\] must be finite", id="nan"),
    pytest.param(_with_item("scalings", 0, "2.0"), TypeError, r"scalings\[0\] must be a real number", id="str"),
    pytest.param(lambda: _bad(adapter_index=torch.tensor([0, -1, 1, 1], dtype=torch.int32, **ON)), TypeError,
                 "adapter_index has dtype torch.int32; expected torch.int64", id="index-int32"),
    pytest.param(lambda: _bad(adapter_index=[0, -1, 1, 1]), TypeError, "adapter_index must be a torch.Tensor",
                 id="index-list"),
    pytest.param(lambda: _bad(adapter_index=torch.zeros(2, 2, dtype=torch.int64, **ON)), ValueError,
                 r"adapter_index has shape \(2, 2\); expected x's leading shape \(4,\)", id="index-shape"),
    pytest.param(lambda: _bad(adapter_index=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError,
                 "adapter_index is on meta", id="index-device"),
    pytest.param(lambda: _bad(adapter_index=torch.tensor([0, -1, 2, 1], **ON)), ValueError,
                 r"values must lie in \[-1, 2\).*from -1 to 2", id="index-n"),
    pytest.param(lambda: _bad(adapter_index=torch.tensor([0, -2, 1, 1], **ON)), ValueError,
                 r"values must lie in \[-1, 2\).*from -2 to 1", id="index-minus-2"),
    pytest.param(lambda: _bad(x=torch.ones(4, 6, **ON)), ValueError, r"x has shape \(4, 6\); expected \(\.\.\., 5\)",
                 id="x-in"),
    pytest.param(lambda: _bad(x=torch.ones(4, 5, dtype=torch.int64, **ON)), TypeError, "x has dtype torch.int64",
                 id="x-int"),
    pytest.param(lambda: _bad(bias=torch.ones(5, **ON)), ValueError, r"bias has shape \(5,\); expected \(4,\)",
                 id="bias"),
]


@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_bad_inputs_are_named_before_any_backend_runs(make, error, match, spy):
    for backend in (None, "reference", "triton"):
        with pytest.raises(error, match=match):
            kernels.multi_lora_linear(**make(), backend=backend)
    assert spy == []


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"multi_lora_linear\(backend=...\): unknown kernel backend 'fast'"):
        _call(backend="fast")


def test_index_range_check_is_skipped_while_compiling(spy, monkeypatch):
    """The range check reads adapter_index back (a host sync): not while torch.compile traces."""
    inputs = _bad(adapter_index=torch.tensor([0, -1, 7, 1], device=DEVICE))
    with pytest.raises(ValueError, match="values must lie"):
        kernels.multi_lora_linear(**inputs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernels.multi_lora_linear(**inputs)
    assert spy == [AUTO_HERE]


# ----------------------------------------------------------------------------------------------------------
# One adapter per sequence: the index (B,) for x (B, L, in), and the gathered route ("auto" on CUDA, inference)
# ----------------------------------------------------------------------------------------------------------
@st.composite
def sequences(draw, max_dim=MAX_DIM):
    """A batch of B sequences of L tokens (or 2-D x: B rows), each sequence on one adapter or none (-1); ranks
    1..16 that differ; returns the case of ``batches`` (index per row) and the index per sequence."""
    n = draw(st.integers(1, 4))
    B, L = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    per_sequence = draw(st.lists(st.integers(-1, n - 1), min_size=B, max_size=B))
    two_d = draw(st.booleans())
    case = dict(index=[i for i in per_sequence for _ in range(1 if two_d else L)], lead=(B,) if two_d else (B, L),
                ranks=draw(st.lists(st.integers(1, 16), min_size=n, max_size=n)), K=draw(st.integers(1, max_dim)),
                N=draw(st.integers(1, max_dim)), bias=draw(st.booleans()),
                scalings=draw(st.lists(st.sampled_from([0.5, 2.0, -1.0, 0.25]), min_size=n, max_size=n)))
    return case, per_sequence


def _packed_args(inputs):
    """multi_lora_linear_packed's arguments from multi_lora_linear's."""
    adapters = kernels.pack_adapters(inputs["lora_As"], inputs["lora_Bs"], inputs["scalings"])
    return dict(x=inputs["x"], weight=inputs["weight"], bias=inputs["bias"], adapters=adapters)


@settings(max_examples=30)
@given(drawn=sequences(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_gathered_route_is_each_adapter_alone(drawn, dtype):
    """Each sequence's adapter padded to the largest rank and gathered, two batched GEMMs: every row gets its own
    adapter's output (zero-rank padding adds nothing, a -1 sequence gets the base), in float64 and float32."""
    case, per_sequence = drawn
    inputs, dy = _inputs(case, dtype, "cpu")
    seq = torch.tensor(per_sequence)
    y = multi_lora_routes.multi_lora_linear_gathered(**_packed_args(inputs), adapter_index=seq)
    assert y.dtype == dtype and y.shape == (*case["lead"], case["N"])
    _check(y, _each_adapter_alone(inputs, dy)[0], dtype)


@settings(max_examples=12)
@given(drawn=sequences(), backend=st.sampled_from(["reference", "triton", "auto"]))
def test_an_index_per_sequence_is_that_index_on_every_row(drawn, backend):
    """adapter_index (B,) for x (B, L, in) means adapter_index[b] on every row of sequence b, on every backend,
    packed or not, with and without autograd."""
    case, per_sequence = drawn
    inputs, dy = _inputs(case)
    seq = torch.tensor(per_sequence, device=DEVICE)
    per_row = _run(inputs, dy, backend)
    _check_all(_run(dict(inputs, adapter_index=seq), dy, backend), per_row, torch.float32)

    def packed(x, weight, bias, lora_As, lora_Bs, scalings, adapter_index):
        adapters = kernels.pack_adapters(lora_As, lora_Bs, scalings)
        return kernels.multi_lora_linear_packed(x, weight, bias, adapters, adapter_index, backend)

    _check_all(_run(dict(inputs, adapter_index=seq), dy, packed), per_row, torch.float32)
    with torch.no_grad():
        _check(kernels.multi_lora_linear_packed(**_packed_args(inputs), adapter_index=seq, backend=backend),
               per_row[0], torch.float32)


def test_the_stack_is_made_once_per_packing_and_gathered_copies_serve_many_calls(monkeypatch):
    """The padded stack is kept per packing and made again after an in-place change of the adapters (their
    version counters); ``gather_adapters`` made once serves later calls, and the output follows the adapters."""
    made = []
    real = multi_lora_routes.stack_adapters
    monkeypatch.setattr(multi_lora_routes, "stack_adapters", lambda a: made.append("stack") or real(a))
    inputs, _ = _make([0, 0, -1, -1, 1, 1], 6, 5, [2, 3], lead=(3, 2), dtype=torch.float64, device="cpu")
    args, seq = _packed_args(inputs), torch.tensor([0, -1, 1])

    def check(gathered=None):
        want = reference.multi_lora_linear_packed(**args, adapter_index=seq[:, None].expand(3, 2))
        got = multi_lora_routes.multi_lora_linear_gathered(**args, adapter_index=seq, gathered=gathered)
        assert_close(got, want, dtype=torch.float64)

    check()
    gathered = kernels.gather_adapters(args["adapters"], seq)
    check(gathered)
    check(gathered)
    assert made == ["stack"]                                   # one stack for both gathers, and three calls
    with torch.no_grad():
        args["adapters"].a_cat.mul_(2)                         # in place, as an optimizer step on the packing
    check()
    assert made == ["stack", "stack"]
    with torch.no_grad():
        args["adapters"].b_cat.mul_(-1)
    check()
    assert made == ["stack", "stack", "stack"]


@pytest.mark.parametrize("lead,index,K,N", [((0, 3), [], 6, 5), ((3, 0), [0, -1, 1], 6, 5), ((3, 2), [0, -1, 1], 0, 5),
                                           ((3, 2), [0, -1, 1], 6, 0), ((0,), [], 6, 5)])
def test_gathered_route_with_empty_dimensions(lead, index, K, N):
    """No sequences, empty sequences, K = 0 (an empty sum: the base's bias alone) or N = 0: the reference's shapes
    and values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    adapters = kernels.pack_adapters([torch.randn(r, K, generator=g, dtype=torch.float64) for r in (2, 3)],
                                     [torch.randn(N, r, generator=g, dtype=torch.float64) for r in (2, 3)], [0.5, 2.0])
    seq = torch.tensor(index, dtype=torch.long)
    y = multi_lora_routes.multi_lora_linear_gathered(x, weight, bias, adapters, seq)
    per_row = seq.view(-1, *[1] * (x.dim() - 2)).expand(lead)
    want = reference.multi_lora_linear_packed(x, weight, bias, adapters, per_row)
    assert y.shape == want.shape == (*lead, N)
    assert_close(y, want, dtype=torch.float64)


def test_gathered_route_under_inference_mode():
    """Tensors made under torch.inference_mode keep no version counter: their stack is built again on every call
    and never kept (an in-place change would otherwise go unseen), and the results are the same."""
    inputs, _ = _make([0, 0, -1, -1, 1, 1], 6, 5, [2, 3], lead=(3, 2), dtype=torch.float64, device="cpu")
    seq = torch.tensor([0, -1, 1])
    with torch.inference_mode():
        args = _packed_args(inputs)
        got = multi_lora_routes.multi_lora_linear_gathered(**args, adapter_index=seq,
                                                           gathered=kernels.gather_adapters(args["adapters"], seq))
        again = multi_lora_routes.multi_lora_linear_gathered(**args, adapter_index=seq)
    want = reference.multi_lora_linear_packed(**_packed_args(inputs), adapter_index=seq[:, None].expand(3, 2))
    assert_close(got, want, dtype=torch.float64)
    assert torch.equal(got, again)


def test_auto_gathers_for_inference_with_one_adapter_per_sequence(monkeypatch):
    """choose_route: "gathered" without autograd for an index per sequence within the byte budget; the Triton
    kernels for training, an index per token, a batch past the budget, and while torch.compile traces."""
    inputs, _ = _make([0, 0, 1, 1, -1, -1], 6, 5, [2, 3], lead=(3, 2), device="cpu")
    adapters = _packed_args(inputs)["adapters"]
    x, seq, per_token = inputs["x"], torch.tensor([0, 1, -1]), inputs["adapter_index"]
    assert multi_lora_routes.choose_route(x, seq, adapters, needs_grad=False) == "gathered"
    assert multi_lora_routes.choose_route(x.reshape(6, 6), per_token.reshape(6), adapters, False) == "gathered"
    assert multi_lora_routes.choose_route(x, seq, adapters, needs_grad=True) == "triton"
    assert multi_lora_routes.choose_route(x, per_token, adapters, needs_grad=False) == "triton"
    monkeypatch.setattr(multi_lora_routes, "GATHER_MAX_BYTES", 3 * 3 * (6 + 5) * 4 - 1)  # B·R·(K+N)·4 bytes, less 1
    assert multi_lora_routes.choose_route(x, seq, adapters, needs_grad=False) == "triton"
    monkeypatch.undo()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert multi_lora_routes.choose_route(x, seq, adapters, needs_grad=False) == "triton"


def test_multi_lora_route_says_which_route_runs():
    inputs, _ = _make([0, 1, -1], 6, 5, [2, 3], device="cpu")
    adapters, index = _packed_args(inputs)["adapters"], inputs["adapter_index"]
    assert kernels.multi_lora_route(inputs["x"], index, adapters) == "reference"   # auto on the CPU
    assert kernels.multi_lora_route(inputs["x"], index, adapters, backend="reference") == "reference"
    if multi_lora_triton.INTERPRETING:
        assert kernels.multi_lora_route(inputs["x"], index, adapters, backend="triton") == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        kernels.multi_lora_route(inputs["x"], index, adapters, backend="cuda")
    with pytest.raises(TypeError, match="adapters must be the PackedAdapters"):
        kernels.multi_lora_route(inputs["x"], index, [inputs["lora_As"], inputs["lora_Bs"]])
    with pytest.raises(ValueError, match="adapter_index has shape"):
        kernels.multi_lora_route(inputs["x"], index[:2], adapters)


def test_gathered_copies_that_do_not_fit_are_named():
    """gathered= is checked where the gathered route uses it: copies of another batch size or rank are a
    ValueError naming gathered (checked on the route itself: on the CPU "auto" is the reference)."""
    inputs, _ = _make([0, 1, -1], 6, 5, [2, 3], device="cpu")
    adapters, seq = _packed_args(inputs)["adapters"], torch.tensor([0, 1, -1])
    other = kernels.gather_adapters(adapters, seq[:2])
    for wrong in (other, (other.a, other.b), None):
        args = dict(x=inputs["x"], weight=inputs["weight"], bias=inputs["bias"], adapters=adapters,
                    adapter_index=seq, gathered=wrong)
        if wrong is None:
            kernels._check_gathered(kernels.gather_adapters(adapters, seq), inputs["x"], adapters, 6, 5)  # fits
            continue
        with pytest.raises(ValueError, match="gathered must be kernels.gather_adapters"):
            kernels._check_gathered(wrong, inputs["x"], adapters, 6, 5)
        kernels.multi_lora_linear_packed(**args)  # the reference route ignores it, as it ignores groups


# ----------------------------------------------------------------------------------------------------------
# On a GPU: a serving batch, no host sync, and a CUDA graph replayed with new adapter indices
# ----------------------------------------------------------------------------------------------------------
def _on_gpu(dtype: torch.dtype) -> object:
    """The tolerance table's key for a result of the GPU kernels in `dtype`: fp32 dots are "ieee", unless torch
    allows tf32 matmuls (the kernels then follow it)."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else dtype


def _serving_batch(dtype, ranks=(16,) * 8, M=1000, K=768, N=2304, seed=0):
    """GPT-2's c_attn shape: M rows over len(ranks) adapters, about 1 row in 9 with none, shuffled."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, len(ranks), (M,), generator=g).tolist()
    return _make(index, K, N, list(ranks), scalings=[2.0] * len(ranks), dtype=dtype, seed=seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("ranks", [(16,) * 8, (4, 8, 16, 32, 64, 1, 2, 16)], ids=["8x r16", "mixed ranks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_serving_batch_on_gpu(dtype, ranks):
    inputs, dy = _serving_batch(dtype, ranks)
    (y, grads), (y_ref, grads_ref) = _run(inputs, dy, "triton"), _run(inputs, dy, "reference", dtype=torch.float64)
    assert_rel_error(y, y_ref, _on_gpu(dtype))
    for name in grads_ref:
        assert_rel_error(grads[name], grads_ref[name], _on_gpu(dtype), msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_on_gpu():
    """Forward and backward of the Triton route with no host sync, once the per-adapter table exists."""
    inputs, dy = _serving_batch(torch.bfloat16)
    _run(inputs, dy, multi_lora_triton.multi_lora_linear)                 # warm-up: compile, make the table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(inputs, dy, multi_lora_triton.multi_lora_linear)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_graph_replays_with_new_adapter_indices():
    """Captured once, replayed with other adapter indices copied into the same tensor: segments are found on the
    device at each replay (other segment sizes, empty ones, all rows on one adapter), and the output follows."""
    inputs, _ = _serving_batch(torch.bfloat16)
    static = dict(inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):                                                 # warm-up, as CUDA graphs want
            kernels.multi_lora_linear(**static, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y_static = kernels.multi_lora_linear(**static, backend="triton")
    M = static["x"].shape[0]
    g = torch.Generator().manual_seed(1)
    for new in (torch.randint(-1, 8, (M,), generator=g), torch.full((M,), 3), torch.randint(-1, 2, (M,), generator=g),
                torch.full((M,), -1)):
        static["adapter_index"].copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = reference.multi_lora_linear(**_leaves(static, torch.float64, wants=())[0])
        assert_rel_error(y_static, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_gathers_a_serving_batch_on_gpu(dtype):
    """64 sequences of 8 tokens over 16 adapters of mixed ranks at GPT-2's c_attn shape, inference: "auto" takes
    the gathered route, and it matches the reference loop."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(-1, 16, (64,), generator=g)
    ranks = [16, 8, 4, 16] * 4
    inputs, _ = _make(seq.repeat_interleave(8).tolist(), 768, 2304, ranks, lead=(64, 8), dtype=dtype)
    args, seq = _packed_args(inputs), seq.cuda()
    assert kernels.multi_lora_route(args["x"], seq, args["adapters"]) == "gathered"
    with torch.no_grad():
        y = kernels.multi_lora_linear_packed(**args, adapter_index=seq)
    want = reference.multi_lora_linear(**_leaves(inputs, torch.float64, wants=())[0])
    assert_rel_error(y, want, _on_gpu(dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gathered_route_in_a_cuda_graph_follows_a_new_index():
    """Captured on "auto" (the gathered route), replayed after new sequence indices are copied into the same
    tensor: the gather is in the graph, so the output follows the new index (a kept copy would not)."""
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(-1, 8, (32,), generator=g)
    inputs, _ = _make(seq.repeat_interleave(4).tolist(), 768, 2304, [16] * 8, lead=(32, 4), dtype=torch.bfloat16)
    args, static_seq = _packed_args(inputs), seq.cuda()
    with torch.no_grad():
        assert kernels.multi_lora_route(args["x"], static_seq, args["adapters"]) == "gathered"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(2):
            kernels.multi_lora_linear_packed(**args, adapter_index=static_seq)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y_static = kernels.multi_lora_linear_packed(**args, adapter_index=static_seq)
    for new in (torch.randint(-1, 8, (32,), generator=g), torch.full((32,), 5), torch.full((32,), -1)):
        static_seq.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        want = reference.multi_lora_linear_packed(**{k: v.double() for k, v in args.items() if k != "adapters"},
                                                  adapters=kernels.pack_adapters(
                                                      [a.double() for a in inputs["lora_As"]],
                                                      [b.double() for b in inputs["lora_Bs"]], inputs["scalings"]),
                                                  adapter_index=static_seq[:, None].expand(32, 4))
        assert_rel_error(y_static, want, torch.bfloat16)
